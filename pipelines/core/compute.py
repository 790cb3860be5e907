"""How a stage asks Ray for compute. One vocabulary for every actor pool (the encoders of precompute, the
samplers of evaluation, the CLIP scorer of the filter): `compute.actors`, `compute.num_cpus_per_actor`,
`compute.num_gpus_per_actor`, `compute.batch_size`. Training asks Ray Train for a worker group instead
(`scaling.*`, pipelines/core/ray_train.py): workers that train one model together, not a pool of copies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActorPool:
    actors: int = 1  # pool size: one model load each
    num_cpus_per_actor: float = 0.5  # fractional on small machines: whole CPUs starve the read tasks
    num_gpus_per_actor: float = 0.0  # > 0 runs the model on CUDA
    batch_size: int = 32  # rows per model call

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError(f"actors and batch_size must be >= 1, got {self.actors} and {self.batch_size}")
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise ValueError("num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0")
