"""LPOSS / LPOSS+ solvers and refiners against independent scipy computations of the reference math.

The references below are written from the formulas of the authors' code (vladan-stojnic/LPOSS e489a74,
`segmentation/evaluation/lposs_eval.py`: `get_lposs_laplacian`, `perform_lp`, `get_lposs_plus_laplacian`),
not from the package: a dense numpy kNN graph or an explicit list of pixel edges, scipy sparse matrices
and one `scipy.sparse.linalg.cg` per class with x0 = 0, rtol = tol, atol = 0 and maxiter = 10.
"""

import math

import numpy as np
import pytest
import torch

scipy_sparse = pytest.importorskip("scipy.sparse")
from scipy.sparse import linalg as sla  # noqa: E402

from ovseg import build_refiner  # noqa: E402
from ovseg.evaluation.metrics import BoundaryIoU, IoU  # noqa: E402
from ovseg.pipeline.windows import merge_windows, sliding_windows  # noqa: E402
from ovseg_lposs import propagate_patches, propagate_pixels  # noqa: E402
from ovseg_lposs.cg import block_cg, block_cg_numpy  # noqa: E402
from ovseg_lposs.pixel_lp import lab_image  # noqa: E402
from ovseg_lposs.refiners import LPOSSRefiner, infer_patch_size, patch_centers  # noqa: E402


# ---------------------------------------------------------------------------------------------
# independent references


def scipy_cg_columns(L, Y, tol=1e-6, maxiter=10):
    """One scipy CG per column, as the reference runs it (x0 = 0, relative tol, no preconditioner)."""
    out = np.zeros(Y.shape, dtype=np.float64)
    for j in range(Y.shape[1]):
        b = Y[:, j].astype(np.float64)
        out[:, j], _ = sla.cg(L, b, x0=np.zeros_like(b), rtol=tol, atol=0.0, maxiter=maxiter)
    return out


def normalized_laplacian(W, alpha):
    """`I - alpha D^-1/2 W D^-1/2` with W's diagonal removed and zero degrees set to 1."""
    W = scipy_sparse.csr_matrix(W)
    W = W - scipy_sparse.diags(W.diagonal())
    deg = np.asarray(W.sum(axis=1)).ravel()
    deg[deg == 0] = 1
    d = scipy_sparse.diags(1 / np.sqrt(deg))
    return scipy_sparse.eye(W.shape[0]) - alpha * (d @ W @ d)


def patch_reference(Y, X, C, k=400, gamma=3.0, sigma=0.01, p=1.0, alpha=0.95, tol=1e-6, maxiter=10):
    X, C = np.asarray(X, np.float64), np.asarray(C, np.float64)
    n = X.shape[0]
    k = min(k, n)
    S = X @ X.T
    W = np.zeros((n, n))
    for i in range(n):
        nn_ = np.argsort(-S[i], kind="stable")[:k]
        dist = np.sqrt(((C[nn_] - C[i]) ** 2).sum(-1))
        W[i, nn_] = np.maximum(S[i, nn_], 0) ** gamma * np.exp(-sigma * dist**p)
    return scipy_cg_columns(normalized_laplacian(W + W.T, alpha), np.asarray(Y), tol, maxiter)


def pixel_reference(image, Y, radius=6, tau=0.01, alpha=0.95, tol=1e-6, maxiter=10):
    """Explicit edge list of the (2r+1)² neighbourhood, exactly like the reference's get_pixel_connections."""
    lab = lab_image(image.double()).reshape(3, -1).T.numpy()
    _, h, w = image.shape
    ys, xs = np.divmod(np.arange(h * w), w)
    rows, cols = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            rows.append(np.nonzero(ok)[0])
            cols.append((ys[ok] + dy) * w + xs[ok] + dx)
    rows, cols = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in (rows, cols))
    weight = np.exp(-np.sqrt(((lab[rows] - lab[cols]) ** 2).sum(-1)) / tau)
    W = scipy_sparse.csr_matrix((weight, (rows, cols)), shape=(h * w, h * w))
    F = scipy_cg_columns(normalized_laplacian(W, alpha), Y.reshape(Y.shape[0], -1).T.numpy(), tol, maxiter)
    return F.T.reshape(Y.shape)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def clustered(n, d, clusters, seed, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g, dtype=torch.float64)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1)


