"""Time LPOSS patch LP and LPOSS+ pixel LP against a straightforward scipy implementation of the same math.

The case is an ADE20k-like image (ADE20K's images resized to a short side of 448): 448×597, windows 224 / stride 112
(15 windows, N = 2940 patches), D = 768, k = 400, r = 13 (radius 6), 150 classes, synthetic seeded
inputs (clustered unit features, a Voronoi colour image with noise, scores uniform in [-0.2, 0.4]).

The baseline is the reference algorithm written plainly with numpy/scipy: exact kNN by a float64
GEMM and argpartition, a float32 sparse graph (W + Wᵀ, diagonal removed, D^-1/2 W D^-1/2), L in
float64, and one `scipy.sparse.linalg.cg` per class (x0 = 0, rtol = 1e-6, atol = 0, maxiter = 10).

Every (stage, implementation) runs in its own subprocess, so its peak memory is that process's
`ru_maxrss` (resident set, what the OS had to provide). We print the peak and the peak minus the RSS
right before the stage ran (interpreter, torch, the inputs): the latter is what the stage itself
added, its output included. On CUDA the peak is `torch.cuda.max_memory_allocated`. Outputs go to a
temporary folder and the parent compares them: max |ours - scipy| / max |scipy|.

    python benchmarks/lp.py                     # CPU, both stages, 150 classes (the scipy pixel solve takes minutes)
    python benchmarks/lp.py --device cuda       # ours on the GPU (synchronised timings), scipy on the CPU
    python benchmarks/lp.py --classes 19 --baseline-classes 5   # scipy CG on 5 classes, time scaled to 19

The machine is shared and timings drift by ±30 % over minutes, so both sides are run several times
(ours `--repeats` after a warm-up, scipy `--baseline-repeats`) and the speed-up is printed both as a
ratio of medians and as a ratio of the fastest runs. Ours also prints its median process CPU time
(all threads, waiting in a spin loop included): on a loaded machine the wall time mostly says what
share of the cores a run got, and the CPU time says more about the work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEIGHT, WIDTH, CROP, STRIDE, DIM, K, RADIUS = 448, 597, 224, 112, 768, 400, 6
PARAMS = dict(gamma=3.0, sigma=0.01, pix_dist_pow=1.0, alpha=0.95, tol=1e-6, maxiter=10, tau=0.01)


# ---------------------------------------------------------------------------------------------
# inputs


def patch_inputs(classes: int, seed: int = 0):
    """Clustered unit features of the 15 windows' patches, their centres, uniform scores."""
    import torch

    from ovseg.pipeline.windows import sliding_windows

    boxes = sliding_windows(HEIGHT, WIDTH, CROP, STRIDE)
    g = CROP // 16
    offs = torch.arange(g) * 16 + 8
    centres = torch.cat(
        [torch.stack(torch.meshgrid(y1 + offs, x1 + offs, indexing="ij"), -1).reshape(-1, 2) for y1, _, x1, _ in boxes.tolist()]
    ).float()
    rng = np.random.default_rng(seed)
    n = centres.shape[0]
    feats = rng.standard_normal((12, DIM))[rng.integers(0, 12, n)] + 1.5 * rng.standard_normal((n, DIM))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    scores = rng.uniform(-0.2, 0.4, (n, classes)).astype(np.float32)
    return scores, feats, centres.numpy()


