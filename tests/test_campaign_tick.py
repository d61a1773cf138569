"""The campaign tick is claimed by one request per due moment.

Regression: ``tick_due`` stayed true until the tick ran on a worker thread, so every request
arriving meanwhile queued a tick of its own (a database refresh each) and, on PostgreSQL,
threw away the snapshot read with its rate-limit statement. Now the first caller claims it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from otaguard.clock import SimClock
from otaguard.server.storage.campaigns import CampaignService
from otaguard.server.storage.db import Database, sqlite_url


def test_one_caller_claims_each_due_tick(tmp_path: Path) -> None:
    clock = SimClock(1_000.0)
    svc = CampaignService(Database(sqlite_url(tmp_path / "o.db")), clock=clock, refresh_s=5.0)
    claims: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        due = [svc.tick_due() for _ in range(50)]
        with lock:
            claims.extend(due)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(claims) == 1  # first start: due once, not once per request
    clock.advance(4.9)
    assert not svc.tick_due()
    clock.advance(0.2)
    assert svc.tick_due() and not svc.tick_due()
    svc.wake()  # another node changed a campaign: due again at once, claimed once
    assert svc.tick_due() and not svc.tick_due()
