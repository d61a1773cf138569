"""MCUboot images on the update server: upload check, per-class format, check-in offer.

A release stays one row in ``releases`` (its SUIT manifest is what campaigns, assignments and
rotation work on); its MCUboot image is an extra artifact of it. Devices of a class configured
for MCUboot (``PUT /admin/v1/classes/{class_id}/format``) are offered that image instead of the
SUIT manifest, through the same assignments and campaigns.

The upload check (``POST /admin/v1/releases/{id}/mcuboot?image=<blob>``) keeps the server's
promise of never offering what a device must refuse, without the server holding a key: the
image must parse strictly, be signed by one of the release's signers that the trust anchors
still trust for firmware (KEYHASH selects it, the signature must verify), and carry exactly the
release's image bytes, version and security counter.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...crypto.algorithms import CoseAlg, HashAlg, digest_bytes
from ...crypto.keys import PublicKey
from ...errors import CryptoError, ErrorCode, OtaError, ServerError
from ...mcuboot.image import MAX_MCUBOOT_IMAGE, ImageVersion, verify_image
from ...trust.model import Role
from ..storage import models as m
from ..storage import store
from ..storage.blobs import check_name
from ..storage.mcuboot import mcuboot_row
from ..storage.prepared import Record
from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext

FORMATS = ("suit", "mcuboot")
_ALGS = (CoseAlg.ED25519, CoseAlg.ESP256)


def _signer_keys(resolver: Any, rel: Record) -> list[PublicKey]:
    """The release's signers that the anchors still trust for firmware (now)."""
    keys: list[PublicKey] = []
    first_error: OtaError | None = None
    for kid in json.loads(rel.signers):
        for alg in _ALGS:
            try:
                keys.append(resolver.resolve(bytes.fromhex(kid), alg, Role.FIRMWARE, None).key)
                break
            except CryptoError as err:
                if err.code != ErrorCode.ALGORITHM:
                    first_error = first_error or err
                    break
            except OtaError as err:
                first_error = first_error or err
                break
    if not keys:
        raise first_error or OtaError(ErrorCode.UNTRUSTED_KEY, "no trusted signer")
    return keys


def verify_upload(srv: ServerContext, rel: Record, blob: str, resolver: Any) -> dict[str, Any]:
    size = srv.blobs.size(blob)
    if size is None:
        raise ServerError(ErrorCode.NOT_FOUND, "MCUboot image blob not uploaded", 404)
    if size > MAX_MCUBOOT_IMAGE:
        raise ServerError(ErrorCode.TOO_LARGE, "MCUboot image too large", 413)
    data = srv.blobs.read(blob, MAX_MCUBOOT_IMAGE)
    try:
        v = verify_image(data, _signer_keys(resolver, rel))
    except OtaError as err:
        raise ServerError(err.code, f"MCUboot image: {err.detail}", 400) from None
    alg = HashAlg.SHA256 if rel.digest_alg == "sha-256" else HashAlg.SHA384
    same = {
        "version": (str(v.version), str(ImageVersion.from_release(rel.version))),
        "security_counter": (v.security_counter, rel.security_counter),
        "image": (digest_bytes(v.parsed.image, alg).hex(), rel.image_digest),
    }
    for name, (got, want) in same.items():
        if got != want:
            raise ServerError(
                ErrorCode.CONFLICT, f"MCUboot image differs from release {rel.id} in {name}", 409
            )
    return {
        "release_id": rel.id,
        "blob": blob,
        "size": size,
        "mcuboot_version": str(v.version),
        "key_id": v.key.key_id.hex(),
    }


def mcuboot_routes(srv: ServerContext) -> list[Route]:

    async def upload(request: Request) -> Response:
        who = await authorize(srv, request, "release")
        release_id = int(request.path_params["release_id"])
        blob = check_name(request.query_params.get("image", ""))
        resolver = await run_in_threadpool(srv.trust.fresh)  # the database's newest anchors
        if resolver is None:
            raise ServerError(
                ErrorCode.UNTRUSTED_KEY, "server has no trust anchors configured", 409
            )

        def work() -> dict[str, Any]:
            with srv.db.read() as conn:
                rel = store.release_by_id(conn, release_id)
            if rel is None:
                raise ServerError(ErrorCode.NOT_FOUND, f"no release {release_id}", 404)
            values = verify_upload(srv, rel, blob, resolver)
            with srv.db.write() as conn:
                if mcuboot_row(conn, release_id) is not None:
                    raise ServerError(
                        ErrorCode.EXISTS, f"release {release_id} has an MCUboot image", 409
                    )
                conn.execute(
                    insert(m.release_mcuboot).values(
                        **values, uploaded_by=who, created_at=store.now_s()
                    )
                )
            return values

        return JSONResponse(await run_in_threadpool(work), status_code=201)

    async def set_format(request: Request) -> Response:
        await authorize(srv, request, "release")
        try:
            cid = str(uuid.UUID(request.path_params["class_id"]))
        except ValueError:
            raise ServerError(ErrorCode.MALFORMED, "class_id must be a UUID", 400) from None
        body = await srv.read_json(request)
        fmt = body.get("format")
        if set(body) != {"format"} or fmt not in FORMATS:
            raise ServerError(ErrorCode.MALFORMED, f"want {{'format': one of {FORMATS}}}", 400)

        def work() -> None:
            with srv.db.write() as conn:
                conn.execute(delete(m.class_formats).where(m.class_formats.c.class_id == cid))
                if fmt != "suit":
                    conn.execute(
                        insert(m.class_formats).values(
                            class_id=cid, format=fmt, updated_at=store.now_s()
                        )
                    )

        await run_in_threadpool(work)
        return JSONResponse({"class_id": cid, "format": fmt})

    return [
        Route("/admin/v1/releases/{release_id:int}/mcuboot", upload, methods=["POST"]),
        Route("/admin/v1/classes/{class_id}/format", set_format, methods=["PUT"]),
    ]
