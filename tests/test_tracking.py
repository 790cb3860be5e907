"""MLflow tracking (pipelines/core/tracking.py) and what leaves the process: real MLflow stores and a real
`mlflow server` on 127.0.0.1, real training on local Ray.

- run names with quotes find their run again (the search filter is quoted, not spliced);
- MLflow down when a run starts: the run is created when the server answers, with what was buffered;
- credentials inside URIs reach no report, param, tag, checkpoint, export or log line (storage.redact);
- a finished run rerun is a no-op; a raised max_steps is recorded in MLflow as what it became;
- the registered model is logged from code: loading it unpickles nothing.
"""

import http.server
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from pipelines.core import storage
from pipelines.core.local_cluster import LocalTrackingServer, free_port
from pipelines.core.tracking import RUN_NAME_TAG, MLflowSettings, Tracker
from tests.exports import write_untrained_export

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
PASSWORD = "pw-Zq81-do-not-log"  # in the tracking URI's user info
SIGNATURE, CREDENTIAL = "sig0f9e8d7c6b5a4", "AKIAEXAMPLE%2F20260101%2Fus-east-1"  # in a presigned prompts URL


def _runs_named(client, experiment: str, name: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return [r for r in client.search_runs([experiment_id]) if r.data.tags.get(RUN_NAME_TAG) == name]


# ------------------------------------------------------------------------------------------------ redact

def test_redact_hides_user_info_and_signed_query_values_and_keeps_the_rest():
    text = (f"features at s3://AKIA1:{PASSWORD}@bucket/f, tracking http://bob:{PASSWORD}@10.0.0.1:5000 and "
            f"https://b.s3.amazonaws.com/k.txt?X-Amz-Algorithm=AWS4&X-Amz-Credential={CREDENTIAL}"
            f"&X-Amz-Signature={SIGNATURE}&x=1 and https://a.blob.core.windows.net/c/p?sv=2024&sig={SIGNATURE} and "
            f"https://h/p?Signature={SIGNATURE}&Expires=9 https://h/q?token={SIGNATURE}")
    out = storage.redact(text)
    for secret in (PASSWORD, SIGNATURE, CREDENTIAL, "AKIA1"):
        assert secret not in out
    assert "s3://***@bucket/f" in out and "http://***@10.0.0.1:5000" in out
    assert "X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&x=1" in out and "Expires=9" in out
    assert storage.redact("/data/runs/a@b") == "/data/runs/a@b"  # no scheme: a path, not user info
    nested = storage.redact_values({"a": [f"http://u:{PASSWORD}@h"], "n": 3})
    assert nested == {"a": ["http://***@h"], "n": 3}


# ------------------------------------------------------------------------------------------ 6. run names

def test_run_names_with_quotes_find_their_own_run_again(tmp_path):
    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="names",
                              system_metrics=False)
    names = ["it's", 'say "hi"', "both ' and \" here", "back\\slash 50%_done", "it_s"]
    ids = {name: Tracker.open(settings, name).run_id for name in names}
    assert all(ids.values()), ids
    assert len(set(ids.values())) == len(names)  # "it_s" is not "it's" (a LIKE pattern would match both)
    for name in names:
        tracker = Tracker.open(settings, name)
        assert tracker.run_id == ids[name], name
        assert tracker.failures == 0


# ------------------------------------------------------------------------- 12. MLflow down at the start

