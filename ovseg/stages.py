"""Public import path of the stage interfaces plugins implement; the code lives in `ovseg.pipeline.stages`."""

from .pipeline.stages import (  # noqa: F401
    Stage,
    VLMPredictor,
    FeatureExtractor,
    Refiner,
    prepare_images,
    grid_size,
    module_device,
    module_dtype,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = ["Stage", "VLMPredictor", "FeatureExtractor", "Refiner", "prepare_images", "grid_size", "module_device", "module_dtype", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
