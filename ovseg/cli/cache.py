"""`ovseg cache info|clear`: the on-disk cache of text embeddings (`ovseg.text_cache`)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="show or remove the cache of text embeddings")
    c_sub = c.add_subparsers(dest="cache_command", required=True)
    c_sub.add_parser("info", help="folder, entries and size of the text-embedding cache")
    c_sub.add_parser("clear", help="remove the text-embedding cache (embeddings are recomputed when needed)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_cache(args: argparse.Namespace) -> int:
    from ovseg import text_cache

    if args.cache_command == "clear":
        gone = text_cache.clear()
        print(f"removed {gone.entries} text embeddings ({gone.groups} encoders, {_size(gone.bytes)}) from {gone.folder}")
        return 0
    state = text_cache.info()
    switched = "" if text_cache.enabled() else f" (switched off: {text_cache.ENV}=0)"
    print(f"text cache: {state.folder}{switched}")
    print(f"{state.entries} text embeddings of {state.groups} encoders, {_size(state.bytes)}")
    for line in state.descriptions:
        print(f"  {line}")
    return 0
