"""jobs/sample_eval.py end to end on a real local Ray with a real MLflow store, its rerun, and its bad inputs.

The model is a tiny export written with the same code the training job uses (pipelines/inference/export.py), with
untrained weights: this file tests the evaluation machinery; the demo's end-to-end test evaluates a
trained model.

A rerun into the same OUT_DIR is a clean redo: every output rewritten, to the same bytes (sampling starts from
initial_noise(seed)), nothing of the earlier run left in the folder, and one new MLflow run (each evaluation is
its own record; the earlier run keeps its metrics and artifacts). A refused run writes nothing anywhere."""

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from model.unet import WEIGHTS_FILE
from pipelines.eval.driver import METRICS_FILE, REPORT_FILE, EvalConfig, SamplingSettings, expand_rows
from pipelines.eval.outputs import GRIDS_DIR, IMAGES_DIR, RESULTS_FILE, TABLE_FILE, write_outputs
from pipelines.eval.prompts import PromptRow, read_prompts
from pipelines.inference.draw import captioned_grid, png_bytes
from pipelines.inference.export import INDEX_FILE, UNET_DIR
from tests.exports import write_untrained_export
from tests.snapshots import DIR, mlflow_run_ids, tree_snapshot

pytestmark = pytest.mark.slow

PROMPTS = ('{"prompt": "a large red circle in the top left", "seed": 5}\n'
           '{"prompt": "a small blue triangle in the center"}\n'
           '{"prompt": "a photo of a cat"}\n')
SETTINGS = ("--set", "sampling.steps=3", "--set", "sampling.guidance_scales=[1.0, 3.0]",
            "--set", "compute.batch_size=4")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_untrained_export(tmp_path_factory.mktemp("eval-model"), step=7, run_name="unit")


def run_job(*args: str) -> int:
    from jobs.sample_eval import main

    return main(list(args))


def mlflow_runs(db: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(db)
    return client.search_runs([client.get_experiment_by_name("latentforge").experiment_id])


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory, ray_local):
    """One evaluation run to the end (3 prompts x 2 guidance scales, a real MLflow store): what the tests below
    check, rerun, and refuse to overwrite. The store's runs are read right after it (a rerun adds one)."""
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    out, db = root / "out", f"sqlite:///{root / 'mlflow.db'}"
    args = ("--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), *SETTINGS,
            "--set", f"mlflow.tracking_uri={db}")
    assert run_job(*args) == 0
    return SimpleNamespace(out=out, db=db, args=args, runs=mlflow_runs(db))


def test_sample_eval_writes_images_results_grids_metrics_and_an_mlflow_run(finished, tmp_path):
    import pandas as pd
    from mlflow import MlflowClient

    out, runs = finished.out, finished.runs
    results = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    assert len(results) == 6  # 3 prompts x 2 guidance scales
    assert {r["guidance"] for r in results} == {1.0, 3.0}
    assert {r["seed"] for r in results if r["prompt"].startswith("a large red")} == {5}
    for r in results:
        assert set(r) >= {"prompt", "seed", "guidance", "sampler", "steps", "image", "scores"}
        image = np.asarray(Image.open(out / r["image"]))
        assert image.shape == (64, 64, 3)
    assert sorted(p.name for p in (out / GRIDS_DIR).iterdir()) == ["guidance_1.png", "guidance_3.png"]
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["images"] == 6 and metrics["clip_score"]["computed"] is False
    assert "clip_weights" in metrics["clip_score"]["reason"] and metrics["fid"]["computed"] is False
    assert set(metrics["synthetic_accuracy"]) == {"guidance_1", "guidance_3"}
    assert len(runs) == 1 and runs[0].info.run_name == "eval-unit"
    client = MlflowClient(finished.db)
    run_id = runs[0].info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {METRICS_FILE, GRIDS_DIR, TABLE_FILE}
    assert {a.path for a in client.list_artifacts(run_id, GRIDS_DIR)} == {f"{GRIDS_DIR}/guidance_1.png",
                                                                          f"{GRIDS_DIR}/guidance_3.png"}
    # the grid: 3 images a guidance scale, upscaled to 128 px tiles with their prompts under them
    grid = np.asarray(Image.open(out / GRIDS_DIR / "guidance_1.png"))
    assert grid.shape[1] == 2 * (128 + 2) + 2 and grid.shape[0] > 2 * (128 + 2) + 2
    # CLIP score and FID were not computed: the run says why
    tags = runs[0].data.tags
    assert tags["eval.clip_score_skipped"] == metrics["clip_score"]["reason"]
    assert tags["eval.fid_skipped"] == metrics["fid"]["reason"] and tags["latentforge.job"] == "sample_eval"
    # the table: a row per image, with the image, what the checker read and the verdict (read from the artifact:
    # MlflowClient.load_table searches the process's default store, not the client's)
    assert {"path": TABLE_FILE, "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    table = pd.read_json(client.download_artifacts(run_id, TABLE_FILE, str(tmp_path)), orient="split")
    assert list(table.columns) == ["prompt", "seed", "guidance", "image_file", "image", "read", "wrong", "result"]
    assert sorted(table["image_file"]) == sorted(r["image"] for r in results)
    by_file = {r["image"]: r for r in results}
    for row in table.to_dict("records"):
        scores = by_file[row["image_file"]]["scores"]
        assert row["result"] == {True: "pass", False: "fail", None: "not checked"}[scores["all_correct"]]
        assert row["image"]["type"] == "image"
        if row["prompt"] == "a photo of a cat":
            assert row["read"].startswith("not checked") and row["wrong"] == ""
        elif scores["read"] is not None:
            assert row["read"].startswith(f"{scores['read']['size']} {scores['read']['color']} "), row


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("timing")}


