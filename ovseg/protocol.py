"""Public import path of the evaluation protocol; the code lives in `ovseg.pipeline.protocol`."""

from .pipeline.protocol import (  # noqa: F401
    Protocol,
)

__all__ = ["Protocol"]
