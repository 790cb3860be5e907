"""EMA of a DeepSpeed run's fp32 master weights, sharded like the masters, updated without communication.

    ema = ShardedEMA(engine, EMAConfig(max_decay=0.9999, start_step=1000))
    ...
    engine.step(); ema.update(step)                                 # local: each rank its own fragment
    state = ema.state_dict()                                        # EVERY rank, into its checkpoint part
    weights = ema.full_state_dict(rank0_only=True)                  # collective: call on EVERY rank
    with ema.swapped_in(): sample(engine.module)                    # EMA weights in the module (collective)

What is averaged is the optimizer's fp32 master copy, not `engine.module`'s parameters: under bf16 those
are the masters rounded to 8 mantissa bits, and an EMA over them would average the rounding. Under ZeRO
each rank's optimizer owns the masters of one fragment of every parameter (possibly empty), so each rank
keeps the EMA of its own fragment: 4 bytes x parameters / world size. Where a rank's masters are
(DeepSpeed's own mapping; the views are fetched again at every update, since DeepSpeed relinks them when it
loads a checkpoint or reloads offloaded states):

- ZeRO-1/2 (DeepSpeedZeroOptimizer, and BF16_Optimizer for ZeRO-1 + bf16 + fp32 gradient accumulation):
  each parameter carries `_hp_mapping` (deepspeed/utils/tensor_fragment.py), None where this rank owns
  none of it: `lp_fragment_address` is the owned (start, numel) range of the flattened parameter and
  `get_hp_fragment()` the fp32 view of it inside the optimizer's flat partition. The fragments of the
  ranks of `_dp_group` tile the parameter.
- ZeRO-3: rank r of the parameter's `ds_process_group` owns elements [r*n, (r+1)*n) of the flattened
  parameter, n = `ds_tensor.ds_numel` (the last slice is padded past `ds_numel`; the padding is not
  averaged). `ds_tensor` is the bf16 copy under bf16; deepspeed.utils.safe_get_local_fp32_param gives the
  fp32 master of the same slice (a view into the optimizer's fp32_partitioned_groups_flat; a copy on the
  accelerator when the optimizer is offloaded).
- No ZeRO optimizer (a plain module): the parameters themselves, whole on every rank.

fp32 runs take the same path: the masters are then fp32 copies (ZeRO-1/2) or the partitions themselves (ZeRO-3).

- `full_state_dict()` assembles each parameter from every rank's fragment (one all-reduce of a zero-filled
  float32 buffer per parameter), on CPU.
- `swapped_in()` writes the assembled EMA into the module's weights (whole under ZeRO-1/2; this rank's
  partition, and `param.data` wherever it is whole, under ZeRO-3) and puts the training weights back on exit.
- `state_dict()` is this rank's fragments: each rank saves its own file and loads it back with the same world
  size, rank and ZeRO stage (a mismatch is a ValueError). `full_state_dict()` is the copy that does not
  depend on the world size (what export wants).

Every parameter must be trainable: a frozen one has no fp32 master. Buffers are not averaged; exports carry
the module's current buffers.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from model.ema import EMA, EMAConfig

NamedParams = list[tuple[str, nn.Parameter]]


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


def _accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of a flattened parameter: the part whose fp32 master this rank owns.

    group: the ranks whose fragments tile the parameter exactly once; None when every rank owns it whole.
    """

    start: int
    numel: int
    shape: torch.Size  # the whole parameter's
    group: Any = None


def _assemble(frag: Fragment, local: torch.Tensor | None, device: torch.device | None) -> torch.Tensor:
    """The whole parameter, float32 of `frag.shape`, from every rank's `local` fragment (collective over
    frag.group). local: (frag.numel,), None where the fragment is empty."""
    if frag.group is None:
        return local.view(frag.shape)
    whole = torch.zeros(math.prod(frag.shape), dtype=torch.float32, device=device)
    if frag.numel:
        whole.narrow(0, frag.start, frag.numel).copy_(local)
    # Exactly one rank holds each element and the others add 0, so the sum is that rank's value, exactly.
    dist.all_reduce(whole, group=frag.group)
    return whole.view(frag.shape)


