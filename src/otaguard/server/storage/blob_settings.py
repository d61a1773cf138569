"""The blob store's settings (``[storage]`` in the server's file, ``--storage-backend`` and
``--s3-*`` on ``server run``): checked in one place for both, so a bad value is ``E_CONFIG``
naming the key however it was given. Credentials have no setting: they come from boto3's chain.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ...errors import ErrorCode, OtaError

# RunOptions field -> the config file's key.
STORAGE_KEYS = {
    "storage_backend": "storage.backend",
    "s3_bucket": "storage.s3_bucket",
    "s3_endpoint_url": "storage.s3_endpoint_url",
    "s3_region": "storage.s3_region",
    "s3_prefix": "storage.s3_prefix",
}


def _config_error(detail: str) -> OtaError:
    return OtaError(ErrorCode.CONFIG, detail)


_BUCKET = re.compile(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_REGION = re.compile(r"\A[a-z0-9-]{1,40}\Z")
_PREFIX = re.compile(r"\A[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?\Z")


def storage_value(field: str, name: str, v: Any) -> str:
    """A ``[storage]`` value, checked (``name`` is how the error names it). Credentials have
    no key: they come from boto3's chain (environment, profile, instance role), and an
    endpoint URL carrying a user or password is refused like a database URL with one."""
    if not isinstance(v, str) or not v:
        raise _config_error(f"{name} must be a non-empty string")
    if field == "storage_backend":
        if v not in ("local", "s3"):
            raise _config_error(f'{name} must be "local" or "s3"')
    elif field == "s3_bucket":
        if not _BUCKET.match(v) or ".." in v:
            raise _config_error(f"{name} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    elif field == "s3_endpoint_url":
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise _config_error(f"{name} must be an http(s) URL")
        if url.username or url.password:
            raise _config_error(
                f"{name}: no credentials in the config (use $AWS_ACCESS_KEY_ID and "
                "$AWS_SECRET_ACCESS_KEY, a profile or an instance role)"
            )
        if url.query or url.fragment:
            raise _config_error(f"{name} must not have a query or fragment")
    elif field == "s3_region":
        if not _REGION.match(v):
            raise _config_error(f"{name} is not a region name")
    elif field == "s3_prefix":
        if not _PREFIX.match(v) or any(p in (".", "..") for p in v.split("/")):
            raise _config_error(f"{name} must be a relative key prefix such as 'otaguard/blobs/'")
        return v if v.endswith("/") else v + "/"
    return v
