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

Weights are computed one row offset dy at a time (all 2r+1 dx at once); rows dy < 0 are mirrored
from rows dy > 0, since the graph is symmetric. The bands take 13·(b + 2r)·b floats per tile (287 MB
at 448×597, r = 6, b = 8); classes are solved in chunks so the CG vectors stay within
`CG_BUDGET_BYTES`. Everything runs in float32 (float64 for float64 scores); the reference's float32
graph with float64 CG differs from this by about 1e-6 relative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cg import block_cg, full_precision_matmul

#: output pixels per tile (strip width b); at least the radius, so a halo spans one strip
TILE = 8
#: bytes allowed for the CG vectors of one chunk of classes (host memory; see `cg_budget`)
CG_BUDGET_BYTES = 256 << 20
#: Lab value of the zero-padding outside the image: its distance to any pixel makes exp(-d/τ) zero
_FAR = 1e4


def cg_budget(device: torch.device) -> int:
    """Bytes for one chunk of classes' CG vectors.

    On the CPU, `CG_BUDGET_BYTES` keeps the 448×597×150 case under 1 GB in all. An accelerator solves
    more classes per chunk (fewer, larger GEMMs) as long as a quarter of its free memory holds them.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(CG_BUDGET_BYTES, free // 4)
    return CG_BUDGET_BYTES


def lab_image(image: torch.Tensor) -> torch.Tensor:
    """kornia `rgb_to_lab` of a (3, H, W) RGB image in [0, 1], divided by (100, 128, 128) as in LPOSS+."""
    from kornia.color import rgb_to_lab

    scale = torch.tensor([100.0, 128.0, 128.0], dtype=image.dtype, device=image.device).view(3, 1, 1)
    return rgb_to_lab(image[None])[0] / scale


def weight_row(lab: torch.Tensor, radius: int, dy: int, tau: float) -> torch.Tensor:
    """Unnormalised weights to the neighbours in row offset `dy`: (H, 2r+1, W), [y, j, x] for dx = j - r.

    `lab` is the Lab image padded by `radius` on every side with a far-away colour, so neighbours
    outside the image get weight exactly 0. The centre (dy = dx = 0) is set to 0 (no self-loops).
    """
    r = radius
    h, w = lab.shape[-2] - 2 * r, lab.shape[-1] - 2 * r
    centre = lab[:, r : r + h, None, r : r + w]
    neighbours = lab[:, r + dy : r + dy + h].unfold(2, w, 1)  # (3, H, 2r+1, W), a view
    diff = centre - neighbours
    row = diff.mul_(diff).sum(dim=0)
    floor = _negligible(lab.dtype)
    # clamping first keeps exp out of the (slow) subnormal range; what is left below `floor` is dropped
    row.sqrt_().mul_(-1.0 / tau).clamp_(min=math.log(floor) - 1.0).exp_()
    row.masked_fill_(row < floor, 0.0)
    if dy == 0:
        row[:, r] = 0
    return row


def mirrored_row(row: torch.Tensor, radius: int, dy: int) -> torch.Tensor:
    """Weights of row offset -dy from those of +dy (the graph is symmetric): w_{-o}(q) = w_o(q - o).

    Returns a (H, 2r+1, W) strided view of a flipped, zero-padded copy of `row`.
    """
    r = radius
    h, n, w = row.shape
    flipped = F.pad(row.flip(1), (r, r, 0, 0, r, r))  # (H + 2r, 2r+1, W + 2r), [y', j', x'] = w_(dy, r-j')
    # value at (y, j', x) for dx' = j' - r: w_(dy, -dx')(y - dy, x + dx') = flipped[r + y - dy, j', x + j']
    stride_y, stride_j = flipped.stride(0), flipped.stride(1)
    return flipped.as_strided((h, n, w), (stride_y, stride_j + 1, 1), (r - dy) * stride_y)


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
        self.bands = self._bands(image, float(tau))

    @property
    def size(self) -> int:
        """Unknowns per class in the strip layout (tiles · b)."""
        return self.tiles * self.tile

    def bytes_per_class(self) -> int:
        """CG memory per class: the tall buffer (span/b vectors) plus x, r, the workspace and A·p."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return int((self.span / self.tile + 4) * self.size * itemsize)

    def _bands(self, image: torch.Tensor, tau: float) -> torch.Tensor:
        """The (tiles, b, depth) band matrices of `D^-1/2 W D^-1/2`, built one row offset at a time."""
        h, w, r, b, s, k = self.height, self.width, self.radius, self.tile, self.strips, self.depth
        n = 2 * r + 1
        lab = F.pad(lab_image(image), (r, r, r, r), value=_FAR)
        bands = torch.zeros((self.tiles, b, k), dtype=self.dtype, device=self.device)
        degree = torch.zeros((h, w), dtype=self.dtype, device=self.device)

        def put(row: torch.Tensor, dy: int) -> None:
            # entry (strip, r + y, i, (dy + r)·span + i + j) <- row[y, j, strip·b + i]
            src = F.pad(row, (0, s * b - w)).view(h, n, s, b).permute(2, 0, 3, 1)
            offset = r * b * k + (dy + r) * self.span
            bands.as_strided((s, h, b, n), (self.rows * b * k, b * k, k + 1, 1), offset).copy_(src)
            degree.add_(row.sum(dim=1))

        for dy in range(r + 1):
            row = weight_row(lab, r, dy, tau)
            put(row, dy)
            if dy:
                put(mirrored_row(row, r, dy), -dy)
        del lab
        # normalise in place: rows by 1/sqrt(degree) of the output pixel, columns by that of the source
        dinv = torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()
        dinv_buf = self.buffer(1)
        self.interior(dinv_buf).copy_(self.to_strips(dinv[None]))
        self.fill_halos(dinv_buf)
        source = dinv_buf.as_strided((self.tiles, 1, n, self.span), (self.span, 0, self.span, 1))
        grouped = bands.view(self.tiles, b, n, self.span)
        grouped.mul_(self.to_strips(dinv[None]).view(self.tiles, b, 1, 1)).mul_(source)
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
    with full_precision_matmul():
        graph = PixelGraph(image.to(device=device, dtype=dtype), radius=radius, tau=tau)
        chunk = max(1, min(q, int(cg_budget(device) // graph.bytes_per_class())))
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
