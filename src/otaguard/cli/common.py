"""Shared CLI plumbing: output, error reporting, and how a command obtains a signer.

Secrets never travel on the command line (it is visible in ``ps`` and shell history): PINs and
passphrases come from environment variables or an interactive prompt.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from ..crypto.algorithms import CoseAlg, parse_alg_name
from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

PIN_ENV = "OTAGUARD_PKCS11_PIN"
PASSPHRASE_ENV = "OTAGUARD_KEY_PASSPHRASE"
MODULE_ENV = "OTAGUARD_PKCS11_MODULE"
MAX_SIGNERS = 8  # authentication blocks a SUIT envelope may carry (manifest/envelope.py)


def emit(data: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    else:
        click.echo(text(data) if text else _plain(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _plain(data: Any) -> str:
    if isinstance(data, dict):
        width = max((len(str(k)) for k in data), default=0)
        return "\n".join(f"{k:<{width}}  {_plain_value(v)}" for k, v in data.items())
    return str(data)


def _plain_value(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return ", ".join(_plain_value(x) for x in v)
    return str(v)


def secret_from_env_or_prompt(env: str, prompt: str, *, confirm: bool = False) -> bytes:
    value = os.environ.get(env)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise OtaError(ErrorCode.PIN, f"{prompt} required: set {env} (no terminal to prompt)")
    entered: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return entered.encode()


def _key_options(func: F, *, repeatable: bool) -> F:
    """The key-selecting options, once for both forms: one key, or repeatable URIs and files."""
    again = " (repeatable: each key signs)" if repeatable else ""
    opts = [
        click.option(
            "--pkcs11-uri",
            "pkcs11_uris" if repeatable else "pkcs11_uri",
            metavar="URI",
            multiple=repeatable,
            help=f"Key in an HSM, e.g. 'pkcs11:token=ota;object=release-2026'{again}. "
            f"PIN from ${PIN_ENV} or a prompt.",
        ),
        click.option(
            "--pkcs11-module",
            metavar="PATH",
            envvar=MODULE_ENV,
            help=f"PKCS#11 module (.so); default from ${MODULE_ENV} or SoftHSM2.",
        ),
        click.option(
            "--key-file",
            "key_files" if repeatable else "key_file",
            type=click.Path(dir_okay=False, path_type=Path),
            multiple=repeatable,
            help=f"DEVELOPMENT ONLY: encrypted PKCS#8 key file{again}; passphrase from "
            f"${PASSPHRASE_ENV} or a prompt.",
        ),
        click.option(
            "--alg",
            "alg_name",
            metavar="ALG",
            help="COSE algorithm: ed25519 (default for Ed25519 keys), eddsa, "
            "esp256 (default for P-256), es256.",
        ),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def signer_options(func: F) -> F:
    """Options that select a signing key: a PKCS#11 URI, or a development key file."""
    return _key_options(func, repeatable=False)


def load_signer(
    pkcs11_uri: str | None, pkcs11_module: str | None, key_file: Path | None, alg_name: str | None
) -> Signer:
    alg: CoseAlg | None = parse_alg_name(alg_name) if alg_name else None
    if bool(pkcs11_uri) == bool(key_file):
        raise UsageError(ErrorCode.USAGE, "give exactly one of --pkcs11-uri or --key-file")
    if key_file is not None:
        from ..crypto.software import SoftwareSigner

        click.echo(
            "WARNING: --key-file is for development only; production keys belong in "
            "an HSM (--pkcs11-uri).",
            err=True,
        )
        passphrase = secret_from_env_or_prompt(PASSPHRASE_ENV, "Key passphrase")
        return SoftwareSigner.load(key_file, passphrase, alg)
    from ..crypto.pkcs11 import Pkcs11Signer

    assert pkcs11_uri is not None
    pin = secret_from_env_or_prompt(PIN_ENV, "Token PIN")
    return Pkcs11Signer.open(pkcs11_uri, pin=pin.decode(), module=pkcs11_module, alg=alg)


