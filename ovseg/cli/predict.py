"""`ovseg predict`: segment your own images with free-text class names.

    ovseg predict photos/ cat.jpg --classes "cow; grass; sky, clouds" --method lposs_plus --output out/

Per image it writes `<stem>_labels.png` (palette PNG whose pixel values are class indices),
`<stem>_overlay.png` (image, colours and a legend) and, with `--save-scores`, `<stem>_scores.npy`
(float32 (C, H, W)); `classes.json` maps each index to its names. Everything that can be checked
without the images (classes, method, device, precision) is checked before the model is built; a
missing or unreadable image is reported and skipped, and the exit code is 1 if any was.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovseg.api import IMAGE_SUFFIXES, from_config, load_image
from ovseg.runtime import check_precision, resolve_device
from ovseg.errors import ConfigError, DatasetError
from ovseg.visualize import RANDOM_WEIGHTS_BANNER, label_png, overlay
from ovseg.pipeline.vocabulary import Vocabulary


@dataclass
class Failure:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def parse_classes(text: str) -> Vocabulary:
    """The `--classes` string as a Vocabulary, with errors that quote the option."""
    try:
        return Vocabulary.parse(text or "")
    except ConfigError as exc:
        raise ConfigError(
            f'--classes {text!r}: {exc} (separate classes with ";" and synonyms with ",", e.g. "cow; grass; sky, clouds")'
        ) from exc


def expand_inputs(inputs: list[Path]) -> tuple[list[Path], list[Failure]]:
    """Image files from files and folders (a folder's images with a known suffix, sorted by name;
    not recursive); missing paths and folders without images become failures. Duplicates are dropped."""
    images: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            images.append(path)

    for path in inputs:
        path = Path(path)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                failures.append(Failure(path, f"folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"))
            for p in found:
                add(p)
        elif path.is_file():
            add(path)  # any suffix: the image reader decides
        else:
            failures.append(Failure(path, "no such file or folder"))
    return images, failures


def output_stems(paths: list[Path]) -> list[str]:
    """One output name per image: its stem, prefixed by its folder (then numbered) when two images
    share a stem, so that no image's outputs overwrite another's."""
    used: set[str] = set()
    stems = []
    for p in paths:
        stem = p.stem
        if stem in used:
            stem = f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem
            base, k = stem, 2
            while stem in used:
                stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def split_inputs(inputs: list, overrides: list) -> tuple[list[Path], list[str]]:
    """Separate `key=value` overrides from image paths.

    argparse cannot tell two adjacent positionals apart, so `ovseg predict a.jpg refiner.k=200`
    puts the override among the inputs; an item is an override when it has the form key=value with a
    method-config key (`refiner.k=200`, `protocol.crop=448`) and is not an existing path.
    """
    from ovseg.evaluation.methods import METHOD_KEYS

    paths, extra = [], []
    for item in inputs:
        text = str(item)
        key = text.split("=", 1)[0]
        if "=" in text and key.split(".", 1)[0] in METHOD_KEYS and not Path(text).exists():
            extra.append(text)
        else:
            paths.append(Path(item))
    return paths, list(overrides or []) + extra


def write_classes(vocabulary: Vocabulary, output: Path) -> Path:
    path = output / "classes.json"
    path.write_text(json.dumps({str(i): names for i, names in enumerate(vocabulary.class_names)}, indent=2) + "\n")
    return path


def write_prediction(output: Path, stem: str, image: np.ndarray, result, save_scores: bool,
                     banner: str | None = None) -> None:
    """Label PNG, overlay PNG (with `banner` on top, e.g. the random-weights warning) and optionally the
    score array of one image."""
    labels = result.labels.detach().cpu()
    label_png(labels).save(output / f"{stem}_labels.png")
    overlay(image, labels, result.vocabulary.display_names, banner=banner).save(output / f"{stem}_overlay.png")
    if save_scores:
        np.save(output / f"{stem}_scores.npy", result.scores.detach().float().cpu().numpy().astype(np.float32))


def run_predict(args, log=print, err=None) -> int:
    """Run `ovseg predict` for parsed CLI `args`; returns the exit code (0, or 1 if an image failed)."""
    from tqdm import tqdm

    from .arguments import method_from_args
    from ovseg.evaluation.methods import dataset_protocol

    err = err or (lambda msg: print(msg, file=sys.stderr))
    # checks that need no image and no model come first, so a typo costs nothing
    vocabulary = parse_classes(args.classes)
    precision = check_precision(args.precision)
    device = resolve_device(args.accelerator)
    args.inputs, args.overrides = split_inputs(args.inputs, args.overrides)
    cfg, protocol_overrides = method_from_args(args)  # malformed overrides raise ConfigError there
    protocol = dataset_protocol(cfg, final=protocol_overrides)
    images, failures = expand_inputs(args.inputs)
    for failure in failures:
        err(f"ovseg predict: skipped {failure}")
    output = Path(args.output)
    if images:
        segmenter = from_config(cfg, protocol, device, precision)
        if segmenter.random_weights:
            log("note: random weights (pretrained=random): the masks show the pipeline works, not what the method sees")
        segmenter.set_classes(vocabulary)
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--output {str(output)!r}: cannot create the folder ({exc})") from exc
        write_classes(vocabulary, output)
        written = 0
        bar = tqdm(list(zip(images, output_stems(images))), desc="ovseg predict", unit="image", disable=None, file=sys.stderr)
        for path, stem in bar:
            try:
                image = load_image(path)
            except DatasetError as exc:  # report PIL's own reason; Failure already names the file
                cause = exc.__cause__ or exc
                failures.append(Failure(path, f"not a readable image ({type(cause).__name__}: {cause})"))
                tqdm.write(f"ovseg predict: skipped {failures[-1]}", file=sys.stderr)
                continue
            try:
                result = segmenter.segment(image)
                write_prediction(output, stem, image, result, args.save_scores,
                                 RANDOM_WEIGHTS_BANNER if segmenter.random_weights else None)
            except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory on one huge image
                failures.append(Failure(path, f"failed ({type(exc).__name__}: {exc})"))
                tqdm.write(f"ovseg predict: {failures[-1]}", file=sys.stderr)
                continue
            written += 1
        bar.close()
        log(f"wrote {written} of {len(images)} images to {output} (<stem>_labels.png, <stem>_overlay.png"
            + (", <stem>_scores.npy" if args.save_scores else "") + "; class indices in classes.json)")
    if failures:
        err(f"ovseg predict: {len(failures)} input(s) failed:")
        for failure in failures:
            err(f"  {failure}")
        return 1
    return 0
