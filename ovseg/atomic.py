"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

Each write goes to a uniquely named temporary file next to the target (`.<name>.<random>.tmp`, so two
writers never share one) and is renamed over the target once complete. Temporary files of writes in
progress are registered so that an interrupted process can remove them before it exits.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_pending: set[Path] = set()
_lock = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; it replaces `path` when the block succeeds."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    with _lock:
        _pending.add(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    finally:
        with _lock:
            _pending.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text exactly as given
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def remove_pending() -> None:
    """Delete the temporary files of writes still in progress (an interrupted process, before exiting)."""
    with _lock:
        pending = list(_pending)
    for tmp in pending:
        with contextlib.suppress(OSError):
            tmp.unlink()
