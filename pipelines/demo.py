"""The one-command demo: every stage, through the same job scripts users run, on a local Ray head.

    summary = run_demo(DemoConfig(out_dir="demo-output"))

Starts what it needs and stops what it started: the synthetic image server (jobs/serve_synthetic.py) and a
private Ray head (pipelines/core/local_ray.py: a temp dir and a token of its own, 127.0.0.1 only; stopping it never
touches another Ray on the machine, and nothing is read from or written to ~/.ray). Each stage is
`python jobs/<stage>.py --config ... --set ...` with RAY_ADDRESS and the token's path pointing at that head,
exactly as a user would type it; a stage that exits non-zero stops the demo with its name and log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.local_ray import LocalRayHead
from pipelines.core.runtime import REPO_ROOT
from pipelines.synthetic.shapes import caption_for, held_out_attributes, training_attributes

log = logging.getLogger("latentforge.demo")

SUMMARY_FILE = "summary.json"
RUN_NAME = "demo-unet"  # the U-Net run: <out_dir>/runs/<RUN_NAME>/ holds its checkpoints, export and report
# A Ray Train worker's progress line, e.g. "(RayTrainWorker pid=1) ... 20/700 steps (3%), ... | loss 0.9 ...":
# echoed now and then
TRAINING_PROGRESS = re.compile(r"\(RayTrainWorker[^)]*\).*?\s(\d+/\d+ steps .*)")
PROGRESS_EVERY_S = 30.0


class StageFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "demo-output"
    # Seeds everything random the model comes from: the synthetic data (items, jitter, phrasings), the VAE's
    # init and batches, the text encoder's random init, the U-Net's init, batches and noise. 0: the presets' own.
    seed: int = 0
    num_good: int = 1500  # synthetic items served (planted bad ones come on top)
    planted: int = 2  # of each kind of bad item, to show the filters and reports at work
    # Served, downloaded and trained at 32 px: a quarter of the compute of 64 px a step, so both models get
    # enough steps in ~15 minutes on 2 cores (the U-Net's latents: image_size / the tiny VAE's factor 4).
    image_size: int = 32
    # None: the presets' schedules (configs/tiny/train_vae.yaml, configs/tiny-cpu.yaml); a number also sets a
    # 10% warm-up
    vae_steps: int | None = None
    unet_steps: int | None = None
    seen_prompts: int = 30  # seen (colour, shape) combinations evaluated, besides all 30 held-out ones
    images_per_prompt: int = 2
    ray_num_cpus: int = 2
    extra: dict[str, list[str]] = field(default_factory=dict)  # per stage: more --set overrides


def _schedule(steps: int | None, steps_key: str, warmup_key: str) -> list[str]:
    """--set overrides for a step count with a 10% warm-up; none (the preset's schedule) for None."""
    if steps is None:
        return []
    return ["--set", f"{steps_key}={steps}", "--set", f"{warmup_key}={max(1, steps // 10)}"]


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                "RAY_DEDUP_LOGS": "1", **extra})
    return env