def multi_signer_options(func: F) -> F:
    """Like :func:`signer_options`, but ``--pkcs11-uri`` and ``--key-file`` repeat: one signature
    per key, for a key list whose threshold asks for several (k-of-n). A plain click option
    keeps only its last value, which is how a second ``--pkcs11-uri`` used to vanish."""
    return _key_options(func, repeatable=True)


def load_signers(
    pkcs11_uris: Sequence[str],
    pkcs11_module: str | None,
    key_files: Sequence[Path],
    alg_name: str | None,
) -> list[Signer]:
    """Every given key, in order (HSM keys first); ``E_DUPLICATE_SIGNER`` when two options
    name the same key, spelled alike or not: a key signing twice still counts once on a device,
    so the release would silently miss its threshold."""
    if not pkcs11_uris and not key_files:
        raise UsageError(ErrorCode.USAGE, "give --pkcs11-uri or --key-file (repeatable)")
    if len(pkcs11_uris) + len(key_files) > MAX_SIGNERS:
        raise UsageError(ErrorCode.USAGE, f"at most {MAX_SIGNERS} signing keys (one envelope)")
    for what, values in (("--pkcs11-uri", list(pkcs11_uris)), ("--key-file", key_files)):
        names = [str(v) for v in values]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise OtaError(ErrorCode.DUPLICATE_SIGNER, f"{what} {dup} is given twice")
    signers: list[Signer] = []
    try:
        for uri in pkcs11_uris:
            signers.append(load_signer(uri, pkcs11_module, None, alg_name))
        for kf in key_files:
            signers.append(load_signer(None, pkcs11_module, kf, alg_name))
        seen: dict[bytes, int] = {}
        for i, s in enumerate(signers):
            kid = s.public_key.key_id
            if kid in seen:
                raise OtaError(
                    ErrorCode.DUPLICATE_SIGNER,
                    f"signers {seen[kid] + 1} and {i + 1} are the same key {kid.hex()}",
                )
            seen[kid] = i
    except BaseException:
        close_signers(signers)
        raise
    return signers


def close_signers(signers: Sequence[Signer]) -> None:
    for s in signers:
        close = getattr(s, "close", None)
        if callable(close):
            close()


# --- credential lifetimes (signing-service tokens, admin tokens) ---------------------------------
_DURATION = re.compile(r"\A([1-9][0-9]{0,5})([dh])\Z")
MAX_VALID_FOR = 3650 * 86400
DEFAULT_VALID_FOR = "90d"


def parse_duration(text: str) -> int:
    """``"90d"`` / ``"12h"`` → seconds (at most 3650 days); anything else is ``E_USAGE``."""
    m = _DURATION.match(text)
    if m is None:
        raise UsageError(
            ErrorCode.USAGE, f"--valid-for: want a duration like 90d or 12h, got {text!r}"
        )
    seconds = int(m.group(1)) * (86400 if m.group(2) == "d" else 3600)
    if seconds > MAX_VALID_FOR:
        raise UsageError(ErrorCode.USAGE, f"--valid-for: at most 3650d, got {text!r}")
    return seconds


def lifetime_options(valid_for_help: str, no_expiry_help: str) -> Callable[[F], F]:
    """``--valid-for DURATION`` / ``--no-expiry`` for a command that mints a credential: one
    spelling and one default for every token otaguard issues."""

    def deco(f: F) -> F:
        f = click.option("--no-expiry", is_flag=True, help=no_expiry_help)(f)
        return click.option(
            "--valid-for",
            metavar="DURATION",
            default=None,
            help=f"{valid_for_help}  [default: {DEFAULT_VALID_FOR}]",
        )(f)

    return deco


def lifetime_seconds(valid_for: str | None, no_expiry: bool) -> int | None:
    """The credential's lifetime in seconds, or None for ``--no-expiry``; ``E_USAGE`` for a
    bad duration or both options (checked before anything is written)."""
    if no_expiry and valid_for is not None:
        raise UsageError(ErrorCode.USAGE, "--valid-for and --no-expiry exclude each other")
    return (
        None if no_expiry else parse_duration(DEFAULT_VALID_FOR if valid_for is None else valid_for)
    )
