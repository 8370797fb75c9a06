"""`ovseg bench` as separate processes: SIGTERM / SIGINT mid-dataset, a second bench on a busy folder,
and DDP on CPU (gloo) with more processes than images.

A dataset whose second image is a named pipe holds a bench mid-dataset for as long as the test needs:
reading it blocks until someone writes, as a slow file system or a long image would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovseg.cli.main import main

from .test_bench import _results
from .test_bench_robust import bench_args

REPO = Path(__file__).resolve().parent.parent


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]))
    return subprocess.Popen([sys.executable, "-m", "ovseg.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the bench ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def _blocking_dataset(tmp_path: Path, names: list[str], **kw) -> list[str]:
    """Bench arguments where the last dataset's image s1 is a named pipe (reading it blocks)."""
    args = bench_args(tmp_path, names, **kw)
    image = tmp_path / "data" / names[-1] / "img" / "s1.jpg"
    kept = tmp_path / "s1.jpg"
    image.rename(kept)
    os.mkfifo(image)
    return args


def _unblock(tmp_path: Path, name: str) -> None:
    image = tmp_path / "data" / name / "img" / "s1.jpg"
    image.unlink()
    (tmp_path / "s1.jpg").rename(image)


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_dataset_stops_at_once_and_a_rerun_resumes(tmp_path, capsys, signum, code):
    args = _blocking_dataset(tmp_path, ["a", "b"])
    run = tmp_path / "run"
    proc = _start(args, tmp_path)
    _wait_for(run / "datasets" / "a.json", proc)
    time.sleep(1.0)  # into dataset b, waiting on its second image

    # meanwhile a second bench on the same folder is refused before it builds anything
    assert main(args) == 2
    assert f"is in use by another bench (pid {proc.pid} on host" in capsys.readouterr().err

    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert proc.returncode == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"ovseg: interrupted by {signal.Signals(signum).name}; finished datasets are kept in {run}, "
                     "and rerunning the same command resumes"]
    assert sorted(_results(run)) == ["a"] and _leftovers(run) == []
    stamp = (run / "datasets" / "a.json").stat().st_mtime_ns

    _unblock(tmp_path, "b")
    assert main(args) == 0
    assert "a: already finished" in capsys.readouterr().out
    assert (run / "datasets" / "a.json").stat().st_mtime_ns == stamp
    assert {k: v["status"] for k, v in _results(run).items()} == {"a": "done", "b": "done"}


@pytest.mark.slow
@pytest.mark.ddp
def test_sigterm_stops_every_process_of_a_ddp_run(tmp_path):
    args = _blocking_dataset(tmp_path, ["a", "b"], n=4) + ["--devices", "2"]
    run = tmp_path / "run"
    proc = _start(args, tmp_path)
    _wait_for(run / "datasets" / "a.json", proc)
    time.sleep(2.0)  # rank 1 waits on b's image s1, rank 0 in the collective at the end of b
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # rank 0 only, as `kill` or `docker stop` do
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 15
    assert err.count("ovseg: interrupted by SIGTERM") == 1 and "Traceback" not in err
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-f", "--", f"--output {run}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the run is still alive"
        time.sleep(0.2)
    assert sorted(_results(run)) == ["a"] and _leftovers(run) == []


@pytest.mark.slow
@pytest.mark.ddp
def test_more_processes_than_images_give_the_single_process_metrics(tmp_path):
    """--devices 3 --limit 2: one process has no image; a malformed image on rank 1 fails its dataset on all."""
    args = bench_args(tmp_path, ["a", "b"], n=3) + ["--limit", "2"]
    (tmp_path / "data" / "b" / "img" / "s1.jpg").write_bytes(b"not an image")
    assert main([*args[:6], str(tmp_path / "run1"), *args[7:]]) == 1  # b failed
    proc = _start([*args[:6], str(tmp_path / "run3"), *args[7:], "--devices", "3"], tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    one, three = _results(tmp_path / "run1"), _results(tmp_path / "run3")
    assert one["a"]["status"] == three["a"]["status"] == "done" and three["a"]["num_images"] == 2
    assert three["a"]["per_class"] == one["a"]["per_class"] and three["a"]["miou"] == one["a"]["miou"]
    assert three["a"]["biou"] == one["a"]["biou"]
    assert one["b"]["status"] == three["b"]["status"] == "failed"
    assert three["b"]["file"] == one["b"]["file"] and three["b"]["file"].endswith("b/img/s1.jpg")
    json.dumps(three)  # plain JSON
