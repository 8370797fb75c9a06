"""Windows per second of the CLIP-family predictors (ViT-B/16, random weights) per size and dtype.

Prints a table; not a test. Random weights run the same arithmetic as pretrained ones, so the
figures hold for real checkpoints. Examples:

    python benchmarks/clip_throughput.py                       # CUDA if present, else CPU
    python benchmarks/clip_throughput.py --device cpu --batch 2 --iters 2 --warmup 1
    python benchmarks/clip_throughput.py --methods maskclip naclip --sizes 224 336 448
"""

from __future__ import annotations

import argparse
import time

import torch

from ovseg import build_predictor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def windows_per_second(pred, size: int, batch: int, iters: int, warmup: int, device: torch.device) -> float:
    images = torch.rand(batch, 3, size, size, device=device)
    for _ in range(warmup):
        pred(images)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        pred(images)
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["maskclip"], help="predictor names (clip maskclip sclip clearclip naclip)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 448], help="square window sizes")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=None, help="windows per forward (default 32 on CUDA, 2 on CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--classes", type=int, default=21, help="number of class names (Q)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batch = args.batch or (32 if cuda else 2)
    iters = args.iters or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    names = [f"class {i}" for i in range(args.classes)]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.model}, random weights, {where}, batch {batch}, {iters} timed iterations, Q={len(names)}")
    print(f"{'method':<10} {'size':>5} {'dtype':>5} {'windows/s':>10}")
    for method in args.methods:
        pred = build_predictor(method, model=args.model, pretrained="random", templates="single").to(device)
        pred.set_classes(names)
        for dtype_name in args.dtypes:
            pred.to(DTYPES[dtype_name])
            for size in args.sizes:
                rate = windows_per_second(pred, size, batch, iters, warmup, device)
                print(f"{method:<10} {size:>5} {dtype_name:>5} {rate:>10.2f}", flush=True)
        del pred
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
