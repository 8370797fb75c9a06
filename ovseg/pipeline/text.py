"""Prompt encoding at each prompt's own length, for causal text transformers pooled at one token.

A CLIP-style text tower pads every prompt to its context (77 tokens) although a prompt is about ten tokens
long. Under a causal attention mask the output at position p depends on tokens 0..p only, so when a prompt
is pooled at position p (CLIP's end-of-text token) every token after p is irrelevant to its embedding.
`encode_by_length` sorts prompts by that position and encodes batches truncated to their longest prompt:
the same embeddings up to float rounding (about 1e-6 on unit vectors), several times faster. Whether a
tower is causal and pooled at one token is for its owner to check; others encode at full context.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["encode_by_length", "weights_version"]


def encode_by_length(
    tokens: torch.Tensor, positions: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """`encode` applied to `tokens` (N, L) in batches of prompts of similar length, each batch cut after its
    largest pooled position (`positions` (N,)); rows come back in the input order."""
    positions = positions.to("cpu")
    order = torch.argsort(positions, stable=True)
    out = None
    for idx in order.split(batch_size):
        length = int(positions[idx].max()) + 1
        emb = encode(tokens[idx.to(tokens.device), :length])
        if out is None:
            out = emb.new_empty((tokens.shape[0], *emb.shape[1:]))
        out[idx.to(emb.device)] = emb
    if out is None:
        raise ValueError("no prompts to encode")
    return out


def weights_version(params: Iterable[torch.Tensor]) -> int:
    """Sum of the tensors' in-place version counters: it grows whenever one is modified in place
    (`load_state_dict`, an optimiser step, `add_`), not when a module is moved or cast. Cached text
    embeddings keyed by where weights came from are valid only while this stays the same."""
    return sum(int(p._version) for p in params)
