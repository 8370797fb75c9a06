"""On-disk cache of per-name text embeddings, so a class list is encoded once per text encoder, not per run.

A name's embedding depends only on the text encoder's weights, its architecture, the tokenizer, the prompt
templates, the dtype it ran in and the name. A predictor describes all but the name in a `key` (a JSON-able
dict; `file_digest` identifies a weights file); entries live under `<ovseg cache>/text/<digest of key>/`,
one file per name, so concurrent processes (DDP ranks, two runs) never rewrite each other's files:

- every write goes to a unique temporary file renamed over the entry (atomic on POSIX and Windows);
- an entry that does not load, or holds something else than a finite unit vector of the group's width,
  is treated as missing: recomputed and replaced;
- `OVSEG_TEXT_CACHE=0` switches the cache off; a cache that cannot be written only logs a warning.

`ovseg cache info` / `ovseg cache clear` show and remove it (`info`, `clear`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .atomic import atomic_path
from .paths import cache_dir

if TYPE_CHECKING:
    import torch

__all__ = ["ENV", "enabled", "folder", "file_digest", "digest", "group_digest", "cached_embeddings", "pack", "CacheInfo", "info", "clear"]

log = logging.getLogger(__name__)

#: environment variable: `0`/`false`/`off`/`no` switches the cache off
ENV = "OVSEG_TEXT_CACHE"
#: bump when the entry format or the meaning of a key changes
FORMAT = 1
_HASH_CHUNK = 1 << 23
#: an entry is a unit vector; anything further from norm 1 is a damaged file
_NORM_TOL = 1e-3
_MAGIC = b"OVSEGTXT"


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def folder() -> Path:
    """`<ovseg cache>/text`: embeddings in one sub-folder per key, weights digests in `weights/`."""
    return cache_dir() / "text"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)


def _write_json(path: Path, doc: Mapping) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1, sort_keys=True)))


def file_digest(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a weights file's content, remembered per (real path, size, mtime).

    Files in a Hugging Face cache are symlinks to `blobs/<sha256>`: that name is the digest, nothing is read.
    Otherwise the file is hashed once (about 1 s per GB) and the digest kept under `text/weights/`.
    """
    real = Path(path).expanduser().resolve()
    st = real.stat()
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return f"sha256:{real.name}"
    record = folder() / "weights" / f"{digest(str(real))}.json"
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and str(saved.get("digest", "")).startswith("sha256:"):
            return saved["digest"]
    except (OSError, ValueError, AttributeError):
        pass
    sha = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            sha.update(chunk)
    found = f"sha256:{sha.hexdigest()}"
    if enabled():
        try:
            _write_json(record, {**stamp, "digest": found})
        except OSError as exc:
            log.warning("text cache: cannot record the digest of %s in %s: %s", real, record.parent, exc)
    return found


