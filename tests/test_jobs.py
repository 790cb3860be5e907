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


def _jobs() -> list[str]:
    return sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


def test_every_job_is_listed():
    assert sorted(BAD_VALUE) == _jobs()


EXIT_TABLE = REPO / "docs" / "hostile_inputs.md"
EXIT_SECTION = "## Exit status of every job"
EXIT_STATUSES = ["0", "1", "2"]


def exit_status_table() -> dict[str, dict[str, str]]:
    """docs/hostile_inputs.md's exit-status table: job -> {status: "file::test[case]"} (a cell's words after the
    test name say how)."""
    section = EXIT_TABLE.read_text().split(EXIT_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    header, _, *body = rows
    assert header == ["Job", *EXIT_STATUSES], header
    return {row[0]: {status: cell.split()[0] for status, cell in zip(EXIT_STATUSES, row[1:]) if cell}
            for row in body}


def _names_a_real_test(cell: str) -> bool:
    """file::test or file::test[case]: the module imports, the function exists, and a case is one of its
    parametrize values."""
    import importlib

    module, _, test = cell.partition("::")
    name, _, case = test.partition("[")
    function = getattr(importlib.import_module(f"tests.{module}"), name, None)
    if not callable(function) or not name.startswith("test_"):
        return False
    cases = {str(value) for mark in getattr(function, "pytestmark", []) if mark.name == "parametrize"
             for value in mark.args[1]}
    return not case or case.rstrip("]") in cases


def test_the_exit_status_table_names_every_job_and_status_and_real_tests():
    table = exit_status_table()
    assert sorted(table) == _jobs(), "every job of jobs/ has a row, and only those"
    missing = [(job, status) for job in table for status in EXIT_STATUSES if status not in table[job]]
    assert not missing, f"no test named for {missing}"
    unknown = [cell for cells in table.values() for cell in cells.values() if not _names_a_real_test(cell)]
    assert not unknown, f"{EXIT_TABLE.name} names tests that do not exist: {unknown}"


def test_every_test_named_in_the_hostile_inputs_table_exists():
    """docs/hostile_inputs.md names a test for each bad input and fault: a renamed or deleted test must not leave
    a row that points at nothing."""
    import re

    named = set(re.findall(r"\b(test_\w+::test_\w+(?:\[[^\]|]+\])?)", EXIT_TABLE.read_text()))
    assert named
    assert not sorted(cell for cell in named if not _names_a_real_test(cell))


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


# ------------------------------------------------------------------- exit status 1: the stage failed at run time
# Each job's failure that no check before the run can see: exit 1 (never 2), the report written with ok false and
# the reason in one line. The table of every job x exit status is docs/hostile_inputs.md's "Exit status of every
# job" (test_the_exit_status_table_names_every_job_and_status_and_real_tests keeps it true).


def _failed_report(path: Path, *named: str) -> dict:
    report = json.loads(path.read_text())
    assert report["ok"] is False and "\n" not in report["error"], report
    assert all(n in report["error"] for n in named), report["error"]
    return report


def test_sample_eval_exits_1_when_the_mlflow_server_of_its_model_is_down(tmp_path):
    """A runs:/ model on a tracking server that does not answer: not bad input (the run may well exist), a failure.
    With the job's own mlflow.http_retries / http_timeout_s (defaults: 1 retry, 10 s) it ends in seconds; MLflow's
    own default (7 retries with backoff) took 4.5 minutes, past _job's timeout."""
    from pipelines.eval.driver import REPORT_FILE

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    down = "http://127.0.0.1:9"  # the discard port: nothing listens there
    run = _job("sample_eval", ["--model", "runs:/0123456789abcdef/model", "--prompts", "prompts.txt", "--out", "eval",
                               "--set", f"mlflow.tracking_uri={down}"], tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    _failed_report(tmp_path / "eval" / REPORT_FILE, down, "Connection refused")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [REPORT_FILE], "nothing but the report"


def test_serve_synthetic_exits_1_with_one_line_when_its_url_list_cannot_be_written(tmp_path):
    """The URL list is written once the server listens; a folder where the file must go (as a full or read-only
    disk refuses it; root ignores chmod) ends the job: exit 1, one line naming the file, the server stopped
    (the job returns instead of serving forever)."""
    from jobs.serve_synthetic import URL_LIST_FILE

    (tmp_path / "synth" / URL_LIST_FILE).mkdir(parents=True)
    run = _job("serve_synthetic", ["--out", "synth", "--set", "num_good=5"], tmp_path)
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and len(errors) == 1 and URL_LIST_FILE in errors[0], run.stderr[-3000:]


@pytest.mark.slow
def test_train_vae_exits_1_when_no_image_of_its_shards_decodes(ray_local, tmp_path):
    """Shards that hold .jpg entries no decoder reads (damaged after the filter finished): the check before Ray
    lists the shards but reads no image, so it is the workers that find it. Exit 1 with the workers' reason in
    the report, no export."""
    import webdataset as wds

    from pipelines.vae.driver import STAGE, report_path
    from tests.test_train_vae import make_config

    shards = tmp_path / "filtered"
    shards.mkdir()
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in range(4):
                sink.write({"__key__": f"{s:04d}{i:04d}", "jpg": b"\xff\xd8 not a JPEG any more", "txt": "a circle"})
    cfg = make_config(shards, tmp_path, {"scaling": {"num_workers": 1}})  # one worker: fewer to start and stop
    assert run_stage(STAGE, cfg) == 1
    _failed_report(Path(report_path(cfg)), "VAE training failed", "no decodable image", str(shards))
    assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == [Path(report_path(cfg)).name], "no export"


@pytest.mark.slow
def test_demo_exits_1_naming_the_stage_that_failed_and_stops_what_it_started(tmp_path):
    """The demo's synthetic server cannot write its dataset (a file stands where its files/ folder goes): the
    server exits 1, the demo says so in its log and exits 1, writes no summary, and leaves no Ray head or server
    process behind."""
    import time

    import psutil

    from pipelines.core.local_ray import FOREIGN_RAY_VARS, LOOPBACK_ONLY, uses_path
    from pipelines.demo import SUMMARY_FILE

    out = tmp_path / "demo"
    (out / "synth").mkdir(parents=True)
    (out / "synth" / "files").write_text("in the way")
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k not in (*FOREIGN_RAY_VARS, *LOOPBACK_ONLY)}
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--set", f"out_dir={out}",
                          "--set", "num_good=5"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    assert "the synthetic image server did not start" in run.stderr, run.stderr[-3000:]
    assert "serve_synthetic failed" in (out / "logs" / "serve_synthetic.log").read_text()
    assert not (out / SUMMARY_FILE).exists()
    leftovers = [p.pid for p in psutil.process_iter(["create_time"])
                 if (p.info["create_time"] or 0) >= started and uses_path(p, str(tmp_path))]
    assert leftovers == []
