"""`pgseg` and `groupvit` VLM predictors: per-name scores from group tokens and their pixel assignment.

GroupViT (Xu et al., CVPR 2022) segments by grouping: its image encoder merges the patches into 8
group tokens, and each patch belongs to a group through the chained assignment of the grouping
stages. PGSeg (Zhang et al., NeurIPS 2023) is GroupViT plus prototype modules (NPR) in the grouping
stages. Scores for a window are therefore `assignment (N, G) @ group_scores (G, Q)`, where:

- `decode="soft"` (default): group_scores are the raw cosines between the projected group tokens and
  the name embeddings, and the assignment is the soft one. These are cosine similarities mixed by the
  assignment weights (each row sums to one), so the values lie in [-1, 1], with no softmax: the
  `VLMPredictor` contract, usable with a protocol `logit_scale`/`prob_thd` or as initial scores for a
  refiner.
- `decode="paper"`: the release's decoding (see `decode.py`): one-hot assignment, group
  probabilities `softmax(top-k masked) * softmax`, in [0, 1]; with `bg_thresh` the names of class
  `background_class` are not matched and score 1 on background groups, 0 elsewhere.

`output="patch"` returns the patch grid (B, Q, ceil(H/p), ceil(W/p)); `output="pixel"` resizes the
assignment to the input pixels before the arg-max (B, Q, H, W), as the release does. Windows are
zero-padded to a multiple of the patch (grid policy `pad`). Only the `none`
refiner (bilinear resize to the window, an identity at equal size) reproduces the release from it.

This is a port of NVIDIA-licensed research code (NVIDIA Source Code License, non-commercial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ovseg.errors import ConfigError
from ovseg.pipeline.options import choice, integer, number
from ovseg.pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, prepare_images
from ovseg.pipeline.stages import VLMPredictor
from ovseg.pipeline.text import encode_by_length, weights_version
from ovseg.runtime import module_dtype
from ovseg.text_cache import cached_embeddings, digest, file_digest
from ovseg.pipeline.vocabulary import Vocabulary

from .checkpoint import load_release_weights
from .decode import assignment_to_pixels, one_hot_groups, paper_group_scores
from .model import GroupViTConfig, GroupViTModel

#: the release evaluates segmentation with the `simple` template
SIMPLE_TEMPLATES = ("a photo of a {}.",)
DECODES = ("soft", "paper")
OUTPUTS = ("patch", "pixel")
#: prompts encoded per text-encoder call
_TEXT_BATCH = 1024


def resolve_templates(templates: str | Sequence[str], where: str) -> list:
    """`simple` (the release's), `imagenet80` (OpenAI's 80), or a list of strings with `{}`."""
    if templates == "simple":
        return list(SIMPLE_TEMPLATES)
    if templates == "imagenet80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ConfigError(f"{where}: templates must be 'simple', 'imagenet80' or a list of strings containing '{{}}', got {templates!r}")
    return list(templates)


class GroupViTPredictor(VLMPredictor):
    """GroupViT: grouping ViT-S + text transformer, loaded from a release checkpoint.

    Args:
        pretrained: path to a release checkpoint (`.pth`, tensors-only `.pth` or `.safetensors`),
            or `"random"` for random weights.
        trust_checkpoint: allow full unpickling of a checkpoint that stores Python objects (the
            releases pickle their training config). Only for files you trust.
        templates: prompt templates; names are embedded as the release does (mean of the projected
            template embeddings, then L2-normalised).
        decode: `"soft"` or `"paper"` (see the module docstring).
        output: `"patch"` or `"pixel"` (the grid of the returned scores).
        topk: `decode="paper"`: classes kept per window (the release: 5).
        bg_thresh: `decode="paper"`: the release's background threshold; None = no thresholding
            (the background class, if any, is matched by its names like any other class).
        background_class: the vocabulary index of the thresholded background class.
        **architecture: `GroupViTConfig` fields; defaults are the released model's.
    """

    npr = False
    kind = "groupvit"
    grid = "pad"
    options = ("decode", "output", "topk", "bg_thresh", "background_class")
    # decoding options (see `configure`)
    decode: str = "soft"
    output: str = "patch"
    topk: int = 5
    bg_thresh: float | None = None
    background_class: int = 0

    def __init__(
        self,
        pretrained: str | Path,
        *,
        trust_checkpoint: bool = False,
        templates: str | Sequence[str] = "simple",
        decode: str = "soft",
        output: str = "patch",
        topk: int = 5,
        bg_thresh: float | None = None,
        background_class: int = 0,
        **architecture,
    ):
        super().__init__()
        where = f"predictor {self.kind}"
        if "npr" in architecture:
            raise ConfigError(f"{where}: npr is fixed by the predictor: use 'pgseg' (with NPR) or 'groupvit' (without)")
        if not isinstance(pretrained, (str, Path)) or not str(pretrained):
            raise ConfigError(f"{where}: pretrained must be a checkpoint path or 'random', got {pretrained!r}")
        cfg = GroupViTConfig.from_kwargs({**architecture, "npr": self.npr}, where)
        self.model = GroupViTModel(cfg)
        self.random_weights = pretrained == "random"
        if not self.random_weights:
            load_release_weights(self.model, pretrained, trust=trust_checkpoint, kind=self.kind)
        self.model.eval()
        self.patch_size = cfg.patch_size
        self.templates = resolve_templates(templates, where)
        self.templates_name = templates if isinstance(templates, str) else "custom"
        self.configure(decode=decode, output=output, topk=topk, bg_thresh=bg_thresh, background_class=background_class)
        self.vocabulary: Vocabulary | None = None
        self.register_buffer("_text", torch.empty(0), persistent=False)
        self._tokenizer = None
        self._names: dict[str, torch.Tensor] = {}  # float32 CPU embeddings per name
        self._names_key: tuple | None = None
        self._weights_path = None if self.random_weights else str(pretrained)
        self._weights_id: str | None = None
        self._weights_version = weights_version(self._text_parameters())

    def check_options(self) -> None:
        """Decoding options (`decode`, `output`, `topk`, `bg_thresh`, `background_class`) only affect
        `forward`, so a segmenter can set per-dataset values (the release's background thresholds)
        through `configure` without reloading weights."""
        where = f"predictor {self.kind}"
        self.decode = choice(self.decode, "decode", DECODES, where)
        self.output = choice(self.output, "output", OUTPUTS, where)
        self.topk = integer(self.topk, "topk", where, minimum=1)
        if self.bg_thresh is not None:
            if self.decode != "paper":
                raise ConfigError(
                    f"{where}: bg_thresh needs decode='paper' (got bg_thresh={self.bg_thresh!r}, decode={self.decode!r}); "
                    "with decode='soft' use the protocol's logit_scale and prob_thd"
                )
            self.bg_thresh = number(self.bg_thresh, "bg_thresh", where, minimum=0.0, maximum=1.0)
        self.background_class = integer(self.background_class, "background_class", where, minimum=0)

    @property
    def text_embeddings(self) -> torch.Tensor:
        if self.vocabulary is None:
            raise RuntimeError(f"{type(self).__name__}: call set_classes(...) before predicting")
        return self._text

    def train(self, mode: bool = True):
        """Inference only: the model stays in eval mode (BatchNorm running statistics, hard grouping)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def logit_scale(self) -> float:
        """The checkpoint's temperature, exp(logit_scale) clamped at 100 (used by `decode="paper"`)."""
        return self.model.temperature()

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.model.cfg.context_length)
        return self._tokenizer(texts)

    def text_key(self) -> dict | None:
        """What fixes a name's embedding besides the name (the disk cache's key), or None when nothing may be
        cached on disk: random weights (unseeded), or weights modified in place since they were loaded."""
        if self.random_weights or weights_version(self._text_parameters()) != self._weights_version:
            return None
        if self._weights_id is None:
            self._weights_id = file_digest(self._weights_path)
        tower = "\n".join([repr(self.model.text), repr(self.model.text_proj), repr(self.model.cfg)])
        prompts = [t("{}") if callable(t) else t for t in self.templates]
        return {
            "encoder": f"ovseg_pgseg {self.kind} mean-normalise",
            "model": self.kind,
            "weights": self._weights_id,
            "tower": digest(tower),
            "tokenizer": ["SimpleTokenizer", self.model.cfg.context_length],
            "templates_name": self.templates_name,
            "templates": digest("\n".join(prompts)),
            "dtype": str(module_dtype(self.model)).replace("torch.", ""),
        }

    def _text_parameters(self) -> list[torch.Tensor]:
        return [*self.model.text.parameters(), *self.model.text_proj.parameters()]

    @torch.no_grad()
    def _encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """The release's recipe: mean of the projected template embeddings, L2-normalised. The text transformer
        is causal and pooled at the end-of-text token, so prompts are encoded in length-sorted batches cut
        after their longest prompt (`ovseg.pipeline.text.encode_by_length`)."""
        prompts = [t(name) if callable(t) else t.format(name) for name in names for t in self.templates]
        tokens = self._tokenize(prompts).to(self._text.device)
        with torch.autocast(self._text.device.type, enabled=False):
            emb = encode_by_length(tokens, tokens.argmax(dim=-1), self.model.encode_text, _TEXT_BATCH).float()
        emb = emb.view(len(names), len(self.templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(emb, dim=-1)

    @torch.no_grad()
    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Embeddings of the vocabulary's names: kept per name in memory and in the disk cache
        (`ovseg.text_cache`), so only names never seen with these weights are encoded."""
        vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
        key = (module_dtype(self.model), weights_version(self._text_parameters()))
        if key != self._names_key:
            self._names, self._names_key = {}, key
        missing = [n for n in dict.fromkeys(vocab.names) if n not in self._names]
        if missing:
            self._names.update(zip(missing, cached_embeddings(self.text_key(), missing, self._encode_names)))
        self._text = torch.stack([self._names[n] for n in vocab.names]).to(self._text.device)
        self.vocabulary = vocab

    def _background_names(self) -> torch.Tensor | None:
        if self.bg_thresh is None:
            return None
        if not 0 <= self.background_class < self.vocabulary.num_classes:
            raise ConfigError(
                f"predictor {self.kind}: background_class {self.background_class} is not a class index of the "
                f"vocabulary ({self.vocabulary.num_classes} classes)"
            )
        if self.vocabulary.num_classes < 2:
            raise ConfigError(f"predictor {self.kind}: bg_thresh needs at least one class besides the background")
        return self.vocabulary.name_to_class == self.background_class

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, Q, h, w), float32; see the module docstring for what they are."""
        if self.vocabulary is None:
            raise RuntimeError(f"{type(self).__name__}: call set_classes(...) before predicting")
        b, _, height, width = images.shape
        x = prepare_images(images, IMAGENET_MEAN, IMAGENET_STD, self.patch_size, dtype=module_dtype(self.model))
        enc = self.model.encode_image(x)
        text = self.text_embeddings.float()
        if self.decode == "soft":
            group_scores = enc.groups.float() @ text.T
        else:
            group_scores = paper_group_scores(
                enc.groups.float(),
                enc.image.float(),
                text,
                logit_scale=self.logit_scale,
                topk=self.topk,
                name_to_class=self.vocabulary.name_to_class,
                background=self._background_names(),
                bg_thresh=self.bg_thresh,
            )
        assignment = enc.assignment.float()
        size = enc.grid
        if self.output == "pixel":
            assignment = assignment_to_pixels(assignment, enc.grid, self.patch_size, (height, width))
            size = (height, width)
        if self.decode == "paper":
            assignment = one_hot_groups(assignment)
        scores = assignment @ group_scores  # (B, n, Q)
        return scores.transpose(1, 2).reshape(b, -1, *size)

    def extra_repr(self) -> str:
        return (
            f"random_weights={self.random_weights}, decode={self.decode!r}, output={self.output!r}, topk={self.topk}, "
            f"bg_thresh={self.bg_thresh}, templates={len(self.templates)}"
        )


class PGSegPredictor(GroupViTPredictor):
    """PGSeg: GroupViT with prototype reconstruction (NPR) before both grouping blocks."""

    npr = True
    kind = "pgseg"
