"""Every stage with every location on s3:// equals the same chain on local folders (issue 17).

One S3-compatible server on 127.0.0.1 (pipelines/core/local_cluster.LocalObjectStore, moto) holds the URL list,
the raw, filtered and feature shards, the training run (Ray Train's storage, checkpoints, the export) and the
evaluation. Its endpoint and credentials reach every process only as a user sets them: AWS_* in the environment
of the driver before Ray starts, so that Ray Data and Ray Train workers inherit them as a cluster's nodes would
(never runtime_env, which the dashboard shows). The same chain then runs on local folders, and the module checks:
- the same rows at every stage (keys, captions, image bytes; features and losses bit-equal on CPU);
- checkpoint.resume_from (a whole run) and model.init_from reading s3:// (sd2-base-512 starts from sd2-base-256's
  export so);
- the secret key appears in no report, log line, Ray log, MLflow param, tag or artifact, checkpoint or export.

Kept small: a few dozen images in 3 download shards, 10 steps on 2 ZeRO-2 workers, 2 prompts. Two settings make
a chain reproducible bit for bit, local or not, so that the two can be compared so:
- the download runs one HTTP thread per task: img2dataset's threads write a shard's samples in the order they
  finish, so with more the rows of a shard (and the loader's batches) come in another order on every run;
- precompute encodes one row per call: Ray Data batches rows of different shards together in whatever order
  the reads finish, and a batched convolution rounds differently in the last bits (test_data_chain allows 4e-3).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from pipelines.core import storage
from pipelines.core.config import apply_override, from_dict, load_config
from pipelines.core.job import run_stage
from pipelines.core.local_cluster import LocalObjectStore
from pipelines.data import schema
from pipelines.data.download import REPORT_FILE as DOWNLOAD_REPORT
from pipelines.data.download import STAGE as DOWNLOAD
from pipelines.data.download import DownloadConfig
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.filter.config import FilterConfig
from pipelines.data.filter.driver import STAGE as FILTER
from pipelines.data.precompute.config import REPORT_FILE as PRECOMPUTE_REPORT
from pipelines.data.precompute.config import PrecomputeConfig
from pipelines.data.precompute.driver import STAGE as PRECOMPUTE
from pipelines.data.shards import iter_tar_samples
from pipelines.eval.driver import METRICS_FILE, EvalConfig
from pipelines.eval.driver import REPORT_FILE as EVAL_REPORT
from pipelines.eval.driver import STAGE as SAMPLE_EVAL
from pipelines.eval.outputs import RESULTS_FILE
from pipelines.inference.export import INDEX_FILE
from pipelines.synthetic.shapes import PlantedCounts, SyntheticConfig, build_dataset
from pipelines.synthetic.web import SyntheticServer, write_url_list
from pipelines.train import checkpoint
from pipelines.train.config import TrainConfig, validate_for_launch
from pipelines.train.driver import REPORT_FILE as TRAIN_REPORT
from pipelines.train.driver import STAGE as TRAIN_UNET
from pipelines.train.driver import run_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "tiny"
STEPS = 10
PROMPTS = "a large red circle in the top left\na small blue triangle in the center\n"
# Kinds dropped by download (404, too small) and by filter (empty caption, duplicate): the counts must agree too.
PLANTED = PlantedCounts(http_404=1, tiny_image=1, empty_caption=1, duplicate_image=1)
AWS_OVERRIDES = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")  # would take precedence over ours


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def store():
    with LocalObjectStore(bucket="lfb") as s3:
        yield s3


class _Lines(logging.Handler):
    """Every log line the driver emits at INFO and above, formatted as a job would print it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def s3_ray(store):
    """The store's AWS_* in this process's environment, then a Ray started after it (an earlier test's Ray,
    started without them, is stopped first and started again afterwards for the tests that follow)."""
    import ray

    from pipelines.core.runtime import init_ray

    was_running = ray.is_initialized()
    ray.shutdown()
    patch = pytest.MonkeyPatch()
    for name in AWS_OVERRIDES:
        patch.delenv(name, raising=False)
    for name, value in store.client_env({}).items():
        patch.setenv(name, value)
    lines, root = _Lines(), logging.getLogger()
    old_level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    init_ray(num_cpus=2)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        yield {"log_lines": lines.lines, "ray_session_dir": session_dir}
    finally:
        ray.shutdown()
        root.removeHandler(lines)
        root.setLevel(old_level)
        patch.undo()
        if was_running:
            init_ray(num_cpus=2)


