"""The job contract (pipelines/core/job.py), job by job as users run them: a bad config or input exits 2 with
one line on stderr that names the key or file, before any Ray starts; a stage that fails writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.config import ConfigError
from pipelines.core.job import Stage, run_stage
from pipelines.core.runtime import StageReport

REPO = Path(__file__).resolve().parents[1]

# job -> (arguments with one bad value that only the job's own checks can catch, what the line must name)
BAD_VALUE = {
    "download_data": (["--set", "url_list=urls.parquet", "--set", "output_dir=raw", "--set", "resize_mode=bogus"],
                      "resize_mode"),
    "filter_data": (["--set", "input_dir=/nonexistent/raw", "--set", "output_dir=filtered"], "/nonexistent/raw"),
    "precompute_latents": (["--set", "input_dir=a", "--set", "output_dir=b", "--set", "compute.dtype=float8"],
                           "compute.dtype"),
    "train_vae": (["--config", "configs/tiny/train_vae.yaml", "--set", "train.loss=l3"], "train.loss"),
    "train_unet": (["--config", "configs/tiny-cpu.yaml", "--set", "deepspeed.zero_stage=4"], "zero_stage"),
    "sample_eval": (["--model", "/nonexistent/model", "--prompts", "/nonexistent/prompts.txt", "--out", "eval"],
                    "/nonexistent/prompts.txt"),
    "serve_synthetic": (["--out", "synth", "--set", "num_good=-1"], "num_good"),
    "demo": (["--set", "unet_steps=many"], "unet_steps"),
}


def _job(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_every_job_is_listed():
    assert sorted(BAD_VALUE) == sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", sorted(BAD_VALUE))
def test_a_bad_value_exits_2_with_one_line_naming_it(name, tmp_path):
    args, named = BAD_VALUE[name]
    run = _job(name, [a if not a.startswith("configs/") else str(REPO / a) for a in args], tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and named in lines[0], run.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "a job refused for bad input wrote something"


@pytest.mark.parametrize("name", sorted(BAD_VALUE))
def test_an_unknown_key_exits_2_with_one_line_naming_it(name, tmp_path):
    required = ["--out", "synth"] if name == "serve_synthetic" else []  # argparse's own required flag
    run = _job(name, [*required, "--set", "no_such_key=1"], tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr[-3000:]
    assert "no_such_key" in run.stderr


def _stage(run, check=lambda cfg: cfg) -> Stage:
    return Stage("unit", dict, run=run, report_path=lambda cfg: cfg["report"], check=check, uses_ray=False)


def test_run_stage_exit_statuses_and_reports(tmp_path, caplog):
    report_file = str(tmp_path / "report.json")
    cfg = {"report": report_file}

    def done(cfg):
        return StageReport("unit", rows_in=3, rows_out=2, dropped={"bad": 1})

    def crashes(cfg):
        raise RuntimeError("the disk is full\nsecond line")

    def bad_input(cfg):
        raise ConfigError("input_dir /x holds no shards")

    assert run_stage(_stage(done), cfg) == 0
    assert json.loads(Path(report_file).read_text())["rows_out"] == 2
    assert run_stage(_stage(crashes), cfg) == 1
    failed = json.loads(Path(report_file).read_text())
    assert failed["ok"] is False and failed["error"] == "RuntimeError: the disk is full second line"
    Path(report_file).unlink()
    assert run_stage(_stage(done, check=bad_input), cfg) == 2
    assert run_stage(_stage(bad_input), cfg) == 2
    assert not Path(report_file).exists(), "bad input is refused with one line, before any report"
    assert "unit: bad config or input: input_dir /x holds no shards" in caplog.text


def test_train_unet_refuses_a_missing_feature_folder_before_ray_starts(tmp_path):
    run = _job("train_unet", ["--config", str(REPO / "configs/tiny-cpu.yaml"),
                              "--set", f"features_dir={tmp_path / 'no-features'}"], tmp_path)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-3000:]
    assert "no-features" in run.stderr and "ray" not in run.stderr.lower()
