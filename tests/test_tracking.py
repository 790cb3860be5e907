"""MLflow tracking (pipelines/core/tracking.py) and what leaves the process: real MLflow stores and a real
`mlflow server` on 127.0.0.1, real training on local Ray.

- run names with quotes find their run again (the search filter is quoted, not spliced);
- MLflow down when a run starts: the run is created when the server answers, with what was buffered;
- credentials inside URIs reach no report, param, tag, checkpoint, export or log line (storage.redact);
- a finished run rerun is a no-op; a raised max_steps is recorded in MLflow as what it became;
- the registered model is logged from code: loading it unpickles nothing, and logging it raises no MLflow warning.
"""

import dataclasses
import http.server
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import pytest

from pipelines.core import storage
from pipelines.core.local_cluster import LocalTrackingServer, free_port
from pipelines.core.tracking import RUN_NAME_TAG, MLflowSettings, Tracker
from tests.exports import write_untrained_export

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
# a registered model's recommended sampling, unlike SamplerConfig's defaults in every field
RECOMMENDED = {"name": "ddim", "steps": 3, "guidance_scale": 2.5, "guidance_rescale": 0.3,
               "timestep_spacing": "leading", "steps_offset": 1}
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
    """... with a signature (prompts and seeds in, PNGs out, the sampler settings as params), a description and
    tags naming the training run and the features; an evaluation writes its metrics into the description."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pipelines.inference.mlflow_model import EVAL_HEADING, TextToImageModel, describe_evaluation, log_pyfunc_model

    model_dir = write_untrained_export(tmp_path, sampling=RECOMMENDED)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(MLflowSettings(tracking_uri=uri, experiment="pyfunc", system_metrics=False), "pyfunc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # MLflow checks predict's type hints when a PythonModel class is defined (this one was, at import): a
        # class with the same predict has it check them again here
        type("SamePredict", (TextToImageModel,), {"predict": TextToImageModel.predict})
        assert log_pyfunc_model(tracker, str(model_dir), "tiny-from-code", f"Tiny.\n\n{EVAL_HEADING}\n\nNot yet.",
                                {"dataset_manifest_sha256": "f00d"}) == "1"
    from_mlflow = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                   if issubclass(w.category, UserWarning) and f"{os.sep}mlflow{os.sep}" in w.filename]
    assert from_mlflow == []
    client = MlflowClient(uri)
    version = client.get_model_version("tiny-from-code", "1")
    assert version.tags == {"training_run_id": tracker.run_id, "dataset_manifest_sha256": "f00d"}
    signature = mlflow.models.get_model_info("models:/tiny-from-code/1").signature
    assert signature.inputs.input_names() == ["prompt", "seed"] and signature.outputs.input_names()[-1] == "png"
    # the params' defaults are the model's recommended sampling, not SamplerConfig's
    defaults = {p.name: p.default for p in signature.params.params}
    assert {k: defaults[k] for k in RECOMMENDED} == RECOMMENDED
    metrics = {"images": 6, "prompts": 3, "sampler": "ddim", "steps": 3,
               "synthetic_accuracy": {"guidance_4": {"overall": {"all_correct": 0.5}, "held_out": {"all_correct": 0.25},
                                                     "out_of_vocabulary": 1}},
               "clip_score": {"computed": False, "reason": "no CLIP weights given"},
               "fid": {"computed": True, "value": 12.5}}
    for _ in range(2):  # a second evaluation replaces the first's text
        assert describe_evaluation(client, tracker.run_id, metrics, "eval-run") == [("tiny-from-code", "1")]
    described = client.get_model_version("tiny-from-code", "1")
    assert described.description.startswith("Tiny.") and described.description.count(EVAL_HEADING) == 1
    assert "all correct 50.0% (held-out pairs 25.0%" in described.description and "FID: 12.5" in described.description
    assert "CLIP score: not computed (no CLIP weights given)" in described.description
    assert "Not yet." not in described.description and described.tags["eval_run_id"] == "eval-run"
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


def test_the_pyfunc_model_takes_each_sampling_param_not_given_from_the_model(tmp_path):
    """predict called without MLflow's signature defaults (as a Python object): a given param overrides only itself,
    the rest is the model's recommended sampling."""
    from types import SimpleNamespace

    import pandas as pd

    from model.samplers import SamplerConfig
    from pipelines.inference.draw import decode_images, draw_latents, encode_prompts, png_bytes
    from pipelines.inference.mlflow_model import PYFUNC_ARTIFACT, TextToImageModel

    model_dir = write_untrained_export(tmp_path, sampling=RECOMMENDED)
    pyfunc = TextToImageModel()
    pyfunc.load_context(SimpleNamespace(artifacts={PYFUNC_ARTIFACT: str(model_dir)}))
    prompt = "a small blue triangle in the center"
    got = pyfunc.predict(None, pd.DataFrame({"prompt": [prompt], "seed": [4]}), params={"steps": 2})["png"][0]

    def draw(sampler: SamplerConfig) -> bytes:
        m = pyfunc.model
        states, masks = encode_prompts(pyfunc.text, [prompt])
        latents = draw_latents(m.unet, m.schedule, states, masks, m.empty_caption, [4], m.latent_shape, sampler)
        return png_bytes(decode_images(pyfunc.vae, latents, m.scaling_factor, m.shift_factor)[0])

    assert got == draw(dataclasses.replace(SamplerConfig(**RECOMMENDED), steps=2))
    assert got != draw(SamplerConfig(steps=2))  # SamplerConfig's defaults elsewhere: another image


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
    # reports, checkpoints (meta.json), the export (its manifest, INDEX_FILE), the evaluation's outputs
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

    from pipelines.inference.export import INDEX_FILE

    caplog.set_level(logging.INFO, logger="latentforge")
    export_index = train_work / "runs" / "tracked" / "export" / INDEX_FILE
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