def test_run_is_created_when_mlflow_comes_back_with_what_was_buffered(tmp_path, caplog):
    from mlflow import MlflowClient

    caplog.set_level(logging.INFO, logger="latentforge")
    server = LocalTrackingServer(str(tmp_path), str(tmp_path / "artifacts"), port=free_port())
    settings = MLflowSettings(tracking_uri=server.tracking_uri, experiment="late", system_metrics=False,
                              retry_after_s=0.5)
    # The driver: MLflow is down when the run starts.
    driver = Tracker.open(settings, "late-run", tags={"git_commit": "abc123"})
    assert driver.run_id is None and driver.active
    driver.log_params({"max_steps": 4, "lr": 0.1})
    driver.log_dict({"max_steps": 4}, "config.json")
    # Rank 0 gets no run id from the driver, only the run's name.
    worker = Tracker.attach(driver.settings, driver.run_id, run_name="late-run")
    worker.log_metrics({"loss": 1.0}, step=1)
    assert worker.run_id is None
    server.start(os.environ)
    try:
        worker.log_metrics({"loss": 0.5}, step=2)
        assert worker.run_id is not None
        driver.log_metrics({"restarts": 0}, step=2)
        driver.finish("FINISHED")
        assert driver.run_id == worker.run_id
        client = MlflowClient(server.tracking_uri)
        runs = _runs_named(client, "late", "late-run")
        assert [r.info.run_id for r in runs] == [driver.run_id]
        run = client.get_run(driver.run_id)
        assert run.data.params == {"max_steps": "4", "lr": "0.1"}
        assert run.data.tags["git_commit"] == "abc123" and run.info.status == "FINISHED"
        assert {m.step: m.value for m in client.get_metric_history(driver.run_id, "loss")} == {1: 1.0, 2: 0.5}
        assert "config.json" in {a.path for a in client.list_artifacts(driver.run_id)}
    finally:
        server.stop()
    assert "MLflow at %s answers again" % server.tracking_uri in caplog.text


# --------------------------------------------------------------------- 3. the registered model, from code

