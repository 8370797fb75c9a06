"""LPOSS patch label propagation: exact kNN graph over patch features, then 10 steps of block CG.

The symmetrised graph `W + Wᵀ` is built directly in CSR form (row offsets, column indices, values)
and its product with the (N, classes) block of CG directions is an `embedding_bag` (a weighted sum
of gathered rows per node; on CPU one per chunk of classes, see `_class_chunks`). That uses only its ~N·k non-zeros: on the ADE-like case (N = 2940,
k = 400, 15 % dense) it is about twice as fast as a dense fp32 GEMM and needs no N×N float matrix
after the kNN search.

The similarity matrix is one exactly symmetric Gram matrix (`_gram`). On CPU the kNN lists are
per-row thresholds (the k-th largest similarity, by `np.partition`), and the graph is built from
them with numpy on row blocks in threads (`_cpu_graph`); on other devices, and on CPU when a row has
a tie at its k-th similarity, with `topk` and an N×N byte mask in torch (`_union_from_mask`). Both
give the same graph when there is no tie. The CG runs in torch on other devices and as numpy
vector updates around the torch product on CPU (`block_cg_numpy`).

Graph and CG run in float32 (float64 when the inputs are float64): against the reference (float32
graph, float64 CG) this differs by about 1e-6 relative.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import threadpoolctl
import torch
import torch.nn.functional as F

from .cg import block_cg, block_cg_numpy, full_precision_matmul

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


def _union_from_mask(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of the kNN lists (without the diagonal) as sorted flat indices i·N + j, with sims and multiplicity.

    `sims` is the whole similarity matrix, so the union's similarities are read from it; an N×N byte
    mask counts each pair once per list it is in (1, or 2 for mutual neighbours), and its non-zeros in
    row-major order are the CSR structure. This avoids sorting the 2·N·k directed pairs.
    """
    n = sims.shape[0]
    idx = sims.topk(k, dim=1, sorted=False).indices
    count = torch.zeros((n, n), dtype=torch.int8, device=sims.device)
    one = torch.ones((), dtype=torch.int8, device=sims.device).expand(n, k)
    count.scatter_add_(1, idx, one)
    count.T.scatter_add_(1, idx, one)
    count.diagonal().zero_()  # the self-loops the kNN lists contain are dropped (as `get_lposs_laplacian`)
    flat = count.view(-1).nonzero().squeeze(1)
    return flat, sims.view(-1).index_select(0, flat), count.view(-1).index_select(0, flat).to(sims.dtype)


def _gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`x @ x.T` into `out`, computing the lower-left block as the transpose of the upper-right (3/4 of the flops).

    On CPU (float32/float64) the result is exactly symmetric (`_gram_cpu`), which the CPU graph
    build relies on.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):  # numpy has no bfloat16
        _gram_cpu(x.detach().numpy(), out.numpy())
        return out
    h = x.shape[0] // 2
    torch.mm(x[:h], x.T, out=out[:h])
    torch.mm(x[h:], x[h:].T, out=out[h:, h:])
    out[h:, :h] = out[:h, h:].T
    return out


#: rows per GEMM of the CPU Gram matrix (one task each: 8 tasks for N = 2940, ~54 % of the full products)
GRAM_BLOCK_ROWS = 368
#: rows per task when the CPU Gram matrix's lower triangle is copied from its upper one
SYMMETRISE_ROWS = 128


