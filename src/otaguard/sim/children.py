"""Starting the simulator's child processes so that Ctrl-C never shows a stack trace.

The terminal sends SIGINT to the whole process group: the simulator, its server processes,
its device shards and its reboot-check workers. Only the simulator handles it (it stops the
children and writes the partial report); each child ignores it, but a child that is still
importing when the signal arrives has not yet said so, and Python would print a
KeyboardInterrupt traceback. A child started while SIGINT is ignored inherits that across
``exec``, and Python then installs no KeyboardInterrupt handler at all.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT in this process while children are started (main thread only: elsewhere
    signal dispositions cannot be changed, and children start as before). A Ctrl-C in these
    few milliseconds is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then deliver it (main thread only; elsewhere
    nothing changes). For a message into a pipe: a KeyboardInterrupt halfway through would
    leave a truncated message that the reader at the other end waits on forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        caught.append(signum)

    old = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught and old is not signal.SIG_IGN:
        if callable(old):
            old(signal.SIGINT, None)
        else:
            raise KeyboardInterrupt