def eval_prompts(cfg: DemoConfig) -> list[dict[str, Any]]:
    """All held-out (colour, shape) combinations and a fixed sample of seen ones, canonical captions."""
    import random

    seen = random.Random(0).sample(training_attributes(), cfg.seen_prompts)
    return [{"prompt": caption_for(a), "seed": 1000 + i} for i, a in enumerate(held_out_attributes() + seen)]


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}
        self.head: LocalRayHead | None = None  # the private Ray head the stages run on, while run() runs

    def path(self, name: str) -> str:
        return str(self.out / name)

    # ---- running a job ------------------------------------------------------------------------

    def job(self, stage: str, script: str, *args: str) -> None:
        """Run `python jobs/<script> args...` (or `python -m <module> args...` for a script "-m <module>") with its
        whole output in logs/<stage>.log and the project's own log lines (progress, summaries) echoed here."""
        extra = [a for kv in self.cfg.extra.get(stage, []) for a in ("--set", kv)]
        entry = script.split() if script.startswith("-m ") else [f"jobs/{script}"]
        cmd = [sys.executable, *entry, *args, *extra]
        log_path = self.logs / f"{stage}.log"
        print(f"\n[demo] {stage}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        with open(log_path, "w", buffering=1) as log_file:  # line-buffered: `tail -f` shows progress
            assert self.head is not None, "job() runs inside run()"
            env = self.head.client_env(_child_env(MLFLOW_TRACKING_URI=f"sqlite:///{self.path('mlflow.db')}"))
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            last_progress = 0.0
            for line in proc.stdout:
                log_file.write(line)
                if "latentforge" in line and " INFO " in line or " ERROR " in line:
                    print(f"  {line.rstrip()[-220:]}", flush=True)
                elif (progress := TRAINING_PROGRESS.search(line)) and time.time() - last_progress >= PROGRESS_EVERY_S:
                    last_progress = time.time()  # the training workers' step lines, one every half minute
                    print(f"  {progress.group(1)[:200]}", flush=True)
            code = proc.wait()
        self.timings[stage] = round(time.time() - start, 1)
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            raise StageFailed(f"stage {stage} failed with exit code {code}; full log: {log_path}\n{tail}")
        print(f"[demo] {stage} done in {self.timings[stage]:.0f} s", flush=True)

    # ---- the stages ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        started = time.time()
        server = None
        self.head = LocalRayHead(self.cfg.ray_num_cpus)
        try:
            print(f"[demo] starting a private local Ray head ({self.cfg.ray_num_cpus} CPUs, 127.0.0.1, a token of its "
                  "own) and the synthetic image server", flush=True)
            self.head.start()
            server = self.start_server()
            self.stages()
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
            self.head.stop()
            print("[demo] stopped the image server and the Ray head", flush=True)
        return self.summarize(time.time() - started)

    def start_server(self) -> subprocess.Popen:
        synth = self.out / "synth"
        url_list = synth / "url_list.parquet"
        url_list.unlink(missing_ok=True)
        p = self.cfg.planted
        # Jitter makes every good item its own image (exact dedup would otherwise keep one per combination).
        args = ["--out", str(synth), "--set", f"seed={self.cfg.seed}", "--set", f"num_good={self.cfg.num_good}",
                "--set", f"image_size={self.cfg.image_size}", "--set", "position_jitter=0.05",
                "--set", "color_jitter=12"] + [
            a for kind in ("http_404", "html_page", "truncated_jpeg", "tiny_image", "empty_caption", "duplicate_image")
            for a in ("--set", f"planted.{kind}={p}")]
        server = subprocess.Popen([sys.executable, "jobs/serve_synthetic.py", *args], cwd=REPO_ROOT, env=_child_env(),
                                  stdout=open(self.logs / "serve_synthetic.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not url_list.is_file():  # the server writes the list once it listens
            if server.poll() is not None or time.time() > deadline:
                raise StageFailed(f"the synthetic image server did not start; log: {self.logs / 'serve_synthetic.log'}")
            time.sleep(0.2)
        return server

    def stages(self) -> None:
        from model.encoders import tiny_vae_config, vae_downsample_factor

        c = self.cfg
        size = f"image_size={c.image_size}"
        latent_side = c.image_size // vae_downsample_factor(tiny_vae_config())  # no model built for one number
        self.job("download", "download_data.py", "--config", "configs/tiny/download.yaml", "--set", size,
                 "--set", f"url_list={self.path('synth/url_list.parquet')}", "--set", f"output_dir={self.path('raw')}",
                 "--set", "allow_private_addresses=true")  # the synthetic web is on 127.0.0.1
        self.job("filter", "filter_data.py", "--config", "configs/tiny/filter.yaml",
                 "--set", f"input_dir={self.path('raw')}", "--set", f"output_dir={self.path('filtered')}")
        self.job("train_vae", "train_vae.py", "--config", "configs/tiny/train_vae.yaml", "--set", size,
                 "--set", f"input_dir={self.path('filtered')}", "--set", f"output_dir={self.path('vae')}",
                 "--set", f"storage_path={self.path('runs')}", "--set", f"vae.seed={c.seed}",
                 "--set", f"train.seed={c.seed}",
                 *_schedule(c.vae_steps, "train.steps", "train.warmup_steps"))
        self.job("precompute", "precompute_latents.py", "--config", "configs/tiny/precompute.yaml", "--set", size,
                 "--set", f"input_dir={self.path('filtered')}", "--set", f"output_dir={self.path('features')}",
                 "--set", f"vae.source={self.path('vae')}", "--set", f"text.seed={c.seed}")
        self.job("train_unet", "train_unet.py", "--config", "configs/tiny-cpu.yaml",
                 "--set", f"features_dir={self.path('features')}", "--set", f"storage_path={self.path('runs')}",
                 "--set", f"run_name={RUN_NAME}", "--set", f"seed={c.seed}",
                 *_schedule(c.unet_steps, "max_steps", "lr.warmup_steps"),
                 "--set", f"model.overrides.sample_size={latent_side}",
                 "--set", "mlflow.registered_model=latentforge-demo")
        # The same model as a diffusers StableDiffusionPipeline folder. The tiny preset masks padding tokens
        # (text_mask, for the accuracy figures of docs/benchmarks.md), which diffusers cannot: the copy attends to
        # them, so its images are close to, not equal to, the evaluation's (docs/model.md).
        self.job("export_diffusers", "-m pipelines.inference.diffusers_export", self.model_dir(), self.diffusers_dir(),
                 "--drop-text-mask")
        prompts = self.out / "eval_prompts.jsonl"
        prompts.write_text("".join(json.dumps(p) + "\n" for p in eval_prompts(c)))
        self.job("sample_eval", "sample_eval.py", "--model", self.model_dir(), "--prompts", str(prompts),
                 "--out", self.path("eval"), "--set", f"sampling.images_per_prompt={c.images_per_prompt}")
        # no sampling settings: the evaluation draws with the ones the export carries (configs/tiny-cpu.yaml's
        # samples.sampler), as any user's sample_eval run on this model does

    def model_dir(self) -> str:
        from pipelines.train.worker import EXPORT_DIR

        return self.path(f"runs/{RUN_NAME}/{EXPORT_DIR}")

    def diffusers_dir(self) -> str:
        from pipelines.inference.diffusers_export import DIFFUSERS_EXPORT_DIR

        return self.path(f"runs/{RUN_NAME}/{DIFFUSERS_EXPORT_DIR}")

    # ---- the summary --------------------------------------------------------------------------

    def _report(self, relative: str) -> Any:
        path = self.out / relative
        return json.loads(path.read_text()) if path.is_file() else None

    def summarize(self, seconds: float) -> dict[str, Any]:
        from pipelines.data import download
        from pipelines.data.filter import config as filter_config
        from pipelines.data.precompute import config as precompute_config
        from pipelines.eval.driver import METRICS_FILE
        from pipelines.eval.outputs import guidance_key
        from pipelines.train import driver as unet_driver
        from pipelines.vae import model as vae_model

        metrics = self._report(f"eval/{METRICS_FILE}") or {}
        key = guidance_key(metrics["guidance_scales"][0]) if metrics else ""  # the one scale the model recommends
        accuracy = metrics.get("synthetic_accuracy", {}).get(key, {})
        train = self._report(f"runs/{RUN_NAME}/{unet_driver.REPORT_FILE}") or {}
        db = self.path("mlflow.db")
        summary = {
            "ok": True, "seconds": round(seconds, 1), "stage_seconds": self.timings,
            "accuracy": {split: {k: (accuracy.get(split) or {}).get(k) for k in
                                 ("count", "all_correct", "color", "shape", "size", "position")}
                         for split in ("seen", "held_out")},
            "final_loss": train.get("final_loss"),
            "model_dir": self.model_dir(),
            "diffusers_dir": self.diffusers_dir(),  # StableDiffusionPipeline.from_pretrained(diffusers_dir)
            "sample_grid": str(self.out / "eval" / metrics.get("grids", {}).get(key, "")),
            "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000",
            "stage_reports": {
                "download": self._report(f"raw/{download.REPORT_FILE}"),
                "filter": self._report(f"filtered/{filter_config.REPORT_FILE}"),
                "train_vae": self._report(f"vae/{vae_model.REPORT_FILE}"),
                "precompute": self._report(f"features/{precompute_config.REPORT_FILE}"),
                "train_unet": train,
                "sample_eval": {k: metrics.get(k) for k in ("images", "prompts", "sampler", "steps",
                                                            "guidance_scales", "guidance_rescale", "timing")},
            },
            "config": asdict(self.cfg),
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def print_summary(summary: dict[str, Any], out_dir: str) -> None:
    acc = summary["accuracy"]

    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    print("\n[demo] finished in {:.1f} min".format(summary["seconds"] / 60))
    for stage, seconds in summary["stage_seconds"].items():
        print(f"  {stage:<12} {seconds:7.1f} s")
    print(f"  final training loss: {summary['final_loss']}")
    for split in ("seen", "held_out"):
        a = acc[split]
        print(f"  {split:<9} all attributes correct: {pct(a['all_correct'])} of {a['count']} images "
              f"(colour {pct(a['color'])}, shape {pct(a['shape'])}, size {pct(a['size'])}, "
              f"position {pct(a['position'])})")
    print(f"  model:        {summary['model_dir']}")
    print(f"  diffusers:    {summary['diffusers_dir']}   (StableDiffusionPipeline.from_pretrained)")
    print(f"  sample grid:  {summary['sample_grid']}")
    print(f"  summary:      {Path(out_dir).resolve() / SUMMARY_FILE}")
    print(f"  MLflow UI:    {summary['mlflow_ui']}   (then open http://127.0.0.1:5000)")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` cleans up like Ctrl-C: server and Ray head stop
    summary = Demo(cfg).run()
    print_summary(summary, cfg.out_dir)
    return summary