def _train_cfg(root: str, run_name: str, db: str, *overrides: str) -> TrainConfig:
    values = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    for assignment in (f"features_dir={root}/features", f"storage_path={root}/runs", f"run_name={run_name}",
                       f"max_steps={STEPS}", "log_every=1", "batch.global_batch=16", "batch.micro_batch=8",
                       "lr.kind=constant", "lr.warmup_steps=0", "checkpoint.every_steps=5",
                       "samples.every_steps=0", "samples.prompts=[a large red circle in the top left]",
                       "samples.seeds=[0]", "samples.sampler.steps=4", f"mlflow.tracking_uri={db}",
                       "mlflow.experiment=object-storage", "mlflow.system_metrics=false", *overrides):
        apply_override(values, assignment)
    return from_dict(TrainConfig, values)


def _eval_cfg(root: str, prompts: str, db: str) -> EvalConfig:
    values: dict = {}
    for assignment in (f"model={root}/runs/chain/export", f"prompts={prompts}", f"out={root}/eval",
                       "sampling.steps=4", "sampling.guidance_scales=[2.0]", "compute.actors=1",
                       "compute.batch_size=4", f"mlflow.tracking_uri={db}", "mlflow.experiment=object-storage"):
        apply_override(values, assignment)
    return from_dict(EvalConfig, values)


def _run_chain(root: str, url_list: str, prompts: str, db: str) -> dict:
    """download -> filter -> precompute -> train_unet -> sample_eval with every location under `root` (a local
    folder or an s3:// URI), each through the job contract (run_stage: check, run, report). Returns seconds."""
    seconds = {}
    stages = (
        (DOWNLOAD, load_config(DownloadConfig, CONFIGS / "download.yaml", [
            f"url_list={url_list}", f"output_dir={root}/raw", "number_sample_per_shard=15", "threads=1",
            "allow_private_addresses=true"])),
        (FILTER, load_config(FilterConfig, CONFIGS / "filter.yaml",
                             [f"input_dir={root}/raw", f"output_dir={root}/filtered"])),
        (PRECOMPUTE, load_config(PrecomputeConfig, CONFIGS / "precompute.yaml", [
            f"input_dir={root}/filtered", f"output_dir={root}/features", "compute.batch_size=1"])),
        (TRAIN_UNET, _train_cfg(root, "chain", db, f"mlflow.experiment=object-storage-{_kind(root)}")),
        (SAMPLE_EVAL, _eval_cfg(root, prompts, db)),
    )
    for stage, cfg in stages:
        start = time.perf_counter()
        assert run_stage(stage, cfg) == 0, f"{stage.name} on {root} failed: {storage.read_text(stage.report_path(cfg))}"
        seconds[stage.name] = round(time.perf_counter() - start, 1)
    return seconds


def _kind(root: str) -> str:
    return "s3" if storage.is_uri(root) else "local"


@pytest.fixture(scope="module")
def chains(store, s3_ray, tmp_path_factory):
    """The chain on s3:// and on local folders, both from the same URL list (the s3 one a copy of it)."""
    work = tmp_path_factory.mktemp("object-storage")
    db = f"sqlite:///{work / 'mlflow.db'}"
    dataset = build_dataset(SyntheticConfig(num_good=36, seed=5, planted=PLANTED))
    local, s3 = str(work / "local"), store.uri("chain")
    (work / "prompts.txt").write_text(PROMPTS)
    storage.write_text(store.uri("prompts.txt"), PROMPTS)
    seconds = {}
    with SyntheticServer(dataset.responses) as server:
        url_list = str(write_url_list(dataset, server.base_url, work / "urls.parquet"))
        storage.write_bytes(store.uri("urls.parquet"), Path(url_list).read_bytes())
        seconds["s3"] = _run_chain(s3, store.uri("urls.parquet"), store.uri("prompts.txt"), db)
        seconds["local"] = _run_chain(local, url_list, str(work / "prompts.txt"), db)
    print("\nobject-storage chain seconds:", seconds)
    return {"work": work, "db": db, "local": local, "s3": s3, "dataset": dataset, "seconds": seconds, **s3_ray}


