"""ovseg: open-vocabulary semantic segmentation, composed from pluggable stages and benchmarked fairly."""

from .registry import build_extractor, build_predictor, build_refiner, list_plugins

__all__ = ["build_predictor", "build_extractor", "build_refiner", "list_plugins", "__version__"]
__version__ = "0.1.0"
