"""The simulator's device shards (sim/shard.py) around their failures: a request that fails
in a shard process comes back as a typed error and the shard keeps serving; a shard process
that dies fails every pending and later request instead of leaving the event loop waiting;
a device's draw depends only on its seed. (A whole run on 2 shard processes is
tests/test_demo.py; on one in-process shard, tests/test_sim_perf.py's strict-clock run.)
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from otaguard.errors import ErrorCode, OtaError
from otaguard.sim import world as W
from otaguard.sim.model import SCENARIOS, SimOptions
from otaguard.sim.shard import AttackKit, ProcessShard, ShardConfig, _all_of, device_spec
from otaguard.sim.sharedclock import SharedClock


def _cfg(tmp_path: Path, clock: SharedClock) -> ShardConfig:
    return ShardConfig(
        url="https://127.0.0.1:9",
        ca_pem=tmp_path / "ca.pem",
        clock_name=clock.name,
        opts=SimOptions(),
        kit=AttackKit(b"", b"", b""),
        patch_len=1,
        keylist_target=2,
        t0=1_000.0,
        workers=2,
        fd_cap=16,
    )


def test_shard_process_failures_are_typed_and_never_hang(tmp_path: Path) -> None:
    clock = SharedClock.create(1_000.0)
    shard = ProcessShard(_cfg(tmp_path, clock), "test-shard")
    try:
        # a poll of a device the shard does not have fails in the child: a typed error back
        for _ in range(2):  # and the shard still serves the next request
            with pytest.raises(OtaError) as e:
                shard.poll(7, 1_000.0).result(timeout=60)
            assert e.value.code is ErrorCode.INTERNAL
            assert "KeyError" in e.value.detail
        shard._proc.kill()
        shard._proc.join(timeout=30)
        # the pending request fails when the reader sees the pipe close (a hang would end in
        # concurrent.futures.TimeoutError, not OtaError)
        with pytest.raises(OtaError) as e:
            shard.poll(1, 1_000.0).result(timeout=30)
        assert e.value.code is ErrorCode.INTERNAL
        # from then on every request fails at once: the future is already done when returned,
        # so close() (whose first step is such a request) never waits on the dead child
        for fut in (shard.poll(2, 1_000.0), shard._request("close")):
            assert fut.done()
            exc = fut.exception(timeout=0)
            assert isinstance(exc, OtaError) and exc.code is ErrorCode.INTERNAL
    finally:
        shard.close()
        assert not shard._proc.is_alive()
        clock.close()


def test_a_send_failing_as_the_reader_fails_everything_settles_once(tmp_path: Path) -> None:
    """Regression (a CI dry run): the child died, a request's send hit the broken pipe while
    the reader, seeing the pipe close at the same moment, failed every pending request —
    this one included; the sender then settled the same future again (InvalidStateError
    out of ``poll`` instead of a failed future)."""
    clock = SharedClock.create(1_000.0)
    shard = ProcessShard(_cfg(tmp_path, clock), "test-shard")
    real = shard._conn

    class Racing:
        def send(self, _msg: object) -> None:
            with shard._lock:  # what the reader does on EOF, just before this send fails
                pending, shard._pending = shard._pending, {}
            for fut in pending.values():
                fut.set_exception(OtaError(ErrorCode.INTERNAL, "shard process exited"))
            raise BrokenPipeError(32, "Broken pipe")

    try:
        shard._conn = Racing()  # type: ignore[assignment]
        fut = shard.poll(3, 1_000.0)
        exc = fut.exception(timeout=0)
        assert isinstance(exc, OtaError) and exc.detail == "shard process exited"
    finally:
        shard._conn = real
        shard.close()
        clock.close()


def test_all_of_waits_for_every_future_and_keeps_the_first_failure() -> None:
    a: Future[None] = Future()
    b: Future[None] = Future()
    both = _all_of([a, b])
    a.set_result(None)
    assert not both.done()
    b.set_result(None)
    assert both.result(timeout=0) is None
    c: Future[None] = Future()
    d: Future[None] = Future()
    one_bad = _all_of([c, d])
    c.set_exception(OtaError(ErrorCode.INTERNAL, "first"))
    assert one_bad.done()  # no need to wait for the rest once one failed
    d.set_exception(OtaError(ErrorCode.INTERNAL, "second"))
    with pytest.raises(OtaError, match="first"):
        one_bad.result(timeout=0)
    assert _all_of([]).result(timeout=0) is None


def test_device_draw_depends_only_on_its_seed(tmp_path: Path) -> None:
    opts = SCENARIOS["hvac-14k"]
    f = W.DeviceFiles("HVAC-000003", tmp_path, tmp_path / "c.pem", tmp_path / "k.pem")
    one = device_spec(3, f, opts, 42, attacked=True)
    assert one == device_spec(3, f, opts, 42, attacked=True)
    spec, first = one
    assert 0 <= first <= spec.link.poll_s
    assert spec.attack is not None
    other, _ = device_spec(3, f, opts, 43, attacked=False)
    assert other.attack is None and other.poll_seed != spec.poll_seed
    assert other.link != spec.link
    # what goes to the shard per device is small (it crosses a pipe 14,000 times)
    assert len(pickle.dumps(spec)) < 1024


def test_a_ctrl_c_during_a_pipe_message_waits_until_the_message_is_whole() -> None:
    import os
    import signal

    from otaguard.sim.children import sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt), sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run by now: nothing was raised here
        done.append("whole message sent")
    assert done == ["whole message sent"]
    with sigint_deferred():  # without a Ctrl-C: nothing
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
