"""The `floss` predictor: FLOSS's per-class template experts on a NACLIP or MaskCLIP host.

FLOSS (Benigmim et al., ICCV'25, "Free Lunch in Open-vocabulary Semantic Segmentation"; code
yasserben/FLOSS at ccf1d49, method unchanged since ba2ee15) changes only the text classifier of a
training-free CLIP segmenter. Per name `e` an *expert* classifier averages the embeddings of the
templates that rank best for that name on unlabeled images (stage 1, `rank_templates`); every expert
classifies all names, the usual 80-template classifier runs beside them, and the maps are fused pixel
by pixel (`fusion.py`). The host predictor of `ovseg_clip` (its weights, dense features, templates
and text path) does everything else; its patch grid is `floor`, as both hosts' code.

Host differences, as the authors' code runs them (`naclip.py`, `maskclip.py` + `dinoclip_inferencer.py`):

| | naclip | maskclip |
|---|---|---|
| expert and default classifiers | normalise, mean, normalise | normalise, mean (no final normalisation) |
| stage 1: softmax(logit_scale · cos) | after merging windows and resizing to the original size | at the patch grid, per window |
| final step (method config) | `protocol.logit_scale: 100`: softmax again, max over synonyms | argmax of the fused map |

`forward` returns fused probabilities at the window's pixel resolution (the segmenter merges them at
scale 1); `expert_scores` the raw expert cosines at the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ovseg import build_predictor
from ovseg.errors import ConfigError
from ovseg.pipeline.imaging import ResizedImage
from ovseg.pipeline.options import choice, integer, number
from ovseg.pipeline.protocol import Protocol
from ovseg.pipeline.ranking import TemplateRanker, TemplateStatistics
from ovseg.pipeline.segmenter import resize_for
from ovseg.pipeline.stages import VLMPredictor
from ovseg.pipeline.vocabulary import Vocabulary
from ovseg.pipeline.windows import crop_windows, merge_windows, sliding_windows
from ovseg.runtime import module_device
from ovseg_clip.predictors import ClipDensePredictor

from . import rankings as rk
from .fusion import fuse_experts
from .statistics import entropy_statistics


@dataclass(frozen=True)
class HostStyle:
    """What differs between the authors' two hosts (see the module docstring)."""

    renormalize: bool  # expert and default classifiers normalised after the template mean
    softmax_after_merge: bool  # stage 1: softmax after the windows are merged and resized (else per window)


HOSTS = {"naclip": HostStyle(True, True), "maskclip": HostStyle(False, False)}


