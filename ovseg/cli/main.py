"""The `ovseg` command line: bench, predict, rank-templates, list, download, data check, compare."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ovseg.errors import OvsegError
from ovseg.evaluation.interrupt import Interrupted, launched_by_parent, stop_on_signals

from .arguments import add_device_args, add_method_args, engine_args, method_from_args
from .cache import add_parser as add_cache_parser, cmd_cache
from .rank_templates import add_parser as add_rank_templates_parser, cmd_rank_templates

EPILOG = "Overrides: trailing key=value pairs merge into the method config, e.g. refiner.k=200 protocol.crop=448."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description="Open-vocabulary semantic segmentation benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="evaluate a method on a suite", epilog=EPILOG)
    b.add_argument("--suite", default="demo", help="suite name (demo, standard8, mess22) or YAML path")
    add_method_args(b)
    add_device_args(b)
    b.add_argument("--num-nodes", type=int, default=1, help="nodes for multi-node DDP (torchrun / SLURM)")
    b.add_argument("--data-root", type=Path, help="folder holding prepared datasets (env OVSEG_DATA_ROOT)")
    b.add_argument("--output", type=Path, help="run folder (default: runs/<suite>/<method>-<config hash>)")
    b.add_argument("--num-workers", type=int, default=0, help="data loading workers per process (>= 0)")
    b.add_argument("--limit", type=int, help="evaluate only the first N images of each dataset (N >= 1)")
    b.add_argument("--datasets", help="comma-separated subset of the suite's datasets")
    b.add_argument("--strict", action="store_true",
                   help="stop at the first dataset that is missing or fails, instead of recording it and going on")
    b.add_argument("--wandb", metavar="PROJECT", help="log to Weights & Biases (offline without credentials)")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    b.add_argument("--save-examples", type=int, default=0, metavar="N",
                   help="write image | prediction | ground-truth pictures of the first N images per dataset "
                        "(also for datasets a resumed run skips)")

    p = sub.add_parser("predict", help="segment your own images with free-text class names", epilog=EPILOG)
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--classes", required=True, help='classes separated by ";", synonyms by ",": "cow; grass; sky, clouds"')
    add_method_args(p)
    add_device_args(p, devices=False)
    p.add_argument("--output", type=Path, default=Path("predictions"), help="output folder")
    p.add_argument("--save-scores", action="store_true", help="also write per-class score maps (.npy)")

    sub.add_parser("list", help="registered plugins, suites and method configs")
    sub.add_parser("env", help="versions, devices and paths, for bug reports")

    d = sub.add_parser("download", help="fetch the weights a method needs into the local cache")
    add_method_args(d)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="report found / missing / malformed datasets of a suite")
    c.add_argument("--suite", required=True)
    c.add_argument("--data-root", type=Path)
    c.add_argument("--deep", action="store_true", help="validate every file, not a sample")

    add_rank_templates_parser(sub)

    cmp = sub.add_parser("compare", help="side-by-side table and bar chart of finished runs")
    cmp.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    cmp.add_argument("--output", type=Path, default=Path("comparison"))
    cmp.add_argument("--wandb", metavar="PROJECT", help="also push the table to W&B")
    add_cache_parser(sub)
    return parser


def stoppable(command: str, run, args) -> int:
    """SIGINT / SIGTERM stop `run(args)` (`Interrupted`); an error raised while it stops is part of the stop."""
    with stop_on_signals(lambda signum: interrupted_message(command, signum)) as stopper:
        try:
            return run(args)
        except Exception as exc:
            if stopper.signum is None:
                raise
            raise Interrupted(stopper.signum) from exc


def cmd_bench(args) -> int:
    return stoppable("bench", _bench, args)


def _bench(args) -> int:
    from ovseg.evaluation.bench import BenchOptions, run_bench

    opts = BenchOptions(output=args.output, strict=args.strict, wandb_project=args.wandb,
                        save_examples=args.save_examples, **engine_args(args))
    opts.check()  # before the method config is even read
    cfg, opts.protocol_overrides = method_from_args(args)
    run = run_bench(args.suite, cfg, opts)
    return finish_bench(run) if run is not None else 0


def finish_bench(run) -> int:
    """Rank 0 after a bench: summary files, the W&B tables, the summary on screen, and the exit status:
    1 when a dataset failed, none was evaluated, or `--strict` stopped the bench; else 0."""
    from ovseg.report import comparison_table, results_table, summary_markdown, write_summary

    summary = write_summary(run.run_dir)
    if run.logger is not None:
        columns, rows = comparison_table([summary])
        run.logger.log_table(key="comparison", columns=columns, data=rows)
        columns, rows = results_table(summary)
        run.logger.log_table(key="results", columns=columns, data=rows)
        run.logger.experiment.finish()
    print(f"summary: {run.run_dir / 'summary.md'}")
    print(summary_markdown(summary))
    records = {r.name: r for e in summary.entries for r in (e.members or [e])}
    asked = [records[n] for n in run.datasets if n in records]
    failed = [r for r in asked if r.status == "failed"]
    for r in failed:
        print(f"ovseg: {r.name} failed: {r.reason}", file=sys.stderr)
    if not any(r.done for r in asked):
        print(f"ovseg: no dataset was evaluated (see {run.run_dir / 'summary.md'})", file=sys.stderr)
        return 1
    return 1 if failed or run.stopped_at else 0


def cmd_list(args) -> int:
    from ovseg.evaluation.methods import method_path
    from ovseg.paths import config_dir
    from ovseg.registry import list_plugins

    for kind, infos in list_plugins().items():
        print(f"{kind}s:")
        for info in infos:
            print(f"  {info.name:<14} {info.value}  [{info.distribution} {info.version}]")
    methods = sorted(p.stem for p in (config_dir() / "methods").glob("*.yaml"))
    print("method configs:")
    for m in methods:
        print(f"  {m:<14} {method_path(m)}")
    return 0


def cmd_env(args) -> int:
    import platform

    import torch

    from ovseg.evaluation.bench import environment
    from ovseg.paths import cache_dir, config_dir, data_root

    env = environment()
    print(f"ovseg {env['ovseg']}  python {env['python']}  {platform.platform()}")
    for pkg, version in env["versions"].items():
        print(f"  {pkg:<16} {version}")
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    print(f"CUDA available: {cuda} {gpus}  CPU threads: {torch.get_num_threads()}")
    print(f"configs: {config_dir()}\ncache: {cache_dir()}\ndata root: {data_root()}")
    return 0


def cmd_download(args) -> int:
    from ovseg.evaluation.methods import build_segmenter

    cfg, _ = method_from_args(args)
    segmenter = build_segmenter(cfg)
    names = [type(m).__name__ for m in (segmenter.predictor, segmenter.extractor) if m is not None]
    print(f"weights for method {cfg.name} ({', '.join(names)}) are in the local cache")
    return 0


def cmd_data_check(args) -> int:
    from ovseg.evaluation.data import check_dataset
    from ovseg.paths import data_root
    from ovseg.evaluation.suites import load_suite

    suite = load_suite(args.suite)
    root = args.data_root or data_root()
    bad = 0
    print(f"suite {suite.name}, data root {root}")
    for spec in suite.datasets:
        status = check_dataset(spec, root, deep=args.deep)
        bad += status.status != "found"
        print(f"  {spec.name:<22} {status.status:<10} {status.reason or ''}")
    print(f"{len(suite.datasets) - bad} of {len(suite.datasets)} datasets found")
    return 0 if bad == 0 else 1


def cmd_compare(args) -> int:
    from ovseg.report import compare_runs

    paths = compare_runs(args.runs, args.output)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if args.wandb:
        from ovseg.report import comparison_table, load_run, summarize
        from ovseg.evaluation.wandb_logging import make_wandb_logger

        logger = make_wandb_logger(args.wandb, args.output, {"runs": [str(r) for r in args.runs]})
        columns, rows = comparison_table([summarize(load_run(r)) for r in args.runs])
        logger.log_table(key="comparison", columns=columns, data=rows)
        logger.experiment.finish()
    return 0


def cmd_predict(args) -> int:
    from .predict import run_predict

    return run_predict(args)


#: subcommand -> function(args) -> exit status; a new subcommand adds its parser in `build_parser` and a line here
COMMANDS = {"bench": cmd_bench, "predict": cmd_predict, "list": cmd_list, "env": cmd_env, "download": cmd_download,
            "data": cmd_data_check, "compare": cmd_compare, "cache": cmd_cache,
            "rank-templates": lambda args: stoppable("rank-templates", cmd_rank_templates, args)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # key=value overrides may follow the options; argparse cannot split two positional lists
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # usage errors (already printed) and --help: a return code, like other errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return COMMANDS[args.command](args)
    except OvsegError as exc:
        print(f"ovseg: error: {exc}", file=sys.stderr)
        if os.environ.get("OVSEG_DEBUG"):
            raise
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        code = stop.exit_code
        if launched_by_parent():
            code = 0  # a process of a multi-process run: the launching process reports and sets the status
        else:
            print(interrupted_message(args.command, stop.signum, getattr(exc, "run_dir", None)), file=sys.stderr)
        if argv is None:  # run as a program: exit now, not after the interpreter's slow teardown of torch
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def interrupted_message(command: str, signum: int, run_dir=None) -> str:
    """The one line an interrupted command prints."""
    text = f"ovseg: interrupted by {signal.Signals(signum).name}"
    if command == "bench":
        where = f" in {run_dir}" if run_dir is not None else ""
        text += f"; finished datasets are kept{where}, and rerunning the same command resumes"
    elif command == "rank-templates":
        text += "; datasets already written to --output are kept, and rerunning the same command resumes"
    return text