# ---------------------------------------------------------------------------------------------
# block CG


def test_block_cg_matches_per_column_scipy_cg_with_early_stops():
    g = torch.Generator().manual_seed(0)
    n = 40
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A @ A.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(A)
    B = torch.randn(n, 5, generator=g, dtype=torch.float64)
    B[:, 1] = 0  # a zero right-hand side stays zero
    B[:, 2] = 3 * evecs[:, 7]  # an eigenvector converges after one step and must stop there
    B[:, 3] *= 1e-3  # scale must not matter (tolerance is relative to ‖b‖)
    for maxiter, tol in [(10, 1e-6), (3, 1e-6), (60, 1e-9)]:
        X = block_cg(lambda p: A @ p, B, tol=tol, maxiter=maxiter)
        ref = scipy_cg_columns(A.numpy(), B.numpy(), tol, maxiter)
        assert np.abs(X.numpy() - ref).max() <= 1e-12 * np.abs(ref).max()
    assert torch.equal(X[:, 1], torch.zeros(n, dtype=torch.float64))
    assert torch.allclose(X, torch.linalg.solve(A, B), atol=1e-7)  # 60 steps: converged


def test_block_cg_numpy_is_block_cg():
    # the numpy iteration used for the patch LP on CPU: same iterates, same early stops
    g = torch.Generator().manual_seed(40)
    n = 300  # more than one 256-row block in the column sums
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A @ A.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    evecs = torch.linalg.eigh(A)[1]
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    B[:, 1] = 0
    B[:, 2] = 3 * evecs[:, 5]
    for maxiter, tol in [(10, 1e-6), (3, 1e-6), (80, 1e-9), (0, 1e-6)]:
        X = block_cg_numpy(lambda p: (A @ torch.from_numpy(p)).numpy(), B.numpy(), tol=tol, maxiter=maxiter)
        ref = block_cg(lambda p: A @ p, B, tol=tol, maxiter=maxiter)
        assert np.abs(X - ref.numpy()).max() <= 1e-12 * max(ref.abs().max().item(), 1e-300)
        assert np.array_equal(X[:, 1], np.zeros(n))
        if maxiter == 10:
            assert np.abs(X - scipy_cg_columns(A.numpy(), B.numpy(), tol, maxiter)).max() <= 1e-12 * np.abs(X).max()
    assert block_cg_numpy(lambda p: p, np.zeros((0, 3))).shape == (0, 3)
    assert block_cg_numpy(lambda p: p, B.numpy().astype(np.float32)).dtype == np.float32


def test_block_cg_numpy_on_a_stack_of_blocks_solves_each_block():
    # (C, N, Q): the patch LP's classes in chunks; every column of every block is its own system
    g = torch.Generator().manual_seed(41)
    n = 270
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (A @ A.T / n + 0.5 * torch.eye(n, dtype=torch.float64)).numpy()
    B = torch.randn(3, n, 4, generator=g, dtype=torch.float64).numpy()
    B[1, :, 2] = 0  # a zero column inside a block stays zero
    X = block_cg_numpy(lambda p: np.matmul(A, p), B, tol=1e-6, maxiter=7)
    assert X.shape == B.shape
    for c in range(3):
        ref = scipy_cg_columns(A, B[c], 1e-6, 7)
        assert np.abs(X[c] - ref).max() <= 1e-12 * np.abs(ref).max()
    assert np.array_equal(X[1, :, 2], np.zeros(n))
    with pytest.raises(ValueError, match=r"\(N, Q\) or \(C, N, Q\)"):
        block_cg_numpy(lambda p: p, np.zeros(5))


