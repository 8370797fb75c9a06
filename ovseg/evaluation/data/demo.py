"""The embedded demo dataset: 20 outdoor-like scenes generated from a seed, no download.

Five classes with real names (sky, grass, water, sand, road) are laid out as scenes (a wavy
horizon, a shore line, lakes with sandy banks, roads running to a vanishing point), each class
painted with its own colour and texture so that colour affinities carry information (what
LPOSS+ exploits). A few images hold an unlabelled object marked 255 (ignore).

The generator uses only seeded uniform draws and arithmetic (no sin/exp, whose last bits may
differ across CPUs), so the same version writes the same pixels everywhere. It writes once into
`cache_dir()/demo/{images,labels}`; the `.version` marker records GENERATOR_VERSION and a change
regenerates. Generation goes to a temporary folder renamed into place, so concurrent processes
(DDP ranks, parallel tests) never see a half-written dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.errors import DatasetError
from ovseg.paths import cache_dir

GENERATOR_VERSION = 1
SEED = 2025
NUM_IMAGES = 20
CLASSES = ("sky", "grass", "water", "sand", "road")
SKY, GRASS, WATER, SAND, ROAD = range(5)
IGNORE = 255
MARKER = ".version"

# per class: base RGB, smooth-variation amplitude, pixel-noise amplitude
_BASE = np.array([[120, 170, 230], [70, 135, 45], [35, 85, 145], [212, 190, 140], [88, 88, 94]], np.float64)
_SMOOTH = np.array([10, 22, 14, 12, 6], np.float64)
_NOISE = np.array([4, 20, 8, 12, 7], np.float64)


def demo_root() -> Path:
    return cache_dir() / "demo"


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a small (gh, gw) grid to (h, w): smooth random fields."""
    gh, gw = grid.shape
    ys = np.arange(h) * ((gh - 1) / max(h - 1, 1))
    xs = np.arange(w) * ((gw - 1) / max(w - 1, 1))
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _curve(rng: np.random.Generator, n: int, knots: int) -> np.ndarray:
    """Smooth 1-D curve of length n with values in [-0.5, 0.5]."""
    return _upsample(rng.random((1, knots)), 1, n)[0] - 0.5


def _layout(rng: np.random.Generator, index: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    horizon = h * rng.uniform(0.25, 0.45) + _curve(rng, w, 6) * h * 0.15
    ground = (GRASS, SAND)[index % 2]
    label = np.full((h, w), ground, np.uint8)
    kind = index % 4  # 0 beach, 1 lake, 2 road, 3 lake and road
    if kind == 0:
        shore = horizon + (h - horizon) * rng.uniform(0.3, 0.6) + _curve(rng, w, 5) * h * 0.12
        label[yy < shore[None, :]] = WATER
        if ground == GRASS:  # a sandy strip along the shore
            label[(yy >= shore[None, :]) & (yy < shore[None, :] + h * 0.08)] = SAND
    if kind in (1, 3):
        cx, cy = w * rng.uniform(0.25, 0.75), h * rng.uniform(0.6, 0.8)
        rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.1, 0.2)
        wobble = (_upsample(rng.random((5, 7)), h, w) - 0.5) * 0.8
        r = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + wobble
        label[r < 1.5] = SAND if ground == GRASS else GRASS
        label[r < 1.0] = WATER
    if kind in (2, 3):
        hy = float(horizon.mean())
        vx, bx = w * rng.uniform(0.35, 0.65), w * rng.uniform(0.2, 0.8)
        half, bend = w * rng.uniform(0.12, 0.25), w * rng.uniform(-0.3, 0.3)
        t = np.clip((yy - hy) / (h - hy), 0.0, 1.0)
        centre = vx + (bx - vx) * t + bend * t * (1 - t)
        label[(np.abs(xx - centre) < 1.5 + half * t) & (yy > hy)] = ROAD
    if index % 3 == 2:  # a patch of the other ground class
        px, py = w * rng.uniform(0.1, 0.9), h * rng.uniform(0.7, 0.95)
        r = ((xx - px) / (w * 0.12)) ** 2 + ((yy - py) / (h * 0.08)) ** 2
        label[(r < 1) & (label == ground)] = SAND if ground == GRASS else GRASS
    label[yy < horizon[None, :]] = SKY
    if index % 5 == 3:  # an unlabelled object: ignore region
        ox, oy = w * rng.uniform(0.2, 0.8), h * rng.uniform(0.55, 0.85)
        r = ((xx - ox) / (w * 0.07)) ** 2 + ((yy - oy) / (h * 0.06)) ** 2
        label[r < 1] = IGNORE
    return label


def _paint(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    cls = np.where(label == IGNORE, 0, label).astype(np.int64)
    base = _BASE + rng.integers(-12, 13, size=_BASE.shape)  # per-image colour jitter
    img = base[cls]
    img += (_upsample(rng.random((6, 8)), h, w)[:, :, None] - 0.5) * 2 * _SMOOTH[cls][:, :, None]
    img += (rng.random((h, w, 1)) - 0.5) * 2 * _NOISE[cls][:, :, None]
    rows = np.arange(h, dtype=np.float64)[:, None]
    sky = label == SKY
    img[sky] += ((rows / h) * 60.0 * np.ones((1, w)))[sky][:, None]  # lighter towards the horizon
    water = label == WATER
    ripples = (_upsample(rng.random((max(2, h // 3), 1)), h, 1) - 0.5) * 40.0  # horizontal bands
    img[water] += (ripples * np.ones((1, w)))[water][:, None]
    ignore = label == IGNORE
    if ignore.any():  # a saturated, checkered object the labels do not cover
        colours = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        yy, xx = np.mgrid[:h, :w]
        img[ignore] = colours[((yy // 4 + xx // 4) % 2)[ignore]]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_demo(out_dir: str | os.PathLike) -> Path:
    """Write the demo images and labels (grayscale PNGs) into `out_dir`; same bytes for the same version."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(NUM_IMAGES):
        rng = np.random.default_rng([SEED, GENERATOR_VERSION, i])
        h, w = int(rng.integers(160, 241)), int(rng.integers(224, 321))
        label = _layout(rng, i, h, w)
        image = _paint(rng, label)
        Image.fromarray(image, "RGB").save(out / "images" / f"demo_{i:03d}.png")
        Image.fromarray(label, "L").save(out / "labels" / f"demo_{i:03d}.png")
    return out


def _is_current(root: Path) -> bool:
    try:
        return (root / MARKER).read_text().strip() == str(GENERATOR_VERSION)
    except OSError:
        return False


def ensure_demo(root: str | os.PathLike | None = None) -> Path:
    """Generate the demo dataset once (regenerated when GENERATOR_VERSION changes); returns its folder."""
    root = Path(root) if root is not None else demo_root()
    if _is_current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-new-", dir=root.parent))
    try:
        generate_demo(tmp)
        (tmp / MARKER).write_text(f"{GENERATOR_VERSION}\n")
        for _ in range(3):
            try:
                os.rename(tmp, root)  # atomic; fails if root exists (and is not empty)
                return root
            except OSError:
                if _is_current(root):  # another process installed it first
                    return root
                # an older version or a stray file: move it aside, then try again
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
                try:
                    os.rename(root, stale / "old")
                except OSError:
                    pass  # someone else moved it already
                shutil.rmtree(stale, ignore_errors=True)
        raise DatasetError(f"could not install the demo dataset into {root}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