# ------------------------------------------------------------------------------------------ reading either side


def _report(root: str, *parts: str) -> dict:
    return storage.read_json(storage.join(root, *parts))


def _counts(report: dict) -> tuple:
    return report["ok"], report["rows_in"], report["rows_out"], {k: v for k, v in report["dropped"].items() if v}


def _samples(folder: str) -> dict[str, dict[str, bytes]]:
    """Every sample of every tar in a folder: key -> {extension: bytes} (tar headers, e.g. mtimes, left out)."""
    out = {}
    for name in storage.list_files(folder, suffix=".tar"):
        with storage.open_input(storage.join(folder, name)) as stream:
            for sample in iter_tar_samples(stream):
                out[f"{name}/{sample['__key__']}"] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


def _parquet(location: str):
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs)


def _rows_by_key(location: str):
    """img2dataset's per-row records of a shard, by key (its threads write them in the order they finish)."""
    return _parquet(location).sort_by("key")


def _features(root: str):
    folder = storage.join(root, "features")
    manifest = schema.Manifest.load(folder)
    tables = [_parquet(storage.join(folder, shard["name"])) for shard in manifest.shards]
    return manifest, tables


def _losses(db: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(db).get_metric_history(run_id, "loss")}


def _export_weights(export_dir: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(storage.join(export_dir, "unet", "model.safetensors")))


def _all_files(location: str) -> dict[str, bytes]:
    fs, base = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {info.path: storage.read_bytes(location.rstrip("/") + info.path[len(base):])
            for info in infos if info.type == pafs.FileType.File}


# ------------------------------------------------------------------------------------------ tests


def _bad_s3_inputs(store) -> list[tuple]:
    """(stage, config, what its one line must say): s3 locations that are not there, or not allowed."""
    nowhere = store.uri("nowhere")
    return [
        (FILTER, load_config(FilterConfig, CONFIGS / "filter.yaml", [f"input_dir={nowhere}", f"output_dir={nowhere}2"]),
         f"input_dir {nowhere} is not a directory"),
        (PRECOMPUTE, load_config(PrecomputeConfig, CONFIGS / "precompute.yaml", [
            f"input_dir={nowhere}", f"output_dir={nowhere}2", f"vae.source={nowhere}/vae"]), "vae.source"),
        (TRAIN_UNET, _train_cfg(nowhere, "bad", "sqlite:///unused.db"), f"features_dir: {nowhere}/features"),
        (TRAIN_UNET, _train_cfg(nowhere, "bad", "sqlite:///unused.db", f"model.init_from={nowhere}/unet"),
         f"model.init_from: {nowhere}/unet/config.json not found"),
        (SAMPLE_EVAL, _eval_cfg(nowhere, f"{nowhere}/prompts.txt", "sqlite:///unused.db"),
         f"prompt file {nowhere}/prompts.txt not found"),
        (SAMPLE_EVAL, _eval_cfg(nowhere, store.uri("prompts.txt"), "sqlite:///unused.db"),
         f"model directory {nowhere}/runs/chain/export not found"),
    ]


def test_missing_or_refused_s3_inputs_exit_2_with_one_line_before_ray(store, monkeypatch, caplog):
    import ray

    for name, value in store.client_env({}).items():
        monkeypatch.setenv(name, value)
    storage.write_text(store.uri("prompts.txt"), PROMPTS)
    was_running = ray.is_initialized()
    for stage, cfg, message in _bad_s3_inputs(store):
        caplog.clear()
        assert run_stage(stage, cfg) == 2, stage.name
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (stage.name, errors)
    assert ray.is_initialized() == was_running  # refused before any Ray started
    assert not storage.list_dir(store.uri("nowhere")) and not storage.list_dir(store.uri("nowhere2"))


