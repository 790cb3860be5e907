"""`make demo`'s code path end to end, smaller: a Ray head of its own, the synthetic server, every job as a
subprocess (download -> filter -> train_vae -> precompute -> train_unet -> sample_eval), the summary.

The step counts are too small to learn the shapes: this checks that every stage runs and reports, that
the summary points at real outputs, and that the demo stops what it started. The accuracy figures of the
full demo are measured by `make demo` itself (docs/benchmarks.md)."""

import json
import os
from pathlib import Path

import psutil
import pytest

from pipelines.core.local_ray import (
    FOREIGN_RAY_VARS,
    LOOPBACK_ONLY,
    RAY_TEMP_PARENT,
    RAY_TEMP_PREFIX,
    TOKEN_FILE,
    uses_path,
)
from pipelines.demo import DemoConfig, run_demo
from pipelines.inference.export import INDEX_FILE

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_writes_the_summary(tmp_path, monkeypatch):
    import time

    # As on a machine that never ran Ray: an empty HOME (a ~/.ray/auth_token once hid a head without auth) and
    # none of the test session's Ray settings. DeepSpeed's prebuilt op is still found where `make install` put it.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR")
                       or str(Path.home() / ".cache" / "torch_extensions"))
    monkeypatch.setenv("HOME", str(tmp_path / "empty_home"))
    for name in [*FOREIGN_RAY_VARS, *LOOPBACK_ONLY]:
        monkeypatch.delenv(name, raising=False)
    started = time.time()
    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), num_good=300, planted=1, vae_steps=10, unet_steps=10,
                     seen_prompts=4, images_per_prompt=1,
                     extra={"train_unet": ["samples.sampler.steps=4"]})
    summary = run_demo(cfg)
    from diffusers import StableDiffusionPipeline

    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk["ok"] is True and on_disk["model_dir"] == summary["model_dir"]
    assert list(on_disk["stage_seconds"]) == ["download", "filter", "train_vae", "precompute", "train_unet",
                                              "export_diffusers", "sample_eval"]
    reports = on_disk["stage_reports"]
    assert reports["download"]["rows_out"] > 250 and reports["download"]["dropped"]["http_404"] == 1
    assert reports["filter"]["dropped"]["exact_duplicate"] == 1  # the planted duplicate, not the jittered items
    assert reports["precompute"]["rows_out"] == reports["filter"]["rows_out"]
    assert reports["train_vae"]["scaling_factor"] > 0
    assert reports["train_unet"]["steps"] == 10 and on_disk["final_loss"] is not None
    assert on_disk["accuracy"]["held_out"]["count"] == 30 and on_disk["accuracy"]["seen"]["count"] == 4
    # the evaluation, given no sampling settings, drew with the ones the training config put into the export
    evaluated = reports["sample_eval"]
    assert (evaluated["sampler"], evaluated["steps"], evaluated["guidance_scales"]) == ("dpmpp_2m", 4, [2.0])
    assert Path(on_disk["sample_grid"]).is_file()
    assert (Path(on_disk["model_dir"]) / INDEX_FILE).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(on_disk["diffusers_dir"], local_files_only=True)
    assert pipe.vae.config.scaling_factor == reports["train_vae"]["scaling_factor"]
    assert "mlflow ui --backend-store-uri sqlite:///" in on_disk["mlflow_ui"]
    # it stopped what it started: no process of its Ray head or its image server is left (by command line
    # or by open files: Ray's agents rename themselves but keep their logs open in the head's temp dir)
    leftovers = [(p.pid, p.info["name"]) for p in psutil.process_iter(["name", "create_time"])
                 if (p.info["create_time"] or 0) >= started
                 and (uses_path(p, str(tmp_path)) or uses_path(p, os.path.join(RAY_TEMP_PARENT, RAY_TEMP_PREFIX)))]
    assert leftovers == []
    assert not list(Path(RAY_TEMP_PARENT).glob(f"{RAY_TEMP_PREFIX}*/{TOKEN_FILE}")), "the head's token outlived it"
    assert not (tmp_path / "empty_home" / ".ray").exists(), "the demo wrote into ~/.ray"
