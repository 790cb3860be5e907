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
from tests.exports import write_untrained_export

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


# ------------------------------------------------------------------- inputs that used to end in a traceback

def _refused(run: subprocess.CompletedProcess, named: str) -> None:
    """Exit status 2 and exactly one line on stderr that names the key or file."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and named in lines[0], run.stderr[-3000:]


def test_a_list_where_a_scalar_is_expected_exits_2(tmp_path):
    """demo's `extra` maps a stage to a list of KEY=VALUE strings: a list inside it is not a string."""
    _refused(_job("demo", ["--set", "extra.filter=[[a, b]]"], tmp_path), "extra.filter[0]")
    _refused(_job("demo", ["--set", "extra.filter=caption.min_chars=3"], tmp_path), "extra.filter")
    # model.overrides maps UNetConfig fields to values: each is checked against the field's type
    _refused(_job("train_unet", ["--config", str(REPO / "configs/tiny-cpu.yaml"),
                                 "--set", "model.overrides.context_dim=[1]"], tmp_path), "model.overrides.context_dim")


def test_a_str_key_keeps_the_text_given_with_set(tmp_path, capsys):
    """YAML 1.1 reads on/yes/null/1e3/2024-01-01 as other types; a str-typed key (a path) keeps what was typed."""
    from jobs.sample_eval import main

    for text in ("on", "no", "null", "1e3", "0o17", "2024-01-01", "1_000"):
        with pytest.raises(SystemExit) as done:
            main(["--model", "m", "--prompts", "p.txt", "--out", text, "--print-config"])
        assert done.value.code == 0 and yaml_load(capsys.readouterr().out)["out"] == text
    quoted = _job("filter_data", ["--set", "input_dir='yes'", "--set", "output_dir=off", "--print-config"], tmp_path)
    assert quoted.returncode == 0, quoted.stderr[-3000:]
    assert yaml_load(quoted.stdout)["input_dir"] == "yes" and yaml_load(quoted.stdout)["output_dir"] == "off"


def test_a_non_str_scalar_for_a_str_key_in_a_yaml_file_exits_2(tmp_path):
    config = tmp_path / "filter.yaml"
    config.write_text("input_dir: raw\noutput_dir: on\n")
    run = _job("filter_data", ["--config", str(config)], tmp_path)
    _refused(run, "output_dir")
    assert "quote" in run.stderr


def yaml_load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_sample_eval_refuses_a_missing_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # a store that exists, as a user's does (creating one logs lines)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    run = _job("sample_eval", ["--model", "runs:/0123456789abcdef/model", "--prompts", "prompts.txt", "--out", "eval",
                               "--set", f"mlflow.tracking_uri={store}"], tmp_path)
    _refused(run, "runs:/0123456789abcdef/model")


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    return write_untrained_export(tmp_path_factory.mktemp("export"), rows=2)


def test_sample_eval_refuses_truncated_model_weights(exported_model, tmp_path):
    import shutil

    from model.unet import WEIGHTS_FILE
    from pipelines.inference.export import UNET_DIR, load_exported

    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    weights = model / UNET_DIR / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    _refused(_job("sample_eval", ["--model", str(model), "--prompts", "prompts.txt", "--out", "eval"], tmp_path),
             str(weights))
    with pytest.raises(ValueError, match="truncated"):
        load_exported(model)


def test_train_unet_refuses_features_whose_precompute_failed(tmp_path):
    """The precompute report is the feature folder's verdict: a failed run's folder is not trained on."""
    from pipelines.data.schema import REPORT_FILE
    from pipelines.synthetic.features import write_synthetic_features

    features = tmp_path / "features"
    write_synthetic_features(str(features), rows=4)
    (features / REPORT_FILE).write_text(json.dumps({"stage": "precompute", "ok": False,
                                                   "error": "RuntimeError: the disk is full"}))
    run = _job("train_unet", ["--config", str(REPO / "configs/tiny-cpu.yaml"), "--set", f"features_dir={features}"],
               tmp_path)
    _refused(run, f"{features / REPORT_FILE} says the precompute failed (RuntimeError: the disk is full)")
