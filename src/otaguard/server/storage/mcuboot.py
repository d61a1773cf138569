"""What the database says about MCUboot releases: a class's image format, a release's MCUboot
image, the check-in offer for a device of that class, and whether a device may fetch an image."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from . import models as m
from .prepared import Record


def class_format(conn: Connection, class_id: str) -> str:
    row = conn.execute(
        select(m.class_formats.c.format).where(m.class_formats.c.class_id == class_id)
    ).first()
    return "suit" if row is None else str(row[0])


def mcuboot_row(conn: Connection, release_id: int) -> Record | None:
    return conn.execute(
        select(m.release_mcuboot).where(m.release_mcuboot.c.release_id == release_id)
    ).first()


def offer(conn: Connection, rel: Record, suit_ref: dict[str, Any]) -> dict[str, Any] | None:
    """The check-in's ``update`` for this release and the device's class: the SUIT reference
    as it is, or the MCUboot image. A release without an MCUboot image is offered to nobody of
    an MCUboot class (None): they could not install it."""
    if class_format(conn, rel.class_id) != "mcuboot":
        return {**suit_ref, "format": "suit"}
    row = mcuboot_row(conn, rel.id)
    if row is None:
        return None
    return {
        "format": "mcuboot",
        "release_id": rel.id,
        "version": rel.version,
        "mcuboot_version": row.mcuboot_version,
        "security_counter": rel.security_counter,
        "image_url": f"/v1/images/{row.blob}",
        "image_size": row.size,
        "image_digest": row.blob,
        "digest_alg": "sha-256",
    }


def device_may_fetch_mcuboot(conn: Connection, device_id: int, blob: str) -> bool:
    """Whether ``blob`` is the MCUboot image of a release assigned to the device."""
    j = m.assignments.join(
        m.release_mcuboot, m.assignments.c.release_id == m.release_mcuboot.c.release_id
    )
    q = (
        select(m.release_mcuboot.c.release_id)
        .select_from(j)
        .where(m.assignments.c.device_id == device_id, m.release_mcuboot.c.blob == blob)
        .limit(1)
    )
    return conn.execute(q).first() is not None
