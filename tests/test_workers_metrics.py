"""server/workers.py's counter channel, in-process: what a worker sends, how the first process
adds it up, and that a first process that stops reading cannot stall a worker."""

from __future__ import annotations

import asyncio
import threading
from multiprocessing.connection import Pipe

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from otaguard.server.metrics import parse_samples
from otaguard.server.workers import PeerMetrics, collect_only, publish, snapshot


def _counters() -> tuple[CollectorRegistry, Counter, Histogram]:
    r = CollectorRegistry()
    c = Counter("otaguard_refusals", "x", ["code"], registry=r)
    h = Histogram("otaguard_request_duration_seconds", "y", ["route"], registry=r)
    return r, c, h


def test_workers_counters_add_up_in_the_first_process() -> None:
    own, c, h = _counters()
    c.labels("E_CERT").inc(2)
    h.labels("/v1/checkin").observe(0.01)
    peers = PeerMetrics()
    _worker_reg, wc, wh = _counters()
    wc.labels("E_CERT").inc(3)
    wc.labels("E_RATE_LIMIT").inc(5)  # a series only the worker has
    wh.labels("/v1/checkin").observe(0.2)
    peers.latest[1] = snapshot(collect_only([wc, wh])())
    peers.latest[2] = snapshot(collect_only([wc])())

    class Merged:
        def collect(self):  # type: ignore[no-untyped-def]
            return peers.merged(own.collect())

    text = generate_latest(Merged()).decode()  # type: ignore[arg-type]
    samples = parse_samples(text)
    assert samples['otaguard_refusals_total{code="E_CERT"}'] == 2 + 3 + 3
    assert samples['otaguard_refusals_total{code="E_RATE_LIMIT"}'] == 10
    assert samples['otaguard_request_duration_seconds_count{route="/v1/checkin"}'] == 2
    assert samples['otaguard_request_duration_seconds_bucket{le="0.25",route="/v1/checkin"}'] == 2
    assert samples['otaguard_request_duration_seconds_bucket{le="0.01",route="/v1/checkin"}'] == 1


def test_a_first_process_that_stops_reading_does_not_stall_a_worker() -> None:
    reader, sender = Pipe(duplex=False)
    reg = CollectorRegistry()
    c = Counter("otaguard_refusals", "x", ["code"], registry=reg)
    for i in range(3000):  # a snapshot larger than the pipe's buffer: the send blocks
        c.labels(f"E_{i:05d}").inc()
    ticks: list[int] = []

    async def worker() -> None:
        task = asyncio.create_task(publish(collect_only([c]), sender))
        for _ in range(20):  # the worker's event loop keeps serving meanwhile
            await asyncio.sleep(0.01)
            ticks.append(1)
        task.cancel()

    t = threading.Thread(target=lambda: asyncio.run(worker()), daemon=True)
    t.start()
    t.join(3)
    served = len(ticks)  # while the first process was not reading
    reader.close()  # the blocked send then fails and the thread ends
    t.join(5)
    assert served == 20
