"""Text encoding of the CLIP-family predictors: `set_classes` against open_clip's `encode_text`, and the cache.

Prints, for a CLIP with ViT-B/16's text tower (random weights: the same arithmetic as pretrained ones):

1. open_clip's `encode_text` on every prompt (names x 80 templates) at full context (77 tokens), in batches
   of `text_batch_size`, plus the per-name recipe (normalise, mean, normalise): the baseline;
2. `set_classes` of a predictor with an empty text cache (length-sorted prompts, batches cut after their
   longest prompt), its speed-up and its largest difference to the baseline's embeddings;
3. `set_classes` of a second predictor built on the same checkpoint: read from the disk cache; its time
   as a fraction of (2).

Each step is repeated (`--repeats`) in one process, interleaved, and reported as median [min - max]; the
cache lives in a temporary folder unless OVSEG_CACHE is set. Not a test. Examples:

    python benchmarks/text.py                               # 6 class lines (7 names) x 80 templates
    python benchmarks/text.py --pretrained /path/to/ViT-B-16.pt --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

CLASSES = ["wall", "building, edifice", "sky", "floor", "tree", "ceiling"]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _baseline(pred, names) -> torch.Tensor:
    """open_clip at full context, the predictors' recipe written out: what `set_classes` must reproduce."""
    prompts = [t(n) for n in names for t in pred.templates]
    tokens = pred.tokenizer(prompts)
    with torch.no_grad():
        emb = torch.cat([pred.clip.encode_text(c) for c in tokens.split(pred.text_batch_size)]).float()
    emb = F.normalize(emb, dim=-1).view(len(names), len(pred.templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def _fmt(values) -> str:
    return f"{statistics.median(values):.3f} s [{min(values):.3f} - {max(values):.3f}]"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="random", help="random (default), an open_clip tag or a checkpoint path")
    ap.add_argument("--method", default="maskclip", help="CLIP-family predictor (they share the text path)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if "OVSEG_CACHE" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="ovseg-text-bench-")
        os.environ["OVSEG_CACHE"] = tmp.name
    from ovseg import build_predictor
    from ovseg.pipeline.vocabulary import Vocabulary
    from ovseg.text_cache import clear, folder

    vocab = Vocabulary(CLASSES)
    names = vocab.names
    clear()
    build_s, first = _timed(lambda: build_predictor(args.method, model=args.model, pretrained=args.pretrained))
    print(f"# {args.model} ({first.weights_source}), {len(CLASSES)} class lines, {len(names)} names x "
          f"{len(first.templates)} templates = {len(names) * len(first.templates)} prompts, "
          f"{torch.get_num_threads()} threads, text cache {folder()}")
    if not first.random_weights:
        from ovseg.text_cache import file_digest

        digest_s, _ = _timed(lambda: file_digest(first._weights_path))
        print(f"weights digest (once per file, then remembered): {digest_s:.3f} s")

    base_t, ours_t, cached_t, diffs = [], [], [], []
    second = None
    for _ in range(args.repeats):
        t, want = _timed(lambda: _baseline(first, names))
        base_t.append(t)
        clear()  # nothing on disk ...
        first._text_cache.clear()  # ... nor in the predictor's memory
        t, _ = _timed(lambda: first.set_classes(vocab))
        ours_t.append(t)
        diffs.append(float((first.text_embeddings - want).abs().max()))
        if second is None:
            second = build_predictor(args.method, model=args.model, pretrained=args.pretrained)
        second._text_cache.clear()
        t, _ = _timed(lambda: second.set_classes(vocab))
        cached_t.append(t)
        diffs.append(float((second.text_embeddings - want).abs().max()))

    speedup = statistics.median(base_t) / statistics.median(ours_t)
    ratio = statistics.median(cached_t) / statistics.median(ours_t)
    print(f"open_clip encode_text, full context : {_fmt(base_t)}")
    print(f"set_classes, empty cache            : {_fmt(ours_t)}   speed-up {speedup:.1f}x "
          f"(per repeat {min(b / o for b, o in zip(base_t, ours_t)):.1f} - {max(b / o for b, o in zip(base_t, ours_t)):.1f}x)")
    print(f"set_classes, second predictor (disk): {_fmt(cached_t)}   {100 * ratio:.1f} % of the first call")
    print(f"max |difference| to open_clip's embeddings: {max(diffs):.2e}")
    print(f"(building a predictor: {build_s:.1f} s, not counted)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
