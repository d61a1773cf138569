"""SUIT numbers (draft-ietf-suit-manifest-34 and its companion drafts) in one place.

Names follow the drafts' CDDL with the ``suit-`` prefix dropped. Companion-draft numbers are
taken from draft-ietf-suit-update-management (use-before, version, set-version, coswid ...),
draft-ietf-suit-trust-domains (dependencies, manifest-component-id, uninstall ...) and
draft-ietf-suit-firmware-encryption (encryption-info). The decoder uses these tables to tell
"known SUIT element we do not implement" (E_UNSUPPORTED) from "element nobody defined"
(E_CRITICAL_UNKNOWN).
"""

from __future__ import annotations

TAG_ENVELOPE = 107
TAG_SIGN1 = 18
TAG_MAC0 = 17
TAG_SIGN = 98
TAG_MAC = 97

# --- SUIT_Envelope keys ---------------------------------------------------------------------
ENV_DELEGATION = 1
ENV_AUTH = 2
ENV_MANIFEST = 3

# --- SUIT_Manifest keys ---------------------------------------------------------------------
MAN_VERSION = 1
MAN_SEQUENCE = 2
MAN_COMMON = 3
MAN_REFERENCE_URI = 4
MAN_COMPONENT_ID = 5  # trust-domains
MAN_SET_VERSION = 6  # update-management
MAN_VALIDATE = 7
MAN_LOAD = 8
MAN_INVOKE = 9
MAN_COSWID = 14  # update-management, severable
MAN_DEPENDENCY_RESOLUTION = 15  # trust-domains, severable
MAN_PAYLOAD_FETCH = 16
MAN_CANDIDATE_VERIFICATION = 18  # trust-domains, severable
MAN_INSTALL = 20
MAN_TEXT = 23
MAN_UNINSTALL = 24  # trust-domains

SEVERABLE = frozenset(
    {
        MAN_COSWID,
        MAN_DEPENDENCY_RESOLUTION,
        MAN_PAYLOAD_FETCH,
        MAN_CANDIDATE_VERIFICATION,
        MAN_INSTALL,
        MAN_TEXT,
    }
)
MANIFEST_KEYS = {
    MAN_VERSION: "manifest-version",
    MAN_SEQUENCE: "manifest-sequence-number",
    MAN_COMMON: "common",
    MAN_REFERENCE_URI: "reference-uri",
    MAN_COMPONENT_ID: "manifest-component-id",
    MAN_SET_VERSION: "set-version",
    MAN_VALIDATE: "validate",
    MAN_LOAD: "load",
    MAN_INVOKE: "invoke",
    MAN_COSWID: "coswid",
    MAN_DEPENDENCY_RESOLUTION: "dependency-resolution",
    MAN_PAYLOAD_FETCH: "payload-fetch",
    MAN_CANDIDATE_VERIFICATION: "candidate-verification",
    MAN_INSTALL: "install",
    MAN_TEXT: "text",
    MAN_UNINSTALL: "uninstall",
}
ENVELOPE_KEYS = {
    ENV_DELEGATION: "delegation",
    ENV_AUTH: "authentication-wrapper",
    ENV_MANIFEST: "manifest",
    **{k: MANIFEST_KEYS[k] for k in SEVERABLE},
}
# Manifest members that hold a command sequence (bstr .cbor SUIT_Command_Sequence).
COMMAND_SEQUENCES = frozenset(
    {
        MAN_VALIDATE,
        MAN_LOAD,
        MAN_INVOKE,
        MAN_DEPENDENCY_RESOLUTION,
        MAN_PAYLOAD_FETCH,
        MAN_CANDIDATE_VERIFICATION,
        MAN_INSTALL,
        MAN_UNINSTALL,
    }
)

