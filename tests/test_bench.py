"""The benchmark runs end to end and reports consistent figures (it never judges time)."""

import json

from bench.unet_step import main


def test_unet_step_bench_reports_its_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = main(["--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
                   "--peak-tflops", "1.0", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["max_abs_output_diff"] < 1e-4  # same weights, same numerics
    assert result["ours_s"] > 0 and result["diffusers_s"] > 0
    assert abs(result["speedup_vs_diffusers"] - result["diffusers_s"] / result["ours_s"]) < 1e-9
    assert result["step_tflop"] > 0 and 0 < result["mfu"] < 1
    printed = capsys.readouterr().out
    assert "ratio" in printed and "images/s" in printed


def test_gpu_train_bench_runs_every_phase_on_cpu_with_torch_alone(tmp_path):
    """bench/gpu_train.py end to end on the CPU preset, as a subprocess in which Ray, DeepSpeed, MLflow,
    diffusers and open_clip cannot be imported (the GPU machine has none of them). Every phase reports
    figures except compile, which gets a budget far too small on CPU: it must be cut at that budget and
    leave the other phases' figures intact."""
    import math
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from bench.gpu_train import PHASES, hard_grace

    out = tmp_path / "figures.json"
    blocked = ("ray", "deepspeed", "mlflow", "diffusers", "open_clip")
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "runpy.run_module('bench.gpu_train', run_name='__main__', alter_sys=True)")
    budget, compile_budget = 120, 3
    args = ["--device", "cpu", "--preset", "tiny", "--res", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--threads", "1", "--peak-tflops", "1", "--budget", str(budget), "--budget", f"compile={compile_budget}",
            "--total-budget", "900", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert set(phases) == {"flops"} | {f"{p}@32" for p in PHASES if p != "flops"}

    flops = phases["flops"]
    assert flops["status"] == "ok", flops.get("error")
    tflop = flops["tflop_per_sample"]["32"]
    assert 0 < tflop < 1e-2 and report["meta"]["measured_tflop_per_sample"]["32"] == pytest.approx(tflop, rel=1e-5)

    for name in ("eager", "channels_last", "mask", "checkpointing", "job"):
        f = phases[f"{name}@32"]
        assert f["status"] == "ok", (name, f.get("error"), f.get("traceback"))
        assert f["steps_timed"] == 2 and len(f["step_ms"]) == 2 and f["warmup_steps"] == 1
        assert f["images_per_s"] == pytest.approx(2 / (f["step_ms_median"] / 1000), rel=1e-3)
        assert f["tflop_per_sample"] == pytest.approx(tflop, rel=1e-5) and f["peak_tflops"] == 1.0
        assert f["mfu"] == pytest.approx(f["images_per_s"] * tflop, rel=1e-4) and 0 < f["mfu"] < 1
        assert f["peak_rss_gib"] > 0 and f["seconds"] <= budget + hard_grace(budget)
    variants = {name: phases[f"{name}@32"]["variant"] for name in ("eager", "channels_last", "mask", "checkpointing")}
    assert [v["text_mask"] for v in variants.values()] == [False, False, True, False]
    assert variants["channels_last"]["memory_format"] == "channels_last"
    assert variants["checkpointing"]["gradient_checkpointing"]
    # the profiler saw the SDPA kernels; checkpointing recomputes each forward attention once in backward
    attention = {name: sum(phases[f"{name}@32"]["attention"]["backends"].values()) for name in variants}
    assert attention["eager"] > 0 and attention["checkpointing"] == 2 * attention["eager"]

    job = phases["job@32"]
    assert job["bare_images_per_s"] > 0 and job["bare_mfu"] > 0 and job["loader_ms_median"] >= 0
    assert job["job_overhead"] == pytest.approx(job["step_ms_median"] / job["bare_step_ms_median"] - 1, abs=1e-3)
    assert math.isfinite(job["last_loss"]) and job["skipped_micro_batches"] == 0

    compiled = phases["compile@32"]
    assert compiled["status"] in ("ok", "timeout"), compiled.get("error")
    assert compiled["seconds"] <= compile_budget + hard_grace(compile_budget) + 5
    if compiled["status"] == "ok":  # a fast machine compiled the tiny U-Net within the budget
        assert compiled["images_per_s"] > 0
    summary = report["summary"]["32"]
    assert summary["eager"]["images_per_s"] == phases["eager@32"]["images_per_s"]
    assert summary["job"]["job_overhead"] == job["job_overhead"]
