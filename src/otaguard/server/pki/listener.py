"""Read deadlines for every HTTP listener (device, admin, signing): uvicorn's httptools protocol
plus three rules it lacks.

uvicorn has a keep-alive timeout between requests and nothing else: a client that sends its
header block one byte every few seconds, or a body at a trickle, holds its connection (and a
slot of the server's file descriptors) for as long as it likes, and a request refused before
its body was read (401, 403, 413) has that body read and thrown away afterwards to keep the
connection alive — a declared gigabyte included. Here:

* **Header deadline**: from the connection's start (or the first byte of the next request on a
  kept-alive connection) the complete header block must arrive within ``header_timeout``
  seconds; else the server answers 408 and closes the connection.
* **Body deadline**: the server waits at most ``body_timeout`` seconds for the next part of a
  body, and the body as a whole must average ``body_min_rate`` bytes per second after a grace
  of ``body_timeout`` (a body of N bytes gets ``body_timeout + N / body_min_rate`` seconds at
  most); else the connection is closed. The timer also runs while the application does not
  read (uvicorn stops reading once 64 KiB are buffered), so a stalled exchange cannot pin a
  connection either.
* **No reading after an early answer**: a response that starts before the request's body has
  fully arrived is sent with ``Connection: close`` and the connection is closed after it, so
  the rest of the body is never read.

Deadlines are per connection, on the event loop (``loop.call_later``), with no thread and no
polling. A closed connection is counted by the listener's ``on_expire`` callback (the update
server's metrics) and logged at most once per source address per 10 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .authlog import RateLimitedLog

DEADLINES_ATTR = "otaguard_deadlines"
_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_log = RateLimitedLog("otaguard.listener", interval=10.0)


@dataclass(frozen=True)
class Deadlines:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 16384
    listener: str = "http"
    on_expire: Callable[[str, str], None] | None = None  # (listener, phase)

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0 or self.body_min_rate <= 0:
            raise ValueError("deadlines must be positive")


def with_deadlines(config: uvicorn.Config, deadlines: Deadlines) -> uvicorn.Config:
    """Attach ``deadlines`` to a uvicorn config whose ``http`` is :class:`DeadlineProtocol`."""
    setattr(config, DEADLINES_ATTR, deadlines)
    return config


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read deadlines (module docstring)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._deadlines: Deadlines = getattr(config, DEADLINES_ATTR, None) or Deadlines()
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "header"
        self._body_start = 0.0
        self._body_seen = 0

    # --- timer ---------------------------------------------------------------------------------
    def _arm(self, phase: str, delay: float) -> None:
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(max(0.0, delay), self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_body(self) -> None:
        d = self._deadlines
        now = time.monotonic()
        by_rate = self._body_start + d.body_timeout + self._body_seen / d.body_min_rate
        self._arm("body", min(now + d.body_timeout, by_rate) - now)

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        d = self._deadlines
        ip = self.client[0] if self.client else "?"
        _log.warning(
            (d.listener, ip),
            "%s listener: closed the connection from %s: %s deadline passed",
            d.listener,
            ip,
            self._phase,
        )
        if d.on_expire is not None:
            d.on_expire(d.listener, self._phase)
        if self._phase == "header" and (self.cycle is None or self.cycle.response_complete):
            transport.write(_TIMEOUT_408)
        transport.close()

    # --- uvicorn hooks ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("header", self._deadlines.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None or self._phase != "header":
            self._arm("header", self._deadlines.header_timeout)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return  # an upgrade request (refused by the app: no websocket support)
        plain_send = cycle.send

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False  # answered before the body arrived: never read it
            await plain_send(message)

        cycle.send = send  # type: ignore[method-assign]
        self._body_start = time.monotonic()
        self._body_seen = 0
        self._arm_body()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_seen += len(body)
        if self._phase == "body" and self._timer is not None:
            self._arm_body()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase == "body":
            self._disarm()
            self._phase = "idle"
