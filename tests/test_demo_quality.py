"""bench/demo_quality.py's pure parts: the new prompt sets and the aggregation; and the demo's seed reaching every
seeded stage. No demo is trained here (a demo takes many minutes)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.demo_quality import aggregate, markdown_table, new_prompt_sets, run_figures, spread
from pipelines.demo import Demo, DemoConfig, eval_prompts
from pipelines.synthetic.checker import score_image
from pipelines.synthetic.shapes import HELD_OUT_PAIRS, held_out_attributes, parse_caption, render, training_attributes


def test_new_prompt_sets_are_new_and_of_the_right_combinations():
    demo = [p["prompt"] for p in eval_prompts(DemoConfig())]
    per_split = 60
    sets = new_prompt_sets(demo, per_split)
    seen = [r["prompt"] for r in sets["seen"]]
    held = [r["prompt"] for r in sets["held_out"]]
    assert len(seen) == len(set(seen)) == per_split and len(held) == len(set(held)) == per_split
    assert not (set(seen) | set(held)) & set(demo)
    demo_combinations = {parse_caption(p) for p in demo}
    seen_attrs = [parse_caption(p) for p in seen]
    assert all(a in training_attributes() and a not in demo_combinations for a in seen_attrs)
    assert all(parse_caption(p) in held_out_attributes() for p in held)
    assert set(map(parse_caption, held)) == set(held_out_attributes())  # 60 prompts: every withheld one, twice
    # the eval's split of each prompt is the one it was made for (what sample_eval's metrics report it under)
    image = render(training_attributes()[0], 32)
    assert {score_image(image, p)["split"] for p in seen} == {"seen"}
    assert {score_image(image, p)["split"] for p in held} == {"held_out"}
    # the j-th seen and held-out prompts share a wording: the two sets differ by combination only
    for s, h in zip(seen, held):
        assert _wording(s) == _wording(h)
    assert len({r["seed"] for r in sets["seen"] + sets["held_out"]}) == 2 * per_split


def _wording(prompt: str) -> str:
    a = parse_caption(prompt)
    for value in (a.position, a.size, a.color, a.shape):
        prompt = prompt.replace(value, "_", 1)
    return prompt


def test_new_prompt_sets_refuse_more_prompts_than_there_are_and_follow_their_seed():
    demo = [p["prompt"] for p in eval_prompts(DemoConfig())]
    assert len(new_prompt_sets(demo, 120)["held_out"]) == 120  # 30 withheld combinations x 4 paraphrases
    with pytest.raises(ValueError, match="1..120"):
        new_prompt_sets(demo, 121)
    with pytest.raises(ValueError):
        new_prompt_sets(demo, 0)
    every_seen = [p["prompt"] for p in eval_prompts(DemoConfig(seen_prompts=len(training_attributes())))]
    with pytest.raises(ValueError, match="seen combinations the demo did not evaluate: 0"):
        new_prompt_sets(every_seen, 1)  # no seen combination is left that the demo did not evaluate
    few = [parse_caption(r["prompt"]) for r in new_prompt_sets(demo, 7)["held_out"]]
    pairs = Counter((a.color, a.shape) for a in few)
    assert set(pairs) == HELD_OUT_PAIRS and max(pairs.values()) - min(pairs.values()) == 1  # spread evenly
    assert new_prompt_sets(demo, 20, seed=1) == new_prompt_sets(demo, 20, seed=1)
    assert new_prompt_sets(demo, 20, seed=1)["seen"] != new_prompt_sets(demo, 20, seed=2)["seen"]


def test_spread_and_aggregate():
    assert spread([0.9, 1.0, 0.5]) == {"min": 0.5, "median": 0.9, "max": 1.0, "runs": 3}
    assert spread([0.9, None, 0.5, 1.0]) == {"min": 0.5, "median": 0.9, "max": 1.0, "runs": 3}
    assert spread([0.2, 0.4])["median"] == pytest.approx(0.3)
    assert spread([None]) == {"min": None, "median": None, "max": None, "runs": 0}
    stats = aggregate([{"seen": 1.0, "held-out": 0.8}, {"seen": 0.9}, {"seen": 0.95, "held-out": 0.6}])
    assert list(stats) == ["seen", "held-out"]
    assert stats["seen"] == {"min": 0.9, "median": 0.95, "max": 1.0, "runs": 3}
    assert stats["held-out"] == {"min": 0.6, "median": pytest.approx(0.7), "max": 0.8, "runs": 2}
    table = markdown_table([0, 1, 2], [{"seen": 1.0, "held-out": 0.8}, {"seen": 0.9}, {"seen": 0.95, "held-out": 0.6}],
                           stats).splitlines()
    assert table[0] == "| run | seen | held-out |" and table[1] == "|---|---|---|"
    assert table[3] == "| seed 1 | 90.0% | n/a |"
    assert table[-1] == "| min / median / max | 90.0% / 95.0% / 100.0% | 60.0% / 70.0% / 80.0% |"


def _metrics(split: str, rates: dict[str, float]) -> dict:
    other = "held_out" if split == "seen" else "seen"
    return {"synthetic_accuracy": {key: {split: {"count": 60, "all_correct": rate}, other: {"count": 0}}
                                   for key, rate in rates.items()}}


def test_run_figures_names_the_guidance_scale_only_when_several():
    summary = {"accuracy": {"seen": {"all_correct": 1.0}, "held_out": {"all_correct": 0.95}}}
    one = run_figures(summary, {"seen": _metrics("seen", {"guidance_2": 0.9}),
                                "held_out": _metrics("held_out", {"guidance_2": 0.7})})
    assert one == {"demo seen": 1.0, "demo held-out": 0.95, "seen": 0.9, "held-out": 0.7}
    two = run_figures(summary, {"seen": _metrics("seen", {"guidance_2": 0.9, "guidance_4": 0.8}),
                                "held_out": _metrics("held_out", {"guidance_2": 0.7, "guidance_4": 0.5})})
    assert two["seen guidance_4"] == 0.8 and two["held-out guidance_2"] == 0.7 and "seen" not in two


def test_the_demo_seed_reaches_every_seeded_stage(tmp_path):
    """stages() with its jobs recorded, not run: each seeded stage gets the demo's seed."""
    commands = {}

    class Recorded(Demo):
        def job(self, stage, script, *args):
            commands[stage] = args

    Recorded(DemoConfig(out_dir=str(tmp_path), seed=7)).stages()
    sets = {stage: {args[i + 1] for i, a in enumerate(args) if a == "--set"} for stage, args in commands.items()}
    assert {"vae.seed=7", "train.seed=7"} <= sets["train_vae"]
    assert "text.seed=7" in sets["precompute"]
    assert "seed=7" in sets["train_unet"]


def test_the_demo_seed_reaches_the_synthetic_data(tmp_path):
    """The demo's image server, started for two seeds: different items (the same ones if the seed stopped short)."""
    import pyarrow.parquet as pq

    items = {}
    for seed in (0, 7):
        demo = Demo(DemoConfig(out_dir=str(tmp_path / str(seed)), seed=seed, num_good=20, planted=0))
        demo.logs.mkdir(parents=True)
        server = demo.start_server()
        server.terminate()
        server.wait(timeout=30)
        items[seed] = pq.read_table(demo.out / "synth" / "items.parquet").to_pylist()
    assert len(items[0]) == len(items[7]) == 20
    assert [r["caption"] for r in items[0]] != [r["caption"] for r in items[7]]