# ---------------------------------------------------------------------------------------------
# patch LP


def test_propagate_patches_matches_dense_reference():
    n, q = 90, 4
    x = clustered(n, 12, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    c = torch.randint(0, 200, (n, 2), generator=g).double()
    y = torch.rand(n, q, generator=g, dtype=torch.float64) * 0.6 - 0.2
    for kw in [dict(k=15), dict(k=15, sigma=0.05, pix_dist_pow=2.0, gamma=1.0, alpha=0.8), dict(k=30, maxiter=4)]:
        out = propagate_patches(y, x, c, **kw)
        ref = patch_reference(
            y.numpy(), x.numpy(), c.numpy(), k=kw["k"], gamma=kw.get("gamma", 3.0), sigma=kw.get("sigma", 0.01),
            p=kw.get("pix_dist_pow", 1.0), alpha=kw.get("alpha", 0.95), maxiter=kw.get("maxiter", 10),
        )
        assert out.dtype == torch.float64 and out.shape == (n, q)
        assert rel_err(out, ref) < 1e-10
    # float32 inputs: float32 graph and CG, still within 1e-5 of the float64 reference
    out32 = propagate_patches(y.float(), x.float(), c.float(), k=15)
    assert out32.dtype == torch.float32
    assert rel_err(out32, patch_reference(y.numpy(), x.numpy(), c.numpy(), k=15)) < 1e-5


@pytest.mark.parametrize("classes", [1, 8, 21, 33])
def test_patch_lp_classes_in_padded_chunks_match_the_reference(monkeypatch, classes):
    # the CPU solve keeps classes in chunks of at most CLASS_CHUNK_MAX columns, zero-padded to a
    # multiple of 8: with a chunk limit of 16 these cover one chunk, exact fits and padding
    import ovseg_lposs.patch_lp as patch_lp

    monkeypatch.setattr(patch_lp, "CLASS_CHUNK_MAX", 16)
    chunks, width = patch_lp._class_chunks(classes)
    assert width % 8 == 0 and width <= 16 and chunks * width >= classes > (chunks - 1) * width
    n = 70
    x = clustered(n, 10, 3, seed=42)
    g = torch.Generator().manual_seed(43)
    c = torch.randint(0, 150, (n, 2), generator=g).double()
    y = torch.rand(n, classes, generator=g, dtype=torch.float64) * 0.6 - 0.2
    out = propagate_patches(y, x, c, k=12)
    assert out.shape == (n, classes) and out.is_contiguous()
    assert rel_err(out, patch_reference(y.numpy(), x.numpy(), c.numpy(), k=12)) < 1e-10


def test_class_chunks_of_the_cpu_patch_lp():
    import ovseg_lposs.patch_lp as patch_lp

    assert patch_lp._class_chunks(150) == (2, 80)  # ADE20K: two chunks of 80, 10 zero columns
    assert patch_lp._class_chunks(171) == (3, 64)  # COCO-Stuff
    assert patch_lp._class_chunks(21) == (1, 24)
    assert patch_lp._class_chunks(80) == (1, 80)


def test_cpu_gram_restores_the_blas_thread_count():
    # the Gram matrix's GEMMs run single-threaded on our threads; the process's BLAS setting comes back
    import ovseg_lposs.patch_lp as patch_lp

    blas = patch_lp._blas_threads().select(user_api="blas")
    before = [lib["num_threads"] for lib in blas.info()]
    x = torch.randn(600, 40, generator=torch.Generator().manual_seed(44))
    out = torch.empty(600, 600)
    patch_lp._gram(x, out)
    assert [lib["num_threads"] for lib in blas.info()] == before  # info() reads the libraries' setting now
    assert torch.allclose(out, x @ x.T, atol=1e-5)


def test_large_graph_path_equals_dense_mask_path(monkeypatch):
    import ovseg_lposs.patch_lp as patch_lp

    x = clustered(70, 10, 3, seed=14)
    y = torch.rand(70, 3, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    c = torch.rand(70, 2, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * 200
    dense = propagate_patches(y, x, c, k=12)
    graph = patch_lp.patch_graph(x, c, k=12).to_dense()
    monkeypatch.setattr(patch_lp, "DENSE_KNN_MAX_NODES", 0)  # large N: chunked kNN, pairs sorted
    monkeypatch.setattr(patch_lp, "KNN_CHUNK_BYTES", 8 * 70 * 16)  # 16 rows per chunk
    assert torch.allclose(patch_lp.patch_graph(x, c, k=12).to_dense(), graph, rtol=0, atol=1e-15)
    assert torch.allclose(propagate_patches(y, x, c, k=12), dense, rtol=0, atol=1e-12)


def dense_patch_graph(X, C, k, gamma=3.0, sigma=0.01, p=1.0):
    """`D^-1/2 (W + Wᵀ - diag) D^-1/2` from the formulas, in float64 numpy."""
    X, C = np.asarray(X, np.float64), np.asarray(C, np.float64)
    S = X @ X.T
    W = np.zeros_like(S)
    for i in range(len(X)):
        nn_ = np.argsort(-S[i], kind="stable")[:k]
        W[i, nn_] = np.maximum(S[i, nn_], 0) ** gamma * np.exp(-sigma * np.sqrt(((C[nn_] - C[i]) ** 2).sum(-1)) ** p)
    W = W + W.T
    np.fill_diagonal(W, 0)
    deg = W.sum(1)
    deg[deg == 0] = 1
    return W / np.sqrt(deg)[:, None] / np.sqrt(deg)[None, :]


def test_float32_csr_graph_and_its_product_match_the_dense_formula_across_sizes():
    # float32 takes the embedding_bag product; sizes go big, small, big so the kept scratch
    # similarity matrix is reused for a smaller problem and then replaced
    import ovseg_lposs.patch_lp as patch_lp

    for n, seed in [(120, 20), (50, 21), (130, 22)]:
        x = clustered(n, 16, 4, seed=seed).float()
        c = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 300
        graph = patch_lp.patch_graph(x, c, k=25)
        ref = dense_patch_graph(x.numpy(), c.numpy(), k=25)
        assert graph.values.dtype == torch.float32
        assert np.abs(graph.to_dense().numpy() - ref).max() <= 1e-6 * np.abs(ref).max()
        rows = torch.arange(n).repeat_interleave(graph.offsets.diff())
        assert ((rows * n + graph.columns).diff() > 0).all()  # CSR: each pair once, rows and columns ascending
        p = torch.randn(n, 7, generator=torch.Generator().manual_seed(seed))
        assert np.abs(graph.matmul(p).numpy() - ref @ p.double().numpy()).max() <= 1e-5


def _spy_cpu_graph(monkeypatch, patch_lp):
    """Record what the CPU graph build returns (None: it handed the graph to the topk path)."""
    results = []
    build = patch_lp._cpu_graph

    def spy(*args):
        results.append(build(*args))
        return results[-1]

    monkeypatch.setattr(patch_lp, "_cpu_graph", spy)
    return results


def _topk_graph(monkeypatch, patch_lp, x, c, **kw):
    """The graph from the topk path, which other devices take, with the CPU build switched off."""
    with monkeypatch.context() as m:
        m.setattr(patch_lp, "_cpu_graph", lambda *args: None)
        return patch_lp.patch_graph(x, c, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_threshold_graph_equals_the_topk_graph(monkeypatch, dtype):
    # per-row thresholds on row blocks in threads give the same CSR structure as topk + byte mask,
    # and the same values up to rounding; also with one neighbour (only itself: no edges) and k = N
    import ovseg_lposs.patch_lp as patch_lp

    n = 150
    monkeypatch.setattr(patch_lp, "CPU_TASK_BYTES", 7 * n * 8)  # blocks of 7 (float64) or 14 rows
    monkeypatch.setattr(patch_lp, "SYMMETRISE_ROWS", 20)  # lower triangle copied in 8 strips
    monkeypatch.setattr(patch_lp, "GRAM_BLOCK_ROWS", 40)  # upper triangle in 4 block rows
    built = _spy_cpu_graph(monkeypatch, patch_lp)
    x = clustered(n, 24, 5, seed=30).to(dtype)
    c = (torch.rand(n, 2, generator=torch.Generator().manual_seed(31), dtype=torch.float64) * 300).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for kw in [dict(k=1), dict(k=17), dict(k=60, gamma=1.5, sigma=0.03, pix_dist_pow=2.0), dict(k=n, gamma=2.0)]:
        ours = patch_lp.patch_graph(x, c, **kw)
        assert built[-1] is ours  # the CPU build made it, no fallback
        ref = _topk_graph(monkeypatch, patch_lp, x, c, **kw)
        assert torch.equal(ours.offsets, ref.offsets) and torch.equal(ours.columns, ref.columns)
        assert ours.values.dtype == dtype
        assert torch.allclose(ours.values, ref.values, rtol=0, atol=tol * float(ref.values.abs().sum()))
    assert patch_lp.patch_graph(x, c, k=1).values.numel() == 0


def test_cpu_graph_hands_a_tie_at_the_kth_similarity_to_topk(monkeypatch):
    # duplicated features give equal similarities; where such a pair straddles a row's k-th place,
    # the threshold selects k + 1 entries, so the CPU build must give up and topk decides, as before
    import ovseg_lposs.patch_lp as patch_lp

    built = _spy_cpu_graph(monkeypatch, patch_lp)
    x = clustered(60, 8, 3, seed=32)
    x = torch.cat([x, x[::3]])
    n = x.shape[0]
    c = torch.rand(n, 2, generator=torch.Generator().manual_seed(33), dtype=torch.float64) * 100
    ties = 0
    for k in range(5, 30):
        graph = patch_lp.patch_graph(x, c, k=k)
        ties += built[-1] is None
        ref = _topk_graph(monkeypatch, patch_lp, x, c, k=k)
        assert torch.equal(graph.offsets, ref.offsets) and torch.equal(graph.columns, ref.columns)
        assert torch.allclose(graph.values, ref.values, rtol=0, atol=1e-15)
    assert ties > 0  # the fallback was exercised


def test_cpu_gram_is_exactly_symmetric(monkeypatch):
    import ovseg_lposs.patch_lp as patch_lp

    g = torch.Generator().manual_seed(34)
    for n, rows, dtype in [(1, 4, torch.float32), (7, 2, torch.float32), (101, 16, torch.float32), (90, 7, torch.float64),
                           (64, 128, torch.float32)]:
        monkeypatch.setattr(patch_lp, "SYMMETRISE_ROWS", rows)
        monkeypatch.setattr(patch_lp, "GRAM_BLOCK_ROWS", 3 * rows)
        x = torch.randn(n, 33, generator=g, dtype=dtype)
        out = torch.full((n, n), float("nan"), dtype=dtype)
        patch_lp._gram(x, out)
        assert torch.equal(out, out.T)
        exact = x.double() @ x.double().T
        assert (out.double() - exact).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-14) * exact.abs().max()


def test_patch_lp_inside_then_outside_inference_mode(monkeypatch):
    """The similarity buffer kept between calls, first made under inference_mode, takes torch writes later."""
    import threading

    import ovseg_lposs.patch_lp as patch_lp

    monkeypatch.setattr(patch_lp, "_cache", threading.local())  # no buffer from an earlier test
    n = 80
    x = clustered(n, 12, 4, seed=5).float()
    g = torch.Generator().manual_seed(6)
    c = torch.randint(0, 200, (n, 2), generator=g).float()
    y = torch.rand(n, 3, generator=g) * 0.6 - 0.2
    ref = patch_reference(y.numpy(), x.numpy(), c.numpy(), k=15)
    with torch.inference_mode():
        inside = propagate_patches(y, x, c, k=15)
    outside = propagate_patches(y, x, c, k=15)
    assert rel_err(inside, ref) < 1e-5 and rel_err(outside, ref) < 1e-5
    buffer = patch_lp._similarity_buffer(n, torch.float32, torch.device("cpu"))  # the one kept from the first call
    assert buffer.data_ptr() == getattr(patch_lp._cache, "buffer").data_ptr()
    torch.mm(x, x.T, out=buffer)  # the torch Gram path's write, outside inference mode
    assert torch.allclose(buffer, x @ x.T)


def test_parallel_runs_every_task_once_and_reraises():
    import ovseg_lposs.patch_lp as patch_lp

    done = []
    patch_lp._parallel(done.append, 50)
    assert sorted(done) == list(range(50))

    def fail(t):
        if t == 3:
            raise KeyError("task 3")

    with pytest.raises(KeyError, match="task 3"):
        patch_lp._parallel(fail, 10)


def test_propagate_patches_k_larger_than_n_and_isolated_patches():
    # 12 points around +e0, 3 points around -e0 that only have negative similarity to the others:
    # with k = N everyone is in everyone's list, but negative similarities weigh 0, so each of the
    # 3 is linked only to its own group; the last point is alone on +e1 -> zero degree.
    g = torch.Generator().manual_seed(3)
    a = torch.tensor([1.0, 0, 0]) + 0.1 * torch.randn(12, 3, generator=g)
    b = torch.tensor([-1.0, 0, 0]) + 0.1 * torch.randn(3, 3, generator=g)
    b[:, 1] = -b[:, 1].abs() - 0.2  # negative along e1 too, so the lone point sees it negatively
    lone = torch.tensor([[0.0, 1.0, 0.0]])
    a[:, 1] = -a[:, 1].abs() - 0.05
    x = torch.nn.functional.normalize(torch.cat([a, b, lone]).double(), dim=1)
    n = x.shape[0]
    c = torch.arange(2 * n, dtype=torch.float64).view(n, 2)
    y = torch.rand(n, 3, generator=g, dtype=torch.float64)
    out = propagate_patches(y, x, c, k=1000)
    ref = patch_reference(y.numpy(), x.numpy(), c.numpy(), k=n)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-10
    # the isolated node is decoupled: its row of (I - αWn) is the identity row, so CG keeps it
    # proportional to its own label, and the reference agrees
    assert np.allclose(out[-1].numpy(), ref[-1])
    one = propagate_patches(y[:1], x[:1], c[:1], k=5)  # a single patch: no edges at all
    assert torch.allclose(one, y[:1])


def test_patch_centres_for_windows_that_do_not_align():
    boxes = sliding_windows(200, 250, 112, 56)  # y1 in {0, 56, 88}: centres of overlapping windows differ
    assert infer_patch_size(boxes, (7, 7)) == 16
    centres = patch_centers(boxes, (7, 7), 16).view(len(boxes), 7, 7, 2)
    for wi, (y1, _, x1, _) in enumerate(boxes.tolist()):
        for i in range(7):
            for j in range(7):
                assert centres[wi, i, j].tolist() == [y1 + 8 + 16 * i, x1 + 8 + 16 * j]
    assert sorted({int(y) for y in boxes[:, 0]}) == [0, 56, 88]

    n = centres.shape[0] * 49
    x = clustered(n, 16, 6, seed=4)
    y = torch.rand(n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c = centres.reshape(-1, 2).double()
    out = propagate_patches(y, x, c, k=40, sigma=0.05)
    assert rel_err(out, patch_reference(y.numpy(), x.numpy(), c.numpy(), k=40, sigma=0.05)) < 1e-10


def test_lposs_refiner_is_patch_lp_then_merge():
    boxes = sliding_windows(80, 100, 48, 32)
    g = torch.Generator().manual_seed(6)
    w = len(boxes)
    scores = torch.randn(w, 3, 3, 3, generator=g)  # /16 score grid...
    feats = torch.randn(w, 8, 4, 4, generator=g)  # ...on a /12 feature grid: scores resized first
    image = torch.rand(3, 80, 100, generator=g)
    ref_scores = torch.nn.functional.interpolate(scores, size=(4, 4), mode="bilinear", align_corners=False)
    y = ref_scores.flatten(2).transpose(1, 2).reshape(-1, 3)
    x = torch.nn.functional.normalize(feats.flatten(2).transpose(1, 2).reshape(-1, 8), dim=1)
    c = patch_centers(boxes, (4, 4), 12).float()
    f = propagate_patches(y, x, c, k=20).view(w, 4, 4, 3).permute(0, 3, 1, 2)
    expected = merge_windows(f, boxes, 80, 100)
    refiner = build_refiner("lposs", k=20)
    assert refiner.needs_features
    out = refiner(image, boxes, scores, feats)
    assert out.shape == (3, 80, 100) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)
    assert refiner(image, boxes, scores.bfloat16(), feats.bfloat16()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# pixel LP


def textured_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    regions = ((yy * 0.7 + xx) > 0.8 * w).long() + 2 * ((xx - 0.4 * w) ** 2 + (yy - 0.5 * h) ** 2 < (0.3 * h) ** 2).long()
    colours = torch.rand(4, 3, generator=g)
    return (colours[regions].permute(2, 0, 1) + 0.03 * torch.randn(3, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize(
    "h, w, radius, tau",
    [(21, 30, 6, 0.01), (17, 23, 3, 0.1), (9, 5, 6, 0.05), (4, 3, 6, 0.05), (13, 40, 1, 0.2), (6, 7, 0, 0.1)],
)
def test_propagate_pixels_matches_edge_list_reference(h, w, radius, tau):
    image = textured_image(h, w, seed=h * w).double()
    y = torch.rand(3, h, w, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.6 - 0.2
    out = propagate_pixels(image, y, radius=radius, tau=tau)
    ref = pixel_reference(image, y, radius=radius, tau=tau)
    assert out.shape == y.shape and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-10
    out32 = propagate_pixels(image.float(), y.float(), radius=radius, tau=tau)
    assert out32.dtype == torch.float32 and rel_err(out32, ref) < 1e-4


def test_propagate_pixels_zero_degree_pixel_and_class_chunks(monkeypatch):
    import ovseg_lposs.pixel_lp as pixel_lp

    image = torch.full((3, 12, 14), 0.5, dtype=torch.float64)
    image[:, 5, 6] = torch.tensor([1.0, 0.0, 0.0])  # far from every neighbour: exp(-d/τ) underflows to 0
    y = torch.rand(5, 12, 14, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref = pixel_reference(image, y, tau=0.001)
    monkeypatch.setattr(pixel_lp, "CG_BUDGET_BYTES", 1)  # one class per chunk
    out = propagate_pixels(image, y, tau=0.001)
    assert rel_err(out, ref) < 1e-10
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# refiners on generated images with known regions


class ColourFeatures:
    """Patch features = mean colour around grey plus the colour's own direction (a stand-in for DINO)."""

    def __init__(self, patch):
        self.patch = patch

    def __call__(self, crops):
        mean = torch.nn.functional.avg_pool2d(crops, self.patch, ceil_mode=True)
        return torch.nn.functional.normalize(mean - 0.45, dim=1)


def noisy_patch_scores(labels, boxes, classes, patch, noise, seed):
    """Per window and patch: one-hot of the majority true class of the patch + Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for y1, y2, x1, x2 in boxes.tolist():
        crop = torch.nn.functional.one_hot(labels[y1:y2, x1:x2], classes).permute(2, 0, 1).float()
        frac = torch.nn.functional.avg_pool2d(crop[None], patch)[0]
        onehot = torch.nn.functional.one_hot(frac.argmax(0), classes).permute(2, 0, 1).float()
        out.append(onehot + noise * torch.randn(onehot.shape, generator=g))
    return torch.stack(out)


def test_lposs_gains_miou_and_lposs_plus_gains_boundary_iou():
    h, w, patch, classes = 128, 192, 16, 4
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (xx + 0.45 * yy > 100).long() + 2 * ((xx - 60) ** 2 + (yy - 70) ** 2 < 38**2).long()
    colours = torch.tensor([[0.85, 0.2, 0.2], [0.2, 0.75, 0.25], [0.2, 0.3, 0.9], [0.9, 0.85, 0.2]])
    g = torch.Generator().manual_seed(9)
    image = (colours[labels].permute(2, 0, 1) + 0.04 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    boxes = sliding_windows(h, w, 64, 32)
    crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes.tolist()])
    scores = noisy_patch_scores(labels, boxes, classes, patch, noise=0.9, seed=10)
    feats = ColourFeatures(patch)(crops)

    def evaluate(refiner):
        pred = refiner(image, boxes, scores, feats).argmax(0)
        miou, biou = IoU(classes), BoundaryIoU(classes)
        miou.update(pred, labels)
        biou.update(pred, labels)
        return float(miou.compute()["mean"]), float(biou.compute()["mean"])

    none = evaluate(build_refiner("none"))
    lposs = evaluate(build_refiner("lposs", k=60))
    plus = evaluate(build_refiner("lposs_plus", k=60))
    print(f"mIoU/BIoU none {none}, lposs {lposs}, lposs+ {plus}")
    assert lposs[0] > none[0] + 0.10  # propagation over colour-similar patches removes the noise
    assert plus[1] > lposs[1] + 0.05  # pixel propagation snaps the 16-px blocks to the colour edges
    assert plus[0] >= lposs[0]


def test_refiner_options_and_errors():
    from ovseg.errors import ConfigError

    r = build_refiner("lposs_plus", k=10, radius=2, tau=0.05, pixel_maxiter=3)
    assert (r.k, r.radius, r.tau, r.pixel_maxiter, r.pixel_alpha) == (10, 2, 0.05, 3, None)
    r.configure(k=20, tau=0.02)
    assert (r.k, r.tau) == (20, 0.02)
    with pytest.raises(ConfigError, match="unknown"):
        r.configure(kk=3)
    with pytest.raises(ConfigError, match="needs patch features"):
        r(torch.rand(3, 32, 32), sliding_windows(32, 32, 32, 16), torch.randn(1, 2, 2, 2), None)
    with pytest.raises(ConfigError):
        LPOSSRefiner(alpha=1.0)
    with pytest.raises(ConfigError, match="patch size"):
        infer_patch_size(torch.tensor([[0, 20, 0, 64]]), (2, 2))
    assert math.isclose(build_refiner("lposs").sigma, 0.01)


def test_solvers_ignore_and_restore_a_reduced_matmul_precision():
    x = clustered(40, 8, 3, seed=11).float()
    y = torch.rand(40, 2, generator=torch.Generator().manual_seed(12))
    c = torch.rand(40, 2, generator=torch.Generator().manual_seed(13)) * 100
    expected = propagate_patches(y, x, c, k=10)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(propagate_patches(y, x, c, k=10), expected)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_refiner_configure_validates_and_rolls_back():
    from ovseg import build_refiner
    from ovseg.errors import ConfigError

    r = build_refiner("lposs_plus", k=7, radius=3)
    r.configure(k=5, tau=0.02)
    assert (r.k, r.radius, r.tau) == (5, 3, 0.02)
    for bad in ({"k": 0}, {"tau": 0}, {"k": "x"}, {"foo": 1}, {"alpha": 1.0}):
        with pytest.raises(ConfigError):
            r.configure(**bad)
        assert (r.k, r.tau, r.alpha) == (5, 0.02, 0.95)  # a rejected option leaves the refiner unchanged
