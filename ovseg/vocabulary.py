"""Public import path of class names and synonyms; the code lives in `ovseg.pipeline.vocabulary`."""

from .pipeline.vocabulary import (  # noqa: F401
    Vocabulary,
)

__all__ = ["Vocabulary"]
