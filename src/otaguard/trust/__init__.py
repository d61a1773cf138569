"""Trust: root key, operational-key authorizations, key lists, threshold policy. Pure logic."""

from .bundle import TrustBundle
from .documents import KeyAuthorization, KeyList, issue_authorization, parse_keylist, sign_keylist
from .model import KeyResolver, Role, Scope, StaticKeys, TrustedKey
from .store import TrustStore

__all__ = [
    "KeyAuthorization",
    "KeyList",
    "KeyResolver",
    "Role",
    "Scope",
    "StaticKeys",
    "TrustBundle",
    "TrustStore",
    "TrustedKey",
    "issue_authorization",
    "parse_keylist",
    "sign_keylist",
]
