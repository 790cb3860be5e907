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