def test_rerunning_a_finished_evaluation_redoes_it_to_the_same_results(finished):
    """Same folder, same settings: every file rewritten with the same bytes (same prompts, seeds and batching ->
    the same pixels), no file more or less; metrics.json equal but for its timing; one new MLflow run with the
    same metrics, the first run as it was."""
    from mlflow import MlflowClient

    out, client = finished.out, MlflowClient(finished.db)
    before, metrics_before = tree_snapshot(out), json.loads((out / METRICS_FILE).read_text())
    assert run_job(*finished.args) == 0
    after = tree_snapshot(out)
    assert set(after) == set(before)
    for path, (_, mtime, digest) in before.items():
        if digest != DIR:
            assert after[path][1] > mtime, f"{path} was not rewritten"
        if digest != DIR and path not in (METRICS_FILE, REPORT_FILE):
            assert after[path][2] == digest, f"{path} changed"
    assert _without_timing(json.loads((out / METRICS_FILE).read_text())) == _without_timing(metrics_before)

    first = finished.runs[0]
    runs = {run.info.run_id: run for run in mlflow_runs(finished.db)}
    assert len(runs) == 2 and first.info.run_id in runs
    again = runs[next(run_id for run_id in runs if run_id != first.info.run_id)]
    assert again.info.run_name == first.info.run_name and again.info.status == "FINISHED"
    assert _without_timing(again.data.metrics) == _without_timing(first.data.metrics)
    assert again.data.params == first.data.params
    kept = runs[first.info.run_id]
    assert (kept.data.metrics, kept.info.end_time, kept.info.status) == (first.data.metrics, first.info.end_time,
                                                                         first.info.status)
    assert {a.path for a in client.list_artifacts(first.info.run_id)} >= {METRICS_FILE, RESULTS_FILE, GRIDS_DIR}