def digest(text: str) -> str:
    """A short stable digest of a text (a key part: templates, a tower's description)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def group_digest(key: Mapping[str, Any]) -> str:
    """Folder name of a key: a digest of its canonical JSON."""
    return digest(json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str))


def _entry(group: Path, name: str) -> Path:
    return group / f"{digest(name)}.emb"


def pack(name: str, embedding) -> bytes:
    """An entry's bytes: magic, header length, JSON header (name, width), little-endian float32 values.

    A plain format rather than `torch.save`: reading 150 entries takes milliseconds instead of a second.
    """
    import numpy as np

    values = np.ascontiguousarray(embedding.detach().float().cpu().numpy(), dtype="<f4")
    header = json.dumps({"name": name, "width": int(values.size)}).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + values.tobytes()


def _unpack(data: bytes, name: str, width: int | None):
    import numpy as np
    import torch

    if not data.startswith(_MAGIC):
        return None
    start = len(_MAGIC) + 4
    (size,) = struct.unpack("<I", data[len(_MAGIC) : start])
    header = json.loads(data[start : start + size])
    values = np.frombuffer(data[start + size :], dtype="<f4")
    if header.get("name") != name or values.size != header.get("width") or width not in (None, values.size):
        return None
    emb = torch.from_numpy(values.astype(np.float32))
    if not bool(torch.isfinite(emb).all()) or abs(float(emb.norm()) - 1.0) >= _NORM_TOL:
        return None
    return emb


def _read(path: Path, name: str, width: int | None):
    """The stored embedding, or None when the entry is absent or damaged (then it is recomputed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("text cache: cannot read %s (%s); recomputing %r", path, exc, name)
        return None
    try:
        emb = _unpack(data, name, width)
    except (ValueError, struct.error, UnicodeDecodeError, AttributeError):
        emb = None
    if emb is None:
        log.warning("text cache: entry %s for %r is damaged; recomputing it", path, name)
    return emb


def cached_embeddings(key: Mapping[str, Any] | None, names: Sequence[str], encode: Callable) -> torch.Tensor:
    """(len(names), E) float32 CPU embeddings: from the cache where present, `encode(missing)` otherwise.

    `key=None` (weights that cannot be identified) or a switched-off cache: everything is encoded, nothing
    is stored. `encode(names)` returns unit embeddings (n, E).
    """
    import torch

    names = list(names)
    unique = list(dict.fromkeys(names))
    if key is None or not enabled() or not unique:
        found = dict(zip(unique, encode(unique).float().cpu())) if unique else {}
        return torch.stack([found[n] for n in names]) if names else torch.empty(0)
    group = folder() / group_digest(key)
    meta_path = group / "meta.json"
    try:
        width = json.loads(meta_path.read_text()).get("width")
    except (OSError, ValueError, AttributeError):
        width = None
    found = {}
    for n in unique:
        emb = _read(_entry(group, n), n, width)
        if emb is not None:
            found[n] = emb
    missing = [n for n in unique if n not in found]
    if missing:
        fresh = encode(missing).float().cpu()
        found.update(zip(missing, fresh))
        _store(group, meta_path, key, width, dict(zip(missing, fresh)))
    return torch.stack([found[n] for n in names])


def _store(group: Path, meta_path: Path, key: Mapping, width: int | None, fresh: Mapping) -> None:
    try:
        if width is None:
            _write_json(meta_path, {"format": FORMAT, "key": dict(key), "width": int(next(iter(fresh.values())).numel())})
        for name, emb in fresh.items():
            _atomic_write(_entry(group, name), lambda tmp, data=pack(name, emb): tmp.write_bytes(data))
    except OSError as exc:
        log.warning("text cache: cannot write to %s (%s); embeddings are recomputed next time", group, exc)


@dataclass
class CacheInfo:
    folder: Path
    groups: int  # text encoders (weights x architecture x templates x dtype)
    entries: int  # per-name embeddings
    bytes: int  # everything under `folder`, weights digests included
    descriptions: list[str]  # one line per group


def _describe(meta: Mapping) -> str:
    key = meta.get("key", {})
    parts = [str(key.get(k)) for k in ("model", "templates_name", "dtype") if key.get(k) is not None]
    weights = str(key.get("weights", "?"))
    return f"{' '.join(parts)} weights {weights[:23]}"


def info() -> CacheInfo:
    """What the text cache holds (`ovseg cache info`)."""
    root = folder()
    groups = entries = size = 0
    lines = []
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file():
                size += path.stat().st_size
        for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "weights"):
            n = sum(1 for _ in group.glob("*.emb"))
            groups += 1
            entries += n
            try:
                desc = _describe(json.loads((group / "meta.json").read_text()))
            except (OSError, ValueError, AttributeError):
                desc = "(no meta.json)"
            lines.append(f"{group.name}  {n:>6} names  {desc}")
    return CacheInfo(root, groups, entries, size, lines)


def clear() -> CacheInfo:
    """Remove the text cache (`ovseg cache clear`); returns what it held."""
    before = info()
    if before.folder.is_dir():
        shutil.rmtree(before.folder)
    return before
