"""Database schema (SQLAlchemy Core). The migrations in ``migrations/versions`` create it.

Core tables rather than ORM classes: the hot path (check-in) is a handful of single-row
statements and must stay cheap. The same definitions run on SQLite and PostgreSQL.

Campaign support is prepared, not built: a device's pending target lives in ``assignments``
(one row per device, so a device can never be in two conflicting rollouts), and its
``campaign_id`` column will reference the future ``campaigns`` table.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

devices = Table(
    "devices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial", String(64), nullable=False, unique=True),
    Column("model", String(64), nullable=False),
    Column("hw_rev", String(32), nullable=False),
    Column("cert_fingerprint", String(64), nullable=False),  # sha256(cert DER) hex
    Column("cert_not_after", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("revoked_at", BigInteger),
    Column("enrolled_at", BigInteger, nullable=False),
    Column("current_version", String(32)),
    Column("security_counter", BigInteger),
    Column("keylist_version", BigInteger),
    Column("slot_state", Text),  # JSON as last reported
    Column("running_digest", String(128)),
    Column("last_seen", BigInteger),
    Column("last_error", String(64)),
    Column("suspect", Boolean, nullable=False, default=False),
    Column("suspect_reason", String(200)),
    # Certificate renewal (migration 0006): the renewed certificate not yet used by the
    # device, and the one it superseded once it was.
    Column("pending_cert_fingerprint", String(64)),
    Column("pending_cert_not_after", BigInteger),
    Column("prev_cert_fingerprint", String(64)),
    Column("cert_renewed_at", BigInteger),
    Index("ix_devices_model_hw", "model", "hw_rev"),
    Index("ix_devices_cert_not_after", "cert_not_after"),
)

device_groups = Table(
    "device_groups",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Index("ix_device_groups_name", "name"),
)

releases = Table(
    "releases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(64), nullable=False),
    Column("hw_rev", String(32), nullable=False),
    Column("vendor_id", String(36), nullable=False),
    Column("class_id", String(36), nullable=False),
    Column("version", String(32), nullable=False),
    Column("min_version", String(32)),
    Column("security_counter", BigInteger, nullable=False),
    Column("sequence_number", BigInteger, nullable=False),
    Column("expires", BigInteger),
    Column("digest_alg", String(16), nullable=False),
    Column("manifest_digest", String(128), nullable=False, unique=True),  # SUIT digest, hex
    Column("envelope_blob", String(64), nullable=False),  # sha256 of the envelope bytes
    Column("image_digest", String(128), nullable=False),  # manifest's image digest, hex
    Column("image_size", BigInteger, nullable=False),
    Column("image_blob", String(64), nullable=False),  # sha256 of the image bytes
    Column("signers", Text, nullable=False),  # JSON list of kid hex
    Column("description", Text),
    Column("uploaded_by", String(64)),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("class_id", "version", name="uq_releases_class_version"),
    Index("ix_releases_envelope_blob", "envelope_blob"),
    Index("ix_releases_image_blob", "image_blob"),
)

# Delta downloads of a release: one per base image (the device's running image digest). The
# delta envelope is signed separately but says the same release (version, sequence number,
# final digest and size) as its row in ``releases``; the patch is a blob like an image.
release_deltas = Table(
    "release_deltas",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("release_id", Integer, ForeignKey("releases.id", ondelete="CASCADE"), nullable=False),
    Column("base_digest", String(128), nullable=False),  # base image digest, hex
    Column("base_version", String(32)),  # informational (from the uploader)
    Column("manifest_digest", String(128), nullable=False, unique=True),  # SUIT digest, hex
    Column("envelope_blob", String(64), nullable=False),  # sha256 of the delta envelope
    Column("patch_digest", String(128), nullable=False),  # manifest's patch digest, hex
    Column("patch_size", BigInteger, nullable=False),
    Column("patch_blob", String(64), nullable=False),  # sha256 of the patch bytes
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("release_id", "base_digest", name="uq_release_deltas_release_base"),
    Index("ix_release_deltas_envelope_blob", "envelope_blob"),
    Index("ix_release_deltas_patch_blob", "patch_blob"),
)

# The MCUboot image of a release (docs/server.md "MCUboot images"): a blob like an image, checked
# on upload against the release's signers and fields; ``blob`` is the sha256 of its bytes.
release_mcuboot = Table(
    "release_mcuboot",
    metadata,
    Column("release_id", Integer, ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True),
    Column("blob", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mcuboot_version", String(32), nullable=False),  # major.minor.revision+build
    Column("key_id", String(64), nullable=False),  # kid hex of the signer
    Column("uploaded_by", String(64)),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_release_mcuboot_blob", "blob"),
)

# Device classes that consume MCUboot images instead of SUIT (no row: SUIT).
class_formats = Table(
    "class_formats",
    metadata,
    Column("class_id", String(36), primary_key=True),
    Column("format", String(16), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

assignments = Table(
    "assignments",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("release_id", Integer, ForeignKey("releases.id"), nullable=False),
    Column("campaign_id", Integer),  # FK to campaigns once they exist
    Column("state", String(16), nullable=False),  # assigned/offered/installing/done/failed
    Column("assigned_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_assignments_release", "release_id"),
    Index("ix_assignments_campaign", "campaign_id"),
)

status_reports = Table(
    "status_reports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("report_id", String(64), nullable=False),
    Column("release_id", Integer, ForeignKey("releases.id")),
    Column("campaign_id", Integer),
    Column("manifest_digest", String(128)),
    Column("state", String(32), nullable=False),
    Column("error_code", String(32)),
    Column("version", String(32)),
    Column("detail", String(500)),
    Column("received_at", BigInteger, nullable=False),
    UniqueConstraint("device_id", "report_id", name="uq_status_reports_device_report"),
    Index("ix_status_reports_release_state", "release_id", "state"),
)

probe_events = Table(
    "probe_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE")),
    Column("ip", String(64)),
    Column("kind", String(32), nullable=False),  # rate_limit, identity, revoked, cert, ...
    Column("path", String(200)),
    Column("detail", String(200)),
    Column("at", BigInteger, nullable=False),
    Index("ix_probe_events_device_at", "device_id", "at"),
)

keylists = Table(
    "keylists",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("document", LargeBinary, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("role", String(32), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    # POSIX seconds on the server clock (migration 0005); NULL = never expires (tokens made
    # before 0005, or ``token-create --no-expiry``).
    Column("expires_at", BigInteger),
)

# Dashboard sessions logged out (migration 0009): shared by every node, kept until the
# session's cookie would have expired anyway.
dashboard_logouts = Table(
    "dashboard_logouts",
    metadata,
    Column("sid", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
)

# Campaigns (migration 0003_campaigns): ``state`` is ``rollout.Campaign.to_dict()`` as JSON;
# ``status`` mirrors it for queries; ``revision`` rises on every write of ``state`` (the
# in-process cache compares it). ``n_<state>`` are the per-state counts of the members, moved
# with atomic increments in the same transaction as the member's progress row.
CAMPAIGN_STATES = (
    "pending",
    "offered",
    "downloading",
    "installed",
    "succeeded",
    "failed",
    "reverted",
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),  # the engine's campaign id
    Column("release_id", Integer, ForeignKey("releases.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("state", Text, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("created_by", String(64)),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    *(Column(f"n_{s}", Integer, nullable=False, default=0) for s in CAMPAIGN_STATES),
    Index("ix_campaigns_status", "status"),
)

# One row per (campaign, member device): rollout.DeviceProgress.
campaign_devices = Table(
    "campaign_devices",
    metadata,
    Column(
        "campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("version", String(32)),
    Column("step_done", Boolean, nullable=False, default=False),
    Column("steps", Integer, nullable=False, default=0),
    Column("error", String(64)),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_campaign_devices_device", "device_id"),
    Index("ix_campaign_devices_campaign_state", "campaign_id", "state"),
)

# Key rotations (docs/operations.md): one row per rotation, its history in rotation_events.
# The newest rotation that reached "advanced" names the key new releases must be signed with;
# its old key is refused for release uploads from then on.
rotations = Table(
    "rotations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),  # started / advanced / finished
    Column("old_kid", String(64), nullable=False),  # hex
    Column("new_kid", String(64), nullable=False),  # hex
    Column("start_version", BigInteger, nullable=False),  # key list that adds the new key
    Column("final_version", BigInteger),  # key list that removes + revokes the old key
    Column("threshold", Integer, nullable=False),  # per mille of the targeted fleet
    Column("unreachable_after", BigInteger, nullable=False),  # seconds without a check-in
    Column("target_model", String(64)),
    Column("target_hw_rev", String(32)),
    Column("target_group", String(64)),
    Column("started_at", BigInteger, nullable=False),
    Column("advanced_at", BigInteger),
    Column("finished_at", BigInteger),
    Index("ix_rotations_state", "state"),
)

rotation_events = Table(
    "rotation_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rotation_id", Integer, ForeignKey("rotations.id", ondelete="CASCADE"), nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("action", String(16), nullable=False),  # start / advance / finish
    Column("actor", String(64), nullable=False),
    Column("forced", Boolean, nullable=False),
    Column("fraction", Integer, nullable=False),  # per mille on the new list at that moment
    Column("reason", String(500)),
    Column("audit_seq", BigInteger),  # the audit-log record of this action
    Column("audit_hash", String(64)),
    Column("audit_log_id", String(64)),  # which log (its genesis id); migration 0010
    Column("audit_node", String(300)),  # where that log is (host:data dir), for messages
    Index("ix_rotation_events_rotation", "rotation_id"),
)
