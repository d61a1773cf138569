"""Admin API, releases: image upload, release upload, delta upload, release detail.

Deltas are uploaded per release (``POST /admin/v1/releases/{id}/deltas?patch=<blob>``, body the
delta envelope) and verified the same way (:func:`_verify_delta`).

Release upload is where the "server holds no signing key" property is enforced from the other
side: the server refuses a manifest that does not verify against its trust anchors, and checks
the uploaded image against the signed digest and size, so it never offers devices something
they would have to refuse.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...crypto.algorithms import HashAlg, StreamingHasher
from ...errors import ErrorCode, OtaError, ServerError
from ...wire import decimal
from ..storage import admin_queries as q
from ..storage import store
from ..storage.blobs import check_name
from .auth import authorize
from .rotation import check_release_signers

if TYPE_CHECKING:
    from ..context import ServerContext


def release_routes(srv: ServerContext) -> list[Route]:
    """Image upload, release and delta upload (verified against the trust anchors), release
    detail."""

    async def upload_image(request: Request) -> Response:
        await authorize(srv, request, "release")
        cl = request.headers.get("content-length")
        declared = decimal(cl)
        if declared is not None and declared > srv.settings.max_image:
            raise ServerError(ErrorCode.TOO_LARGE, "image over the upload limit", 413)
        name, size = await srv.blobs.put_async(request.stream(), srv.settings.max_image)
        return JSONResponse({"blob": name, "size": size}, status_code=201)

    async def create_release(request: Request) -> Response:
        who = await authorize(srv, request, "release")
        image_blob = check_name(request.query_params.get("image", ""))
        envelope = await srv.read_body(request, srv.settings.max_envelope)
        resolver = await run_in_threadpool(srv.trust.fresh)  # the database's newest anchors
        if resolver is None:
            raise ServerError(
                ErrorCode.UNTRUSTED_KEY, "server has no trust anchors configured", 409
            )
        values = await run_in_threadpool(_verify_release, srv, envelope, image_blob, resolver)
        values["uploaded_by"] = who

        def insert() -> int:
            with srv.db.write() as conn:
                check_release_signers(conn, values["signers"])  # E_KEY_RETIRED after advance
                return store.insert_release(conn, values)

        rid = await run_in_threadpool(insert)
        out = {k: values[k] for k in ("version", "model", "hw_rev", "manifest_digest")}
        return JSONResponse({"id": rid, **out}, status_code=201)

    async def create_delta(request: Request) -> Response:
        who = await authorize(srv, request, "release")
        release_id = int(request.path_params["release_id"])
        patch_blob = check_name(request.query_params.get("patch", ""))
        envelope = await srv.read_body(request, srv.settings.max_envelope)
        resolver = await run_in_threadpool(srv.trust.fresh)  # the database's newest anchors
        if resolver is None:
            raise ServerError(
                ErrorCode.UNTRUSTED_KEY, "server has no trust anchors configured", 409
            )
        base_version = request.query_params.get("base_version")
        if base_version is not None and not (0 < len(base_version) <= 32):
            raise ServerError(ErrorCode.MALFORMED, "base_version too long", 400)

        def work() -> tuple[int, dict[str, Any]]:
            with srv.db.read() as conn:
                rel = store.release_by_id(conn, release_id)
            if rel is None:
                raise ServerError(ErrorCode.NOT_FOUND, f"no release {release_id}", 404)
            values = _verify_delta(srv, rel, envelope, patch_blob, resolver)
            values["base_version"] = base_version
            with srv.db.write() as conn:
                return store.insert_delta(conn, values), values

        did, values = await run_in_threadpool(work)
        log_values = {k: values[k] for k in ("release_id", "base_digest", "manifest_digest")}
        return JSONResponse({"id": did, "uploaded_by": who, **log_values}, status_code=201)

    async def release(request: Request) -> Response:
        await authorize(srv, request, "read")
        release_id = int(request.path_params["release_id"])

        def work() -> dict[str, Any]:
            with srv.db.read() as conn:
                return q.release_detail(conn, release_id)

        return JSONResponse(await run_in_threadpool(work))

    return [
        Route("/admin/v1/images", upload_image, methods=["POST"]),
        Route("/admin/v1/releases", create_release, methods=["POST"]),
        Route("/admin/v1/releases/{release_id:int}", release, methods=["GET"]),
        Route("/admin/v1/releases/{release_id:int}/deltas", create_delta, methods=["POST"]),
    ]


def _verify_release(
    srv: ServerContext, envelope: bytes, image_blob: str, resolver: Any
) -> dict[str, Any]:
    from ...manifest.conditions import check_fleet_wide
    from ...manifest.ids import class_id
    from ...manifest.verify import verify_envelope

    vm = verify_envelope(envelope, resolver, max_size=srv.settings.max_envelope)
    info = vm.info
    try:
        check_fleet_wide(info, store.now_s())  # what every device would refuse
    except OtaError as err:
        raise ServerError(err.code, err.detail, 400) from None
    model, hw_rev = info.text.get("model"), info.text.get("hw_rev")
    if not model or not hw_rev:
        raise ServerError(ErrorCode.MALFORMED, "manifest text lacks model/hw_rev", 400)
    if class_id(info.vendor_id, model, hw_rev) != info.class_id:
        raise ServerError(ErrorCode.CLASS_ID, "class-id does not match model/hw_rev text", 400)
    size = srv.blobs.size(image_blob)
    if size is None:
        raise ServerError(ErrorCode.NOT_FOUND, "image blob not uploaded", 404)
    if size != info.image_size:
        raise ServerError(
            ErrorCode.IMAGE_SIZE, f"image is {size} bytes, manifest says {info.image_size}", 400
        )
    hasher = StreamingHasher(info.digest_alg)
    for chunk in srv.blobs.open_range(image_blob, 0, max(size - 1, 0)):
        hasher.update(chunk)
    if size and hasher.digest() != info.image_digest:
        raise ServerError(ErrorCode.IMAGE_DIGEST, "image does not match the signed digest", 400)
    envelope_blob = srv.blobs.put(vm.envelope)
    return {
        "model": model,
        "hw_rev": hw_rev,
        "vendor_id": str(info.vendor_id),
        "class_id": str(info.class_id),
        "version": info.version,
        "min_version": info.min_version,
        "security_counter": info.security_counter,
        "sequence_number": info.sequence_number,
        "expires": info.expires,
        "digest_alg": "sha-256" if info.digest_alg == HashAlg.SHA256 else "sha-384",
        "manifest_digest": vm.manifest_digest.hex(),
        "envelope_blob": envelope_blob,
        "image_digest": info.image_digest.hex(),
        "image_size": info.image_size,
        "image_blob": image_blob,
        "signers": json.dumps([s.key_id.hex() for s in vm.signers]),
        "description": info.text.get("description"),
    }


def _verify_delta(
    srv: ServerContext, rel: Any, envelope: bytes, patch_blob: str, resolver: Any
) -> dict[str, Any]:
    """A delta upload is checked like a release: signature, then that it is *this* release
    (same version, sequence, counter, expiry, final digest and size), then the patch blob
    against the signed patch digest and size, then the patch header against the release image
    (size and SHA-256 fingerprint), so devices are never offered a delta they must refuse."""
    from ...delta import HEADER_MAX, patch_header
    from ...manifest.verify import verify_envelope

    vm = verify_envelope(envelope, resolver, max_size=srv.settings.max_envelope)
    info, d = vm.info, vm.info.delta
    if d is None:
        raise ServerError(ErrorCode.MALFORMED, "not a delta manifest (no delta part)", 400)
    alg = "sha-256" if info.digest_alg == HashAlg.SHA256 else "sha-384"
    same = {
        "class_id": (str(info.class_id), rel.class_id),
        "vendor_id": (str(info.vendor_id), rel.vendor_id),
        "version": (info.version, rel.version),
        "min_version": (info.min_version, rel.min_version),
        "security_counter": (info.security_counter, rel.security_counter),
        "sequence_number": (info.sequence_number, rel.sequence_number),
        "expires": (info.expires, rel.expires),
        "digest_alg": (alg, rel.digest_alg),
        "image_digest": (info.image_digest.hex(), rel.image_digest),
        "image_size": (info.image_size, rel.image_size),
    }
    for name, (got, want) in same.items():
        if got != want:
            raise ServerError(
                ErrorCode.CONFLICT, f"delta manifest differs from release {rel.id} in {name}", 409
            )
    size = srv.blobs.size(patch_blob)
    if size is None:
        raise ServerError(ErrorCode.NOT_FOUND, "patch blob not uploaded", 404)
    if size != d.patch_size:
        raise ServerError(
            ErrorCode.IMAGE_SIZE, f"patch is {size} bytes, manifest says {d.patch_size}", 400
        )
    hasher = StreamingHasher(info.digest_alg)
    head = bytearray()
    for chunk in srv.blobs.open_range(patch_blob, 0, max(size - 1, 0)):
        hasher.update(chunk)
        if len(head) < HEADER_MAX:
            head += chunk[: HEADER_MAX - len(head)]
    if not size or hasher.digest() != d.patch_digest:
        raise ServerError(ErrorCode.IMAGE_DIGEST, "patch does not match the signed digest", 400)
    try:
        hdr = patch_header(bytes(head))
    except OtaError as err:
        raise ServerError(err.code, f"patch header: {err.detail}", 400) from None
    if hdr.new_size != info.image_size or hdr.new_fp != bytes.fromhex(rel.image_blob)[:8]:
        raise ServerError(
            ErrorCode.DELTA_CORRUPT, "patch does not produce this release's image", 400
        )
    return {
        "release_id": rel.id,
        "base_digest": d.base_digest.hex(),
        "manifest_digest": vm.manifest_digest.hex(),
        "envelope_blob": srv.blobs.put(vm.envelope),
        "patch_digest": d.patch_digest.hex(),
        "patch_size": d.patch_size,
        "patch_blob": patch_blob,
    }
