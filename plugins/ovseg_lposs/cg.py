"""Block conjugate gradient: one independent CG per column, run as one batched iteration.

The LPOSS reference calls `scipy/cupyx.sparse.linalg.cg` once per class with x0 = 0, no
preconditioner, a tolerance relative to ‖b‖ and maxiter = 10, and the published numbers come from
that 10-step iterate. Running every class as a column of one block keeps those iterates exactly
(each column has its own step sizes and stops on its own) while the operator is applied to all
columns at once, which is what makes the solve fast.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch


def block_cg(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    tol: float = 1e-6,
    maxiter: int = 10,
    p: torch.Tensor | None = None,
    consume_b: bool = False,
) -> torch.Tensor:
    """Solve `A X = B` column by column with plain CG from X = 0; returns X shaped like `b`.

    `b` is (..., Q): the last dimension indexes the independent right-hand sides (classes), all other
    dimensions index the unknowns. Per column this reproduces scipy's
    `cg(A, b_j, x0=0, rtol=tol, atol=0, maxiter=maxiter)`: before each iteration a column whose
    residual norm is below `tol·‖b_j‖` stops updating, and a zero column gives zero.

    `apply(p)` returns `A p` for the whole block (a tensor shaped like `b`; it may be a buffer that is
    overwritten on the next call). `p`, if given, is a preallocated tensor shaped like `b` (possibly a
    strided view into an operator's own padded layout) that holds the search directions in place.
    `consume_b=True` lets the solver use `b`'s memory as the residual.
    """
    if b.ndim < 1:
        raise ValueError("b must have a class dimension")
    q = b.shape[-1]
    x = torch.zeros_like(b)
    if b.numel() == 0 or maxiter <= 0:
        return x
    r = b if consume_b else b.clone()
    if p is None:
        p = torch.empty_like(b)
    elif p.shape != b.shape or p.dtype != b.dtype:
        raise ValueError("the search-direction buffer must match b in shape and dtype")
    work = torch.empty_like(b)  # reused for products: no large temporaries per step

    def coldot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.mul(u, v, out=work)
        return column_sum(work.view(-1, q))

    rho = coldot(r, r)
    atol = float(tol) * rho.sqrt()  # tol·‖b_j‖, since r = b
    active = rho > 0
    rho_prev = rho
    zero = torch.zeros_like(rho)
    for it in range(maxiter):
        # scipy stops a column when ‖r‖ < tol·‖b‖; an exactly zero residual also stops (no 0/0)
        active = active & (rho > 0) & (rho.sqrt() >= atol)
        if not bool(active.any()):
            break
        if it == 0:
            p.copy_(r)
        else:
            torch.addcmul(r, p, torch.where(active, rho / rho_prev, zero), out=p)
        ap = apply(p)
        alpha = torch.where(active, rho / coldot(p, ap), zero)
        x.addcmul_(p, alpha)
        r.addcmul_(ap, alpha.neg())
        rho_prev = rho
        rho = coldot(r, r)
    return x


def block_cg_numpy(
    apply: Callable[[np.ndarray], np.ndarray], b: np.ndarray, *, tol: float = 1e-6, maxiter: int = 10
) -> np.ndarray:
    """`block_cg` for a numpy block: the same iteration, stopping rule and column sums.

    `b` is (N, Q), or a stack (C, N, Q) of such blocks, each with N unknowns: every column of every
    block is an independent system (the patch LP keeps its classes in chunks that way, see
    `propagate_patches`). For a small block on CPU (the patch LP's 2940 × 150) the vector updates
    cost little next to the operator, and as numpy calls they run on the calling thread only. As
    torch calls each of them is a parallel region whose threads meet at a barrier; on a shared
    machine a descheduled thread holds up every barrier, and the ~80 per solve made it several times
    slower (0.8–2.6 s against 0.5–0.8 s with load 6 on 2 cores). `apply(p)` returns `A p` as an
    array that it may overwrite on the next call; only the operator is left to parallelise.
    """
    if b.ndim not in (2, 3):
        raise ValueError(f"b must be (N, Q) or (C, N, Q), got shape {b.shape}")
    x = np.zeros_like(b)
    if b.size == 0 or maxiter <= 0:
        return x
    r = b.copy()
    p = np.empty_like(b)
    work = np.empty_like(b)

    def coldot(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # (..., 1, Q): broadcasts over the unknowns
        np.multiply(u, v, out=work)
        return _column_sum_numpy(work)

    rho = coldot(r, r)
    atol = float(tol) * np.sqrt(rho)
    active = rho > 0
    rho_prev = rho
    for it in range(maxiter):
        active = active & (rho > 0) & (np.sqrt(rho) >= atol)
        if not active.any():
            break
        if it == 0:
            np.copyto(p, r)
        else:
            p *= np.where(active, rho / np.where(active, rho_prev, 1), 0).astype(b.dtype)
            p += r
        ap = apply(p)
        alpha = np.where(active, rho / np.where(active, coldot(p, ap), 1), 0).astype(b.dtype)
        x += np.multiply(p, alpha, out=work)
        r -= np.multiply(ap, alpha, out=work)
        rho_prev = rho
        rho = coldot(r, r)
    return x


def _column_sum_numpy(t: np.ndarray, block: int = 256) -> np.ndarray:
    """`column_sum` in numpy over the unknowns axis (-2) of a (..., N, Q) array, kept as size 1."""
    n = t.shape[-2]
    full = n - n % block
    head = t[..., :full, :].reshape(*t.shape[:-2], -1, block, t.shape[-1])
    total = head.sum(axis=-2).sum(axis=-2, keepdims=True)
    return total + t[..., full:, :].sum(axis=-2, keepdims=True) if full < n else total


def column_sum(t: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Sum of a (n, q) tensor over its rows, in blocks of rows.

    Reducing blocks first and then the block sums is several times faster than `t.sum(0)` on CPU when
    q is small, and as accurate (it is a two-level pairwise sum).
    """
    n = t.shape[0]
    full = n - n % block
    total = t[:full].view(-1, block, t.shape[1]).sum(dim=1).sum(dim=0)
    return total + t[full:].sum(dim=0) if full < n else total


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Run float32 matrix products in full float32 (no TF32 / bf16 shortcuts) inside the block.

    A process that allowed TF32 (`torch.set_float32_matmul_precision("high")`, common on GPUs) would
    otherwise get ~1e-3 relative errors from the graph products; the solvers promise ~1e-6. The
    setting is global, so it is restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
