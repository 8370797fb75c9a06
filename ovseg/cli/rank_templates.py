"""`ovseg rank-templates`: FLOSS stage 1 on a suite's images (no labels read), one rankings JSON per dataset.

    ovseg rank-templates --suite standard8 --datasets voc20 --method floss_naclip --split train \\
        --output rankings/naclip_voc20.json
    ovseg bench --suite standard8 --datasets voc20 --method floss_naclip predictor.rankings=rankings/naclip_voc20.json

`--split NAME` ranks another split of the same data: a Hugging Face source's split, or a folder source's
split file of that name beside the suite's (`ImageSets/Segmentation/val.txt` -> `train.txt`). Folder
sources without a split file keep each split in its own folder: `--source DATASET.images=FOLDER` (any
source key: `root`, `images`, `image_suffix`, `split_file`, `split`, ...; without `DATASET.` it applies to
every ranked dataset). A rerun with the same `--output` skips datasets the file already ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ovseg.errors import ConfigError

from .arguments import add_device_args, add_method_args, engine_args, method_from_args

EPILOG = ("Overrides: trailing key=value pairs merge into the method config, e.g. predictor.top_n=4 "
          "protocol.crop=448. Datasets already ranked in the --output file are skipped.")


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("rank-templates", help="rank prompt templates on a suite's unlabeled images (FLOSS stage 1)",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG)
    r.add_argument("--suite", default="demo", help="suite name (demo, standard8, mess22) or YAML path")
    r.add_argument("--datasets", help="comma-separated subset of the suite's datasets")
    add_method_args(r)
    add_device_args(r)
    r.add_argument("--num-nodes", type=int, default=1, help="nodes for multi-node DDP (torchrun / SLURM)")
    r.add_argument("--split", help="rank this split instead of the suite's (e.g. train; see --help)")
    r.add_argument("--source", action="append", default=[], metavar="[DATASET.]KEY=VALUE",
                   help="change a dataset's source, e.g. cityscapes.images=leftImg8bit/train (repeatable)")
    r.add_argument("--output", required=True, help="rankings JSON; with several datasets a path with {dataset}")
    r.add_argument("--data-root", type=Path, help="folder holding prepared datasets (env OVSEG_DATA_ROOT)")
    r.add_argument("--num-workers", type=int, default=0, help="data loading workers per process")
    r.add_argument("--limit", type=int, help="rank on only the first N images of each dataset")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return r


def cmd_rank_templates(args) -> int:
    from ovseg.evaluation.ranking import RankingOptions, run_ranking

    opts = RankingOptions(output=args.output, split=args.split, sources=list(args.source), **engine_args(args))
    opts.check()  # before the method config is even read
    if args.method is None:
        raise ConfigError("rank-templates needs --method (floss_naclip or floss_maskclip, or a config of yours)")
    cfg, opts.protocol_overrides = method_from_args(args)
    run_ranking(args.suite, cfg, opts)
    return 0
