"""The GroupViT / PGSeg two-tower model and its architecture description.

`GroupViTConfig` defaults are the released models' (ViT-S width 384, stages [6, 3, 3] with
[64, 8, 0] group tokens, 256-wide 12-layer text transformer, 2-layer 4096-hidden projection heads
to 256 dimensions); `npr=True` adds PGSeg's prototype modules to both grouping stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.errors import ConfigError

from .layers import ProjectMLP
from .text import TextTransformer
from .vision import GroupViTVisionEncoder


@dataclass(frozen=True)
class GroupViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depths: Sequence[int] = (6, 3, 3)
    #: heads of every stage (an int) or one per stage
    num_heads: int | Sequence[int] = 6
    num_group_tokens: Sequence[int] = (64, 8, 0)
    num_output_groups: Sequence[int] = (64, 8)
    mlp_ratio: float = 4.0
    #: PGSeg's non-parametric prototype reconstruction (NPR) before each grouping block
    npr: bool = False
    npr_iters: int = 10
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 256
    text_layers: int = 12
    #: None = text_width // 64, as the release
    text_heads: int | None = None
    output_dim: int = 256
    #: hidden width of the projection heads and of the NPR mapping MLPs
    proj_hidden_dim: int = 4096

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], where: str) -> "GroupViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}; architecture options: {sorted(known)}")
        try:
            cfg = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: invalid architecture option: {exc}") from exc
        cfg.validate(where)
        return cfg

    def __post_init__(self):
        # YAML gives lists: store tuples so the config stays hashable and comparable
        for name in ("depths", "num_group_tokens", "num_output_groups"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not isinstance(self.num_heads, int):
            object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))

    @property
    def heads(self) -> tuple[int, ...]:
        """Heads per stage."""
        return (self.num_heads,) * len(self.depths) if isinstance(self.num_heads, int) else self.num_heads

    @property
    def text_num_heads(self) -> int:
        return self.text_heads or max(self.text_width // 64, 1)

    def validate(self, where: str) -> None:
        n = len(self.depths)
        problems = []
        if n < 2 or len(self.num_group_tokens) != n or len(self.heads) != n or len(self.num_output_groups) != n - 1:
            problems.append(
                "depths, num_group_tokens and num_heads need one entry per stage (at least 2 stages) "
                "and num_output_groups one per grouping stage (stages - 1)"
            )
        elif any(g <= 0 for g in self.num_group_tokens[:-1]) or self.num_group_tokens[-1] != 0:
            problems.append("every stage but the last needs group tokens; the last has none")
        if any(v <= 0 for v in (*self.depths, *self.num_output_groups)):
            problems.append("depths and num_output_groups must be positive")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if any(self.embed_dim % h for h in self.heads) or self.text_width % self.text_num_heads:
            problems.append("embed_dim and text_width must be divisible by their head counts")
        if problems:
            raise ConfigError(f"{where}: invalid architecture: " + "; ".join(problems))


@dataclass
class ImageEmbeddings:
    """`groups` (B, G, E) and `image` (B, E), both L2-normalised; `assignment` (B, N, G) soft
    patch-to-group weights on the patch `grid` (h, w)."""

    groups: torch.Tensor
    image: torch.Tensor
    assignment: torch.Tensor
    grid: tuple[int, int]


class GroupViTModel(nn.Module):
    """Image encoder + text encoder + projection heads + the learned temperature."""

    def __init__(self, cfg: GroupViTConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = GroupViTVisionEncoder(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depths=cfg.depths,
            num_heads=cfg.heads,
            num_group_tokens=cfg.num_group_tokens,
            num_output_groups=cfg.num_output_groups,
            mlp_ratio=cfg.mlp_ratio,
            npr_hidden_dim=cfg.proj_hidden_dim if cfg.npr else None,
            npr_iters=cfg.npr_iters,
        )
        self.text = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_num_heads,
        )
        self.visual_proj = ProjectMLP(cfg.embed_dim, cfg.proj_hidden_dim, cfg.output_dim)
        self.text_proj = ProjectMLP(cfg.text_width, cfg.proj_hidden_dim, cfg.output_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def temperature(self) -> float:
        """exp(logit_scale) clamped at 100, as the release's segmentation decoding uses it."""
        return float(self.logit_scale.detach().float().exp().clamp(max=100))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected end-of-text features (B, E), not normalised."""
        return self.text_proj(self.text(tokens))

    def encode_image(self, images: torch.Tensor) -> ImageEmbeddings:
        """`images` normalised (B, 3, H, W), H and W multiples of the patch size.

        The image embedding projects the *mean* group token (the release's pooling), not the mean
        of the projected group embeddings.
        """
        out = self.visual(images)
        groups = F.normalize(self.visual_proj(out.tokens), dim=-1)
        image = F.normalize(self.visual_proj(out.tokens.mean(dim=1)), dim=-1)
        return ImageEmbeddings(groups, image, out.assignment, out.grid)