@pytest.mark.slow
def test_every_stage_report_is_on_s3_and_counts_as_the_local_one(chains):
    s3, local = chains["s3"], chains["local"]
    for folder, name in (("raw", DOWNLOAD_REPORT), ("filtered", FILTER_REPORT), ("features", PRECOMPUTE_REPORT),
                         ("eval", EVAL_REPORT)):
        a, b = _report(s3, folder, name), _report(local, folder, name)
        assert a["ok"] and _counts(a) == _counts(b), (folder, a, b)
    download = _report(s3, "raw", DOWNLOAD_REPORT)
    assert download["shards"]["total"] == 3 and download["rows_out"] < download["rows_in"]
    assert _report(s3, "filtered", FILTER_REPORT)["rows_out"] < _report(s3, "filtered", FILTER_REPORT)["rows_in"]
    train = _report(s3, "runs", "chain", TRAIN_REPORT)
    assert train["ok"] and train["steps"] == STEPS
    assert train["export_dir"] == f"{s3}/runs/chain/export"


@pytest.mark.slow
def test_download_and_filter_write_the_same_samples(chains):
    s3, local = chains["s3"], chains["local"]
    for folder in ("raw", "filtered"):
        a, b = _samples(storage.join(s3, folder)), _samples(storage.join(local, folder))
        assert a and a.keys() == b.keys() and a == b, folder
    for name in storage.list_files(storage.join(local, "raw"), suffix=".parquet"):  # img2dataset's per-row records
        a, b = (_rows_by_key(storage.join(root, "raw", name)) for root in (s3, local))
        assert a.equals(b), name


@pytest.mark.slow
def test_precompute_writes_the_same_rows_and_bit_equal_features(chains):
    (ma, ta), (mb, tb) = _features(chains["s3"]), _features(chains["local"])
    assert ma.total_rows == mb.total_rows > 16 and [s["rows"] for s in ma.shards] == [s["rows"] for s in mb.shards]
    for a, b in zip(ta, tb):
        assert a.schema.remove_metadata() == b.schema.remove_metadata()
        for name in a.column_names:
            assert a.column(name).equals(b.column(name)), name
    empty = [storage.read_bytes(storage.join(root, "features", schema.EMPTY_CAPTION_FILE))
             for root in (chains["s3"], chains["local"])]
    assert empty[0] == empty[1]


