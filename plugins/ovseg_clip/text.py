"""open_clip's text tower for the CLIP-family predictors: prompts encoded at their own length where exact.

`encode_tokens` runs open_clip's `CLIP.encode_text` on batches truncated after their longest prompt
(`ovseg.pipeline.text.encode_by_length`) when `truncation_problem` finds nothing against it: the standard
`CLIP` class (not a subclass or a `CustomTextCLIP` with a Hugging Face tower), open_clip's own transformer
blocks, an attention mask that is causal (-inf strictly above the diagonal, so slicing it keeps every
remaining entry) and pooling at one token per prompt (`argmax`: the end-of-text token; `eos`). Any other
tower (no causal mask, `first`/`last`/mean pooling, a class token) is encoded at full context.
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, Transformer, text_global_pool

from ovseg.pipeline.text import encode_by_length
from ovseg.text_cache import digest

__all__ = ["truncation_problem", "encode_tokens", "tower_signature", "text_parameters"]

_POOLS = ("argmax", "eos")


def truncation_problem(clip: torch.nn.Module) -> str | None:
    """None when cutting prompts after their pooled token is exact for this model, else the reason it is not."""
    if type(clip) is not CLIP:
        return f"{type(clip).__name__} is not open_clip's standard CLIP class"
    if not isinstance(clip.transformer, Transformer) or not all(
        type(b) in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in clip.transformer.resblocks
    ):
        return "the text transformer has blocks other than open_clip's"
    if clip.text_pool_type not in _POOLS:
        return f"text pooling {clip.text_pool_type!r} is not at one token per prompt"
    mask = getattr(clip, "attn_mask", None)
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return "the text transformer has no causal attention mask"
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    if not (torch.isneginf(mask[upper]).all() and torch.isfinite(mask[~upper]).all()):
        return "the text attention mask is not causal"
    return None


def _pool_positions(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    if clip.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == clip.text_eos_id).int().argmax(dim=-1)


def _encode_truncated(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`CLIP.encode_text` for tokens cut to length L <= context: the first L positions and mask rows/columns."""
    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, torch.nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection


def encode_tokens(clip: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Text embeddings (N, E), not normalised, of tokenised prompts (N, context): length-sorted truncated
    batches where exact (see the module docstring), `clip.encode_text` at full context otherwise."""
    if truncation_problem(clip) is None:
        return encode_by_length(tokens, _pool_positions(clip, tokens), lambda t: _encode_truncated(clip, t), batch_size)
    return torch.cat([clip.encode_text(chunk) for chunk in tokens.split(batch_size)])


def text_parameters(clip: torch.nn.Module) -> list[torch.Tensor]:
    """The weights text embeddings depend on: every parameter outside the image tower (buffers are left out:
    a cast replaces them, and the causal mask is no weight)."""
    return [t for name, t in clip.named_parameters() if not name.startswith("visual.")]


def tower_signature(clip: torch.nn.Module) -> str:
    """Digest of the text tower's architecture (modules, activations, heads, shapes, pooling, mask kind), so
    cached embeddings are never shared between towers that compute differently from the same file."""
    parts = [type(clip).__name__, str(getattr(clip, "text_pool_type", None)), str(truncation_problem(clip))]
    for name, module in clip.named_children():
        if name == "visual":
            continue
        parts.append(f"{name}: {module!r}")
        parts += [f"{n}.heads={m.num_heads}" for n, m in module.named_modules() if hasattr(m, "num_heads")]
    parts += [f"{n}: {tuple(t.shape)}" for n, t in [*clip.named_parameters(), *clip.named_buffers()]
              if not n.startswith("visual.")]
    return digest("\n".join(parts))