class FLOSSPredictor(VLMPredictor, TemplateRanker):
    """FLOSS experts on a host predictor.

    Args:
        host: `naclip` or `maskclip`, built with the `ovseg_clip` predictor of that name (grid `floor`).
        model, pretrained, templates, cache_dir, quick_gelu, text_batch_size, seed: the host's.
        gaussian_std: NACLIP's neighbourhood std (host `naclip` only; default the host's, 5).
        rankings: template rankings in the authors' JSON schema (a path or a mapping), e.g. written by
            `ovseg rank-templates`; None until set (stage 1 needs none, `forward` does).
        top_n: templates per expert (4 in the paper).
        logit_scale: temperature of the experts' softmax over names (NACLIP 100; MaskCLIP 1/τ = 100).
        rankings_keys: {class name: key in the rankings file} for classes the file names differently.
        max_elements: bound on one chunk's elements (fusion: experts x names x pixels; ranking: templates x
            names x pixels), so that memory does not grow with the square of the vocabulary.
    """

    grid = "floor"
    options = ("rankings", "top_n", "logit_scale", "rankings_keys")

    def __init__(
        self,
        host: str = "naclip",
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        templates: str = "imagenet80",
        rankings: str | Mapping | None = None,
        top_n: int = 4,
        logit_scale: float = 100.0,
        rankings_keys: Mapping[str, str] | None = None,
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        text_batch_size: int = 256,
        seed: int = 0,
        gaussian_std: float | None = None,
        max_elements: int = 2**26,
    ):
        super().__init__()
        self.host_name = choice(host, "host", tuple(HOSTS), self.stage_name)
        self.style = HOSTS[self.host_name]
        extra = {}
        if gaussian_std is not None:
            if self.host_name != "naclip":
                raise ConfigError(f"{self.stage_name}: gaussian_std is a NACLIP option; host is {self.host_name}")
            extra["gaussian_std"] = gaussian_std
        self.host = build_predictor(
            self.host_name, model=model, pretrained=pretrained, templates=templates, cache_dir=cache_dir,
            quick_gelu=quick_gelu, text_batch_size=text_batch_size, seed=seed, grid="floor", **extra,
        )
        if not isinstance(self.host, ClipDensePredictor):
            raise ConfigError(f"{self.stage_name}: host {host!r} is {type(self.host).__name__}, not an ovseg_clip "
                              "dense CLIP predictor")
        self.patch_size = self.host.patch_size
        self.random_weights = self.host.random_weights
        self.max_elements = integer(max_elements, "max_elements", self.stage_name, minimum=1)
        self.vocabulary: Vocabulary | None = None
        self._units: torch.Tensor | None = None  # (Q, T, E) unit embedding of every name x template prompt
        self._classifiers: torch.Tensor | None = None  # (Q + 1, Q, E): experts in name order, default last
        self._unit_cache: dict[str, torch.Tensor] = {}
        self._unit_cache_key: tuple | None = None
        self._rankings: rk.Rankings | None = None
        self.configure(rankings=rankings, top_n=top_n, logit_scale=logit_scale, rankings_keys=rankings_keys)

    def extra_repr(self) -> str:
        source = self._rankings.source if self._rankings is not None else None
        return (f"host={self.host_name}, rankings={source!r}, top_n={self.top_n}, logit_scale={self.logit_scale}"
                + (", random_weights=True" if self.random_weights else ""))

    # -- options ----------------------------------------------------------------------------

    def check_options(self) -> None:
        self.top_n = integer(self.top_n, "top_n", self.stage_name, minimum=1)
        self.logit_scale = number(self.logit_scale, "logit_scale", self.stage_name, above=0.0)
        keys = self.rankings_keys
        if keys is not None and not (isinstance(keys, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in keys.items())):
            raise ConfigError(f"{self.stage_name}: rankings_keys must map class names to keys of the rankings file, "
                              f"got {keys!r}")
        self.rankings_keys = dict(keys) if keys is not None else None
        rankings = rk.read_rankings(self.rankings)
        classifiers = self._build_classifiers(rankings) if self.vocabulary is not None else None
        self._rankings, self._classifiers = rankings, classifiers

    # -- text -------------------------------------------------------------------------------

    @property
    def num_templates(self) -> int:
        return len(self.host.templates)

    def _prompt_units(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), T, E): every template prompt of every name, encoded once by the host's text path."""
        param = next(self.host.clip.parameters())
        key = (param.dtype, param.device)
        if key != self._unit_cache_key:
            self._unit_cache, self._unit_cache_key = {}, key
        missing = [n for n in dict.fromkeys(names) if n not in self._unit_cache]
        if missing:
            prompts = [t(n) for n in missing for t in self.host.templates]
            units = self.host.encode_prompts(prompts).view(len(missing), self.num_templates, -1)
            self._unit_cache.update(zip(missing, units))
        return torch.stack([self._unit_cache[n] for n in names])

    def _mean(self, weights: torch.Tensor) -> torch.Tensor:
        """Classifiers (K, Q, E) from template weights (K, T): the weighted mean of each name's template
        embeddings, normalised again for the NACLIP host."""
        units = self._units
        out = torch.einsum("kt,qte->kqe", weights.to(units.device, torch.float32), units)
        return F.normalize(out, dim=-1) if self.style.renormalize else out

    def _build_classifiers(self, rankings: rk.Rankings | None) -> torch.Tensor | None:
        if rankings is None:
            return None
        chosen = rk.template_choice(rankings, self.vocabulary, self.num_templates, self.top_n, self.rankings_keys)
        weights = torch.cat([rk.expert_weights(chosen, self.num_templates),
                             torch.full((1, self.num_templates), 1.0 / self.num_templates, dtype=torch.float64)])
        return self._mean(weights)

    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Encode every name with every template; build the experts if rankings are set."""
        vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
        units = self._prompt_units(vocab.names)
        previous = (self.vocabulary, self._units)
        self.vocabulary, self._units = vocab, units
        try:
            self._classifiers = self._build_classifiers(self._rankings)
        except ConfigError:
            self.vocabulary, self._units = previous
            raise

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(Q, E) unit embeddings of the default (all-template) classifier."""
        if self._units is None:
            raise RuntimeError(f"{self.stage_name}: call set_classes(...) before predicting")
        return F.normalize(self._units.mean(1), dim=-1)

    def _classifiers_on(self, device) -> torch.Tensor:
        if self._units is None:
            raise RuntimeError(f"{self.stage_name}: call set_classes(...) before predicting")
        if self._classifiers is None:
            raise ConfigError(
                f"{self.stage_name}: no template rankings; set predictor.rankings to a rankings JSON file (write one "
                "for your dataset with `ovseg rank-templates --method floss_<host> ...`)"
            )
        if self._classifiers.device != device:
            self._classifiers = self._classifiers.to(device)
        return self._classifiers

    # -- images -----------------------------------------------------------------------------

    def _scores(self, features: torch.Tensor, classifiers: torch.Tensor) -> torch.Tensor:
        """(B, h, w, E) features x (K, Q, E) classifiers -> (B, K, Q, h, w) float32, autocast off."""
        with torch.autocast(features.device.type, enabled=False):
            return torch.einsum("bhwe,kqe->bkqhw", features.float(), classifiers.to(features.device, torch.float32))

    @torch.no_grad()
    def expert_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Raw expert cosines (B, Q + 1, Q, ⌊H/p⌋, ⌊W/p⌋) of windows (B, 3, H, W) in [0, 1]: row `e < Q` is
        the expert of name `e`, the last row the default classifier. (MaskCLIP host: the classifiers are not
        unit vectors, so these are dot products with unit image features.)"""
        features = self.host.features(images)
        return self._scores(features, self._classifiers_on(features.device))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused probabilities (B, Q, H, W) at the windows' pixel resolution."""
        features = self.host.features(images)
        classifiers = self._classifiers_on(features.device)
        size = tuple(images.shape[-2:])
        out = []
        with torch.autocast(features.device.type, enabled=False):
            for feature in features:  # one image at a time bounds the (Q + 1, Q, h, w) volume
                probs = torch.softmax(self._scores(feature[None], classifiers)[0] * self.logit_scale, dim=1)
                out.append(fuse_experts(probs, size, self.max_elements))
        return torch.stack(out)

    # -- stage 1: template ranking --------------------------------------------------------------

    @torch.no_grad()
    def template_statistics(
        self, image: torch.Tensor | ResizedImage, protocol: Protocol, first: int = 0, last: int | None = None
    ) -> TemplateStatistics:
        """Entropy statistics of one image for templates `first..last` (see `statistics.py`).

        Each template's single-prompt classifier runs on the protocol's windows as the host does in the
        authors' `compute_metric` mode; class probabilities are compared at the original size.
        """
        if self._units is None:
            raise RuntimeError(f"{self.stage_name}: call set_classes(...) before ranking templates")
        last = self.num_templates - 1 if last is None else last
        if not 0 <= first <= last < self.num_templates:
            raise ConfigError(f"{self.stage_name}: template range {first}..{last} is outside 0..{self.num_templates - 1}")
        if not isinstance(image, ResizedImage):
            image = resize_for(image, protocol)
        device = module_device(self)
        pixels = image.pixels.to(device).float() / 255.0
        height, width = pixels.shape[-2:]
        boxes = sliding_windows(height, width, protocol.crop or (height, width), protocol.stride)
        crops = crop_windows(pixels, boxes)
        step = protocol.window_batch or crops.shape[0]
        features = torch.cat([self.host.features(crops[i : i + step]) for i in range(0, crops.shape[0], step)])
        boxes = boxes.to(device)
        units = self._units[:, first : last + 1].transpose(0, 1).to(device)  # (T, Q, E): one prompt each
        q, original = units.shape[1], image.original_size
        chunk = max(1, self.max_elements // (q * max(height * width, original[0] * original[1])))
        sums, counts = [], []
        with torch.autocast(device.type, enabled=False):
            for start in range(0, units.shape[0], chunk):
                probs = self._template_probabilities(features, units[start : start + chunk], boxes, (height, width),
                                                     original)
                s, c = entropy_statistics(probs)
                sums.append(s)
                counts.append(c)
        total = torch.tensor(float(original[0] * original[1]), dtype=torch.float64)
        return TemplateStatistics(torch.cat(sums), torch.cat(counts), total, first)

    def _template_probabilities(self, features, units, boxes, size, original) -> torch.Tensor:
        """Class probabilities (T, C, H0, W0) of single-template classifiers `units` (T, Q, E)."""
        t, q = units.shape[:2]
        scores = self._scores(features, units)  # (n, T, Q, h, w)
        if not self.style.softmax_after_merge:
            scores = torch.softmax(scores * self.logit_scale, dim=2)
        merged = merge_windows(scores.flatten(1, 2), boxes, *size)  # (T * Q, H, W)
        probs = F.interpolate(merged[None], size=original, mode="bilinear", align_corners=False)[0]
        probs = probs.view(t, q, *original)
        if self.style.softmax_after_merge:
            probs = torch.softmax(probs * self.logit_scale, dim=1)
        return self.vocabulary.reduce(probs.transpose(0, 1)).transpose(0, 1)

    def rankings_document(
        self, statistics: TemplateStatistics, *, dataset: str, split: str, previous: Mapping | None = None
    ) -> dict[str, Any]:
        if self.vocabulary is None:
            raise RuntimeError(f"{self.stage_name}: call set_classes(...) first")
        return rk.rankings_document(statistics, rk.class_keys(self.vocabulary), model=self.host_name,
                                    dataset=dataset, split=split, previous=previous)

    def has_rankings(self, document: Mapping, dataset: str, vocabulary: Vocabulary) -> bool:
        return rk.covers(document, rk.class_keys(vocabulary), model=self.host_name, dataset=dataset,
                         num_templates=self.num_templates)

    def rank_templates(
        self,
        images: Iterable[torch.Tensor | ResizedImage],
        protocol: Protocol | Mapping | None = None,
        first: int = 0,
        last: int | None = None,
        *,
        dataset: str = "images",
        split: str = "unlabeled",
    ) -> dict[str, Any]:
        """Stage 1 on unlabeled images ((3, H, W) uint8 or float in [0, 1], at their original size): the
        rankings document of the current vocabulary, ready for `configure(rankings=...)` or `json.dump`."""
        if not isinstance(protocol, Protocol):
            protocol = Protocol.from_dict(protocol, where="rank_templates protocol")
        total = None
        for image in images:
            stats = self.template_statistics(image, protocol, first, last)
            total = stats if total is None else total + stats
        if total is None:
            raise ConfigError(f"{self.stage_name}.rank_templates: no images to rank templates on")
        return self.rankings_document(total, dataset=dataset, split=split)
