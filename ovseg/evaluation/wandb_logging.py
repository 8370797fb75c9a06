"""Weights & Biases logging through Lightning's `WandbLogger`; W&B never blocks a bench.

The run is created here and handed to the logger: online only with credentials and when the W&B
server answers a TCP connection within `PROBE_S` seconds, with a bounded `init_timeout`
(`WANDB_INIT_TIMEOUT`, default `INIT_TIMEOUT_S`); in every other case, or when the online start
fails, offline into the run folder with one message saying why (upload later with `wandb sync`).
`run_id` continues a W&B run: a resumed bench passes the id stored in its run folder.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

INIT_TIMEOUT_S = 30.0
PROBE_S = 5.0


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(_base_url()).hostname or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits), chosen before the run starts so the run folder keeps it."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _offline_reason(timeout: float) -> str | None:
    """Why this run must be offline, or None when an online start may be tried."""
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "dryrun"):
        return f"WANDB_MODE={mode}"
    if not has_wandb_credentials():
        return "no credentials found (`wandb login` or WANDB_API_KEY)"
    url = urlparse(_base_url())
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=min(PROBE_S, timeout)).close()
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or type(exc).__name__})"
    return None


def make_wandb_logger(project: str, run_dir: Path, config: dict, run_id: str | None = None,
                      group: str | None = None, log=print):
    """A WandbLogger for one bench run (or comparison); offline into `run_dir` when W&B cannot be reached."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init = dict(project=project, name=run_dir.name, dir=str(run_dir), group=group, job_type="bench",
                id=run_id, resume="allow" if run_id else None, config=config, reinit="finish_previous")
    if os.environ.get("WANDB_MODE") == "disabled":
        return WandbLogger(experiment=wandb.init(mode="disabled", **init))
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
    reason = _offline_reason(timeout)
    run = None
    if reason is None:
        try:
            run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **init)
        except Exception as exc:  # noqa: BLE001 - any failure to start online means offline
            reason = f"the online start failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            wandb.teardown()  # the failed attempt still holds the run id
    if run is None:
        log(f"W&B: {reason}; logging offline to {run_dir / 'wandb'} "
            f"(upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`)")
        run = wandb.init(mode="offline", **init)
    return WandbLogger(experiment=run)
