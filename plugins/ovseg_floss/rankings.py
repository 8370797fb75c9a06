"""FLOSS template rankings: the authors' JSON document, read (which templates each expert uses) and written.

Schema (yasserben/FLOSS `mmseg/evaluation/metrics/entropy_metric.py`, `compute_metrics`)::

    {"model": "naclip", "dataset": "voc20", "split": "train",
     "classes": {"<class>": {"entropy_ranking": [
         {"template_id": 12, "entropy": 0.41, "pixel_percentage": 3.2, "rank": 1}, ...]}}}

Per class the entries are sorted by ascending mean entropy (a stable sort: ties keep the existing order,
and templates that never win the class, entropy 0.0 and pixel percentage 0.0, sort first). The authors'
files key NACLIP classes by the dataset's class names with spaces removed (`diningtable`), MaskCLIP ones
with spaces; ovseg writes each class's first name as it is.

Reading (`_load_template_rankings` in the authors' `naclip.py` and `dinoclip_inferencer.py`): per class,
drop the entries with `pixel_percentage == 0`, keep the first `top_n` ids in file order.
"""

from __future__ import annotations

import json
import math
import os
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ovseg.errors import ConfigError
from ovseg.pipeline.ranking import TemplateStatistics
from ovseg.pipeline.vocabulary import Vocabulary

__all__ = ["Rankings", "read_rankings", "class_keys", "template_choice", "expert_weights", "rankings_document", "covers"]

RANKING = "entropy_ranking"
OPTION = "predictor.rankings"


@dataclass(frozen=True)
class Rankings:
    """A rankings document and where it came from (for error messages)."""

    document: dict
    source: str


def read_rankings(value: Any, where: str = OPTION) -> Rankings | None:
    """Rankings from a JSON path or a mapping in the authors' schema (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{where}: rankings file {str(path)!r} does not exist "
                              "(write one with `ovseg rank-templates`)") from exc
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read rankings file {str(path)!r} as JSON ({exc})") from exc
        where = f"{where} ({path})"
    elif isinstance(value, Mapping):
        doc = deepcopy(dict(value))
    else:
        raise ConfigError(f"{where} must be a path to a rankings JSON file or a mapping, got {type(value).__name__}")
    _check(doc, where)
    return Rankings(doc, where)


def _check(doc: Any, where: str) -> None:
    classes = doc.get("classes") if isinstance(doc, Mapping) else None
    if not isinstance(classes, Mapping):
        raise ConfigError(f"{where}: not a template rankings document (expected a mapping with `classes`)")
    for name, entry in classes.items():
        ranking = entry.get(RANKING) if isinstance(entry, Mapping) else None
        if ranking is None:
            continue  # the authors' loader skips classes without an entropy ranking
        if not isinstance(ranking, list):
            raise ConfigError(f"{where}: classes.{name}.{RANKING} must be a list")
        for item in ranking:
            ok = isinstance(item, Mapping) and isinstance(item.get("template_id"), int) and not isinstance(
                item.get("template_id"), bool) and isinstance(item.get("pixel_percentage"), (int, float))
            if not ok:
                raise ConfigError(f"{where}: classes.{name}.{RANKING} has an entry without an integer template_id "
                                  f"and a numeric pixel_percentage: {item!r}")


def class_keys(vocabulary: Vocabulary) -> list[str]:
    """The key each class is written under: its first name."""
    return vocabulary.display_names


def _squash(name: str) -> str:
    return name.replace(" ", "")


def _lookup(doc: Mapping, vocabulary: Vocabulary, aliases: Mapping[str, str]) -> tuple[list[str | None], list[str]]:
    """The document key of each name, and the classes with none.

    Per name, in order: the key the user gave for its class (`rankings_keys`), the name itself, its
    class's first name; each first exactly, then with spaces removed on both sides (reads the authors'
    NACLIP files, `trafficlight`). A synonym therefore uses its class's templates unless the file ranks
    it itself: the authors' VOC20 fix (`person in shirt` takes `person`'s list), generalised.
    """
    ranked = [k for k, v in doc["classes"].items() if isinstance(v, Mapping) and v.get(RANKING) is not None]
    exact = set(ranked)
    squashed: dict[str, str] = {}
    for key in ranked:
        squashed.setdefault(_squash(key), key)
    keys, missing = [], []
    for names in vocabulary.class_names:
        alias = next((aliases[n] for n in names if n in aliases), None)
        for name in names:
            candidates = [c for c in (alias, name, names[0]) if c is not None]
            found = next((c for c in candidates if c in exact), None)
            if found is None:
                found = next((squashed[_squash(c)] for c in candidates if _squash(c) in squashed), None)
            keys.append(found)
            if found is None and names[0] not in missing:
                missing.append(names[0])
    return keys, missing


def template_choice(
    rankings: Rankings, vocabulary: Vocabulary, num_templates: int, top_n: int,
    aliases: Mapping[str, str] | None = None,
) -> list[list[int]]:
    """Template ids of each name's expert, in vocabulary name order.

    The first `top_n` entries with a non-zero pixel percentage, in file order. Fewer than `top_n` such
    entries: the ones there are. None (the class never won a pixel under any template): all templates,
    i.e. the default classifier, as the authors' MaskCLIP/CLIP-DINOiser code does (their NACLIP code stops
    with an error there).
    """
    doc, where = rankings.document, rankings.source
    keys, missing = _lookup(doc, vocabulary, aliases or {})
    if missing:
        known = sorted(doc["classes"])
        shown = ", ".join(map(repr, known[:12])) + (", ..." if len(known) > 12 else "")
        raise ConfigError(
            f"{where} ranks other classes: no entry for {', '.join(map(repr, missing))} "
            f"(the file has {shown}); rank these classes with `ovseg rank-templates`, or map a class to a key of "
            "the file with predictor.rankings_keys"
        )
    chosen = []
    for key in keys:
        ids = [e["template_id"] for e in doc["classes"][key][RANKING] if e["pixel_percentage"] > 0.0][:top_n]
        bad = [i for i in ids if not 0 <= i < num_templates]
        if bad:
            raise ConfigError(f"{where}: class {key!r} uses template ids {bad}, but the predictor has "
                              f"{num_templates} templates (0..{num_templates - 1})")
        chosen.append(ids or list(range(num_templates)))
    return chosen


def expert_weights(choice: Sequence[Sequence[int]], num_templates: int) -> torch.Tensor:
    """(E, T) float64 averaging weights: row e is 1/|ids| on expert e's template ids, 0 elsewhere."""
    rows = torch.cat([torch.full((len(ids),), e) for e, ids in enumerate(choice)])
    cols = torch.tensor([i for ids in choice for i in ids])
    weights = torch.zeros(len(choice), num_templates, dtype=torch.float64)
    weights[rows, cols] = 1.0
    return weights / weights.sum(1, keepdim=True)


