"""The update server's configuration file (TOML; ``files/server.example.toml`` documents every
key), an alternative to ``otaguard server run``'s flags.

Every flag has a key; a flag given on the command line (or through its environment variable)
overrides the file. Strict on purpose, like the agent's and the signing service's files: an
unknown section or key, a wrong type or an out-of-range value is ``E_CONFIG`` naming the key,
before the server binds a socket or touches the database. Relative paths are relative to the
file's directory.

No secret goes into the file: the server's flags take none either (the TLS key and the fleet
CA are paths to files). The values that could carry one are the database URL, refused with a
password (give it in ``$OTAGUARD_DB_URL``, or use a ``PGPASSFILE`` or peer authentication),
and the S3 endpoint URL, refused with a user or password (S3 credentials come from boto3's
chain: the environment, a profile, an instance role).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..errors import ErrorCode, OtaError
from .storage.blob_settings import STORAGE_KEYS, storage_value

MAX_CONFIG = 64 * 1024

# (section, key) -> RunOptions field. "" is the top level.
_FIELDS: dict[tuple[str, str], str] = {
    ("", "data_dir"): "data_dir",
    ("", "db"): "db_url",
    ("tls", "ca_cert"): "ca_cert",
    ("tls", "cert"): "tls_cert",
    ("tls", "key"): "tls_key",
    ("device", "host"): "host",
    ("device", "port"): "port",
    ("device", "trusted_proxies"): "trusted_proxies",
    ("device", "proxy_only"): "proxy_only",
    ("device", "rate"): "device_rate",
    ("device", "burst"): "device_burst",
    ("device", "workers"): "workers",
    ("admin", "host"): "admin_host",
    ("admin", "port"): "admin_port",
    ("limits", "ip_rate"): "ip_rate",
    ("limits", "ip_burst"): "ip_burst",
    ("trust", "bundle"): "trust_bundle",
    ("trust", "keys"): "trusted_keys",
    ("listener", "header_timeout"): "header_timeout",
    ("listener", "body_timeout"): "body_timeout",
    ("listener", "body_min_rate"): "body_min_rate",
    ("audit", "seal_pkcs11_uri"): "audit_seal_pkcs11_uri",
    ("audit", "seal_key_file"): "audit_seal_key_file",
    ("audit", "signing_log"): "signing_audit_log",
    ("audit", "signing_keys"): "signing_audit_keys",
    ("dashboard", "session_key_file"): "dashboard_session_key_file",
    ("renewal", "issuing_ca_dir"): "issuing_ca_dir",
    ("renewal", "cert_lifetime"): "cert_lifetime",
    ("pkcs11", "module"): "pkcs11_module",
    ("tuf", "timestamp_hours"): "tuf_timestamp_hours",
    ("tuf", "max_targets_days"): "tuf_max_targets_days",
    ("tuf", "snapshot_pkcs11_uri"): "tuf_snapshot_pkcs11_uri",
    ("tuf", "timestamp_pkcs11_uri"): "tuf_timestamp_pkcs11_uri",
    ("storage", "backend"): "storage_backend",
    ("storage", "s3_bucket"): "s3_bucket",
    ("storage", "s3_endpoint_url"): "s3_endpoint_url",
    ("storage", "s3_region"): "s3_region",
    ("storage", "s3_prefix"): "s3_prefix",
}
_SECTIONS = {s for s, _ in _FIELDS if s}
_PATHS = {
    "data_dir",
    "ca_cert",
    "tls_cert",
    "tls_key",
    "trust_bundle",
    "audit_seal_key_file",
    "issuing_ca_dir",
    "signing_audit_log",
    "dashboard_session_key_file",
}
_TEXTS = {"host", "admin_host", "db_url", "audit_seal_pkcs11_uri", "cert_lifetime", "pkcs11_module"}
_TEXTS |= {"tuf_snapshot_pkcs11_uri", "tuf_timestamp_pkcs11_uri"}
_PORTS = {"port", "admin_port"}
_COUNTS = {"device_burst", "ip_burst"}
_TUF = {"tuf_timestamp_hours": 24 * 366, "tuf_max_targets_days": 3660}  # field -> maximum
_RATES = {"device_rate", "ip_rate"}
_SECONDS = {"header_timeout", "body_timeout"}


def _fail(detail: str) -> OtaError:
    return OtaError(ErrorCode.CONFIG, detail)


def _name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def load_server_config(path: Path) -> dict[str, Any]:
    """The file's values as :class:`~otaguard.server.runtime.RunOptions` field names."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(f"config file {path} does not exist") from None
    except OSError as exc:
        raise _fail(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise _fail(f"config file {path} is larger than {MAX_CONFIG} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(f"{path}: not valid TOML: {exc}") from None
    return parse_server_config(doc, path.parent)


def parse_server_config(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for top, value in doc.items():
        if isinstance(value, dict):
            if top not in _SECTIONS:
                raise _fail(f"unknown section [{top}]")
            items = [(top, k, v) for k, v in value.items()]
        else:
            items = [("", top, value)]
        for section, key, v in items:
            field = _FIELDS.get((section, key))
            if field is None:
                raise _fail(f"unknown key {_name(section, key)}")
            out[field] = _value(field, _name(section, key), v, base)
    return out


def _value(field: str, name: str, v: Any, base: Path) -> Any:
    if field in STORAGE_KEYS:
        return storage_value(field, name, v)
    if field in _PATHS:
        if not isinstance(v, str) or not v:
            raise _fail(f"{name} must be a non-empty path string")
        return base / v
    if field in ("trusted_keys", "signing_audit_keys"):
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise _fail(f"{name} must be a list of path strings")
        return [base / x for x in v]
    if field == "trusted_proxies":
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise _fail(f"{name} must be a list of addresses or CIDR networks")
        return list(v)
    if field in _TEXTS:
        if not isinstance(v, str) or not v:
            raise _fail(f"{name} must be a non-empty string")
        if field == "db_url":
            _check_db_url(name, v)
        return v
    if field == "proxy_only":
        if not isinstance(v, bool):
            raise _fail(f"{name} must be true or false")
        return v
    if field in _PORTS:
        return _integer(name, v, 0, 65535)
    if field in _COUNTS:
        return _integer(name, v, 1, 10**9)
    if field == "workers":
        return _integer(name, v, 1, 64)
    if field in _TUF:
        return _integer(name, v, 1, _TUF[field])
    if field == "body_min_rate":
        return _integer(name, v, 1, 1 << 40)
    if field in _RATES:
        return _number(name, v, 1e-6, 1e9)
    if field in _SECONDS:
        return _number(name, v, 0.01, 86400.0)
    raise AssertionError(field)  # pragma: no cover - every field has a type above


def _integer(name: str, v: Any, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"{name} must be an integer in [{lo}, {hi}]")
    return v


def _number(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _fail(f"{name} must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _check_db_url(name: str, v: str) -> None:
    try:
        url = make_url(v)
    except Exception:  # sqlalchemy raises ArgumentError and ValueError for malformed URLs
        raise _fail(f"{name} is not a database URL") from None
    if url.password:
        raise _fail(
            f"{name}: no passwords in the config file (set $OTAGUARD_DB_URL, or use a "
            "PGPASSFILE or peer authentication)"
        )
