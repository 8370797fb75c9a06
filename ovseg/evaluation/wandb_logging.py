"""Weights & Biases logging through Lightning's `WandbLogger`, offline when no credentials exist."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_wandb_logger(project: str, run_dir: Path, config: dict, log=print):
    """A WandbLogger for one bench run; offline (sync later with `wandb sync`) without credentials."""
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not has_wandb_credentials()
    if offline and os.environ.get("WANDB_MODE") != "disabled":
        log(f"W&B: no credentials found, logging offline to {run_dir / 'wandb'} (upload later with `wandb sync`)")
    logger = WandbLogger(
        project=project,
        name=Path(run_dir).name,
        save_dir=str(run_dir),
        offline=offline,
        group=config.get("suite"),
        job_type="bench",
    )
    logger.log_hyperparams(config)
    return logger
