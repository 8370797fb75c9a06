"""Stopping a bench on SIGTERM / SIGINT: within seconds, on every process, without partial files.

`stop_on_signals()` installs one handler for both signals. On the first signal it raises
`Interrupted` in the main thread wherever it runs (a model forward, data loading, a W&B call): a
`BaseException`, so no `except Exception` on the way swallows it, and not a `KeyboardInterrupt`,
which Lightning turns into `sys.exit(1)`. Lightning installs its own SIGTERM handler inside each
`trainer.predict` (it only logs and keeps going); the engine puts ours back (`reinstall`).

Processes of one run stop together: the process that launched the others (rank 0 under
`--devices N`) passes the signal on to them, and they pass a signal they got directly (a `kill` of
one of them) to it. Launched processes then exit quietly with status 0, so that Lightning's process
observer does not kill rank 0 before rank 0 says it was interrupted and exits with 128 + signal.

The main thread runs Python signal handlers only between bytecodes, so a process waiting in native
code (a collective whose peer is still computing) would not notice the signal. A helper thread
therefore also learns of each signal through `signal.set_wakeup_fd`: it passes the signal on at once
(so the peers stop, which ends the wait) and starts a watchdog that ends the process after `GRACE_S`
seconds if it has not exited by then, removing temporary files first. Further signals are ignored
while stopping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from ovseg import atomic

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 10.0
#: set by the process that launches the others, inherited by them: their parent to forward signals to
LAUNCHER_ENV = "OVSEG_LAUNCHER_PID"


class Interrupted(BaseException):
    """A bench was stopped by a signal; finished datasets are kept."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def launched_by_parent() -> bool:
    """Whether this process is one of the processes another ovseg process launched (ranks > 0)."""
    return os.environ.get(LAUNCHER_ENV) == str(os.getppid())


class _Stopper:
    def __init__(self, message: Callable[[int], str] | None):
        self.pid = os.getpid()
        self.signum: int | None = None  # the signal that asked to stop
        self.raised = False
        self.forward: list[Callable[[int], None]] = []
        self.cleanup: list[Callable[[], None]] = []  # what the watchdog runs before it ends the process
        self.message = message
        self._lock = threading.Lock()

    def request(self, signum: int) -> None:
        """Pass the stop on and start the watchdog, once (from the handler or the wakeup thread)."""
        with self._lock:
            if self.signum is not None:
                return
            self.signum = signum
        for forward in self.forward:
            with contextlib.suppress(Exception):
                forward(signum)
        threading.Thread(target=self._watchdog, name="ovseg-stop-watchdog", daemon=True).start()

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked data-loading worker before `reset_in_worker`
            os._exit(0)
        self.request(signum)
        if not self.raised:
            self.raised = True
            raise Interrupted(self.signum)

    def _watchdog(self) -> None:
        threading.Event().wait(GRACE_S)
        atomic.remove_pending()
        for cleanup in self.cleanup:
            with contextlib.suppress(Exception):
                cleanup()
        if self.message is not None and not launched_by_parent():
            print(self.message(self.signum), file=sys.stderr, flush=True)
        os._exit(0 if launched_by_parent() else 128 + self.signum)

    def _listen(self, fd: int) -> None:
        """Learn of signals while the main thread may be stuck in native code (see the module docstring)."""
        try:
            while data := os.read(fd, 64):
                for signum in data:
                    if signum in SIGNALS:
                        self.request(signum)
        except OSError:
            pass
        finally:
            os.close(fd)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self.handle)


_active: _Stopper | None = None


def requested() -> int | None:
    """The signal a stop was asked with, if any: an error raised while stopping is part of the stop."""
    return _active.signum if _active is not None else None


@contextlib.contextmanager
def stop_on_signals(message: Callable[[int], str] | None = None) -> Iterator[_Stopper]:
    """Turn SIGINT / SIGTERM into `Interrupted` for the block (nested uses share the outer one).

    `message(signum)` is what the watchdog prints if it has to end the process itself.
    """
    global _active
    if _active is not None:
        yield _active
        return
    if threading.current_thread() is not threading.main_thread():
        yield _Stopper(message)  # signals reach the main thread only
        return
    stopper = _Stopper(message)
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    if launched_by_parent():
        stopper.forward.append(lambda signum: os.kill(os.getppid(), signum))
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=stopper._listen, args=(read_fd,), name="ovseg-signal-listener", daemon=True).start()
    stopper.install()
    _active = stopper
    try:
        yield stopper
    finally:
        _active = None
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # ends the listener
        for s, handler in previous.items():
            # after a stop, signals the other processes pass back must not kill this one before it exits
            signal.signal(s, signal.SIG_IGN if stopper.signum is not None else handler)


def reinstall(launcher=None) -> None:
    """Put the stop handler back (Lightning installs its own inside each `trainer.predict`) and pass stop
    signals on to the processes `launcher` started (Lightning's launcher: its `kill(signum)`)."""
    if _active is None:
        return
    kill = getattr(launcher, "kill", None)
    if kill is not None and kill not in _active.forward:
        _active.forward.append(kill)
    _active.install()


def reset_in_worker(worker_id: int = 0) -> None:
    """`worker_init_fn` of data loaders: a forked worker leaves stopping to its process (default handlers,
    no wakeup fd shared with it)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