def rankings_document(
    statistics: TemplateStatistics,
    keys: Sequence[str],
    *,
    model: str,
    dataset: str,
    split: str,
    previous: Mapping | None = None,
) -> dict[str, Any]:
    """The rankings of `keys` (one per class) from dataset totals, merged into `previous` as the authors do:
    entries of other templates and other classes are kept, entries of these templates replaced, and each
    class re-sorted and re-ranked."""
    entropy_sum = statistics.entropy_sum.double().cpu().tolist()
    count = statistics.count.double().cpu().tolist()
    total = float(statistics.pixels)
    doc = deepcopy(dict(previous)) if previous else {}
    if not doc:
        doc = {"model": model, "dataset": dataset, "split": split, "classes": {}}
    for c, key in enumerate(keys):
        entries = {str(e["template_id"]): e for e in doc["classes"].setdefault(key, {}).get(RANKING, [])}
        for t, (sums, counts) in enumerate(zip(entropy_sum, count)):
            n = counts[c]
            new = {
                "template_id": statistics.first + t,
                "entropy": sums[c] / n if n > 0 else 0.0,
                "pixel_percentage": n / total * 100 if n > 0 else 0.0,
            }
            if not all(math.isfinite(v) for v in (new["entropy"], new["pixel_percentage"])):
                raise ValueError(f"non-finite template statistics for class {key!r}: {new}")
            entries.setdefault(str(new["template_id"]), {}).update(new)
        ordered = sorted(entries.values(), key=lambda e: e["entropy"])
        doc["classes"][key][RANKING] = [{**e, "rank": i + 1} for i, e in enumerate(ordered)]
    return doc


def covers(doc: Mapping, keys: Sequence[str], *, model: str, dataset: str, num_templates: int) -> bool:
    """Whether `doc` ranks all `num_templates` templates of every key, for this model and dataset."""
    if doc.get("model") != model or doc.get("dataset") != dataset or not isinstance(doc.get("classes"), Mapping):
        return False
    wanted = set(range(num_templates))
    for key in keys:
        ranking = (doc["classes"].get(key) or {}).get(RANKING) or []
        if not wanted <= {e.get("template_id") for e in ranking if isinstance(e, Mapping)}:
            return False
    return True