def test_a_rerun_with_fewer_images_leaves_none_of_the_earlier_ones(tmp_path):
    """OUT_DIR after a rerun holds that run's outputs only: a first run with more prompts and guidance scales
    leaves no image or grid that results.jsonl and metrics.json no longer list (MLflow logs the grids folder)."""
    cfg = EvalConfig(model="m", prompts="p.txt", out=str(tmp_path),
                     sampling=SamplingSettings(steps=3, guidance_scales=(1.0, 3.0)))
    prompts = [PromptRow("a red circle", 0), PromptRow("a blue square", 1), PromptRow("a green triangle", 2)]

    def write(cfg: EvalConfig, prompts: list[PromptRow]) -> dict:
        rows = expand_rows(prompts, cfg)
        pngs = {r["index"]: png_bytes(np.full((16, 16, 3), 30 * r["index"], np.uint8)) for r in rows}
        return write_outputs(cfg, rows, pngs, {"step": 1})

    write(cfg, prompts)
    assert len(list((tmp_path / IMAGES_DIR).iterdir())) == 6
    fewer = replace(cfg, sampling=replace(cfg.sampling, guidance_scales=(1.0,)))
    metrics = write(fewer, prompts[:2])
    listed = [json.loads(line)["image"] for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert sorted(f"{IMAGES_DIR}/{p.name}" for p in (tmp_path / IMAGES_DIR).iterdir()) == sorted(listed)
    assert len(listed) == 2
    assert sorted(f"{GRIDS_DIR}/{p.name}" for p in (tmp_path / GRIDS_DIR).iterdir()) == sorted(
        metrics["grids"].values()) == [f"{GRIDS_DIR}/guidance_1.png"]


# ------------------------------------------------------------------------------------------ refusals


def _truncated_copy(model_dir, into):
    model = into / "truncated-model"
    shutil.copytree(model_dir, model)
    weights = model / UNET_DIR / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


# case -> (model, prompts, extra settings, the line that names the problem), paths under the test's tmp_path
BAD_INPUTS = {
    "unknown sampler": lambda t, m: (m, t / "p.txt", ["--set", "sampling.sampler=heun"],
                                     "sampling.sampler: unknown sampler 'heun'"),
    "empty prompt file": lambda t, m: (m, t / "empty.txt", [], f"prompt file {t / 'empty.txt'} holds no prompt"),
    "missing prompt file": lambda t, m: (m, t / "nope.txt", [], f"prompt file {t / 'nope.txt'} not found"),
    "half-written export": lambda t, m: (t / "half", t / "p.txt", [],
                                         f"{t / 'half'} is not an exported model: {INDEX_FILE} is missing"),
    "missing model": lambda t, m: (t / "missing", t / "p.txt", [], f"model directory {t / 'missing'} not found"),
    "truncated weights": lambda t, m: (_truncated_copy(m, t), t / "p.txt", [],
                                       f"{t / 'truncated-model' / UNET_DIR / WEIGHTS_FILE} is truncated"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_clear_errors_that_change_nothing(case, model_dir, tmp_path, caplog):
    """Exit 2 with a line naming the problem (this call's own log: each case is its own test), and nothing
    written: no output folder, no MLflow store, the model and prompt files as they were."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    model, prompts, extra, message = BAD_INPUTS[case](tmp_path, model_dir)
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = tree_snapshot(tmp_path)
    assert run_job("--model", str(model), "--prompts", str(prompts), "--out", str(out), *extra,
                   "--set", f"mlflow.tracking_uri={db}") == 2
    assert any(message in r.getMessage() for r in caplog.records), caplog.text
    assert tree_snapshot(tmp_path) == before and mlflow_run_ids(db) == set()


def test_a_refused_rerun_leaves_the_finished_evaluation_as_it_was(finished, model_dir, tmp_path, caplog):
    """A finished OUT_DIR and its MLflow store, then a rerun with a bad value or a damaged model: refused, and
    not a file of the earlier results nor the store's runs changed."""
    before, runs = tree_snapshot(finished.out), mlflow_run_ids(finished.db)
    assert run_job(*finished.args, "--set", "sampling.sampler=heun") == 2
    truncated = _truncated_copy(model_dir, tmp_path)
    assert run_job(*finished.args, "--model", str(truncated)) == 2
    assert f"{truncated / UNET_DIR / WEIGHTS_FILE} is truncated" in caplog.text
    assert tree_snapshot(finished.out) == before and mlflow_run_ids(finished.db) == runs


def test_captioned_grids_upscale_each_image_and_write_its_prompt_under_it():
    """Nearest-neighbour upscaling to >= 128 px a side (the pixels unchanged, only larger), a white band under each
    tile with dark text in it, and a long prompt cut to the band rather than spilling into the next tile."""
    images = np.stack([np.full((32, 32, 3), value, np.uint8) for value in (40, 200, 90)])  # (3, 32, 32, 3)
    images[0, 0, 0] = (255, 0, 0)
    long = "a very long prompt " * 20
    grid = captioned_grid(images, ["a red circle", "", long], columns=2)
    tile, pad = 128, 2
    band = (grid.shape[0] - 3 * pad) // 2 - tile
    assert grid.shape[1] == 2 * (tile + pad) + pad and band > 20
    assert (grid[pad:pad + 4, pad:pad + 4] == (255, 0, 0)).all()  # the top-left pixel, 4 x 4 now
    assert (grid[pad + 4:pad + tile, pad + 4:pad + tile] == 40).all()
    under = [grid[pad + tile:pad + tile + band, left:left + tile] for left in (pad, 2 * pad + tile)]
    assert under[0].min() < 100 and (under[1] == 255).all()  # text under the first tile, none under the empty
    third = grid[2 * pad + tile + band + tile: 2 * pad + 2 * (tile + band), pad:pad + tile]
    assert third.min() < 100 and third.shape[0] == band
    with pytest.raises(ValueError, match="one caption per image"):
        captioned_grid(images, ["x"], columns=2)


def test_a_negative_seed_in_a_prompt_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "seed": -1}\n')
    with pytest.raises(ValueError, match="seeds must be integers"):
        read_prompts(str(bad))