# --- SUIT_Common keys -----------------------------------------------------------------------
COMMON_DEPENDENCIES = 1
COMMON_COMPONENTS = 2
COMMON_SHARED_SEQUENCE = 4
COMMON_KEYS = {
    COMMON_DEPENDENCIES: "dependencies",
    COMMON_COMPONENTS: "components",
    COMMON_SHARED_SEQUENCE: "shared-sequence",
}

# --- conditions and directives ------------------------------------------------------------
COND_VENDOR_ID = 1
COND_CLASS_ID = 2
COND_IMAGE_MATCH = 3
COND_USE_BEFORE = 4
COND_COMPONENT_SLOT = 5
COND_CHECK_CONTENT = 6
COND_DEPENDENCY_INTEGRITY = 7
COND_IS_DEPENDENCY = 8
DIR_PROCESS_DEPENDENCY = 11
DIR_SET_COMPONENT_INDEX = 12
COND_ABORT = 14
DIR_TRY_EACH = 15
DIR_WRITE = 18
DIR_SET_PARAMETERS = 19
DIR_OVERRIDE_PARAMETERS = 20
DIR_FETCH = 21
DIR_COPY = 22
DIR_INVOKE = 23
COND_DEVICE_ID = 24
COND_IMAGE_NOT_MATCH = 25
COND_MINIMUM_BATTERY = 26
COND_UPDATE_AUTHORIZED = 27
COND_VERSION = 28
DIR_WAIT = 29
DIR_SWAP = 31
DIR_RUN_SEQUENCE = 32
DIR_UNLINK = 33
DIR_OVERRIDE_MULTIPLE = 34
DIR_COPY_PARAMS = 35

COMMANDS = {
    COND_VENDOR_ID: "condition-vendor-identifier",
    COND_CLASS_ID: "condition-class-identifier",
    COND_IMAGE_MATCH: "condition-image-match",
    COND_USE_BEFORE: "condition-use-before",
    COND_COMPONENT_SLOT: "condition-component-slot",
    COND_CHECK_CONTENT: "condition-check-content",
    COND_DEPENDENCY_INTEGRITY: "condition-dependency-integrity",
    COND_IS_DEPENDENCY: "condition-is-dependency",
    DIR_PROCESS_DEPENDENCY: "directive-process-dependency",
    DIR_SET_COMPONENT_INDEX: "directive-set-component-index",
    COND_ABORT: "condition-abort",
    DIR_TRY_EACH: "directive-try-each",
    DIR_WRITE: "directive-write",
    DIR_SET_PARAMETERS: "directive-set-parameters",
    DIR_OVERRIDE_PARAMETERS: "directive-override-parameters",
    DIR_FETCH: "directive-fetch",
    DIR_COPY: "directive-copy",
    DIR_INVOKE: "directive-invoke",
    COND_DEVICE_ID: "condition-device-identifier",
    COND_IMAGE_NOT_MATCH: "condition-image-not-match",
    COND_MINIMUM_BATTERY: "condition-minimum-battery",
    COND_UPDATE_AUTHORIZED: "condition-update-authorized",
    COND_VERSION: "condition-version",
    DIR_WAIT: "directive-wait",
    DIR_SWAP: "directive-swap",
    DIR_RUN_SEQUENCE: "directive-run-sequence",
    DIR_UNLINK: "directive-unlink",
    DIR_OVERRIDE_MULTIPLE: "directive-override-multiple",
    DIR_COPY_PARAMS: "directive-copy-params",
}

# --- parameters -------------------------------------------------------------------------------
P_VENDOR_ID = 1
P_CLASS_ID = 2
P_IMAGE_DIGEST = 3
P_USE_BEFORE = 4
P_COMPONENT_SLOT = 5
P_STRICT_ORDER = 12
P_SOFT_FAILURE = 13
P_IMAGE_SIZE = 14
P_CONTENT = 18
P_ENCRYPTION_INFO = 19
P_URI = 21
P_SOURCE_COMPONENT = 22
P_INVOKE_ARGS = 23
P_DEVICE_ID = 24
P_FETCH_ARGS = 25
P_MINIMUM_BATTERY = 26
P_UPDATE_PRIORITY = 27
P_VERSION = 28
P_WAIT_INFO = 29
P_COMPONENT_METADATA = 30

