"""LPOSS+ pixel label propagation as a stencil operator: no sparse matrix, no explicit edge indices.

The pixel graph joins every pixel to the (2r+1)² - 1 pixels of its square neighbourhood with weight
`exp(-‖lab_i - lab_j‖₂ / tau)`. Its product with the (pixels, classes) block of CG directions is a
spatially varying stencil, which we run as ONE dense batched GEMM per CG step (fast on CPU and GPU):

- the image is cut into vertical strips of `b` columns. A strip, with `r` halo columns on each side
  and `r` zero rows above and below, is a (H + 2r, b + 2r) patch; the strips are stacked into one
  tall buffer `P` of shape (rows, b + 2r, classes), classes last;
- a *tile* is one row of one strip: `b` output pixels. All 13 × (b + 2r) buffer entries that its
  pixels read (rows y - r .. y + r of the strip) are one contiguous run of `P`, and the runs of
  consecutive tiles overlap, so `P` viewed as (tiles, 13·(b + 2r), classes) is a strided view, no
  copy;
- each tile has a (b, 13·(b + 2r)) weight matrix with the 168 normalised weights of each output pixel
  at their positions and zeros elsewhere, so `Wn p = bmm(bands, runs)`.

Only the 84 weight maps of one half of the offsets are computed (the graph is symmetric). The bands
take 13·(b + 2r)·b floats per tile (287 MB at 448×597, r = 6, b = 8); classes are solved in chunks
so the CG vectors stay within `CG_BUDGET_BYTES`. Everything runs in float32 (float64 for float64
scores); the reference's float32 graph with float64 CG differs from this by about 1e-6 relative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cg import block_cg

#: output pixels per tile (strip width b); at least the radius, so a halo spans one strip
TILE = 8
#: bytes allowed for the CG vectors of one chunk of classes
CG_BUDGET_BYTES = 256 << 20
#: Lab value of the zero-padding outside the image: its distance to any pixel makes exp(-d/τ) zero
_FAR = 1e4


def lab_image(image: torch.Tensor) -> torch.Tensor:
    """kornia `rgb_to_lab` of a (3, H, W) RGB image in [0, 1], divided by (100, 128, 128) as in LPOSS+."""
    from kornia.color import rgb_to_lab

    scale = torch.tensor([100.0, 128.0, 128.0], dtype=image.dtype, device=image.device).view(3, 1, 1)
    return rgb_to_lab(image[None])[0] / scale


def half_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset (dy, dx) of each ± pair of the (2r+1)² - 1 neighbourhood offsets."""
    return [(dy, dx) for dy in range(0, radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx > 0]


def pixel_weights(image: torch.Tensor, radius: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised edge weights for `half_offsets(radius)`: (84, H, W) maps and (H, W) 1/sqrt(degree).

    `maps[o][y, x]` is `Wn` between pixel (y, x) and pixel (y + dy, x + dx) (zero when that pixel is
    outside the image); the weight of the opposite offset at pixel q is the same number read at
    q - (dy, dx).
    """
    r = radius
    h, w = image.shape[-2:]
    lab = F.pad(lab_image(image), (r, r, r, r), value=_FAR)
    centre = lab[:, r : r + h, r : r + w]
    offsets = half_offsets(r)
    maps = torch.empty((len(offsets), h, w), dtype=image.dtype, device=image.device)
    pad = maps.new_zeros((h + 2 * r, w + 2 * r))  # one map with a zero border, for mirrored reads
    degree = maps.new_zeros((h, w))
    floor = _negligible(image.dtype)
    log_floor = math.log(floor) - 1.0
    for m, (dy, dx) in zip(maps, offsets):
        diff = centre - lab[:, r + dy : r + dy + h, r + dx : r + dx + w]
        torch.sum(diff.mul_(diff), dim=0, out=m)
        # clamping first keeps exp out of the (slow) subnormal range
        m.sqrt_().mul_(-1.0 / tau).clamp_(min=log_floor).exp_()
        m.masked_fill_(m < floor, 0.0)
        pad[r : r + h, r : r + w] = m
        degree += m
        degree += pad[r - dy : r - dy + h, r - dx : r - dx + w]
    dinv = torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()
    dinv_pad = F.pad(dinv, (r, r, r, r))
    for m, (dy, dx) in zip(maps, offsets):
        m.mul_(dinv).mul_(dinv_pad[r + dy : r + dy + h, r + dx : r + dx + w])  # >= floor/168: normal
    return maps, dinv


def _negligible(dtype: torch.dtype) -> float:
    """Weights below this are set to zero (about 1e-31 in float32).

    With tau = 0.01 many weights underflow into the subnormal range, and subnormal operands make CPU
    arithmetic (the GEMM above all) many times slower. Dropping weights this small changes the
    products by less than 1e-29 relative, far below float32 rounding of the weights that matter.
    """
    info = torch.finfo(dtype)
    return info.tiny / info.eps


class PixelGraph:
    """The normalised LPOSS+ pixel graph of one image, stored as per-tile band matrices (see module doc).

    CG vectors live in the *strip layout* (strips, rows, b, classes) viewed as (tiles, b, classes):
    strip s, row R holds image row R - r, columns s·b .. s·b + b - 1; rows outside the
    image and columns beyond W are zero. `to_strips` / `from_strips` convert (Q, H, W) maps.
    """

    def __init__(self, image: torch.Tensor, *, radius: int = 6, tau: float = 0.01, tile: int = TILE):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image (3, H, W), got {tuple(image.shape)}")
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        self.height, self.width = h, w = image.shape[-2:]
        self.radius = r = int(radius)
        self.tile = b = max(int(tile), r, 1)
        self.strips = -(-w // b)
        self.rows = h + 2 * r  # rows per strip, zero rows included
        self.span = b + 2 * r  # buffer entries one tile reads in one row
        self.depth = (2 * r + 1) * self.span  # GEMM inner dimension
        self.tiles = self.strips * self.rows
        self.dtype, self.device = image.dtype, image.device
        self.bands = self._bands(*pixel_weights(image, r, tau))

    @property
    def size(self) -> int:
        """Unknowns per class in the strip layout (tiles · b)."""
        return self.tiles * self.tile

    def _bands(self, maps: torch.Tensor, dinv: torch.Tensor) -> torch.Tensor:
        h, w, r, b, s, k = self.height, self.width, self.radius, self.tile, self.strips, self.depth
        bands = torch.zeros((self.tiles, b, k), dtype=self.dtype, device=self.device)
        pad = maps.new_zeros((h + 2 * r, s * b + 2 * r))  # a map with a zero border, for mirrored reads
        stage = maps.new_zeros((h, s * b))  # a map widened to whole strips
        src = stage.view(h, s, b).transpose(0, 1)

        def put(dy: int, dx: int) -> None:
            # entry (strip, r + y, i, column (dy + r)·span + i + r + dx) <- stage[y, strip·b + i]
            offset = r * b * k + (dy + r) * self.span + r + dx
            bands.as_strided((s, h, b), (self.rows * b * k, b * k, k + 1), offset).copy_(src)

        for m, (dy, dx) in zip(maps, half_offsets(r)):
            stage[:, :w] = m
            put(dy, dx)
            pad[r : r + h, r : r + w] = m
            stage[:, :w] = pad[r - dy : r - dy + h, r - dx : r - dx + w]
            put(-dy, -dx)
        return bands

    def buffer(self, classes: int) -> torch.Tensor:
        """Zeroed tall buffer (tiles + 2r, b + 2r, classes) holding the search directions with halos."""
        return torch.zeros((self.tiles + 2 * self.radius, self.span, classes), dtype=self.dtype, device=self.device)

    def interior(self, buf: torch.Tensor) -> torch.Tensor:
        """The strip-layout (tiles, b, classes) strided view of a buffer's own (non-halo) columns."""
        r, b = self.radius, self.tile
        return buf[r : r + self.tiles, r : r + b]

    def fill_halos(self, buf: torch.Tensor) -> None:
        """Copy each strip's edge columns into its neighbours' halo columns."""
        r, b = self.radius, self.tile
        if r == 0 or self.strips == 1:
            return
        main = buf[r : r + self.tiles].view(self.strips, self.rows, self.span, buf.shape[-1])
        main[1:, :, :r] = main[:-1, :, b : b + r]
        main[:-1, :, r + b :] = main[1:, :, r : 2 * r]

    def apply(self, buf: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
        """`(I - alpha·Wn) p` for p = the interior of `buf`, written into `out` (tiles, b, q)."""
        q = buf.shape[-1]
        self.fill_halos(buf)
        runs = buf.as_strided((self.tiles, self.depth, q), (self.span * q, q, 1), buf.storage_offset())
        torch.bmm(self.bands, runs, out=out)
        return torch.add(self.interior(buf), out, alpha=-alpha, out=out)

    def to_strips(self, maps: torch.Tensor) -> torch.Tensor:
        """(q, H, W) -> contiguous strip layout (tiles, b, q), zeros outside the image."""
        q, (h, w), r, b = maps.shape[0], maps.shape[-2:], self.radius, self.tile
        out = maps.new_zeros((self.strips, self.rows, b, q))
        src = F.pad(maps, (0, self.strips * b - w)).view(q, h, self.strips, b)
        out[:, r : r + h] = src.permute(2, 1, 3, 0)
        return out.view(self.tiles, b, q)

    def from_strips(self, x: torch.Tensor) -> torch.Tensor:
        """Strip layout (tiles, b, q) -> (q, H, W)."""
        q, h, w, r = x.shape[-1], self.height, self.width, self.radius
        x = x.view(self.strips, self.rows, self.tile, q)[:, r : r + h]
        return x.permute(3, 1, 0, 2).reshape(q, h, self.strips * self.tile)[..., :w]


def propagate_pixels(
    image: torch.Tensor,
    scores: torch.Tensor,
    *,
    radius: int = 6,
    tau: float = 0.01,
    alpha: float = 0.95,
    tol: float = 1e-6,
    maxiter: int = 10,
) -> torch.Tensor:
    """LPOSS+ label propagation over pixels: solve `(I - alpha·Wn) F = Y` by block CG from F = 0.

    `image` (3, H, W) RGB in [0, 1] (the resized image), `scores` (Q, H, W) the merged patch-level
    scores, used as the right-hand side Y (the reference starts CG from zero, not from Y). Returns
    F (Q, H, W) in float32 (float64 if `scores` is float64) on the device of `scores`.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got {tuple(image.shape)}")
    if scores.ndim != 3 or scores.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} must be (Q, H, W) with the image's H, W")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    device = scores.device
    q, h, w = scores.shape
    out = torch.empty((q, h, w), dtype=dtype, device=device)
    if q == 0:
        return out
    graph = PixelGraph(image.to(device=device, dtype=dtype), radius=radius, tau=tau)
    # per class: the tall buffer (span/b times a vector) plus x, r, the CG workspace and A·p
    per_class = (graph.span / graph.tile + 4) * graph.size * torch.finfo(dtype).bits // 8
    chunk = max(1, min(q, int(CG_BUDGET_BYTES // per_class)))
    for q0 in range(0, q, chunk):
        q1 = min(q, q0 + chunk)
        buf = graph.buffer(q1 - q0)
        prod = buf.new_empty((graph.tiles, graph.tile, q1 - q0))
        x = block_cg(
            lambda _p: graph.apply(buf, alpha, prod),
            graph.to_strips(scores[q0:q1].to(dtype)),
            tol=tol,
            maxiter=maxiter,
            p=graph.interior(buf),
            consume_b=True,
        )
        out[q0:q1] = graph.from_strips(x)
    return out
