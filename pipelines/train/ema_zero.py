"""EMA of a DeepSpeed-trained model's weights under ZeRO stages 0-3, without communication per update.

    ema = ShardedEMA(engine, EMAConfig(max_decay=0.9999, start_step=1000))
    ...
    engine.step(); ema.update(step)
    torch.save(ema.state_dict(), f"{ckpt}/ema_rank{rank}.pt")      # EVERY rank, its own file
    weights = ema.full_state_dict()                                 # collective: call on EVERY rank
    with ema.swapped_in(): sample(engine.module)                    # eval with EMA weights (collective)

ZeRO-1/2 (and no ZeRO): parameters are whole on every rank, so the EMA (model/ema.py) runs over the
module's own parameters and buffers; every rank holds the same shadow.

ZeRO-3: `param.data` is an empty placeholder and each rank owns a flat slice of every parameter,
`param.ds_tensor`. The layout (deepspeed.runtime.zero.partition_parameters._partition_param) is: the
flattened parameter padded to `ds_numel_aligned`, cut into `world` equal slices of `ds_tensor.ds_numel`
elements, rank r holding slice r. Small "persistent" parameters (stage3_param_persistence_threshold) are
partitioned the same way, they only also stay whole in `param.data`. The EMA is kept over these local
slices (float32), so an update touches only local memory, and the optimizer, which writes its result
into `ds_tensor`, is read directly (the update really follows the partitioned weights).
- `full_state_dict()` all-gathers the shadow slices (over each parameter's ds_process_group), drops the
  padding and reshapes: it does not touch the model.
- `swapped_in()` writes the shadow into the partitions (and into `param.data` wherever it is whole), so a
  forward pass (which gathers from the partitions) runs on the EMA weights; the training weights are
  restored on exit.

Checkpoints: under ZeRO-3 `state_dict()` is this rank's shard only; each rank must save its own file and
load it back with the same world size and rank (checked: a mismatch is an error). For a world-size
independent copy, save `full_state_dict()` from rank 0 (it is also what export wants).
Buffers are not partitioned by ZeRO-3: exports carry the module's current buffers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from model.ema import EMA, EMAConfig


def _module_of(engine_or_module: Any) -> nn.Module:
    module = getattr(engine_or_module, "module", engine_or_module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a DeepSpeed engine or nn.Module, got {type(engine_or_module).__name__}")
    return module


def is_zero3_partitioned(module: nn.Module) -> bool:
    """True when the module's parameters are ZeRO-3 partitioned (each carries a ds_tensor slice)."""
    flags = {getattr(p, "ds_tensor", None) is not None for p in module.parameters()}
    if len(flags) > 1:
        raise ValueError("some parameters are ZeRO-3 partitioned and some are not")
    return flags == {True}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEMA:
    """EMA of `engine.module` that works for ZeRO stages 0, 1, 2 (whole weights) and 3 (local slices).

    Build it after `deepspeed.initialize` (the partitions exist then). device: where the shadow lives
    (None: next to each parameter / partition; "cpu" keeps it off the accelerator).
    """

    def __init__(self, engine_or_module: Any, config: EMAConfig = EMAConfig(),
                 device: torch.device | str | None = None) -> None:
        self.module = _module_of(engine_or_module)
        self.zero3 = is_zero3_partitioned(self.module)
        self.rank, self.world_size = _rank_world()
        self.ema = EMA(self._source(), config, device=device)

    @property
    def config(self) -> EMAConfig:
        return self.ema.config

    def _source(self):
        if not self.zero3:
            return self.module
        return [(name, p.ds_tensor) for name, p in self.module.named_parameters()]

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Move the shadow toward the current weights (local, no communication); returns the decay."""
        return self.ema.update(self._source(), step)

    # --- per-rank checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's state. Under ZeRO-3 it is the rank's SHARD: save one file per rank."""
        return {"ema": self.ema.state_dict(), "zero3": self.zero3, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if bool(state.get("zero3")) != self.zero3:
            raise ValueError(f"EMA state was saved with zero3={state.get('zero3')}, this run has "
                             f"zero3={self.zero3}: load the exported full weights instead")
        if self.zero3 and (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise ValueError(
                f"ZeRO-3 EMA shard of rank {state.get('rank')}/{state.get('world_size')} cannot be loaded "
                f"on rank {self.rank}/{self.world_size}: each rank loads its own file, same world size")
        self.ema.load_state_dict(state["ema"])

    # --- full weights ------------------------------------------------------------------------------------

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = False, include_buffers: bool = True) -> dict[str, torch.Tensor]:
        """The complete EMA weights (float32, on CPU), keyed like `module.state_dict()`.

        Collective under ZeRO-3: every rank must call it. rank0_only: other ranks get {}.
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            out[name] = self._full_param(name, p).cpu()
        if include_buffers:
            buffers = self.ema.buffers if not self.zero3 else dict(self.module.named_buffers())
            for name, b in buffers.items():
                out[name] = b.detach().cpu().clone()
        if rank0_only and self.rank != 0:
            return {}
        return out

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Inside the block the module computes with the EMA weights; training weights come back after.

        Collective under ZeRO-3 (call on every rank). Do not step the optimizer inside.
        Under ZeRO-3 a parameter may also be whole in `param.data` (persistent ones, and gathered ones
        DeepSpeed keeps for reuse, e.g. after a forward pass): those copies are overwritten too, on entry
        and on exit, one parameter at a time (never the whole model gathered at once).
        """
        params = list(self.module.named_parameters())
        with torch.no_grad():
            if self.zero3:
                saved = [p.ds_tensor.detach().clone() for _, p in params]
                for name, p in params:
                    self._write_partition(p, self.ema.shadow[name])
            else:
                saved = [p.detach().clone() for _, p in params]
                self.ema.copy_to(self.module)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for (_, p), part in zip(params, saved):
                    if self.zero3:
                        self._write_partition(p, part)
                    else:
                        p.copy_(part)

    def _write_partition(self, p: nn.Parameter, shard: torch.Tensor) -> None:
        """ZeRO-3: set this rank's slice, and the whole `param.data` where it is materialised (collective)."""
        full = self._gather_shards(p, shard)
        p.ds_tensor.copy_(shard)
        if p.data.numel() == p.ds_numel:
            p.data.copy_(full)

    def _full_param(self, name: str, p: nn.Parameter) -> torch.Tensor:
        shard = self.ema.shadow[name]
        if not self.zero3:
            return shard.clone()
        return self._gather_shards(p, shard)

    @staticmethod
    def _gather_shards(p: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """All ranks' slices of parameter p (this rank's is `shard`) as the whole tensor (collective)."""
        group = getattr(p, "ds_process_group", None)
        world = dist.get_world_size(group=group) if dist.is_initialized() else 1
        parts = [torch.empty_like(shard) for _ in range(world)]
        if world == 1:
            parts[0].copy_(shard)
        else:
            dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
