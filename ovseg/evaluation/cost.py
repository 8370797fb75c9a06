"""What a dataset costs: seconds per stage and peak memory, measured the same way on every device.

- `StageClock` times the segmenter's stages from outside: the predictor's and the extractor's forward
  passes count as "model", the refiner's steps (`refine_windows`, `refine_canvas`, `refine_output`) as
  "refiner". Asynchronous devices are synchronised before each clock reading (`sync`), so the time
  of a stage is the time its kernels ran, not the time it took to queue them.
- `reset_peak_memory` / `peak_memory` give the peak resident memory of this process (Linux: VmHWM,
  reset through /proc/self/clear_refs; elsewhere the peak since the process started) and the peak
  memory allocated on the accelerator when the models run on one (None on the CPU).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from ovseg.runtime import module_device

MB = 1024 * 1024
REFINER_STEPS = ("refine_windows", "refine_canvas", "refine_output")


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class StageClock:
    """Accumulates seconds per stage kind ("model", "refiner") of a segmenter while attached."""

    def __init__(self, segmenter: nn.Module):
        self.segmenter = segmenter
        self.seconds = {"model": 0.0, "refiner": 0.0}
        self._started: dict[int, float] = {}
        self._handles = []
        self._wrapped: list[str] = []
        self.device = torch.device("cpu")

    def _start(self, stage: nn.Module) -> None:
        sync(self.device)
        self._started[id(stage)] = time.perf_counter()

    def _stop(self, stage: nn.Module, kind: str) -> None:
        sync(self.device)
        self.seconds[kind] += time.perf_counter() - self._started.pop(id(stage), time.perf_counter())

    def attach(self) -> "StageClock":
        # the device the segmenter computes on (a refiner without parameters works on the same tensors)
        self.device = module_device(self.segmenter)
        for stage in (self.segmenter.predictor, self.segmenter.extractor):
            if stage is None:
                continue
            self._handles.append(stage.register_forward_pre_hook(lambda m, args: self._start(m)))
            self._handles.append(stage.register_forward_hook(lambda m, args, out: self._stop(m, "model")))
        refiner = self.segmenter.refiner
        for name in REFINER_STEPS:
            step = getattr(refiner, name, None)
            if step is None:
                continue

            def timed(*args, _step=step, **kwargs):
                self._start(refiner)
                try:
                    return _step(*args, **kwargs)
                finally:
                    self._stop(refiner, "refiner")

            object.__setattr__(refiner, name, timed)  # an instance attribute shadows the method until detach
            self._wrapped.append(name)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for name in self._wrapped:
            refiner = self.segmenter.refiner
            if name in vars(refiner):
                object.__delattr__(refiner, name)
        self._handles, self._wrapped = [], []


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: resident memory (where the OS allows it) and accelerator memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, float | None]:
    """(peak resident MB of this process, peak accelerator MB allocated or None on the CPU)."""
    rss = _vm_hwm_bytes()
    if rss is None:  # ru_maxrss: kilobytes on Linux, bytes on macOS; the peak since the process started
        try:
            import resource
        except ImportError:  # Windows
            rss = 0
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = torch.accelerator.max_memory_allocated(device) / MB if device.type != "cpu" else None
    return rss / MB, gpu
