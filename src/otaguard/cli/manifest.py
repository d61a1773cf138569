"""``otaguard manifest``: inspect and verify SUIT manifests offline.

``show`` decodes any SUIT envelope (the draft's examples included) and labels the output
UNVERIFIED; ``verify`` checks signatures against explicit public keys or a trust bundle and
prints what the manifest authorizes only when it verified.
Exit codes: 0 valid, 1 invalid (the E_ code says why), 2 usage error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, OtaError
from ..fsutil import read_limited
from ..manifest.envelope import MAX_ENVELOPE_SIZE
from ..manifest.model import info_to_dict
from ..manifest.show import decode_unverified, jsonable, render_manifest
from ..manifest.verify import authenticate_envelope, verify_envelope
from ..trust.model import KeyResolver, StaticKeys

MAX_PEM = 16 * 1024
MAX_BUNDLE = 256 * 1024


def _read_input(path: Path, as_hex: bool) -> bytes:
    if not as_hex:
        return read_limited(path, MAX_ENVELOPE_SIZE)
    text = read_limited(path, 2 * MAX_ENVELOPE_SIZE + 64 * 1024)
    compact = b"".join(text.split())
    try:
        return bytes.fromhex(compact.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(ErrorCode.MALFORMED, f"{path} is not hex") from None


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def _lines(data: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:")
                out += _lines(v, indent + 1)
            else:
                out.append(f"{pad}{k}: {json.dumps(v)}")
    elif isinstance(data, list):
        for v in data:
            if isinstance(v, dict) and set(v) == {"command", "arg"}:
                arg = v["arg"]
                if isinstance(arg, dict | list) and arg:
                    out.append(f"{pad}- {v['command']}:")
                    out += _lines(arg, indent + 2)
                else:
                    out.append(f"{pad}- {v['command']} {json.dumps(arg)}")
            elif isinstance(v, dict | list) and v:
                out.append(f"{pad}-")
                out += _lines(v, indent + 1)
            else:
                out.append(f"{pad}- {json.dumps(v)}")
    else:
        out.append(f"{pad}{json.dumps(data)}")
    return out


@click.group()
def manifest() -> None:
    """Inspect and verify SUIT manifests (envelopes)."""


@manifest.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hex", "as_hex", is_flag=True, help="FILE holds hex text (whitespace ignored).")
def show(file: Path, as_json: bool, as_hex: bool) -> None:
    """Decode FILE WITHOUT checking signatures. Output is marked UNVERIFIED."""
    decoded = decode_unverified(_read_input(file, as_hex))
    if as_json:
        click.echo(_dump(decoded))
        return
    click.echo("*** UNVERIFIED: signatures NOT checked; do not trust these fields ***")
    body = {k: v for k, v in decoded.items() if k != "UNVERIFIED"}
    click.echo("\n".join(_lines(body)))


def _resolver(keys: tuple[Path, ...], trust: Path | None, threshold: int | None) -> KeyResolver:
    if trust is not None:
        from ..trust.bundle import TrustBundle  # lazily: the trust layer may be absent

        store = TrustBundle.load(read_limited(trust, MAX_BUNDLE)).store()
        if threshold is not None:
            raise OtaError(ErrorCode.USAGE, "--threshold applies to --key only")
        return store
    public = [PublicKey.from_pem(read_limited(p, MAX_PEM)) for p in keys]
    return StaticKeys(public, threshold=threshold or 1)


@manifest.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted public key (PEM); repeat for several.",
)
@click.option(
    "--trust",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust bundle (root key + signed key list) as provisioned on devices.",
)
@click.option("--threshold", type=click.IntRange(1, 16), help="Signatures required (--key).")
@click.option("--now", type=int, help="Judge key validity at this POSIX time (default: now).")
@click.option(
    "--any-profile",
    is_flag=True,
    help="Verify any SUIT envelope (e.g. the draft's examples), not only the otaguard profile.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hex", "as_hex", is_flag=True, help="FILE holds hex text (whitespace ignored).")
@click.pass_context
def verify(
    ctx: click.Context,
    file: Path,
    keys: tuple[Path, ...],
    trust: Path | None,
    threshold: int | None,
    now: int | None,
    any_profile: bool,
    as_json: bool,
    as_hex: bool,
) -> None:
    """Verify FILE's signatures (--key PUB.pem ... or --trust BUNDLE) and print its fields."""
    if bool(keys) == (trust is not None):
        click.echo("otaguard: error E_USAGE: give --key PUB.pem (repeatable) or --trust", err=True)
        ctx.exit(2)
    when = int(time.time()) if now is None else now
    try:
        resolver = _resolver(keys, trust, threshold)
        data = _read_input(file, as_hex)
        result: dict[str, Any] = {"valid": True}
        if any_profile:
            auth = authenticate_envelope(data, resolver, now=when)
            result["manifest_digest"] = auth.manifest_digest.hex()
            result["signers"] = [s.key_id.hex() for s in auth.signers]
            result["tagged"] = auth.tagged
            result["manifest"] = render_manifest(auth.manifest)
            result["severed"] = sorted(auth.severed)
            result["integrated"] = {k: len(v) for k, v in auth.integrated.items()}
        else:
            vm = verify_envelope(data, resolver, now=when)
            if vm.info.expires is not None and when > vm.info.expires:  # as devices judge it
                # The signatures hold, but no device installs it: say so, never "VALID".
                raise OtaError(
                    ErrorCode.EXPIRED,
                    f"signatures verified, but the manifest expired at {vm.info.expires} "
                    f"(checked at {when}); devices refuse it",
                )
            result.update(info_to_dict(vm.info))
            result["manifest_digest"] = vm.manifest_digest.hex()
            result["signers"] = [s.key_id.hex() for s in vm.signers]
            result["envelope_size"] = len(vm.envelope)
    except OtaError as err:
        if err.code == ErrorCode.USAGE:
            click.echo(f"otaguard: error {err.code.value}: {err.detail}", err=True)
            ctx.exit(2)
        failure = {"valid": False, "error": err.code.value, "detail": err.detail}
        if as_json:
            click.echo(_dump(failure))
        else:
            click.echo(f"INVALID: {err.code.value}: {err.detail}")
        ctx.exit(1)
    if as_json:
        click.echo(_dump(jsonable(result)))
    else:
        click.echo("VALID: signature(s) verified")
        click.echo("\n".join(_lines({k: v for k, v in result.items() if k != "valid"})))
