"""jobs/sample_eval.py end to end on a real local Ray with a real MLflow store, and its bad inputs.

The model is a tiny export written with the same code the training job uses (pipelines/inference/export.py), with
untrained weights: this file tests the evaluation machinery; the demo's end-to-end test evaluates a
trained model."""

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.eval.prompts import read_prompts
from pipelines.inference.export import INDEX_FILE
from tests.exports import write_untrained_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_untrained_export(tmp_path_factory.mktemp("eval-model"), step=7, run_name="unit")


def run_job(*args: str) -> int:
    from jobs.sample_eval import main

    return main(list(args))


def test_sample_eval_writes_images_results_grids_metrics_and_an_mlflow_run(model_dir, tmp_path, ray_local):
    from mlflow import MlflowClient

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a large red circle in the top left", "seed": 5}\n'
                       '{"prompt": "a small blue triangle in the center"}\n'
                       '{"prompt": "a photo of a cat"}\n')
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = run_job("--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                   "--set", "sampling.steps=3", "--set", "sampling.guidance_scales=[1.0, 3.0]",
                   "--set", f"mlflow.tracking_uri={db}", "--set", "compute.batch_size=4")
    assert code == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 6  # 3 prompts x 2 guidance scales
    assert {r["guidance"] for r in results} == {1.0, 3.0}
    assert {r["seed"] for r in results if r["prompt"].startswith("a large red")} == {5}
    for r in results:
        assert set(r) >= {"prompt", "seed", "guidance", "sampler", "steps", "image", "scores"}
        image = np.asarray(Image.open(out / r["image"]))
        assert image.shape == (64, 64, 3)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["guidance_1.png", "guidance_3.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["clip_score"]["computed"] is False
    assert "clip_weights" in metrics["clip_score"]["reason"] and metrics["fid"]["computed"] is False
    assert set(metrics["synthetic_accuracy"]) == {"guidance_1", "guidance_3"}
    runs = MlflowClient(db).search_runs([MlflowClient(db).get_experiment_by_name("latentforge").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "eval-unit"
    assert {a.path for a in MlflowClient(db).list_artifacts(runs[0].info.run_id)} >= {"metrics.json", "grids"}

    # same prompts, seeds and batching -> the same pixels (sampling starts from initial_noise(seed));
    # another batch size changes only float rounding (batched kernels), a level or two at most
    again = tmp_path / "again"
    assert run_job("--model", str(model_dir), "--prompts", str(prompts), "--out", str(again), "--set",
                   "sampling.steps=3", "--set", "sampling.guidance_scales=[1.0, 3.0]", "--set", "mlflow.enabled=false",
                   "--set", "compute.batch_size=4") == 0
    for r in results:
        assert (out / r["image"]).read_bytes() == (again / r["image"]).read_bytes()


def test_bad_inputs_are_clear_errors(model_dir, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = str(tmp_path / "out")
    assert run_job("--model", str(model_dir), "--prompts", str(prompts), "--out", out,
                   "--set", "sampling.sampler=heun") == 2
    assert "unknown sampler 'heun'" in caplog.text
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert run_job("--model", str(model_dir), "--prompts", str(empty), "--out", out) == 2
    assert "holds no prompt" in caplog.text
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    assert run_job("--model", str(half), "--prompts", str(prompts), "--out", out) == 2
    assert f"{INDEX_FILE} is missing" in caplog.text
    assert run_job("--model", str(tmp_path / "missing"), "--prompts", str(prompts), "--out", out) == 2
    assert "not found" in caplog.text
    assert run_job("--model", str(model_dir), "--prompts", str(tmp_path / "nope.txt"), "--out", out) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "seed": -1}\n')
    with pytest.raises(ValueError, match="seeds must be integers"):
        read_prompts(str(bad))
