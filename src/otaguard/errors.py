"""Stable error codes and the one exception hierarchy every layer raises.

Codes are part of the public interface: devices report them to the server, the CLI prints them,
operators grep logs for them. A code is never renamed or reused for a different meaning; new
failure kinds get new codes. Callers branch on ``err.code``, never on message text.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # --- input shape -------------------------------------------------------------------------
    MALFORMED = "E_MALFORMED"  # not well-formed CBOR/PEM/JSON, wrong types, missing fields
    TOO_LARGE = "E_TOO_LARGE"  # an object over its hard size/depth/count limit
    UNSUPPORTED = "E_UNSUPPORTED"  # well-formed but uses a feature we do not implement
    CRITICAL_UNKNOWN = "E_CRITICAL_UNKNOWN"  # unknown element that must be understood
    VERSION = "E_VERSION"  # wrong document/manifest format version
    FIELD_RANGE = "E_FIELD_RANGE"  # a value does not fit a field of the target format (MCUboot)
    USAGE = "E_USAGE"  # bad command-line or API arguments
    # --- cryptography --------------------------------------------------------------------
    ALGORITHM = "E_ALGORITHM"  # algorithm or key type not allowed (RSA, unknown COSE alg)
    SIGNATURE = "E_SIGNATURE"  # a signature does not verify
    DIGEST = "E_DIGEST"  # a digest over received bytes does not match the signed one
    KEY_FORMAT = "E_KEY_FORMAT"  # a key that cannot be parsed/decrypted
    # --- trust -------------------------------------------------------------------------------
    UNTRUSTED_KEY = "E_UNTRUSTED_KEY"  # signer not in the trusted key list
    KEY_EXPIRED = "E_KEY_EXPIRED"  # outside the authorization's validity window
    KEY_REVOKED = "E_KEY_REVOKED"
    KEY_SCOPE = "E_KEY_SCOPE"  # key not authorized for this vendor/class
    KEY_ROLE = "E_KEY_ROLE"  # key lacks the role (firmware/keylist) for this document
    THRESHOLD = "E_THRESHOLD"  # fewer distinct trusted signatures than policy requires
    REPLAY = "E_REPLAY"  # version/sequence not above the stored one
    EMPTY_KEYLIST = "E_EMPTY_KEYLIST"  # an update would leave no usable key
    NO_AUTH = "E_NO_AUTH"  # no authentication block at all
    # --- keys / HSM -------------------------------------------------------------------------
    PIN = "E_PIN"  # wrong or missing PIN/passphrase
    TOKEN_NOT_FOUND = "E_TOKEN_NOT_FOUND"
    KEY_NOT_FOUND = "E_KEY_NOT_FOUND"
    HSM = "E_HSM"  # any other PKCS#11 failure
    EXISTS = "E_EXISTS"  # refusing to overwrite an existing key/file/object
    # --- manifest conditions (checked on device before download) ------------------------
    VENDOR_ID = "E_VENDOR_ID"
    CLASS_ID = "E_CLASS_ID"
    MIN_VERSION = "E_MIN_VERSION"
    SECURITY_COUNTER = "E_SECURITY_COUNTER"
    EXPIRED = "E_EXPIRED"  # manifest use-before passed
    IMAGE_SIZE = "E_IMAGE_SIZE"
    IMAGE_DIGEST = "E_IMAGE_DIGEST"
    # --- signing service -------------------------------------------------------------------
    POLICY = "E_POLICY"  # signing request refused by policy
    FAST_FORWARD = "E_FAST_FORWARD"  # counter/sequence/version jump too far (fast-forward attack)
    DOWNGRADE = "E_DOWNGRADE"  # version not monotonic without authorization
    AUTH = "E_AUTH"  # missing/invalid credential
    FORBIDDEN = "E_FORBIDDEN"  # credential valid but role insufficient
    CSRF = "E_CSRF"  # a dashboard form without this session's anti-forgery token
    AUDIT_CHAIN = "E_AUDIT_CHAIN"  # audit record edited/removed/reordered
    AUDIT_SEAL = "E_AUDIT_SEAL"  # seal signature invalid or tail truncated after a seal
    AUDIT_ANCHOR = "E_AUDIT_ANCHOR"  # verification asked to say OK without an anchor
    # --- device ------------------------------------------------------------------------------
    FLASH = "E_FLASH"  # flash read/program/erase failure
    POWER_CUT = "E_POWER_CUT"  # injected power loss (simulation only)
    SLOT_FULL = "E_SLOT_FULL"  # image does not fit the slot
    NO_VALID_SLOT = "E_NO_VALID_SLOT"
    # Storage unusable: a device's secure-storage record unreadable in both copies; on the
    # server, the blob store unreachable or failing (503, retry later).
    STORAGE = "E_STORAGE"
    OTP_WRITTEN = "E_OTP_WRITTEN"  # write-once area already programmed
    COUNTER_DECREASE = "E_COUNTER_DECREASE"
    SELF_TEST = "E_SELF_TEST"
    STATE = "E_STATE"  # operation not valid in the current state
    TRANSPORT = "E_TRANSPORT"  # network/file transport failure
    WATCHDOG = "E_WATCHDOG"  # test-booted image not confirmed within N boots; reverted
    WOULD_BRICK = "E_WOULD_BRICK"  # unused since the key-list check was dropped; never reused
    CONFIG = "E_CONFIG"  # configuration missing, unreadable or invalid (agent, services)
    SLOT_DEVICE = "E_SLOT_DEVICE"  # a slot's block device is missing or unusable
    BOOT_ENV = "E_BOOT_ENV"  # bootloader environment unreadable in every copy, or not ours
    TPM = "E_TPM"  # the configured TPM is absent, unreachable or failed a command
    TPM_LOCKOUT = "E_TPM_LOCKOUT"  # the TPM is in dictionary-attack lockout
    TPM_AUTH = "E_TPM_AUTH"  # the TPM refused an authorization (wrong owner password)
    TPM_NV = "E_TPM_NV"  # a TPM NV index or key at our handle is missing or not as defined
    REBOOT = "E_REBOOT"  # the agent asked the system to reboot (not a failure)
    # --- delta -------------------------------------------------------------------------------
    DELTA_BASE = "E_DELTA_BASE"  # patch is for another base image
    DELTA_CORRUPT = "E_DELTA_CORRUPT"  # truncated/corrupt patch stream
    DELTA_BOUNDS = "E_DELTA_BOUNDS"  # patch would read/write outside the slot
    DELTA_BOMB = "E_DELTA_BOMB"  # decompression exceeds the declared/allowed size
    # --- server ------------------------------------------------------------------------------
    CERT = "E_CERT"  # client certificate missing/invalid/other CA
    CERT_REVOKED = "E_CERT_REVOKED"
    CERT_EXPIRED = "E_CERT_EXPIRED"  # device certificate past its not-after on the server clock
    CERT_SUPERSEDED = "E_CERT_SUPERSEDED"  # replaced by a renewed certificate the device used
    NO_ISSUER = "E_NO_ISSUER"  # certificate renewal asked of a server configured without a CA
    RATE_LIMIT = "E_RATE_LIMIT"
    NOT_FOUND = "E_NOT_FOUND"
    CONFLICT = "E_CONFLICT"
    RANGE = "E_RANGE"
    IDENTITY = "E_IDENTITY"  # device reports for a serial that is not its certificate's
    CAMPAIGN = "E_CAMPAIGN"  # campaign spec invalid (phases, thresholds, empty target)
    CAMPAIGN_STATE = "E_CAMPAIGN_STATE"  # illegal campaign transition (e.g. resume a draft)
    NO_PATH = "E_NO_PATH"  # no chain of releases takes this device to the target version
    INCOMPATIBLE = "E_INCOMPATIBLE"  # release cannot be installed by the target
    KEY_RETIRED = "E_KEY_RETIRED"  # release signed with a key rotated out for new releases
    ROTATION_STATE = "E_ROTATION_STATE"  # rotation step out of order (advance before start...)
    ROTATION_PENDING = "E_ROTATION_PENDING"  # too little of the fleet on the new key list yet
    DUPLICATE_SIGNER = "E_DUPLICATE_SIGNER"  # the same key/officer given or approving twice
    FOUR_EYES = "E_FOUR_EYES"  # a requester approving their own co-signing request
    REQUEST_CHANGED = "E_REQUEST_CHANGED"  # approval for other bytes than the request holds
    REQUEST_EXPIRED = "E_REQUEST_EXPIRED"  # co-signing request past its deadline
    PENDING = "E_PENDING"  # co-signing request still waits for approvals
    DATABASE = "E_DATABASE"
    INTERNAL = "E_INTERNAL"


class OtaError(Exception):
    """Base of every error otaguard raises on purpose.

    ``detail`` is a one-line human explanation; it must never contain secrets (PINs,
    passphrases, private key material).
    """

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, code: ErrorCode | None = None, detail: str = "") -> None:
        self.code: ErrorCode = code if code is not None else self.default_code
        self.detail = detail
        super().__init__(f"{self.code.value}: {detail}" if detail else self.code.value)

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code.value, "detail": self.detail}


class FormatError(OtaError):
    """Input that is not the document it claims to be (shape, size, encoding)."""

    default_code = ErrorCode.MALFORMED


class CryptoError(OtaError):
    """A cryptographic check failed or a key/algorithm is not acceptable."""

    default_code = ErrorCode.SIGNATURE


class TrustError(OtaError):
    """A signer is not trusted for this document, or a trust-state change is refused."""

    default_code = ErrorCode.UNTRUSTED_KEY


class KeyStoreError(OtaError):
    """HSM or key-file access failed."""

    default_code = ErrorCode.HSM


class ManifestConditionError(OtaError):
    """A verified manifest does not apply to this device (model, version, counter, expiry)."""

    default_code = ErrorCode.STATE


class PolicyError(OtaError):
    """The signing service refused a request."""

    default_code = ErrorCode.POLICY


class AuditError(OtaError):
    """The audit log is not intact."""

    default_code = ErrorCode.AUDIT_CHAIN

    def __init__(
        self, code: ErrorCode | None = None, detail: str = "", record: int | None = None
    ) -> None:
        super().__init__(code, detail)
        self.record = record


class DeviceError(OtaError):
    """A device-side operation failed; the running firmware is untouched."""

    default_code = ErrorCode.STATE


class FlashError(DeviceError):
    default_code = ErrorCode.FLASH


class PowerCut(FlashError):
    """Injected power loss. Only the flash simulator raises it; the device 'reboots' after."""

    default_code = ErrorCode.POWER_CUT


class DeltaError(OtaError):
    default_code = ErrorCode.DELTA_CORRUPT


class ServerError(OtaError):
    """An update-server request was refused. ``status`` is the HTTP status to send."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, code: ErrorCode | None = None, detail: str = "", status: int = 400) -> None:
        super().__init__(code, detail)
        self.status = status


class UsageError(OtaError):
    default_code = ErrorCode.USAGE