class _Layout(abc.ABC):
    """Where this rank's fp32 masters are, per parameter, and how the module's weights are swapped."""

    kind: str
    fragments: dict[str, Fragment]
    comm_device: torch.device | None  # where fragments are assembled (None: never, they are whole)

    def __init__(self, params: NamedParams) -> None:
        self.params = params

    def masters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, this rank's fp32 masters as a 1-D view) for every parameter of which it owns a part."""
        return [(name, self._master(name, p)) for name, p in self.params if self.fragments[name].numel]

    @abc.abstractmethod
    def _master(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """Each layout (whole, ZeRO-1/2 fragments, ZeRO-3 partitions) defines it."""

    # The module's weights, for swapped_in.
    @abc.abstractmethod
    def training_copy(self, p: nn.Parameter) -> torch.Tensor:
        """Each layout (whole, ZeRO-1/2 fragments, ZeRO-3 partitions) defines it."""

    @abc.abstractmethod
    def set_weights(self, name: str, p: nn.Parameter, whole: torch.Tensor) -> None:
        """Each layout (whole, ZeRO-1/2 fragments, ZeRO-3 partitions) defines it."""

    @abc.abstractmethod
    def restore_weights(self, name: str, p: nn.Parameter, copy: torch.Tensor) -> None:
        """Each layout (whole, ZeRO-1/2 fragments, ZeRO-3 partitions) defines it."""


class _WholeLayout(_Layout):
    """No ZeRO optimizer: the parameters are the masters, whole on every rank."""

    kind = "whole"

    def __init__(self, params: NamedParams) -> None:
        super().__init__(params)
        self.fragments = {name: Fragment(0, p.numel(), p.shape) for name, p in params}
        self.comm_device = None

    def _master(self, name: str, p: nn.Parameter) -> torch.Tensor:
        return p.detach().view(-1)

    # Here and under ZeRO-1/2 the module's weights are whole on every rank.
    def training_copy(self, p: nn.Parameter) -> torch.Tensor:
        return p.detach().clone()

    def set_weights(self, name: str, p: nn.Parameter, whole: torch.Tensor) -> None:
        p.copy_(whole)  # casts to the module's dtype

    def restore_weights(self, name: str, p: nn.Parameter, copy: torch.Tensor) -> None:
        p.copy_(copy)


class _Zero12Layout(_WholeLayout):
    """ZeRO-1/2 and BF16_Optimizer: whole module weights; fp32 masters split as `_hp_mapping` says."""

    kind = "zero1/2"

    def __init__(self, params: NamedParams) -> None:
        _Layout.__init__(self, params)
        self.fragments = {name: self._fragment(p) for name, p in params}
        self.comm_device = _accelerator_device()

    @staticmethod
    def _fragment(p: nn.Parameter) -> Fragment:
        mapping = p._hp_mapping
        if mapping is None:  # other ranks own all of it
            return Fragment(0, 0, p.shape, p._dp_group)
        address = mapping.lp_fragment_address
        return Fragment(address.start, address.numel, p.shape, p._dp_group)

    def _master(self, name: str, p: nn.Parameter) -> torch.Tensor:
        return p._hp_mapping.get_hp_fragment()  # (numel,) float32 view into the optimizer's flat partition


class _Zero3Layout(_Layout):
    """ZeRO-3: the module holds this rank's slice (`ds_tensor`, bf16 under bf16); the optimizer holds the
    fp32 master of the same slice."""

    kind = "zero3"

    def __init__(self, params: NamedParams) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        missing = [name for name, p in params if getattr(p, "_z3_optimizer", None) is None]
        if missing:
            raise ValueError(f"ZeRO-3 parameters {missing[:3]} have no ZeRO-3 optimizer (so no fp32 masters): "
                             "build ShardedEMA from an engine initialized with an optimizer")
        super().__init__(params)
        self._local_fp32 = safe_get_local_fp32_param
        self.fragments = {name: self._fragment(p) for name, p in params}
        self.comm_device = _accelerator_device()

    @staticmethod
    def _fragment(p: nn.Parameter) -> Fragment:
        size = p.ds_tensor.ds_numel  # per rank, padding included
        start = min(dist.get_rank(group=p.ds_process_group) * size, p.ds_numel)
        return Fragment(start, min(size, p.ds_numel - start), p.ds_shape, p.ds_process_group)

    def _master(self, name: str, p: nn.Parameter) -> torch.Tensor:
        return self._local_fp32(p).narrow(0, 0, self.fragments[name].numel)  # the padding dropped

    def training_copy(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor.detach().clone()  # (ds_tensor.ds_numel,) in the module's dtype

    def set_weights(self, name: str, p: nn.Parameter, whole: torch.Tensor) -> None:
        """This rank's slice (what a forward pass gathers from) and `param.data` where it is whole (persistent
        parameters, and gathered ones DeepSpeed keeps for reuse)."""
        frag = self.fragments[name]
        p.ds_tensor.narrow(0, 0, frag.numel).copy_(whole.view(-1).narrow(0, frag.start, frag.numel))
        if p.data.numel() == p.ds_numel:
            p.data.copy_(whole)

    def restore_weights(self, name: str, p: nn.Parameter, copy: torch.Tensor) -> None:
        """Collective: `param.data` may have become whole inside the block, so the slices are assembled again."""
        frag = self.fragments[name]
        whole = _assemble(frag, copy.narrow(0, 0, frag.numel).float(), self.comm_device)
        p.ds_tensor.copy_(copy)
        if p.data.numel() == p.ds_numel:
            p.data.copy_(whole)


_LAYOUTS = {layout.kind: layout for layout in (_WholeLayout, _Zero12Layout, _Zero3Layout)}


def _kind(p: nn.Parameter) -> str:
    if getattr(p, "ds_tensor", None) is not None:
        return _Zero3Layout.kind
    if hasattr(p, "_hp_mapping"):  # set (possibly to None) by ZeRO-1/2's and BF16_Optimizer's link_hp_params
        return _Zero12Layout.kind
    return _WholeLayout.kind


def master_layout(module: nn.Module) -> _Layout:
    """Where this rank's fp32 masters of `module` are, from what DeepSpeed attached to its parameters."""
    params = list(module.named_parameters())
    frozen = [name for name, p in params if not p.requires_grad]
    if frozen:
        raise ValueError(f"ShardedEMA averages the optimizer's fp32 masters, which frozen parameters do not have: "
                         f"{frozen[:5]}")
    kinds = sorted({_kind(p) for _, p in params})
    if len(kinds) > 1:
        raise ValueError(f"the module's parameters are stored in different ways ({kinds}): one DeepSpeed engine "
                         "owns all of them, or none")
    return _LAYOUTS[kinds[0] if kinds else _WholeLayout.kind](params)


def _zero_stage(engine_or_module: Any, kind: str) -> int | None:
    stage = getattr(engine_or_module, "zero_optimization_stage", None)
    if callable(stage):
        return int(stage())
    return {_Zero3Layout.kind: 3, _WholeLayout.kind: 0}.get(kind)


class ShardedEMA:
    """EMA of the fp32 masters of `engine.module`, each rank its own fragment (ZeRO-1, 2, 3, or none).

    Build it after `deepspeed.initialize` (the optimizer owns the masters then). device: where the shadow
    lives (None: next to each master fragment; "cpu" keeps it off the accelerator).
    """

    def __init__(self, engine_or_module: Any, config: EMAConfig = EMAConfig(),
                 device: torch.device | str | None = None) -> None:
        self.module = _module_of(engine_or_module)
        self.layout = master_layout(self.module)
        self.zero_stage = _zero_stage(engine_or_module, self.layout.kind)
        self.rank, self.world_size = _rank_world()
        self.ema = EMA(self.layout.masters(), config, device=device)  # shadow: name -> (fragment numel,) fp32

    @property
    def config(self) -> EMAConfig:
        return self.ema.config

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Move the shadow toward the current fp32 masters (local, no communication); returns the decay.
        Call it after `engine.step()`."""
        return self.ema.update(self.layout.masters(), step)

    # --- per-rank checkpoint state ---------------------------------------------------------------------

    def _partitioned(self) -> bool:
        return self.layout.kind != _WholeLayout.kind

    def _setup(self) -> dict[str, Any]:
        """What a state must have been saved under to load here."""
        setup = {"layout": self.layout.kind, "zero_stage": self.zero_stage}
        if self._partitioned():
            setup.update(world_size=self.world_size, rank=self.rank)
        return setup

    def _fragment_table(self) -> dict[str, tuple[int, int]]:
        return {name: (f.start, f.numel) for name, f in self.layout.fragments.items()}

    def state_dict(self) -> dict[str, Any]:
        """This rank's fragments of the EMA: every rank saves its own file."""
        return {"ema": self.ema.state_dict(), "layout": self.layout.kind, "zero_stage": self.zero_stage,
                "rank": self.rank, "world_size": self.world_size, "fragments": self._fragment_table()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load this rank's own file, saved with the same world size and ZeRO stage (a ValueError otherwise)."""
        if "fragments" not in state:
            raise ValueError("not a ShardedEMA state of fp32 master fragments (no 'fragments' entry): "
                             "load exported full weights into a new run instead")
        ours = self._setup()
        saved = {key: state.get(key) for key in ours}
        if saved != ours:
            raise ValueError(f"EMA state saved with {saved} cannot be loaded here ({ours}): each rank loads the "
                             "file it saved, under the same ZeRO stage and world size; to change them, start "
                             "from the exported full weights")
        # (start, numel) pairs come back from the checkpoint's JSON as lists
        if {name: tuple(f) for name, f in state["fragments"].items()} != self._fragment_table():
            raise ValueError("the EMA state's fp32 master fragments differ from this run's (another model, or "
                             "other DeepSpeed partitioning settings): start from the exported full weights")
        self.ema.load_state_dict(state["ema"])

    @torch.no_grad()
    def load_resharded(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Load the EMA that EVERY rank of a run with another world size (or ZeRO stage) saved: each
        parameter is put together from the saved fragments, and this rank keeps its own fragment of it.
        Exact: the values are copied, never recomputed. No communication; each rank reads all the files."""
        if not states or any("fragments" not in state for state in states):
            raise ValueError("not the ShardedEMA states of every rank (a rank's file is missing or has no "
                             "'fragments' entry)")
        if states[0]["layout"] == _WholeLayout.kind:
            states = states[:1]  # every rank saved the whole parameters
        shadow = {}
        for name, frag in self.layout.fragments.items():
            if name not in self.ema.shadow:  # this rank owns none of it
                continue
            whole = torch.zeros(math.prod(frag.shape), dtype=torch.float32)
            covered = 0
            for state in states:
                start, numel = state["fragments"][name]
                if numel:
                    whole.narrow(0, start, numel).copy_(state["ema"]["shadow"][name].reshape(-1))
                    covered += numel
            if covered != whole.numel():
                raise ValueError(f"the saved EMA fragments of {name} cover {covered} of its {whole.numel()} "
                                 "elements: a rank's file is missing or from another checkpoint")
            shadow[name] = whole.narrow(0, frag.start, frag.numel) if frag.group is not None else whole
        self.ema.load_state_dict({**states[0]["ema"], "shadow": shadow})

    # --- full weights ------------------------------------------------------------------------------------

    def _whole(self, name: str) -> torch.Tensor:
        """Parameter `name`'s EMA, whole and float32 (collective)."""
        return _assemble(self.layout.fragments[name], self.ema.shadow.get(name), self.layout.comm_device)

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = False, include_buffers: bool = True) -> dict[str, torch.Tensor]:
        """The complete EMA weights (float32, on CPU), keyed like `module.state_dict()`.

        Collective: every rank must call it. rank0_only: other ranks get {}.
        """
        keep = not rank0_only or self.rank == 0
        out: dict[str, torch.Tensor] = {}
        for name, _ in self.layout.params:
            whole = self._whole(name)
            if keep:
                out[name] = whole.to("cpu", copy=True)
        if keep and include_buffers:
            out.update({name: b.detach().to("cpu", copy=True) for name, b in self.module.named_buffers()})
        return out

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Inside the block the module computes with the EMA weights; the training weights come back after.

        Collective (every rank enters, also those that do not compute). Do not step the optimizer inside.
        The fp32 masters are not touched. Memory: a copy of the module's training weights (ZeRO-1/2: whole;
        ZeRO-3: this rank's slices) plus one whole parameter at a time, never the whole model gathered.
        """
        layout = self.layout
        with torch.no_grad():
            saved = [layout.training_copy(p) for _, p in layout.params]
            for name, p in layout.params:
                layout.set_weights(name, p, self._whole(name))
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for (name, p), copy in zip(layout.params, saved):
                    layout.restore_weights(name, p, copy)
