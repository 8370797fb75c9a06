"""Arguments shared by several `ovseg` commands, and turning them into a method config."""

from __future__ import annotations

import argparse

from ovseg.errors import OvsegError
from ovseg.runtime import ACCELERATORS, PRECISIONS


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="method config: a YAML path or a name in configs/methods (default: lposs_plus)")
    p.add_argument("--predictor", help="replace the method's VLM predictor (plugin defaults), e.g. sclip")
    p.add_argument("--extractor", help="replace the method's feature extractor, e.g. dino (or 'null')")
    p.add_argument("--refiner", help="replace the method's refiner, e.g. none, lposs, lposs_plus")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def add_device_args(p: argparse.ArgumentParser, devices: bool = True) -> None:
    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="default: auto (a GPU when visible)")
    if devices:
        p.add_argument("--devices", default="1", help="number of devices (DDP when > 1), or 'auto'")
    p.add_argument("--precision", default="32-true", choices=PRECISIONS, help="default: 32-true")


def devices_arg(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError as exc:
        raise OvsegError(f"--devices must be a number or 'auto', got {value!r}") from exc
    if n < 1:
        raise OvsegError(f"--devices must be at least 1, got {n}")
    return n


def engine_args(args) -> dict:
    """The options of a pass through the Lightning engine that `bench` and `rank-templates` share."""
    return dict(
        data_root=args.data_root,
        accelerator=args.accelerator,
        devices=devices_arg(args.devices),
        num_nodes=args.num_nodes,
        precision=args.precision,
        num_workers=args.num_workers,
        limit=args.limit,
        only=[s.strip() for s in args.datasets.split(",")] if args.datasets else None,
        progress=not args.no_progress,
    )


def method_from_args(args):
    """Method config with the stage flags and overrides applied; returns (cfg, protocol overrides)."""
    from ovseg.evaluation.methods import resolve_method as resolve

    return resolve(args.method, args.overrides, predictor=args.predictor, extractor=args.extractor,
                   refiner=args.refiner)