def test_registered_model_is_logged_from_code_and_loads_without_unpickling(tmp_path):
    import mlflow
    import pandas as pd

    from pipelines.inference.mlflow_model import log_pyfunc_model

    model_dir = write_untrained_export(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(MLflowSettings(tracking_uri=uri, experiment="pyfunc", system_metrics=False), "pyfunc")
    log_pyfunc_model(tracker, str(model_dir), "tiny-from-code")
    logged = [p for p in (tmp_path / "mlartifacts").rglob("MLmodel")]
    assert logged, "no logged model"
    for mlmodel in logged:
        folder = mlmodel.parent
        assert not [p for p in folder.rglob("*.pkl")], sorted(p.name for p in folder.rglob("*.pkl"))
        assert "model_code_path" in mlmodel.read_text()
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-from-code/1")
    out = pyfunc.predict(pd.DataFrame({"prompt": ["a large red circle"], "seed": [3]}), params={"steps": 2})
    assert len(out) == 1 and out["png"][0][:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------- 5 and 11: a real training run against a real MLflow server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    server = LocalTrackingServer(str(root), str(root / "artifacts"))
    server.start(os.environ)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def train_work(tmp_path_factory):
    from pipelines.synthetic.features import write_synthetic_features

    root = tmp_path_factory.mktemp("tracked")
    write_synthetic_features(str(root / "features"), rows=16, shards=1, image_size=32)
    return root


def _secret_uri(server: LocalTrackingServer) -> str:
    return f"http://alice:{PASSWORD}@127.0.0.1:{server.port}"


def _train_args(work: Path, server: LocalTrackingServer, *overrides: str) -> list[str]:
    settings = [f"features_dir={work / 'features'}", f"storage_path={work / 'runs'}", "run_name=tracked",
                "max_steps=2", "log_every=1", "batch.global_batch=8", "batch.micro_batch=8", "scaling.num_workers=1",
                "lr.kind=constant", "lr.warmup_steps=0", "checkpoint.every_steps=2", "samples.every_steps=0",
                "samples.prompts=[a large red circle in the top left]", "samples.seeds=[0]",
                f"mlflow.tracking_uri={_secret_uri(server)}", "mlflow.experiment=tracked",
                "mlflow.system_metrics=false", *overrides]
    return ["--config", str(CONFIG), *[a for s in settings for a in ("--set", s)]]


def _train(work, server, *overrides) -> int:
    from jobs.train_unet import main

    return main(_train_args(work, server, *overrides))


class _PromptServer:
    """prompts.txt over 127.0.0.1, as a presigned URL would serve it (the query is not checked)."""

    def __init__(self, text: str) -> None:
        body = text.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self):  # noqa: N802
                self.do_HEAD()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return (f"http://127.0.0.1:{self.httpd.server_port}/prompts.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                f"&X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={SIGNATURE}")

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()


def _files_holding(root: Path, *secrets: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_credentials_in_uris_reach_no_report_param_tag_checkpoint_export_or_log(train_work, server, ray_local,
                                                                              caplog, capfd):
    from mlflow import MlflowClient

    from jobs.sample_eval import main as sample_eval

    caplog.set_level(logging.INFO)
    assert _train(train_work, server) == 0
    run_dir = train_work / "runs" / "tracked"
    report = json.loads((run_dir / "train_report.json").read_text())
    assert report["ok"] and report["mlflow_run_id"]
    out = train_work / "eval"
    with _PromptServer("a large red circle in the top left\n") as prompts:
        assert sample_eval(["--model", str(run_dir / "export"), "--prompts", prompts, "--out", str(out),
                            "--set", "sampling.steps=2", "--set", "sampling.guidance_scales=[2.0]",
                            "--set", "compute.actors=1", "--set", f"mlflow.tracking_uri={_secret_uri(server)}",
                            "--set", "mlflow.experiment=tracked"]) == 0
    logging.getLogger("some.library").warning("fetching %s", prompts)  # a library's log line, after setup_logging
    secrets = (PASSWORD, SIGNATURE, CREDENTIAL)
    # reports, checkpoints (meta.json), the export (model_index.json), the evaluation's outputs
    assert _files_holding(train_work, *secrets) == []
    client = MlflowClient(_secret_uri(server))  # the real credentials still work
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert len(runs) == 2  # the training run and its evaluation
    for run in runs:
        values = json.dumps({**run.data.params, **run.data.tags})
        assert not [s for s in secrets if s in values], values
    assert runs[0].data.params.get("mlflow.tracking_uri", "").startswith("http://***@") or \
        runs[1].data.params.get("mlflow.tracking_uri", "").startswith("http://***@")
    config = client.download_artifacts(report["mlflow_run_id"], "config.json", str(train_work.parent / "dl"))
    assert PASSWORD not in Path(config).read_text()
    assert _files_holding(Path(server.directory), *secrets) == []  # the server's store: params, tags, artifacts
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err):
        assert not [s for s in secrets if s in text]
    assert "X-Amz-Signature=***" in caplog.text


def test_a_finished_run_rerun_is_a_no_op(train_work, server, ray_local, caplog):
    from mlflow import MlflowClient

    caplog.set_level(logging.INFO, logger="latentforge")
    export_index = train_work / "runs" / "tracked" / "export" / "model_index.json"
    if not export_index.exists():  # run on its own
        assert _train(train_work, server) == 0
    before = export_index.stat().st_mtime_ns
    client = MlflowClient(_secret_uri(server))
    run = _runs_named(client, "tracked", "tracked")[0]
    assert _train(train_work, server) == 0
    report = json.loads((train_work / "runs" / "tracked" / "train_report.json").read_text())
    assert report["outcome"] == "already finished" and report["steps"] == 2
    assert report["mlflow_run_id"] == run.info.run_id
    assert export_index.stat().st_mtime_ns == before
    assert [r.info.run_id for r in _runs_named(client, "tracked", "tracked")] == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.end_time == run.info.end_time  # not reopened
    assert "already finished at step 2" in caplog.text


def test_a_raised_max_steps_is_recorded_as_what_it_became(train_work, server, ray_local):
    from mlflow import MlflowClient

    if not (train_work / "runs" / "tracked" / "export").exists():  # run on its own
        assert _train(train_work, server) == 0
    assert _train(train_work, server, "max_steps=4") == 0
    report = json.loads((train_work / "runs" / "tracked" / "train_report.json").read_text())
    assert report["steps"] == 4 and report["resumed_from"]
    client = MlflowClient(_secret_uri(server))
    [run] = _runs_named(client, "tracked", "tracked")
    params, tags = run.data.params, run.data.tags
    assert params["max_steps"] == "2"  # what the run started with (MLflow params are immutable)
    assert params["max_steps.at_step_2"] == "4"  # what it became, and when
    assert tags["latentforge.changed.max_steps"] == "2 -> 4 at step 2"
    assert "batch.micro_batch.at_step_2" not in params  # unchanged settings log nothing new
