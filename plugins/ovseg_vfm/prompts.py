"""CASS's object-presence prompt: name clusters, and per window one adjusted text embedding per cluster.

As the authors' code runs it (MICV-yonsei/CASS 228ecdd, `cass_segmentor.py` `hierarchical_clustering`,
`hierarchical_prompt` and helpers):

- clusters, once per vocabulary: Ward linkage (scipy) on the cosine distances of the text embeddings, cut at
  `h_threshold` (`fcluster(criterion='distance')`); 0 leaves every distinct name alone;
- per window and cluster: the name i* with the highest global similarity p (the first on ties), the two patches
  most similar to it, μ = their mean feature normalised, and `t'[i*] = normalise((1 − α) t + α μ)`; the other
  names keep their embedding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["cluster_names", "adjusted_text"]


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """1 − cosine similarity of the rows of x, clipped to [0, 2], zero diagonal (as scikit-learn computes it)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x = x / norms[:, None]
    d = 1 - x @ x.T
    np.clip(d, 0, 2, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def cluster_names(text: torch.Tensor, h_threshold: float) -> torch.Tensor:
    """Cluster id (Q,) int64, 0..K-1, of each name: Ward linkage on cosine distances cut at `h_threshold`."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if text.shape[0] < 2:
        return torch.zeros(text.shape[0], dtype=torch.long)
    d = cosine_distances(text.detach().float().cpu().numpy())
    condensed = d[np.triu_indices(d.shape[0], k=1)]  # scipy's squareform order
    labels = fcluster(linkage(condensed, method="ward"), t=h_threshold, criterion="distance") - 1
    return torch.as_tensor(labels, dtype=torch.long)


def adjusted_text(
    features: torch.Tensor, text: torch.Tensor, presence: torch.Tensor, clusters: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per-window text embeddings (B, Q, E) after CASS's object-presence adjustment.

    features: (B, N, E) unit patch features of each window; text: (Q, E) unit name embeddings; presence: (B, Q)
    global similarities p; clusters: (Q,) cluster ids; alpha: `mean_vector_weight`.
    """
    b = features.shape[0]
    members = clusters.to(presence.device)[None, :] == torch.arange(int(clusters.max()) + 1, device=presence.device)[:, None]
    scores = presence[:, None, :].masked_fill(~members[None], float("-inf"))  # (B, K, Q)
    best = scores.argmax(dim=-1)  # (B, K): first name of the highest p in each cluster
    t = F.normalize(text[best], dim=-1)  # (B, K, E)
    sims = torch.einsum("bne,bke->bkn", F.normalize(features, dim=-1), t)
    top = sims.topk(min(2, features.shape[1]), dim=-1).indices  # (B, K, 2)
    picked = torch.gather(features[:, None].expand(-1, top.shape[1], -1, -1), 2,
                          top[..., None].expand(-1, -1, -1, features.shape[-1]))
    mean = F.normalize(picked.mean(dim=2), dim=-1)
    adjusted = F.normalize((1 - alpha) * t + alpha * mean, dim=-1)
    out = text[None].expand(b, -1, -1).clone()
    out.scatter_(1, best[..., None].expand(-1, -1, text.shape[-1]), adjusted)
    return out
