"""LPOSS patch label propagation: exact kNN graph over patch features, then 10 steps of block CG.

Everything is torch on the input's device. The symmetrised graph `W + Wᵀ` is built directly in CSR
form (row offsets, column indices, values) from the kNN lists, and its product with the (N, classes)
block of CG directions is one `embedding_bag` (a weighted sum of gathered rows per node). That uses
only its ~N·k non-zeros: on the ADE-like case (N = 2940, k = 400, 19 % dense) it is about twice as
fast as a dense fp32 GEMM and needs no N×N float matrix after the kNN search. Graph and CG run in
float32 (float64 when the inputs are float64): against the reference (float32 graph, float64 CG)
this differs by about 1e-6 relative, far inside 1e-4.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cg import block_cg, full_precision_matmul

#: up to this many patches the kNN search keeps the whole N×N similarity matrix (256 MB in float32)
#: and finds the union of the kNN lists with an N×N byte mask; above it, row chunks and a sort
DENSE_KNN_MAX_NODES = 8192
#: similarity rows computed per GEMM chunk in the chunked kNN search (bounds a chunk to ~64 MB)
KNN_CHUNK_BYTES = 64 << 20


@dataclass
class PatchGraph:
    """The normalised LPOSS graph `Wn = D^-1/2 (W + Wᵀ - diag) D^-1/2` in CSR form.

    Row i's neighbours are `columns[offsets[i]:offsets[i + 1]]` (ascending) with weights
    `values[...]`. `Wn` is symmetric, so it is stored once, not as W and Wᵀ.
    """

    offsets: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor

    @property
    def size(self) -> int:
        return self.offsets.numel() - 1

    def matmul(self, p: torch.Tensor) -> torch.Tensor:
        """`Wn @ p` for a (N, Q) block.

        `embedding_bag` is the fastest exact sparse × dense product torch offers on CPU (a
        multithreaded gather-and-scale per row, about 2× the speed of `torch.sparse.mm` here) and it
        runs unchanged on CUDA. A node without neighbours gets 0.
        """
        if p.dtype != torch.float32:  # embedding_bag's fast kernels are float32 only; float64 is ~20x slower
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                shape = (self.size, self.size)
                return torch.sparse_csr_tensor(self.offsets, self.columns, self.values, shape, check_invariants=False) @ p
        return F.embedding_bag(
            self.columns, p, self.offsets, mode="sum", per_sample_weights=self.values, include_last_offset=True
        )

    def rows(self) -> torch.Tensor:
        """The row index of every stored entry (the expanded form of `offsets`)."""
        return _expand_offsets(self.offsets)

    def to_dense(self) -> torch.Tensor:
        """The N×N matrix (tests and small-case inspection)."""
        dense = torch.zeros((self.size, self.size), dtype=self.values.dtype, device=self.values.device)
        dense[self.rows(), self.columns] = self.values
        return dense


def _expand_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """CSR row offsets (N + 1,) -> the row index of each entry."""
    return torch.arange(offsets.numel() - 1, device=offsets.device).repeat_interleave(offsets.diff())


def _neighbour_count(k: int, n: int) -> int:
    """k clamped to [1, N]: a list can hold at most every node, itself included."""
    return max(1, min(int(k), n))


def knn_inner_product(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by inner product, the point itself included: (N, k) sims and indices.

    Brute force like the reference's `faiss.knn_gpu(METRIC_INNER_PRODUCT)`, in row chunks so the
    similarity block stays small; `k` is clamped to N. The order inside a row is unspecified (the
    graph does not depend on it).
    """
    n = features.shape[0]
    k = _neighbour_count(k, n)
    rows = max(1, min(n, KNN_CHUNK_BYTES // (features.element_size() * max(n, 1))))
    sims, idx = [], []
    for start in range(0, n, rows):
        v, i = (features[start : start + rows] @ features.T).topk(k, dim=1, sorted=False)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _union_from_mask(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of the kNN lists (without the diagonal) as sorted flat indices i·N + j, with sims and multiplicity.

    The whole similarity matrix is kept, so the union's similarities are read from it; an N×N byte
    mask counts each pair once per list it is in (1, or 2 for mutual neighbours), and its non-zeros in
    row-major order are the CSR structure. This avoids sorting the 2·N·k directed pairs.
    """
    n = features.shape[0]
    k = _neighbour_count(k, n)
    sims = _gram(features, _similarity_buffer(n, features.dtype, features.device))
    idx = sims.topk(k, dim=1, sorted=False).indices
    count = torch.zeros((n, n), dtype=torch.int8, device=features.device)
    one = torch.ones((), dtype=torch.int8, device=features.device).expand(n, k)
    count.scatter_add_(1, idx, one)
    count.T.scatter_add_(1, idx, one)
    count.diagonal().zero_()  # the self-loops the kNN lists contain are dropped (reference §4.6)
    flat = count.view(-1).nonzero().squeeze(1)
    return flat, sims.view(-1).index_select(0, flat), count.view(-1).index_select(0, flat).to(sims.dtype)


def _gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`x @ x.T` into `out`, computing the lower-left block as the transpose of the upper-right (3/4 of the flops)."""
    h = x.shape[0] // 2
    torch.mm(x[:h], x.T, out=out[:h])
    torch.mm(x[h:], x[h:].T, out=out[h:, h:])
    out[h:, :h] = out[:h, h:].T
    return out


#: the similarity matrix is kept for the next call up to this size (N = 4096 in float32)
SIMILARITY_CACHE_BYTES = 64 << 20
_cache = threading.local()


def _similarity_buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An (n, n) scratch matrix, reused from the previous call in this thread when it fits.

    On CPU a fresh 35 MB matrix (N = 2940) comes from `mmap`, and its first touch page-faults for
    about a third of the GEMM's time. Images are refined one after another, so keeping the last
    buffer (at most `SIMILARITY_CACHE_BYTES`) removes that. CUDA's caching allocator already does it,
    so only CPU buffers are kept.
    """
    if device.type != "cpu":
        return torch.empty((n, n), dtype=dtype, device=device)
    last = getattr(_cache, "buffer", None)
    if last is not None and last.dtype == dtype and last.device == device and last.numel() >= n * n:
        return last.view(-1)[: n * n].view(n, n)
    buffer = torch.empty((n, n), dtype=dtype, device=device)
    _cache.buffer = buffer if buffer.numel() * buffer.element_size() <= SIMILARITY_CACHE_BYTES else None
    return buffer


def _union_by_sorting(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same as `_union_from_mask` with memory linear in N·k: chunked kNN, then a sort of the pairs.

    A pair in both lists gets the mean of its two similarities (equal up to rounding) and count 2.
    """
    n = features.shape[0]
    sims, idx = knn_inner_product(features, k)
    rows = torch.arange(n, device=idx.device).repeat_interleave(idx.shape[1])
    cols = idx.reshape(-1)
    keep = rows != cols
    rows, cols, s = rows[keep], cols[keep], sims.reshape(-1)[keep]
    flat = torch.cat([rows * n + cols, cols * n + rows])
    flat, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    sum_s = torch.zeros(flat.numel(), dtype=s.dtype, device=s.device).index_add_(0, inverse, torch.cat([s, s]))
    ones = torch.ones((), dtype=s.dtype, device=s.device).expand(inverse.numel())
    count = torch.zeros_like(sum_s).index_add_(0, inverse, ones)
    return flat, sum_s / count, count


def patch_graph(
    features: torch.Tensor,
    centers: torch.Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    pix_dist_pow: float = 1.0,
) -> PatchGraph:
    """The normalised LPOSS patch graph (reference `get_lposs_laplacian`, lposs.md §4).

    `W_ij = max(<x_i, x_j>, 0)^gamma · exp(-sigma·‖c_i - c_j‖^pix_dist_pow)` for j among the k
    nearest neighbours of i (itself included; the diagonal is dropped after symmetrising). In
    `W + Wᵀ` a pair that is in both lists counts twice. A node with zero degree keeps degree 1, so it
    is isolated and keeps its own label.
    """
    n = features.shape[0]
    union = _union_from_mask if n <= DENSE_KNN_MAX_NODES else _union_by_sorting
    flat, sims, count = union(features, k)
    offsets = torch.searchsorted(flat, torch.arange(n + 1, device=flat.device) * n)
    rows = _expand_offsets(offsets)
    columns = flat - rows * n
    # centres as complex numbers: one gather per endpoint (|z| itself is slow on CPU, so d² by hand)
    points = torch.complex(centers[:, 0].contiguous(), centers[:, 1].contiguous())
    diff = points.index_select(0, rows) - points.index_select(0, columns)
    dist2 = diff.real.square().add_(diff.imag.square())
    dist_pow = dist2.sqrt_() if pix_dist_pow == 1 else dist2.pow_(pix_dist_pow / 2)
    values = sims.clamp_(min=0).pow_(gamma).mul_(dist_pow.mul_(-sigma).exp_()).mul_(count)
    graph = PatchGraph(offsets, columns, values)
    dinv = _inv_sqrt_degree(graph.matmul(torch.ones((n, 1), dtype=values.dtype, device=values.device)).squeeze(1))
    values.mul_(dinv.index_select(0, rows)).mul_(dinv.index_select(0, columns))
    return graph


def _inv_sqrt_degree(degree: torch.Tensor) -> torch.Tensor:
    """`1/sqrt(d)` with zero degrees replaced by 1 (reference `normalize_connection_graph`)."""
    return torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()


def propagate_patches(
    scores: torch.Tensor,
    features: torch.Tensor,
    centers: torch.Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    pix_dist_pow: float = 1.0,
    alpha: float = 0.95,
    tol: float = 1e-6,
    maxiter: int = 10,
) -> torch.Tensor:
    """LPOSS label propagation over patches: solve `(I - alpha·Wn) F = Y` by 10 CG steps, all classes at once.

    `scores` (N, Q) initial labels (raw cosines), `features` (N, D) L2-normalised patch features,
    `centers` (N, 2) patch-centre pixel coordinates. Returns F (N, Q) in float32 (float64 if `scores`
    is float64), on the device of `scores`.
    """
    if scores.ndim != 2 or features.ndim != 2 or centers.shape != (scores.shape[0], 2):
        raise ValueError(
            f"expected scores (N, Q), features (N, D), centers (N, 2); got {tuple(scores.shape)}, "
            f"{tuple(features.shape)}, {tuple(centers.shape)}"
        )
    if features.shape[0] != scores.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {scores.shape[0]} score rows")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    device = scores.device
    y = scores.to(dtype)
    if y.shape[0] == 0:
        return y.clone()
    with full_precision_matmul():
        graph = patch_graph(
            features.to(device=device, dtype=dtype),
            centers.to(device=device, dtype=dtype),
            k=k,
            gamma=gamma,
            sigma=sigma,
            pix_dist_pow=pix_dist_pow,
        )
    return block_cg(lambda p: torch.add(p, graph.matmul(p), alpha=-alpha), y.contiguous(), tol=tol, maxiter=maxiter)