def _gram_cpu(x: np.ndarray, out: np.ndarray) -> None:
    """`x @ x.T` into `out` with numpy: the upper triangle by block rows, the lower triangle copied.

    Block row b (rows a:z) is one GEMM, `x[a:z] @ x[a:].T`, from its diagonal block rightwards, so
    the products are `N²/2 + N·rows/2`. A GEMM does not promise `(XXᵀ)_ij == (XXᵀ)_ji` bit for bit,
    so the whole lower triangle is then copied from the upper one, in strips of rows: a strip's
    transposed reads stay in the L1 cache, and the strips run in threads.

    The block rows run on this module's threads, each GEMM on a single-threaded BLAS
    (`threadpoolctl`). Letting numpy's OpenBLAS thread the GEMMs itself was 20–25 % slower for the
    whole patch LP on the 2-core development machine: after each call OpenBLAS's worker threads
    busy-wait for the next one (2^28 cycles, ~0.1 s, unless `OPENBLAS_THREAD_TIMEOUT` is set before
    numpy loads), which took a core from the graph build and the CG that follow. The GEMMs go
    through numpy's BLAS (OpenBLAS in numpy's wheels), which ran them 2.5x as fast as torch's MKL on
    the AMD EPYC development machine (MKL takes a generic code path there). The BLAS thread limit is
    process-wide while the GEMMs run (tens of milliseconds) and restored afterwards.
    """
    n = x.shape[0]
    edges = np.linspace(0, n, max(1, -(-n // GRAM_BLOCK_ROWS)) + 1).astype(int)

    def block_row(t: int) -> None:
        a, z = edges[t], edges[t + 1]
        np.matmul(x[a:z], x[a:].T, out=out[a:z, a:])

    with _blas_threads().limit(limits=1, user_api="blas"):
        _parallel(block_row, len(edges) - 1)

    def mirror(t: int) -> None:
        a, b = t * SYMMETRISE_ROWS, min((t + 1) * SYMMETRISE_ROWS, n)
        out[b:, a:b] = out[a:b, b:].T
        block = out[a:b, a:b]
        lower = np.tril_indices(b - a, -1)
        block[lower] = block.T[lower]

    _parallel(mirror, -(-n // SYMMETRISE_ROWS))


@functools.cache
def _blas_threads() -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries loaded in this process (found once: the search walks every loaded library)."""
    return threadpoolctl.ThreadpoolController()


#: the similarity matrix is kept for the next call up to this size (N = 4096 in float32)
SIMILARITY_CACHE_BYTES = 64 << 20
_cache = threading.local()


def _similarity_buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An (n, n) scratch matrix, reused from the previous call in this thread when it fits.

    On CPU a fresh 35 MB matrix (N = 2940) comes from `mmap`, and its first touch page-faults for
    about a third of the GEMM's time. Images are refined one after another, so keeping the last
    buffer (at most `SIMILARITY_CACHE_BYTES`) removes that. CUDA's caching allocator already does it,
    so only CPU buffers are kept. The kept buffer is always a normal tensor, never an inference tensor
    (allocated with inference mode off): a buffer first made under `torch.inference_mode()` must still
    take in-place writes in a later call outside it.
    """
    if device.type != "cpu":
        return torch.empty((n, n), dtype=dtype, device=device)
    last = getattr(_cache, "buffer", None)
    if last is not None and last.dtype == dtype and last.device == device and last.numel() >= n * n:
        return last.view(-1)[: n * n].view(n, n)
    with torch.inference_mode(False):
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
    """The normalised LPOSS patch graph (`get_lposs_laplacian` in vladan-stojnic/LPOSS e489a74,
    `segmentation/evaluation/lposs_eval.py`).

    `W_ij = max(<x_i, x_j>, 0)^gamma · exp(-sigma·‖c_i - c_j‖^pix_dist_pow)` for j among the k
    nearest neighbours of i (itself included; the diagonal is dropped after symmetrising). In
    `W + Wᵀ` a pair that is in both lists counts twice. A node with zero degree keeps degree 1, so it
    is isolated and keeps its own label.

    On CPU the kNN lists come from per-row thresholds and the graph is built with numpy
    (`_cpu_graph`); on other devices, and on CPU for a row with ties at its k-th similarity, from
    `topk` in torch. Both give the same graph when there are no ties.
    """
    n = features.shape[0]
    k = _neighbour_count(k, n)
    if n > DENSE_KNN_MAX_NODES:
        return _graph_from_union(*_union_by_sorting(features, k), centers, gamma, sigma, pix_dist_pow)
    sims = _gram(features, _similarity_buffer(n, features.dtype, features.device))
    if features.device.type == "cpu" and features.dtype in (torch.float32, torch.float64):
        points = centers.detach().to(features.dtype).numpy()
        graph = _cpu_graph(sims.numpy(), points, k, gamma, sigma, pix_dist_pow)
        if graph is not None:
            return graph
    return _graph_from_union(*_union_from_mask(sims, k), centers, gamma, sigma, pix_dist_pow)


def _graph_from_union(
    flat: torch.Tensor, sims: torch.Tensor, count: torch.Tensor, centers: torch.Tensor, gamma: float, sigma: float,
    pix_dist_pow: float,
) -> PatchGraph:
    """The normalised graph from the union of the kNN lists (sorted flat indices, sims, multiplicity), in torch."""
    n = centers.shape[0]
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


#: similarity rows per task in the CPU graph build (1.5 MB: 128 rows at N = 2940; fewer, smaller tasks were slower)
CPU_TASK_BYTES = 3 << 19


def _cpu_graph(
    sims: np.ndarray, points: np.ndarray, k: int, gamma: float, sigma: float, pix_dist_pow: float
) -> PatchGraph | None:
    """The normalised graph from the (exactly symmetric) similarity matrix, in numpy on row blocks in threads.

    Row i's kNN list is `{j : S_ij >= t_i}` with `t_i` its k-th largest similarity (`np.partition`,
    a linear-time selection, instead of a top-k). That is exactly the top-k set when the row has no
    tie at `t_i`; a row with a tie (or a NaN) has more (fewer) than k such entries, and then None is
    returned, so the caller builds the graph with `topk` as on other devices. S is symmetric, so
    "i is in j's list" is `S_ij >= t_j`, read in row i too: each row block gives its rows of
    `W + Wᵀ` (multiplicity 0, 1 or 2) without a transpose, already in CSR order. Weights, degrees and
    the normalisation are computed per block; numpy releases the GIL in all of them, so the blocks
    run on `torch.get_num_threads()` threads.
    """
    n = sims.shape[0]
    step = max(1, min(n, CPU_TASK_BYTES // (sims.itemsize * n)))
    starts = range(0, n, step)
    kth = np.empty(n, sims.dtype)

    def thresholds(t: int) -> None:
        a, b = starts[t], min(starts[t] + step, n)
        kth[a:b] = np.partition(sims[a:b], n - k, axis=1)[:, n - k]

    _parallel(thresholds, len(starts))
    py, px = np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])
    tally = np.uint16 if n < 1 << 16 else np.int64  # row counts of a byte mask
    parts: list = [None] * len(starts)

    tied: list[bool] = []

    def edges(t: int) -> None:
        a, b = starts[t], min(starts[t] + step, n)
        block = sims[a:b]
        own = block >= kth[a:b, None]
        if tied or (own.view(np.uint8).sum(axis=1, dtype=tally) != k).any():
            tied.append(True)  # a tie at the k-th similarity: the graph is left to topk
            return
        count = own.view(np.int8)
        count += (block >= kth).view(np.int8)
        count[np.arange(b - a), np.arange(a, b)] = 0  # the self-loops the lists contain are dropped (as above)
        flat = np.flatnonzero(count.view(bool))  # numpy's fast path is for bool (5x the int8 one)
        local = np.searchsorted(flat, np.arange(0, (b - a + 1) * n, n))  # CSR offsets of the block's rows
        per_row = np.diff(local)
        columns = flat - np.repeat(np.arange(0, (b - a) * n, n), per_row)
        s = block.ravel().take(flat)
        np.maximum(s, 0, out=s)
        values = _power(s, gamma)
        values *= count.ravel().take(flat)
        dy = np.repeat(py[a:b], per_row)
        dy -= py.take(columns)
        dx = np.repeat(px[a:b], per_row)
        dx -= px.take(columns)
        dy *= dy
        dx *= dx
        dy += dx
        dist = np.sqrt(dy, out=dy) if pix_dist_pow == 1 else np.power(dy, pix_dist_pow / 2, out=dy)
        dist *= -sigma
        values *= np.exp(dist, out=dist)
        parts[t] = (columns, values, per_row, _segment_sums(values, local))

    _parallel(edges, len(starts))
    if tied:
        return None
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate([part[2] for part in parts]), out=offsets[1:])
    degree = np.concatenate([part[3] for part in parts]).astype(sims.dtype)
    degree[degree == 0] = 1
    dinv = np.reciprocal(np.sqrt(degree, out=degree), out=degree)
    columns = np.empty(int(offsets[-1]), np.int64)
    values = np.empty(int(offsets[-1]), sims.dtype)

    def normalise(t: int) -> None:
        a, b = starts[t], min(starts[t] + step, n)
        cols, w, per_row = parts[t][:3]
        out = slice(offsets[a], offsets[b])
        columns[out] = cols
        np.multiply(w, np.repeat(dinv[a:b], per_row), out=values[out])
        values[out] *= dinv.take(cols)

    _parallel(normalise, len(starts))
    return PatchGraph(torch.from_numpy(offsets), torch.from_numpy(columns), torch.from_numpy(values))


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of `values[offsets[i]:offsets[i + 1]]` in float64, 0 for an empty segment."""
    sums = np.zeros(offsets.size - 1, np.float64)
    nonempty = offsets[:-1] < offsets[1:]
    if nonempty.any():  # reduceat takes an empty segment's next value, so those are left out
        sums[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty], dtype=np.float64)
    return sums


def _power(x: np.ndarray, exponent: float) -> np.ndarray:
    """`x ** exponent` as a new array; small integer exponents by repeated products, like torch's `pow`."""
    if float(exponent).is_integer() and 1 <= exponent <= 4:
        out = x.copy()
        for _ in range(int(exponent) - 1):
            out *= x
        return out
    return np.power(x, exponent)


def _parallel(task: Callable[[int], None], count: int) -> None:
    """`task(0)`, …, `task(count - 1)` on up to `torch.get_num_threads()` threads, this one included.

    Threads take the next index when done (blocks cost unequal time on a busy machine). The threads
    are started per call (tens of microseconds), so nothing is left behind to break after a fork.
    The first exception is re-raised here.
    """
    workers = max(1, min(torch.get_num_threads(), count))
    tickets = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            with lock:
                t = next(tickets, None)
            if t is None:
                return
            try:
                task(t)
            except BaseException as error:  # re-raised in the calling thread
                errors.append(error)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
    for thread in threads:
        thread.start()
    work()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


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
    if device.type != "cpu":
        return block_cg(lambda p: torch.add(p, graph.matmul(p), alpha=-alpha), y.contiguous(), tol=tol, maxiter=maxiter)

    n, q = y.shape
    chunks, width = _class_chunks(q)
    scores_np = y.detach().numpy()
    b = np.zeros((n, chunks * width), scores_np.dtype)
    b[:, :q] = scores_np
    b = np.ascontiguousarray(b.reshape(n, chunks, width).transpose(1, 0, 2))  # (chunks, N, width)
    ap = np.empty_like(b)

    def apply(p: np.ndarray) -> np.ndarray:  # (I - alpha Wn) p, chunk by chunk
        for c in range(chunks):
            np.multiply(graph.matmul(torch.from_numpy(p[c])).numpy(), -alpha, out=ap[c])
            ap[c] += p[c]
        return ap

    x = block_cg_numpy(apply, b, tol=tol, maxiter=maxiter)  # padding columns are zero systems: they stay 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2).reshape(n, chunks * width)[:, :q]))


#: the widest class chunk of the CPU patch-LP product (see `_class_chunks`)
CLASS_CHUNK_MAX = 80


def _class_chunks(classes: int) -> tuple[int, int]:
    """How the CPU patch LP splits its classes: (chunks, width), width a multiple of 8, chunks·width ≥ classes.

    `embedding_bag` (the sparse product) runs fastest on rows of a few dozen floats: on the 2-core
    AMD EPYC development machine (AVX2) it took 9.4 ms for 150 columns, 3.0 ms for 64 and 8.4 ms
    for two chunks of 72 and 80; rows whose width is not a multiple of 8 floats take a slower tail
    loop (3.0 ms for 50 columns, 2.1 ms for 48). So the classes are kept in equal chunks of at most
    `CLASS_CHUNK_MAX` columns, zero-padded to a multiple of 8 (150 -> 2 × 80).
    """
    chunks = max(1, -(-classes // CLASS_CHUNK_MAX))
    return chunks, -(-classes // (8 * chunks)) * 8
