"""One writer per run folder: a lock file naming its holder (host, pid), refreshed while held.

The lock is created with O_EXCL, so of two benches started on one folder only one gets it; the
other stops before building a model. A lock is stale, and taken over with a message, when its holder
is gone: on this host its pid no longer runs (or runs another program, told apart by the process
start time); on another host it has not been refreshed for `STALE_AFTER_S` seconds (the holder
touches it every `HEARTBEAT_S`). Taking over renames the stale file away first, so of two benches
finding the same stale lock only one takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ovseg.errors import ConfigError

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _start_time(pid: int) -> str | None:
    """The process start time (Linux, in clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


class RunLock:
    """`with RunLock(run_dir, log):` holds `<run_dir>/.lock` for the block (ConfigError if held)."""

    def __init__(self, run_dir: str | Path, log=print):
        self.path = Path(run_dir) / LOCK
        self.log = log
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ holder
    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why the current lock is stale, or None if its holder may still run."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        if holder is None:  # unreadable: a holder killed while writing it, unless it is being written now
            return "unreadable and not refreshed for a minute" if age > 60 else None
        pid, host = holder.get("pid"), holder.get("host")
        if host == self.info["host"] and isinstance(pid, int):
            if not _running(pid):
                return f"pid {pid} no longer runs"
            started = _start_time(pid)
            if holder.get("start") and started and started != holder["start"]:
                return f"pid {pid} is now another program"
            return None
        if age > STALE_AFTER_S:
            return f"not refreshed for {age / 60:.0f} minutes"
        return None

    def _describe(self, holder: dict | None) -> str:
        if holder is None:
            return "an unknown process (the lock file is being written)"
        return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise ConfigError(
                        f"run folder {self.path.parent} is in use by another bench ({self._describe(holder)}; "
                        f"lock file {self.path}): wait for it to finish, or choose another --output"
                    ) from None
                aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # only one of several takers succeeds
                except FileNotFoundError:
                    continue
                with contextlib.suppress(OSError):
                    aside.unlink()
                if reason != "gone":
                    self.log(f"note: took over the stale lock of {self.path.parent} ({self._describe(holder)}: {reason})")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._thread = threading.Thread(target=self._heartbeat, name="ovseg-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise ConfigError(f"could not take the lock {self.path}: other benches keep taking it; choose another --output")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