def pixel_inputs(classes: int, seed: int = 0):
    """A Voronoi colour image (40 regions, N(0, 4) noise, uint8 -> [0, 1]) and uniform scores (Q, H, W)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, 1, (40, 2)) * [HEIGHT, WIDTH]
    colours = rng.uniform(0, 255, (40, 3))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    region = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    image = np.clip(colours[region] + rng.normal(0, 4, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    image = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / 255
    scores = np.empty((classes, HEIGHT, WIDTH), np.float32)
    for c in range(classes):  # row by row: no (Q, H, W) float64 temporary in the measured process
        scores[c] = rng.uniform(-0.2, 0.4, (HEIGHT, WIDTH))
    return image, scores


# ---------------------------------------------------------------------------------------------
# scipy baseline (the reference math, written plainly)


def _normalise(W):
    import scipy.sparse as sp

    W = W - sp.diags(W.diagonal())
    deg = np.asarray(W.sum(axis=1), dtype=np.float32).ravel()
    deg[deg == 0] = 1
    d = sp.diags((1 / np.sqrt(deg)).astype(np.float32))
    return (d @ W @ d).astype(np.float32)


def _cg_per_class(L, Y, limit):
    from scipy.sparse.linalg import cg

    out = np.zeros((L.shape[0], limit))
    for c in range(limit):
        b = Y[:, c].astype(np.float64)
        out[:, c], _ = cg(L, b, x0=np.zeros_like(b), rtol=PARAMS["tol"], atol=0.0, maxiter=PARAMS["maxiter"])
    return out


def scipy_patch(scores, feats, centres, limit):
    import scipy.sparse as sp

    t0 = time.perf_counter()
    x = feats.astype(np.float64)
    sims = x @ x.T
    idx = np.argpartition(-sims, K - 1, axis=1)[:, :K]
    s = np.take_along_axis(sims, idx, 1).astype(np.float32)
    dist = np.linalg.norm(centres[idx] - centres[:, None, :], axis=-1).astype(np.float32)
    w = np.maximum(s, 0) ** PARAMS["gamma"] * np.exp(-PARAMS["sigma"] * dist ** PARAMS["pix_dist_pow"])
    n = feats.shape[0]
    W = sp.csr_matrix((w.ravel().astype(np.float32), (np.repeat(np.arange(n), K), idx.ravel())), shape=(n, n))
    L = sp.eye(n) - PARAMS["alpha"] * _normalise((W + W.T).tocsr())
    t1 = time.perf_counter()
    out = _cg_per_class(L.tocsr(), scores, limit)
    return out, t1 - t0, time.perf_counter() - t1


def scipy_pixel(image, scores, limit):
    import scipy.sparse as sp
    import torch

    from ovseg_lposs.pixel_lp import lab_image

    t0 = time.perf_counter()
    lab = lab_image(torch.from_numpy(image)).reshape(3, -1).T.numpy()
    h, w = image.shape[-2:]
    ys, xs = np.divmod(np.arange(h * w), w)
    rows, cols, vals = [], [], []
    for dy in range(-RADIUS, RADIUS + 1):
        for dx in range(-RADIUS, RADIUS + 1):
            if dy == 0 and dx == 0:
                continue
            ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            r = np.nonzero(ok)[0].astype(np.int32)
            c = r + np.int32(dy * w + dx)
            rows.append(r)
            cols.append(c)
            vals.append(np.exp(-np.linalg.norm(lab[r] - lab[c], axis=1) / PARAMS["tau"]).astype(np.float32))
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w))
    del rows, cols, vals
    L = sp.eye(h * w) - PARAMS["alpha"] * _normalise(W)
    del W
    t1 = time.perf_counter()
    out = _cg_per_class(L.tocsr(), scores.reshape(scores.shape[0], -1).T, limit)
    return out.T.reshape(limit, h, w), t1 - t0, time.perf_counter() - t1


# ---------------------------------------------------------------------------------------------
# ours


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_patch(scores, feats, centres, device, repeats):
    import torch

    from ovseg_lposs import propagate_patches
    from ovseg_lposs.patch_lp import patch_graph

    y, x, c = (torch.from_numpy(a).to(device) for a in (scores, feats, centres))
    kw = {k: PARAMS[k] for k in ("gamma", "sigma", "pix_dist_pow")}
    times, graph_times, cpu_times = [], [], []
    for i in range(repeats + 1):  # the first run warms up (allocator, kernels) and is not counted
        _sync(device)
        t0 = time.perf_counter()
        patch_graph(x, c, k=K, **kw)
        _sync(device)
        t1 = time.perf_counter()
        c1 = time.process_time()
        out = propagate_patches(y, x, c, k=K, **kw, alpha=PARAMS["alpha"], tol=PARAMS["tol"], maxiter=PARAMS["maxiter"])
        _sync(device)
        t2 = time.perf_counter()
        if i:
            graph_times.append(t1 - t0)
            times.append(t2 - t1)
            cpu_times.append(time.process_time() - c1)
    return out.cpu().numpy(), times, graph_times, cpu_times


def ours_pixel(image, scores, device, repeats):
    import torch

    from ovseg_lposs import propagate_pixels
    from ovseg_lposs.pixel_lp import PixelGraph

    img, y = torch.from_numpy(image).to(device), torch.from_numpy(scores).to(device)
    times, graph_times, cpu_times = [], [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        graph = PixelGraph(img, radius=RADIUS, tau=PARAMS["tau"])
        _sync(device)
        t1 = time.perf_counter()
        c1 = time.process_time()
        del graph
        out = propagate_pixels(img, y, radius=RADIUS, tau=PARAMS["tau"], alpha=PARAMS["alpha"], tol=PARAMS["tol"],
                               maxiter=PARAMS["maxiter"])
        _sync(device)
        t2 = time.perf_counter()
        if i:
            graph_times.append(t1 - t0)
            times.append(t2 - t1)
            cpu_times.append(time.process_time() - c1)
        if i < repeats:
            del out
    return out.cpu().numpy(), times, graph_times, cpu_times


# ---------------------------------------------------------------------------------------------
# one measurement per subprocess


def worker(stage: str, impl: str, args) -> None:
    import torch

    # import everything the timed code uses first, so no import lands inside a timing
    import scipy.sparse.linalg  # noqa: F401

    import ovseg_lposs.patch_lp  # noqa: F401
    import ovseg_lposs.pixel_lp  # noqa: F401

    device = torch.device(args.device if impl == "ours" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if stage == "patch":
        inputs = patch_inputs(args.classes)
    else:
        inputs = pixel_inputs(args.classes)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result: dict = {"stage": stage, "impl": impl, "device": str(device), "threads": torch.get_num_threads()}
    if impl == "ours":
        fn = ours_patch if stage == "patch" else ours_pixel
        out, times, graph_times, cpu_times = fn(*inputs, device, args.repeats)
        result.update(total=float(np.median(times)), graph=float(np.median(graph_times)), runs=times,
                      cpu=float(np.median(cpu_times)))
        if device.type == "cuda":
            result["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    else:
        limit = min(args.baseline_classes or args.classes, args.classes)
        fn = scipy_patch if stage == "patch" else scipy_pixel
        runs = []
        for _ in range(max(1, args.baseline_repeats)):
            out, build, solve = fn(*inputs, limit)
            runs.append((build + solve * args.classes / limit, build, solve))
        total, build, solve = sorted(runs)[len(runs) // 2]  # the median run
        result.update(graph=build, solve_measured=solve, solve=solve * args.classes / limit, solved_classes=limit)
        result.update(total=total, runs=[r[0] for r in runs])
    result["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["rss_before"] = rss_before
    np.save(Path(args.out) / f"{stage}_{impl}.npy", out)
    print(json.dumps(result))


def run(stage: str, impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, impl, "--out", args.out, "--device", args.device,
           "--classes", str(args.classes), "--repeats", str(args.repeats), "--threads", str(args.threads or 0),
           "--baseline-repeats", str(baseline_repeats(args, stage))]
    if args.baseline_classes:
        cmd += ["--baseline-classes", str(args.baseline_classes)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_repeats(args, stage: str) -> int:
    """scipy runs per stage: `--baseline-repeats`, or 3 for patch LP (seconds) and 1 for pixel LP (minutes)."""
    return args.baseline_repeats or (3 if stage == "patch" else 1)


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="device for ours: cpu or cuda (the scipy baseline always runs on CPU)")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--stage", choices=["patch", "pixel", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours after one warm-up run (median reported)")
    p.add_argument("--baseline-classes", type=int, default=0,
                   help="run the scipy CG on this many classes only and scale its solve time (0: all)")
    p.add_argument("--baseline-repeats", type=int, default=0,
                   help="scipy runs per stage, median reported (0: 3 for patch LP, 1 for pixel LP)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", nargs=2, metavar=("STAGE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args)

    import torch

    print(f"LP benchmark: {HEIGHT}x{WIDTH} image, crop {CROP} stride {STRIDE}, D={DIM}, k={K}, r={2 * RADIUS + 1}, "
          f"{args.classes} classes; ours on {args.device}, scipy on CPU")
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, ours with {threads} torch thread(s), {os.cpu_count()} CPUs, "
          f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    stages = ["patch", "pixel"] if args.stage == "both" else [args.stage]
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        for stage in stages:
            ours = run(stage, "ours", args)
            line = (f"[{stage}] ours  : {ours['total']:.3f} s (graph {ours['graph']:.3f} s; runs "
                    f"{', '.join(f'{t:.3f}' for t in ours['runs'])}; CPU time {ours['cpu']:.3f} s, all threads); "
                    f"peak RSS {mb(ours['rss_peak'])}, "
                    f"+{mb(ours['rss_peak'] - ours['rss_before'])} over interpreter+inputs")
            if "gpu_peak" in ours:
                line += f"; GPU peak allocated {mb(ours['gpu_peak'])}"
            print(line, flush=True)
            if args.skip_baseline:
                continue
            ref = run(stage, "scipy", args)
            scaled = "" if ref["solved_classes"] == args.classes else f" (CG on {ref['solved_classes']} classes, scaled)"
            print(f"[{stage}] scipy : {ref['total']:.3f} s (graph {ref['graph']:.3f} s, per-class CG "
                  f"{ref['solve']:.3f} s{scaled}; runs {', '.join(f'{t:.3f}' for t in ref['runs'])}); "
                  f"peak RSS {mb(ref['rss_peak'])}, +{mb(ref['rss_peak'] - ref['rss_before'])} over interpreter+inputs")
            a = np.load(Path(tmp) / f"{stage}_ours.npy")
            b = np.load(Path(tmp) / f"{stage}_scipy.npy")
            a = a[:, : b.shape[1]] if stage == "patch" else a[: b.shape[0]]
            rel = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())
            print(f"[{stage}] speed-up {ref['total'] / ours['total']:.1f}x of medians, "
                  f"{min(ref['runs']) / min(ours['runs']):.1f}x of fastest runs "
                  f"(graph {ref['graph'] / ours['graph']:.1f}x, solve {ref['solve'] / max(ours['total'] - ours['graph'], 1e-9):.1f}x); "
                  f"max |ours - scipy| / max |scipy| = {rel:.2e}", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
