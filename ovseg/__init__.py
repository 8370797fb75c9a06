"""ovseg: open-vocabulary semantic segmentation, composed from pluggable stages and benchmarked fairly."""

from .pipeline.factory import build_extractor, build_predictor, build_refiner
from .registry import list_plugins
from .version import __version__

__all__ = ["build_predictor", "build_extractor", "build_refiner", "list_plugins", "load_segmenter", "__version__"]


def __getattr__(name):
    # lazy: importing ovseg must not import torch models
    if name == "load_segmenter":
        from .api import load_segmenter

        return load_segmenter
    raise AttributeError(f"module 'ovseg' has no attribute {name!r}")
