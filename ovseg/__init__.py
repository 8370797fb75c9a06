"""ovseg: open-vocabulary semantic segmentation, composed from pluggable stages and benchmarked fairly."""

from .registry import build_extractor, build_predictor, build_refiner, list_plugins

__all__ = ["build_predictor", "build_extractor", "build_refiner", "list_plugins", "load_segmenter", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: importing ovseg must not import torch models
    if name == "load_segmenter":
        from .api import load_segmenter

        return load_segmenter
    raise AttributeError(f"module 'ovseg' has no attribute {name!r}")
