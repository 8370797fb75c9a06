"""End to end, per shipped method: images/s, seconds per stage and peak memory on an ADE-like image.

Every `configs/methods/*.yaml` (or `--methods`) is built with full-size random weights (`pretrained=random`
for its predictor and extractor and any stage nested in them: the arithmetic of the real checkpoints, no download),
with its ADE20K settings (the protocol, class names and per-dataset stage options it uses for `ade20k` of
the standard8 suite, 150 classes), and segments a 512x683 JPEG (ADE20K's typical size). A method whose
plugins or random weights cannot be built is skipped with the reason.

Stages are timed by calling the segmenter's own steps in its order (`Segmenter.refined_scores`, then
`segment`'s tail), nothing is added to the pipeline:

  decode+resize  JPEG bytes -> uint8 tensor (the data path's reader) -> mmcv-style resize (`resize_for`)
  predictor      `set_image` + sliding windows + the predictor's forward over all windows
  extractor      the feature extractor over all windows (refiners that need features)
  windows        `refiner.refine_windows` (LPOSS patch LP)
  merge          `merge_windows` (each window's map resized to its box, averaged)
  canvas         `refiner.refine_canvas` (LPOSS+ pixel LP, PAMR at the resized size)
  final          `segment`'s tail: synonyms, resize to the original size, softmax/thresholds, argmax,
                 including `refiner.refine_output` (NACLIP's PAMR at the original size), shown as `output`

`text` is `set_classes` for the 150 classes, once per method, before timing: the first method with given
weights encodes (length-sorted truncated batches), later ones read the text cache (a temporary folder for
the whole run unless OVSEG_CACHE is set); `(enc)` / `(cache)` says which. Each method runs in its own process
so its peak memory (resident set on the CPU, allocated CUDA memory on a GPU) is its own. Not a test.

    python benchmarks/e2e.py --device cpu                           # every method, 1 warm-up + 3 timed images
    python benchmarks/e2e.py --methods lposs_plus sclip --repeats 5 --precision bf16-mixed
    python benchmarks/e2e.py --device cuda --precision bf16-true
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("decode", "predictor", "extractor", "windows", "merge", "canvas", "output", "final")
HEADERS = ("decode+resize", "predictor", "extractor", "ref.windows", "merge", "ref.canvas", "ref.output", "final")
ROOT = Path(__file__).resolve().parent.parent


def _random_overrides(block, prefix: str) -> list[str]:
    """`<prefix>.pretrained=random` for a stage block and every stage spec nested in it (a dict with a `name`,
    e.g. a predictor's `vfm`), whether or not the config writes `pretrained` (its default is real weights)."""
    if not isinstance(block, dict):
        return []
    out = [f"{prefix}.pretrained=random"] if "name" in block or "pretrained" in block else []
    for key, value in block.items():
        out += _random_overrides(value, f"{prefix}.{key}")
    return out


def _ade_like_jpeg(height: int, width: int) -> bytes:
    """A smooth random scene (a few colour regions with texture), JPEG-encoded like ADE20K's images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 12, size=img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_one(method: str, args) -> dict:
    """Build, set classes, then time `args.warmup + args.repeats` images; returns the per-stage seconds."""
    import torch
    from omegaconf import OmegaConf

    from ovseg import text_cache
    from ovseg.evaluation.data.io import image_tensor
    from ovseg.evaluation.methods import (StageOptions, build_segmenter, dataset_protocol, dataset_vocabulary,
                                          load_method, resolve_method)
    from ovseg.evaluation.suites import load_suite
    from ovseg.pipeline.segmenter import resize_for
    from ovseg.pipeline.vocabulary import Vocabulary
    from ovseg.pipeline.windows import crop_windows, merge_windows, sliding_windows
    from ovseg.runtime import autocast, place, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    raw = OmegaConf.to_container(load_method(method), resolve=True)
    overrides = _random_overrides(raw.get("predictor"), "predictor") + _random_overrides(raw.get("extractor"), "extractor")
    cfg, _ = resolve_method(method, overrides)
    spec = next(d for d in load_suite("standard8").datasets if d.name == "ade20k")
    protocol = dataset_protocol(cfg, spec.name, spec.protocol)
    vocab = dataset_vocabulary(cfg, spec)
    if args.classes < vocab.num_classes:
        vocab = Vocabulary(vocab.class_names[: args.classes])
    start = time.perf_counter()
    seg = build_segmenter(cfg, protocol)
    StageOptions(cfg, {"predictor": seg.predictor, "refiner": seg.refiner}).apply(spec.name)
    seg.eval()
    place(seg, device, args.precision)
    build_s = time.perf_counter() - start
    entries = text_cache.info().entries
    start = time.perf_counter()
    seg.set_classes(vocab)
    text_s = time.perf_counter() - start
    key = getattr(seg.predictor, "text_key", None)
    cacheable = text_cache.enabled() and callable(key) and key() is not None
    encoded = not cacheable or text_cache.info().entries > entries
    weights_mb = _peak_mb(device)

    jpeg = _ade_like_jpeg(args.height, args.width)
    p, pred, ext, ref = seg.protocol, seg.predictor, seg.extractor, seg.refiner
    times = {s: [] for s in STAGES}
    output_s = []
    original_refine_output = ref.refine_output

    def timed_refine_output(image, scores):
        _sync(device)
        t = time.perf_counter()
        out = original_refine_output(image, scores)
        _sync(device)
        output_s.append(time.perf_counter() - t)
        return out

    ref.refine_output = timed_refine_output  # instance attribute: times the output step inside `segment`
    for i in range(args.warmup + args.repeats):
        t = {}
        with torch.no_grad(), autocast(device, args.precision):
            clock = time.perf_counter()

            def lap(name):
                nonlocal clock
                _sync(device)
                now = time.perf_counter()
                t[name] = now - clock
                clock = now

            resized_image = resize_for(image_tensor(jpeg, "ade-like.jpg"), p)
            image = resized_image.pixels.to(device).float() / 255.0
            lap("decode")
            h, w = image.shape[-2:]
            boxes = sliding_windows(h, w, p.crop or (h, w), p.stride)
            crops = crop_windows(image, boxes)
            pred.set_image(image)
            scores = seg._batched(pred, crops)
            lap("predictor")
            features = seg._batched(ext, crops) if ext is not None else None
            lap("extractor")
            boxes = boxes.to(device)
            windows = ref.refine_windows(image, boxes, scores, features)
            lap("windows")
            merged = merge_windows(windows.float(), boxes, h, w)
            lap("merge")
            canvas = ref.refine_canvas(image, merged).float()
            lap("canvas")
            seg.refined_scores = lambda _image, canvas=canvas: canvas  # `segment` continues from these scores
            output_s.clear()
            labels = seg.segment(resized_image).labels
            lap("final")
            del seg.refined_scores
        t["output"] = sum(output_s)
        t["final"] -= t["output"]
        if i >= args.warmup:
            for name in STAGES:
                times[name].append(t[name])
    assert tuple(labels.shape) == (args.height, args.width)
    totals = [sum(times[s][i] for s in STAGES) for i in range(args.repeats)]
    return {
        "method": method,
        "names": len(vocab.names),
        "windows": int(boxes.shape[0]),
        "resized": [int(h), int(w)],
        "build_s": build_s,
        "text_s": text_s,
        "text_encoded": encoded,
        "stages": {s: statistics.median(v) for s, v in times.items()},
        "totals": totals,
        "weights_mb": weights_mb,
        "peak_mb": _peak_mb(device),
    }


def _methods(selected) -> list[str]:
    found = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    return [m for m in found if not selected or m in selected]


def _row(r: dict) -> str:
    total = statistics.median(r["totals"])
    spread = f"{min(r['totals']):.2f}-{max(r['totals']):.2f}"
    stages = " | ".join(f"{r['stages'][s]:.3f}" for s in STAGES)
    text = f"{r['text_s']:.1f} ({'enc' if r['text_encoded'] else 'cache'})"
    return (f"| {r['method']} | {1 / total:.3f} | {total:.2f} ({spread}) | {stages} | {text} | {r['windows']} | "
            f"{r['weights_mb']:.0f} / {r['peak_mb']:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", help="method config names (default: every configs/methods/*.yaml)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="32-true", help="as --precision of `ovseg bench` (ovseg.runtime)")
    ap.add_argument("--repeats", type=int, default=3, help="timed images per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first")
    ap.add_argument("--classes", type=int, default=150, help="use only the first N ADE20K classes")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=683)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process, print JSON
    args = ap.parse_args(argv)
    if args.one:
        print("E2E-RESULT " + json.dumps(run_one(args.one, args)))
        return

    tmp = None
    env = dict(os.environ)
    if "OVSEG_CACHE" not in env:
        tmp = tempfile.TemporaryDirectory(prefix="ovseg-e2e-")
        env["OVSEG_CACHE"] = tmp.name
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    passthrough = ["--device", args.device, "--precision", args.precision, "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--classes", str(args.classes), "--height", str(args.height),
                   "--width", str(args.width)] + (["--threads", str(args.threads)] if args.threads else [])
    rows, skipped = [], []
    for method in _methods(args.methods):
        proc = subprocess.run([sys.executable, __file__, "--one", method, *passthrough], env=env, capture_output=True,
                              text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("E2E-RESULT ")), None)
        if proc.returncode != 0 or line is None:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            skipped.append(f"{method}: {reason}")
            print(f"# {method}: skipped ({reason})", flush=True)
            continue
        rows.append(json.loads(line[len("E2E-RESULT "):]))
        r = rows[-1]
        print(f"# {method}: {statistics.median(r['totals']):.2f} s/image, {r['names']} names, {r['windows']} windows "
              f"on {r['resized'][0]}x{r['resized'][1]}, built in {r['build_s']:.1f} s", flush=True)
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.height}x{args.width} JPEG, ADE20K settings ({args.classes} classes), random full-size weights, "
          f"{where}, {args.precision}, median of {args.repeats} images after {args.warmup} warm-up; seconds\n")
    print("| method | images/s | s/image (min-max) | " + " | ".join(HEADERS) + " | text s | windows | memory MB (weights / peak) |")
    print("|---" * (len(HEADERS) + 6) + "|")
    for r in rows:
        print(_row(r))
    for s in skipped:
        print(f"skipped: {s}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