# otaguard private-use custom parameters (nint < -256, see docs/formats.md).
P_OTA_SECURITY_COUNTER = -257
P_OTA_DELTA = -258

PARAMETERS = {
    P_VENDOR_ID: "vendor-id",
    P_CLASS_ID: "class-id",
    P_IMAGE_DIGEST: "image-digest",
    P_USE_BEFORE: "use-before",
    P_COMPONENT_SLOT: "component-slot",
    P_STRICT_ORDER: "strict-order",
    P_SOFT_FAILURE: "soft-failure",
    P_IMAGE_SIZE: "image-size",
    P_CONTENT: "content",
    P_ENCRYPTION_INFO: "encryption-info",
    P_URI: "uri",
    P_SOURCE_COMPONENT: "source-component",
    P_INVOKE_ARGS: "invoke-args",
    P_DEVICE_ID: "device-id",
    P_FETCH_ARGS: "fetch-args",
    P_MINIMUM_BATTERY: "minimum-battery",
    P_UPDATE_PRIORITY: "update-priority",
    P_VERSION: "version",
    P_WAIT_INFO: "wait-info",
    P_COMPONENT_METADATA: "component-metadata",
    P_OTA_SECURITY_COUNTER: "otaguard-security-counter",
    P_OTA_DELTA: "otaguard-delta",
}

# Version comparison types (update-management SUIT_Parameter_Version_Match).
VERSION_GREATER = 1
VERSION_GREATER_EQUAL = 2
VERSION_EQUAL = 3
VERSION_LESSER_EQUAL = 4
VERSION_LESSER = 5

# Reporting policy we put on every condition/directive: report success and failure, with
# system information (0b1111), as the draft's examples do.
REP_POLICY = 15

# --- SUIT_Text_Map ---------------------------------------------------------------------------
TEXT_MANIFEST_DESCRIPTION = 1
TEXT_UPDATE_DESCRIPTION = 2
TEXT_MANIFEST_JSON_SOURCE = 3
TEXT_MANIFEST_YAML_SOURCE = 4
TEXT_VENDOR_NAME = 1
TEXT_MODEL_NAME = 2
TEXT_VENDOR_DOMAIN = 3
TEXT_MODEL_INFO = 4
TEXT_COMPONENT_DESCRIPTION = 5
TEXT_COMPONENT_VERSION = 6
TEXT_VERSION_REQUIRED = 7
TEXT_CURRENT_VERSION = 8

TEXT_KEYS = {
    TEXT_MANIFEST_DESCRIPTION: "manifest-description",
    TEXT_UPDATE_DESCRIPTION: "update-description",
    TEXT_MANIFEST_JSON_SOURCE: "manifest-json-source",
    TEXT_MANIFEST_YAML_SOURCE: "manifest-yaml-source",
}
TEXT_COMPONENT_KEYS = {
    TEXT_VENDOR_NAME: "vendor-name",
    TEXT_MODEL_NAME: "model-name",
    TEXT_VENDOR_DOMAIN: "vendor-domain",
    TEXT_MODEL_INFO: "model-info",
    TEXT_COMPONENT_DESCRIPTION: "component-description",
    TEXT_COMPONENT_VERSION: "component-version",
    TEXT_VERSION_REQUIRED: "version-required",
    TEXT_CURRENT_VERSION: "current-version",
}

# --- COSE ------------------------------------------------------------------------------------
COSE_ALG_NAMES = {-7: "ES256", -8: "EdDSA", -9: "ESP256", -19: "Ed25519", 5: "HMAC 256/256"}
DIGEST_ALG_NAMES = {-16: "sha-256", -43: "sha-384", -44: "sha-512", -18: "shake128"}