# ------------------------------------------------- issue 19: experiments, linked stage runs, dataset inputs

def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiments_open_on_the_training_view_and_a_kind_chosen_in_the_ui_is_kept(tmp_path):
    from mlflow import MlflowClient

    from pipelines.core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = _store(tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("made-elsewhere")  # by another tool: no kind
    client.set_experiment_tag(client.create_experiment("chosen"), EXPERIMENT_KIND_TAG, "genai_development")
    for name in ("new", "made-elsewhere", "chosen"):
        Tracker.open(MLflowSettings(tracking_uri=uri, experiment=name, system_metrics=False), "run")
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
             for name in ("new", "made-elsewhere", "chosen")}
    assert EXPERIMENT_KIND == "custom_model_development"
    assert kinds == {"new": EXPERIMENT_KIND, "made-elsewhere": EXPERIMENT_KIND, "chosen": "genai_development"}


@dataclasses.dataclass(frozen=True)
class _StageConfig:
    output_dir: str = ""
    input_dir: str = ""
    fail: bool = False
    mlflow: MLflowSettings = dataclasses.field(default_factory=MLflowSettings)


def _toy_stage(name: str):
    """A stage shaped like the data stages (no Ray): 10 rows in, 7 out, 2 too_small and 1 'bad caption'."""
    from pipelines.core.job import Stage
    from pipelines.core.runtime import StageReport

    def run(cfg: _StageConfig) -> StageReport:
        if cfg.fail:
            raise RuntimeError("the disk is full")
        report = StageReport(name, rows_in=10, rows_out=7)
        report.drop("too_small", 2)
        report.drop("bad caption", 1)
        return report

    return Stage(name, _StageConfig, run=run, report_path=lambda cfg: storage.join(cfg.output_dir, f"{name}.json"),
                 uses_ray=False, upstream_reports=lambda cfg: (storage.join(cfg.input_dir, "download.json"),)
                 if cfg.input_dir else ())


def test_data_stage_reports_are_runs_linked_to_the_run_that_made_their_input(tmp_path):
    """run_stage logs a data stage's report as a run (counts as metrics, the report as an artifact, the status
    from the report), puts the run id into the report file, and the next stage's run names it."""
    from mlflow import MlflowClient

    from pipelines.core.job import run_stage
    from pipelines.core.tracking import EXPERIMENT_KIND_TAG, JOB_TAG, REPORT_RUN_KEY, UPSTREAM_TAG_PREFIX

    settings = MLflowSettings(tracking_uri=_store(tmp_path), experiment="family", system_metrics=False)
    raw, kept = tmp_path / "raw", tmp_path / "kept"
    assert run_stage(_toy_stage("download"), _StageConfig(output_dir=str(raw), mlflow=settings)) == 0
    assert run_stage(_toy_stage("filter"), _StageConfig(output_dir=str(kept), input_dir=str(raw),
                                                        mlflow=settings)) == 0
    download_id = json.loads((raw / "download.json").read_text())[REPORT_RUN_KEY]
    filter_id = json.loads((kept / "filter.json").read_text())[REPORT_RUN_KEY]
    client = MlflowClient(settings.tracking_uri)
    first, second = client.get_run(download_id), client.get_run(filter_id)
    assert first.info.experiment_id == second.info.experiment_id == client.get_experiment_by_name("family").experiment_id
    assert client.get_experiment(first.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert second.info.run_name == "filter-kept" and second.info.status == "FINISHED"
    assert second.data.tags[JOB_TAG] == "filter" and second.data.tags[UPSTREAM_TAG_PREFIX + "download"] == download_id
    assert UPSTREAM_TAG_PREFIX + "download" not in first.data.tags
    assert second.data.metrics == {"rows_in": 10, "rows_out": 7, "dropped_total": 3, "dropped.too_small": 2,
                                   "dropped.bad caption": 1}
    assert second.data.params == {"output": str(kept), "report": str(kept / "filter.json")}
    logged = json.loads(Path(client.download_artifacts(filter_id, "filter.json", str(tmp_path))).read_text())
    assert logged == {**json.loads((kept / "filter.json").read_text()), "seconds": logged["seconds"]}

    failed = _StageConfig(output_dir=str(tmp_path / "broken"), fail=True, mlflow=settings)
    assert run_stage(_toy_stage("precompute"), failed) == 1
    run = client.get_run(json.loads((tmp_path / "broken" / "precompute.json").read_text())[REPORT_RUN_KEY])
    assert run.info.status == "FAILED" and "the disk is full" in run.data.tags["latentforge.error"]

    off = dataclasses.replace(settings, enabled=False)
    assert run_stage(_toy_stage("download"), _StageConfig(output_dir=str(tmp_path / "off"), mlflow=off)) == 0
    assert REPORT_RUN_KEY not in json.loads((tmp_path / "off" / "download.json").read_text())


def test_the_feature_manifest_is_a_dataset_input_of_the_run(tmp_path):
    from mlflow import MlflowClient

    settings = MLflowSettings(tracking_uri=_store(tmp_path), experiment="data", system_metrics=False)
    tracker = Tracker.open(settings, "train")
    digest = "ab" * 32
    tracker.log_dataset("features", str(tmp_path / "features" / "manifest.json"), digest)
    inputs = MlflowClient(settings.tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("features", digest[:32])
    assert str(tmp_path / "features" / "manifest.json") in dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
