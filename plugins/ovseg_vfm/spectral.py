"""CASS's spectral distillation of a VFM's key graph into CLIP's last-block attention, batched over windows.

As the authors' code runs it (MICV-yonsei/CASS 228ecdd, `clip/model.py`: `_normalize_key_range`,
`_apply_spectral_strategy`, `optimal_q`, `compute_spectrum`, `wasserstein_distance_pytorch`,
`_scale_singular_values`, `_normalize_attention_range`), per window and head:

- the VFM keys, resized to CLIP's grid, are mapped affinely onto the range [min k, max k] of CLIP's keys (one
  range over all heads); both graphs are `k kᵀ · head_dim^-½`, the VFM's in float16 as the authors cast it;
- heads are matched on their spectra: the 20 largest eigenvalues (float64) of each graph, L2- then
  L1-normalised, compared by `W(i, j) = Σ |sort(d_i) − sort(c_j)|`; the assignment minimises `1 − W`, so it
  pairs heads whose spectra differ most. Ties (often: when every sign of `d_i − c_j` agrees, W is separable
  and all pairings cost the same) go to the identity: off-diagonal costs get +1e-6 for the assignment only;
- output head `h` mixes CLIP head `h` with VFM head `col[h]` (the authors' indexing), weight `w = 1 − cost`:
  a rank-10 randomized SVD of the VFM graph (float64), singular values stretched from [s_min, s_max] to
  [0.5 s_min, 1.5 s_max] unless the dataset key turns it off, diagonal zeroed, mapped onto [min, max] of the
  CLIP graph, then `(10 w D + A_c) / (10 w + 1)`.

The randomized SVD (`torch.svd_lowrank`'s algorithm, 2 subspace iterations) draws its start matrix from a CPU
generator seeded with `seed` on every call, so each window's result is deterministic and independent of the
order or batch in which windows run (the authors seed the global stream once; their results depend on every
earlier call).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["match_key_range", "spectral_distance", "match_heads", "lowrank_svd", "distilled_graph"]

#: the authors' constants (`custom_attn` config and `optimal_q`'s first rank, which is always kept)
K_EIGEN = 20
RANK = 10
SCALE_FACTOR = 10.0
TIE_BREAK = 1e-6


def match_key_range(vfm_keys: torch.Tensor, clip_keys: torch.Tensor) -> torch.Tensor:
    """Each window's VFM keys (B, ...) mapped affinely onto the [min, max] of its CLIP keys (B, ...).

    Per window with 0-dim bounds, as the authors' batch-1 code: the arithmetic stays in the VFM keys' dtype
    (float16) with the CLIP bounds as scalars, which a batched broadcast would promote.
    """
    out = torch.empty_like(vfm_keys)
    for i, (d, k) in enumerate(zip(vfm_keys, clip_keys)):
        k_min, k_max = k.min(), k.max()
        d_min, d_max = d.min(), d.max()
        out[i] = (d - d_min) / (d_max - d_min) * (k_max - k_min) + k_min
    return out


def _spectrum(graphs: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest eigenvalues (descending) of symmetric graphs (..., N, N), float64, L2- then L1-normalised."""
    vals = torch.linalg.eigvalsh(graphs.double()).flip(-1)[..., :k]
    return F.normalize(F.normalize(vals, p=2, dim=-1), p=1, dim=-1)


def spectral_distance(vfm_graphs: torch.Tensor, clip_graphs: torch.Tensor, k: int = K_EIGEN) -> torch.Tensor:
    """W (B, H, H) float64: `W[b, i, j] = Σ |sort(d_i) − sort(c_j)|` for VFM head i and CLIP head j."""
    d = _spectrum(vfm_graphs, k).sort(dim=-1).values
    c = _spectrum(clip_graphs, k).sort(dim=-1).values
    return (d[:, :, None, :] - c[:, None, :, :]).abs().sum(dim=-1)


def match_heads(distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, the VFM head paired with each CLIP head (B, H) and the pairing weight `w` (B, H), float32.

    `cost = 1 − W` (float32, as the authors store it) is minimised with scipy's `linear_sum_assignment`;
    off-diagonal costs get +1e-6 for the assignment only, so tied pairings resolve to the identity.
    """
    from scipy.optimize import linear_sum_assignment

    cost = (1 - distance).float()
    heads = cost.shape[-1]
    tie = TIE_BREAK * (1 - np.eye(heads, dtype=np.float64))
    cols = []
    for window in cost.detach().cpu().numpy():
        _, col = linear_sum_assignment(window.astype(np.float64) + tie)
        cols.append(torch.as_tensor(col))
    col = torch.stack(cols).to(cost.device)
    weight = 1 - cost.gather(-1, col[..., None])[..., 0]
    return col, weight


def lowrank_svd(a: torch.Tensor, rank: int, seed: int, niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V of a rank-`rank` randomized SVD of matrices a (..., m, n) (Halko et al. 2009, algorithm 5.1).

    `torch.svd_lowrank`'s algorithm, with the start matrix drawn on the CPU from a generator seeded with `seed`
    (the same draw for every matrix and every call), then moved to a's device.
    """
    m, n = a.shape[-2:]
    tall = m >= n
    a = a if tall else a.mH
    gen = torch.Generator().manual_seed(int(seed))
    start = torch.randn(a.shape[-1], rank, dtype=a.dtype, generator=gen).to(a.device)
    q = torch.linalg.qr(a @ start).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.mH @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u, s, vh = torch.linalg.svd(q.mH @ a, full_matrices=False)
    u, v = q @ u, vh.mH
    return (u, s, v) if tall else (v, s, u)


def _min_max(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, N) mapped affinely, per matrix, onto the [min, max] of `like` (same shape)."""
    def bounds(t):
        flat = t.flatten(-2)
        return flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]

    x_min, x_max = bounds(x)
    t_min, t_max = bounds(like)
    return (x - x_min) / (x_max - x_min) * (t_max - t_min) + t_min


def distilled_graph(
    vfm_graphs: torch.Tensor,
    clip_graphs: torch.Tensor,
    *,
    eigen_scaling: bool,
    seed: int,
    rank: int = RANK,
    k_eigen: int = K_EIGEN,
) -> torch.Tensor:
    """CASS's attention logits (B, H, N, N) in the CLIP graphs' dtype, from VFM graphs (float16) and CLIP graphs.

    See the module docstring for the steps. `rank` is capped at N (the authors' `optimal_q` has no rank for
    windows of fewer than 10 patches and fails there).
    """
    col, weight = match_heads(spectral_distance(vfm_graphs, clip_graphs, k_eigen))
    n = vfm_graphs.shape[-1]
    paired = vfm_graphs.gather(1, col[:, :, None, None].expand(-1, -1, n, n))
    u, s, v = lowrank_svd(paired.double(), min(rank, n), seed)
    if eigen_scaling:
        s_min, s_max = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
        s = (s - s_min) / (s_max - s_min) * (1.5 * s_max - 0.5 * s_min) + 0.5 * s_min
    approx = (u * s[..., None, :]) @ v.mH
    approx.diagonal(dim1=-2, dim2=-1).zero_()
    approx = _min_max(approx, clip_graphs)
    w = (weight * SCALE_FACTOR)[..., None, None]  # float32, as the authors' `w_d * scale_factor`
    mixed = (w.double() * approx + clip_graphs.double()) / (w + 1).double()
    return mixed.to(clip_graphs.dtype)
