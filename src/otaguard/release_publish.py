"""Publish a ``release create`` output directory to the update server in one step.

The directory's ``release.json`` names the files (image, manifest, every delta's patch and
manifest) and their SUIT digests; this uploads what the server does not hold yet, through the
typed admin client. Publishing is idempotent: the server refuses the same manifest twice
(E_CONFLICT), so a release or delta whose manifest digest the server already lists is skipped
instead of uploaded — a re-run after a dropped connection finishes the job and never creates a
duplicate. A *different* manifest for a version the server already holds is still refused
(E_CONFLICT): that is a real conflict, not a re-run.

The server verifies everything again on upload (signature, digests, sizes, retired keys), so
nothing here needs to be trusted; the checks below only turn a damaged directory into one
clear error before any byte is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adminclient import AdminClient, AdminError, Release
from .errors import ErrorCode, FormatError, OtaError
from .fsutil import read_limited
from .wire import loads_json

SUMMARY_FILE = "release.json"
MAX_SUMMARY = 1 << 20
MAX_ENVELOPE = 1 << 20


@dataclass
class PublishedDelta:
    base_version: str | None
    id: int
    created: bool


@dataclass
class PublishResult:
    release_id: int
    model: str
    hw_rev: str
    version: str
    manifest_digest: str
    created: bool
    deltas: list[PublishedDelta] = field(default_factory=list)
    mcuboot: str | None = None  # "attached" / "already attached" when the dir has one

    def as_dict(self) -> dict[str, Any]:
        return {
            "release_id": self.release_id,
            "model": self.model,
            "hw_rev": self.hw_rev,
            "version": self.version,
            "manifest_digest": self.manifest_digest,
            "created": self.created,
            "deltas": [d.__dict__ for d in self.deltas],
            "mcuboot": self.mcuboot,
        }


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise FormatError(ErrorCode.MALFORMED, f"{where}: {key} missing or not a string")
    return v


def _member(directory: Path, name: str) -> Path:
    """A file the summary names: a plain name inside the directory, nothing else."""
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise FormatError(ErrorCode.MALFORMED, f"{SUMMARY_FILE} names a file outside: {name!r}")
    path = directory / name
    if not path.is_file():
        raise OtaError(ErrorCode.NOT_FOUND, f"{path}: missing")
    return path


def load_summary(directory: Path) -> dict[str, Any]:
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise OtaError(ErrorCode.NOT_FOUND, f"{directory}: no {SUMMARY_FILE} (not a release dir)")
    obj = loads_json(read_limited(path, MAX_SUMMARY))
    if not isinstance(obj, dict):
        raise FormatError(ErrorCode.MALFORMED, f"{path}: not a JSON object")
    return obj


def _find(releases: list[Release], digest: str) -> Release | None:
    return next((r for r in releases if r["manifest_digest"] == digest), None)


def publish_release(client: AdminClient, directory: Path) -> PublishResult:
    """Upload image + manifest + every delta of ``directory`` that the server lacks."""
    directory = Path(directory)
    s = load_summary(directory)
    where = str(directory / SUMMARY_FILE)
    image, manifest = s.get("image"), s.get("manifest")
    if not isinstance(image, dict) or not isinstance(manifest, dict):
        raise FormatError(ErrorCode.MALFORMED, f"{where}: image/manifest entries missing")
    model, hw_rev = _str(s, "model", where), _str(s, "hw_rev", where)
    digest = _str(manifest, "suit_digest", where)
    image_path = _member(directory, _str(image, "file", where))
    envelope = read_limited(_member(directory, _str(manifest, "file", where)), MAX_ENVELOPE)
    deltas = s.get("deltas", [])
    if not isinstance(deltas, list) or not all(isinstance(d, dict) for d in deltas):
        raise FormatError(ErrorCode.MALFORMED, f"{where}: deltas must be a list of objects")
    delta_files = []
    for d in deltas:
        dm = d.get("manifest")
        if not isinstance(dm, dict):
            raise FormatError(ErrorCode.MALFORMED, f"{where}: delta without manifest entry")
        patch = _member(directory, _str(d, "patch", where))
        denv = read_limited(_member(directory, _str(dm, "file", where)), MAX_ENVELOPE)
        base = d.get("base_version")
        delta_files.append(
            (patch, denv, _str(dm, "suit_digest", where), base if isinstance(base, str) else None)
        )

    existing = _find(client.list_releases(model=model, hw_rev=hw_rev), digest)
    created = existing is None
    if existing is None:
        blob = client.upload_blob(image_path)
        try:
            out = client.create_release(envelope, blob["blob"])
            release_id, version = out["id"], out["version"]
        except AdminError as err:
            again = _find(client.list_releases(model=model, hw_rev=hw_rev), digest)
            if err.code != ErrorCode.CONFLICT or again is None:
                raise
            release_id, version, created = again["id"], again["version"], False  # a racing run
    else:
        release_id, version = existing["id"], existing["version"]
    result = PublishResult(release_id, model, hw_rev, version, digest, created)

    mc = s.get("mcuboot")
    if isinstance(mc, dict):
        mc_path = _member(directory, _str(mc, "file", where))
        try:
            client.attach_mcuboot(release_id, client.upload_blob(mc_path)["blob"])
            result.mcuboot = "attached"
        except AdminError as err:
            if err.code != ErrorCode.EXISTS:
                raise
            result.mcuboot = "already attached"
    have = {d["manifest_digest"]: d["id"] for d in client.release(release_id).get("deltas", [])}
    for patch, denv, ddigest, base in delta_files:
        if ddigest in have:
            result.deltas.append(PublishedDelta(base, have[ddigest], False))
            continue
        pblob = client.upload_blob(patch)
        dout = client.create_delta(release_id, denv, pblob["blob"], base)
        result.deltas.append(PublishedDelta(base, dout["id"], True))
    return result