@pytest.mark.slow
def test_training_on_s3_has_bit_equal_losses_weights_and_s3_checkpoints(chains):
    s3, local, db = chains["s3"], chains["local"], chains["db"]
    a, b = _report(s3, "runs", "chain", TRAIN_REPORT), _report(local, "runs", "chain", TRAIN_REPORT)
    la, lb = _losses(db, a["mlflow_run_id"]), _losses(db, b["mlflow_run_id"])
    assert sorted(la) == list(range(1, STEPS + 1)) and la == lb
    wa, wb = _export_weights(a["export_dir"]), _export_weights(b["export_dir"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    run = storage.join(s3, "runs", "chain")
    kept = sorted(n for n, i in storage.list_dir(run).items()
                  if n.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
    assert [checkpoint.read_meta(storage.join(run, n))["step"] for n in kept] == [5, 10]
    assert checkpoint.latest_checkpoint(run) == storage.join(run, kept[-1])


@pytest.mark.slow
def test_sample_eval_reads_an_s3_model_and_prompts_and_writes_the_same_images(chains):
    s3, local = chains["s3"], chains["local"]
    ra, rb = (storage.read_text(storage.join(root, "eval", RESULTS_FILE)) for root in (s3, local))
    assert ra == rb and len(ra.splitlines()) == 2
    for line in ra.splitlines():
        a, b = (storage.read_bytes(storage.join(root, "eval", json.loads(line)["image"])) for root in (s3, local))
        assert a == b
    ma, mb = (_report(root, "eval", METRICS_FILE) for root in (s3, local))
    assert ma["synthetic_accuracy"] == mb["synthetic_accuracy"] and ma["model"] == f"{s3}/runs/chain/export"
    from mlflow import MlflowClient

    client = MlflowClient(chains["db"])
    train_run = _report(s3, "runs", "chain", TRAIN_REPORT)["mlflow_run_id"]
    evals = client.search_runs([client.get_run(train_run).info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{train_run}'")
    assert len(evals) == 1
    assert {a.path for a in client.list_artifacts(evals[0].info.run_id)} >= {METRICS_FILE, RESULTS_FILE, "grids"}
    assert {a.path for a in client.list_artifacts(train_run, "model")} >= {f"model/{INDEX_FILE}", "model/unet"}


@pytest.mark.slow
def test_resume_from_an_s3_checkpoint_continues_exactly(chains):
    """checkpoint.resume_from=s3://.../checkpoint_N: a new run continues the chain's run from step 5."""
    s3, db = chains["s3"], chains["db"]
    run = storage.join(s3, "runs", "chain")
    step_5 = next(storage.join(run, n) for n, i in storage.list_dir(run).items()
                  if i.type == pafs.FileType.Directory and n.startswith("checkpoint_")
                  and checkpoint.read_meta(storage.join(run, n))["step"] == 5)
    result = run_training(_train_cfg(s3, "resumed", db, f"checkpoint.resume_from={step_5}",
                                     "mlflow.experiment=object-storage-s3"))
    ours, theirs = _losses(db, result.mlflow_run_id), _losses(db, _report(run, TRAIN_REPORT)["mlflow_run_id"])
    assert result.resumed_from == step_5 and sorted(ours) == list(range(6, STEPS + 1))
    assert all(ours[s] == theirs[s] for s in ours)
    a, b = _export_weights(result.export_dir), _export_weights(storage.join(run, "export"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_init_from_an_s3_export_is_read_by_the_launch_checks_and_the_workers_loader(chains):
    """model.init_from=s3://.../export/unet, as configs/sd2-base-512.yaml starts from sd2-base-256's export: the
    driver's launch checks read its config.json, and checkpoint.pretrained_weights (what every worker's build_engine
    calls, in processes that reach the store as the chain's workers did) gives exactly the exported weights.
    In-process: a whole Ray Train run for it costs a minute (measured 59 s) and goes through the same two calls."""
    s3, db = chains["s3"], chains["db"]
    export = storage.join(s3, "runs", "chain", "export")
    chain_cfg = _train_cfg(s3, "chain", db)
    plan = validate_for_launch(_train_cfg(s3, "phase-2", db, f"model.init_from={export}/unet"))
    assert plan.unet == chain_cfg.model.unet_config()
    start, loaded = _export_weights(export), checkpoint.pretrained_weights(f"{export}/unet")
    assert start.keys() == loaded.keys() and all(torch.equal(start[k], loaded[k]) for k in start)


@pytest.mark.slow
def test_the_secret_key_is_written_and_logged_nowhere(chains, store):
    """Reports, checkpoints, exports, features (every object in the bucket), the local chain's files, the MLflow
    store (params, tags, metrics) and its artifacts, every driver log line and every Ray worker log."""
    secret = store.secret_key.encode()
    places = {**_all_files(store.uri()), **_all_files(str(chains["work"]))}
    places.update({f"log:{n}": line.encode() for n, line in enumerate(chains["log_lines"])})
    places.update({str(p): p.read_bytes() for p in (Path(chains["ray_session_dir"]) / "logs").rglob("*")
                   if p.is_file()})
    assert len(places) > 100 and any(f"{chains['s3']}/raw/{DOWNLOAD_REPORT}" in line for line in chains["log_lines"])
    leaks = sorted(name for name, data in places.items() if secret in data)
    assert not leaks, leaks
    from mlflow import MlflowClient

    client = MlflowClient(chains["db"])
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            text = json.dumps([run.data.params, run.data.tags])
            assert store.secret_key not in text and store.access_key not in text
