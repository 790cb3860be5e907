"""What both training jobs (U-Net and VAE) take from Ray Train: the worker scaling settings, the trainer, and
how a run ends on an error that a restart would only repeat.

    trainer = build_torch_trainer(train_loop_per_worker, {"cfg": ...}, cfg.scaling, run_name="r",
                                  storage_path="/abs/runs", keep_checkpoints=3, max_failures=1)
    result = fit(trainer)          # raises RunStoppedError when a worker raised a FinalTrainingError

Ray Train (2.60, Train v2) restarts the worker group after ANY exception in a worker, up to
FailureConfig.max_failures: it cannot tell a lost node from a diverged run. So the worker loop that
build_torch_trainer runs ends on a FinalTrainingError by returning it (as a `Stopped`) instead of raising:
Ray sees a finished run, restarts nothing, and hands rank 0's return value to the driver
(`Result.return_value`, public API), where `fit` raises it. A final error must be raised on every rank at the
same point (e.g. a verdict all ranks agreed on): a rank that returns while another waits in a collective
would leave that one hanging.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.core.config import ConfigError

# Ray's placement strategies for the worker group's bundles (one per worker).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker and NCCL; else CPU workers and gloo
    cpus_per_worker: float = 1.0  # also the worker's OpenMP thread count
    # PACK fills a node before the next (8 GPUs of a node on NVLink); STRICT_SPREAD puts no two workers on
    # one node (one GPU per node, or a test that loses a node)
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"scaling.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                              f"got {self.placement_strategy!r}")


class FinalTrainingError(RuntimeError):
    """An error a restart would only repeat (the run diverged): it ends the run at once, whatever max_failures."""


class RunStoppedError(RuntimeError):
    """Raised by `fit` on the driver: a worker ended the run with a FinalTrainingError (the message is its own)."""


@dataclass(frozen=True)
class Stopped:
    """What a worker loop returns instead of raising a FinalTrainingError."""

    reason: str  # "<error type>: <message>", one line


def _until_final(loop: Callable[[dict], Any], config: dict) -> Any:
    try:
        return loop(config)
    except FinalTrainingError as err:
        return Stopped(f"{type(err).__name__}: {' '.join(str(err).split())}")


def fit(trainer: Any) -> Any:
    """trainer.fit(), raising RunStoppedError when the workers stopped on a FinalTrainingError."""
    result = trainer.fit()
    if isinstance(result.return_value, Stopped):
        raise RunStoppedError(result.return_value.reason)
    return result


def worker_env(scaling: ScalingSettings) -> dict[str, str]:
    """One OpenMP/MKL thread per CPU Ray gives a worker (torch would otherwise start one per core and
    the workers would oversubscribe), and no GPU probing by DeepSpeed on CPU workers."""
    threads = str(max(1, int(scaling.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if not scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def process_group_backend(scaling: ScalingSettings) -> str:
    """NCCL for CUDA tensors on GPU workers, and gloo for CPU tensors everywhere: NCCL alone has no CPU
    backend, so any collective on a CPU tensor (a library's, or a host-side flag) would fail there."""
    return "cpu:gloo,cuda:nccl" if scaling.use_gpu else "gloo"


def build_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], scaling: ScalingSettings,
                        run_name: str, storage_path: str, keep_checkpoints: int, max_failures: int):
    """A TorchTrainer; a rerun with the same run_name and storage_path resumes from its latest checkpoint.
    storage_path must be absolute or a URI (Ray Train refuses a relative one). Run it with `fit` (above): the
    loop returns a FinalTrainingError rather than raising it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        functools.partial(_until_final, loop),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend=process_group_backend(scaling)),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env(scaling)}),
    )
