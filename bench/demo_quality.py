"""The demo's quality as a distribution over training seeds, not one run.

Trains N demo models (`python jobs/demo.py --set seed=S`, one per seed: the seed reaches the synthetic data, the
VAE, the text encoder's random init and the U-Net), then samples each exported model with jobs/sample_eval.py
with no sampling flags (the model's own sampling defaults) on two prompt sets the demo itself never evaluated:

    seen      training (colour, shape, size, position) combinations the demo's eval did not sample
    held-out  the combinations the synthetic generator withholds from training (HELD_OUT_PAIRS)

The demo evaluates canonical captions ("a small red circle in the top left"), every held-out combination among
them, so both new sets are phrased with the training captions' paraphrases, in the same mix for both sets:
what separates seen from held-out is then the combination, not the wording. Each image is checked by the
synthetic checker; the figure is the share of images with every attribute right. Reported per run and as
min / median / max over runs, beside the demo's own figures (its summary.json): a JSON (--out) and a markdown
table for docs/benchmarks.md.

    python -m bench.demo_quality                                  # 3 runs, seeds 0 1 2 (~25 min a run here)
    python -m bench.demo_quality --seeds 0,1,2,3,4 --out /tmp/demo_quality.json
    python -m bench.demo_quality --runs 1 --prompts-per-split 4 \\
        --demo-set num_good=300 --demo-set vae_steps=10 --demo-set unet_steps=10   # a plumbing check

Each run lives in WORK_DIR/seed-S (the demo's out_dir: logs/, eval/, summary.json; bench_eval/ holds this
script's evaluations). A run whose summary.json records the same demo config is reused, not retrained, so an
interrupted benchmark picks up where it stopped; any other seed-S folder is deleted and trained anew.
Exit status: 0 done, 1 a demo or an evaluation failed (its log is named), 2 bad arguments, 130 stopped (Ctrl-C,
SIGTERM: the running demo or evaluation stops first, Ray head included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.core.config import ConfigError, load_config
from pipelines.core.local_ray import LocalRayHead
from pipelines.core.progress import Progress, format_duration
from pipelines.core.runtime import REPO_ROOT
from pipelines.demo import SUMMARY_FILE, Demo, DemoConfig, _child_env, eval_prompts
from pipelines.synthetic.shapes import (
    PARAPHRASE_TEMPLATES,
    Attributes,
    caption_for,
    held_out_attributes,
    parse_caption,
    training_attributes,
)

SPLITS = ("seen", "held_out")
SPLIT_TITLES = {"seen": "seen", "held_out": "held-out"}
DEFAULT_RUNS = 3
# 60 a split: as many images as the demo's own eval (60 prompts x 2) while sample_eval draws one a prompt
PROMPTS_PER_SPLIT = 60
# Image seeds of the new prompts: the demo's eval uses 1000 + row; these are apart from them only for clarity
# (the prompt texts already differ).
FIRST_IMAGE_SEED = 50_000
EVAL_DIR = "bench_eval"
METRICS_FILE = "metrics.json"  # what jobs/sample_eval.py writes into --out
FAILED, STOPPED = 1, 130  # exit statuses besides 0 and 2 (argparse's)


# ---- pure parts: the prompt sets and the aggregation ----------------------------------------------------------


def new_prompt_sets(demo_prompts: Sequence[str], per_split: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """{"seen": rows, "held_out": rows}, rows {"prompt", "seed"}: `per_split` prompts each, none of them one of
    `demo_prompts` (the demo's evaluated prompts) and no seen combination one the demo evaluated.

    Held-out: each withheld combination in one paraphrase, then each in the next one, and so on (at most
    len(held_out_attributes()) x len(PARAPHRASE_TEMPLATES)). Seen: distinct training combinations the demo did not
    evaluate, drawn with `seed`, the j-th phrased like the j-th held-out prompt (same wording mix)."""
    evaluated_text = set(demo_prompts)
    evaluated = {parse_caption(p) for p in demo_prompts}
    # ordered by position and size first: any number of prompts spreads over the withheld pairs evenly, sizes nearly
    withheld = sorted(held_out_attributes(), key=lambda a: (a.position, a.size))
    held = [(a, PARAPHRASE_TEMPLATES[(i + turn) % len(PARAPHRASE_TEMPLATES)])
            for turn in range(len(PARAPHRASE_TEMPLATES)) for i, a in enumerate(withheld)]
    held = [(a, t) for a, t in held if caption_for(a, t) not in evaluated_text]
    seen_pool = [a for a in training_attributes() if a not in evaluated]
    if per_split < 1 or per_split > min(len(held), len(seen_pool)):
        raise ValueError(f"prompts per split must be in 1..{min(len(held), len(seen_pool))} (new held-out prompts: "
                         f"{len(held)}, seen combinations the demo did not evaluate: {len(seen_pool)}); "
                         f"got {per_split}")
    held = held[:per_split]
    seen = [(a, t) for a, (_, t) in zip(random.Random(seed).sample(seen_pool, per_split), held)]
    return {"seen": _rows(seen, FIRST_IMAGE_SEED), "held_out": _rows(held, FIRST_IMAGE_SEED + per_split)}


def _rows(pairs: list[tuple[Attributes, str]], first_seed: int) -> list[dict[str, Any]]:
    return [{"prompt": caption_for(a, t), "seed": first_seed + i} for i, (a, t) in enumerate(pairs)]


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """min / median / max of the values that exist (None: a figure a run did not produce), and how many."""
    known = [v for v in values if v is not None]
    if not known:
        return {"min": None, "median": None, "max": None, "runs": 0}
    return {"min": min(known), "median": statistics.median(known), "max": max(known), "runs": len(known)}


def aggregate(runs: Sequence[dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """{figure: spread over runs} for every figure any run has, in first-seen order."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {name: spread([run.get(name) for run in runs]) for name in names}


def run_figures(summary: dict[str, Any], metrics: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One run's all-correct rates: the demo's own (its summary) and the new sets' (sample_eval's metrics.json of
    each split, one figure per guidance scale it sampled; named by the scale only when there are several)."""
    figures = {f"demo {SPLIT_TITLES[s]}": summary["accuracy"][s]["all_correct"] for s in SPLITS}
    for split in SPLITS:
        by_guidance = metrics[split]["synthetic_accuracy"]
        for key, accuracy in by_guidance.items():
            name = SPLIT_TITLES[split] if len(by_guidance) == 1 else f"{SPLIT_TITLES[split]} {key}"
            figures[name] = (accuracy.get(split) or {}).get("all_correct")
    return figures


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_table(seeds: Sequence[int], runs: Sequence[dict[str, float | None]],
                   stats: dict[str, dict[str, Any]]) -> str:
    """A row per run, then min / median / max over the runs; columns: the figures of `stats`."""
    names = list(stats)
    lines = ["| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, run in zip(seeds, runs):
        lines.append(f"| seed {seed} | " + " | ".join(_pct(run.get(n)) for n in names) + " |")
    lines.append("| min / median / max | " + " | ".join(
        " / ".join(_pct(stats[n][k]) for k in ("min", "median", "max")) for n in names) + " |")
    return "\n".join(lines)


# ---- running the demos and the evaluations ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.demo_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                   help=f"demo models to train, seeds 0..RUNS-1 (default {DEFAULT_RUNS}); ignored with --seeds")
    p.add_argument("--seeds", default=None, help="comma-separated demo seeds, e.g. 0,1,2 (one run each)")
    p.add_argument("--prompts-per-split", type=int, default=PROMPTS_PER_SPLIT,
                   help=f"new prompts in each of the seen and held-out sets, one image each (default "
                        f"{PROMPTS_PER_SPLIT}; at most 120 with the demo's defaults)")
    p.add_argument("--prompt-seed", type=int, default=0, help="which unevaluated seen combinations are drawn")
    p.add_argument("--demo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a DemoConfig override for every run, repeatable, e.g. --demo-set unet_steps=200 "
                        "(seed and out_dir are this script's)")
    default_work = os.path.join(tempfile.gettempdir(), "demo_quality")
    p.add_argument("--work-dir", default=default_work, help=f"one folder per run (default {default_work})")
    p.add_argument("--out", default=None, help="the JSON report (default WORK_DIR/demo_quality.json)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.runs))
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error("--runs must be >= 1 and --seeds distinct")
    if any(kv.split("=", 1)[0].strip() in ("seed", "out_dir") for kv in args.demo_set):
        p.error("--demo-set cannot set seed or out_dir: --seeds and --work-dir choose them")
    return args


def demo_overrides(seed: int, run_dir: Path, demo_set: Sequence[str]) -> list[str]:
    """The run's DemoConfig overrides: --demo-set's, then its seed and out_dir."""
    return [*demo_set, f"seed={seed}", f"out_dir={run_dir}"]


def _say(message: str) -> None:
    print(f"[demo_quality] {message}", flush=True)


def _command(cmd: list[str], log_path: Path, env: dict[str, str], echo: str | None = None) -> None:
    """Run `cmd` in the repository with its output in `log_path`; lines starting with `echo` are shown too."""
    with open(log_path, "w", buffering=1) as log_file:
        # A session of its own: a Ctrl-C or a `timeout` reaches this script only, which passes one SIGTERM on to the
        # job's process group; a second signal in the middle of the job's clean-up would leave its Ray head behind.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        try:
            for line in proc.stdout:
                log_file.write(line)
                if echo is not None and line.startswith(echo):
                    print(f"  {line.rstrip()}", flush=True)
            code = proc.wait()
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the job stops what it started (the demo its Ray head)
            with contextlib.suppress(ProcessLookupError):  # (gone already)
                os.killpg(proc.pid, signal.SIGTERM)  # as a Ctrl-C would: the job and the stage it runs
            log_file.write(proc.communicate(timeout=120)[0] or "")  # what it said while stopping
            raise
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[1]} failed with exit code {code}; full log: {log_path}\n{tail}")


def train_demo(cfg: DemoConfig, overrides: list[str]) -> dict[str, Any]:
    """The demo's summary for `cfg` (made from `overrides`): the one in its out_dir when it was made with the same
    config, else a new run of `python jobs/demo.py --set ...`."""
    out = Path(cfg.out_dir)
    summary_path = out / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg))):
            _say(f"seed {cfg.seed}: reusing the finished demo in {out}")
            return summary
    # Half a run or another config's: the demo would resume or refuse what it finds, so it starts from nothing
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _say(f"seed {cfg.seed}: training the demo (log: {out / 'demo.log'})")
    _command([sys.executable, "jobs/demo.py", *(a for kv in overrides for a in ("--set", kv))], out / "demo.log",
             _child_env(), echo="[demo] ")
    return json.loads(summary_path.read_text())


def evaluate(cfg: DemoConfig, prompt_files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """sample_eval of the run's exported model on each split's prompts, no sampling flags; {split: metrics}."""
    out = Path(cfg.out_dir) / EVAL_DIR
    out.mkdir(exist_ok=True)
    model_dir = Demo(cfg).model_dir()
    metrics = {}
    with LocalRayHead(cfg.ray_num_cpus) as head:  # private, as the demo's: nothing else on the machine is touched
        env = head.client_env(_child_env(MLFLOW_TRACKING_URI=f"sqlite:///{Path(cfg.out_dir) / 'mlflow.db'}"))
        for split, prompts in prompt_files.items():
            _say(f"seed {cfg.seed}: sample_eval on the new {SPLIT_TITLES[split]} prompts")
            _command([sys.executable, "jobs/sample_eval.py", "--model", model_dir, "--prompts", str(prompts),
                      "--out", str(out / split)], out / f"{split}.log", env)
            metrics[split] = json.loads((out / split / METRICS_FILE).read_text())
    return metrics


def _commit() -> str | None:
    """HEAD's short hash, "+changes" when the working tree differs from it (what the runs ran is then not HEAD)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")) or None


def write_prompt_files(work: Path, sets: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    files = {}
    for split, rows in sets.items():
        files[split] = work / f"prompts_{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def _sampling(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What sample_eval sampled with (the model's defaults; the same for both splits) and how many images."""
    m = metrics[SPLITS[0]]
    return {k: m.get(k) for k in ("sampler", "steps", "guidance_scales", "images")}


def _counts(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Images checked per split and guidance scale (a prompt outside the vocabulary would not count)."""
    return {s: {key: (accuracy.get(s) or {}).get("count") for key, accuracy in metrics[s]["synthetic_accuracy"].items()}
            for s in SPLITS}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops the running job and the eval's Ray head, as Ctrl-C
    work = Path(args.work_dir).resolve()
    out_path = Path(args.out or work / "demo_quality.json").resolve()
    overrides = [demo_overrides(seed, work / f"seed-{seed}", args.demo_set) for seed in args.seeds]
    try:
        configs = [load_config(DemoConfig, None, o) for o in overrides]
        # The demo's eval prompts depend only on its config apart from seed and out_dir: the same for every run.
        sets = new_prompt_sets([p["prompt"] for p in eval_prompts(configs[0])], args.prompts_per_split,
                               args.prompt_seed)
    except (ConfigError, ValueError) as err:
        print(f"demo_quality: {err}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    prompt_files = write_prompt_files(work, sets)
    report: dict[str, Any] = {"commit": _commit(), "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds,
                              "demo_set": args.demo_set, "prompts": {k: str(v) for k, v in prompt_files.items()},
                              "prompts_per_split": args.prompts_per_split, "runs": []}
    progress = Progress(total=len(configs), unit="runs")
    _say(f"{len(configs)} runs (seeds {args.seeds}), {args.prompts_per_split} new prompts per split; work dir {work}")
    for done, (cfg, cfg_overrides) in enumerate(zip(configs, overrides), 1):
        started = time.time()
        try:
            summary = train_demo(cfg, cfg_overrides)
            trained = time.time()
            metrics = evaluate(cfg, prompt_files)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as err:  # a job, the Ray head, a missing file
            print(f"demo_quality: seed {cfg.seed}: {err}", file=sys.stderr)
            return FAILED
        except KeyboardInterrupt as stop:
            print(f"demo_quality: {stop or 'stopped'} during seed {cfg.seed}; finished runs are in {out_path}",
                  file=sys.stderr)
            return STOPPED
        figures = run_figures(summary, metrics)
        report["runs"].append({"seed": cfg.seed, "out_dir": cfg.out_dir, "figures": figures,
                               "demo_seconds": summary.get("seconds"), "eval_seconds": round(time.time() - trained, 1),
                               "sampling": _sampling(metrics), "images": _counts(metrics)})
        report["spread"] = aggregate([r["figures"] for r in report["runs"]])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))  # after every run: an interrupted benchmark keeps its runs
        _say(f"seed {cfg.seed} done in {format_duration(time.time() - started)}: " + ", ".join(
            f"{name} {_pct(value)}" for name, value in figures.items()) + f" | {progress.line(done)}")
    table = markdown_table(args.seeds, [r["figures"] for r in report["runs"]], report["spread"])
    sampling = report["runs"][0]["sampling"]
    print(f"\nAll attributes right, share of images; {len(configs)} demo runs at {report['commit']}, "
          f"{sampling['images']} images on {args.prompts_per_split} new seen prompts and as many on new held-out "
          f"ones, sample_eval's defaults ({sampling['sampler']}, {sampling['steps']} steps, guidance "
          f"{sampling['guidance_scales']}); demo columns: the demo's own eval (its own prompts, the same model "
          "defaults).\n")
    print(table)
    print(f"\nreport: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
