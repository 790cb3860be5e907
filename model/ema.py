"""Exponential moving average (EMA) of model weights.

The shadow copy is kept in float32 whatever the training dtype is, because averaging bf16/fp16
weights with a decay of 0.9999 would round every update away.

Decay schedule (one formula, documented here and in `EMAConfig.decay_at`):

    k       = step - start_step                      # updates since averaging started
    decay_k = min(max_decay, (1 + k) / (10 + k))     # 0.1, 0.18, 0.25, ... -> max_decay

Before `start_step` the shadow simply copies the weights, so early, fast-changing weights do not
leave a long tail in the average. The warm-up keeps the average from being dominated by its
initial value when training is short (the same rule diffusers and many SD trainers use).

`update` and `copy_to` accept either an `nn.Module` or an iterable of `(name, tensor)` pairs, so a
caller that owns the parameters in another form (for example the fp32 master fragments a ZeRO rank
owns) can feed them in without this module knowing about DeepSpeed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

import torch
from torch import nn

NamedTensors = Iterable[tuple[str, torch.Tensor]]
ModelLike = Union[nn.Module, NamedTensors]


@dataclass(frozen=True)
class EMAConfig:
    max_decay: float = 0.9999
    # Steps (as passed to `update`) before which the shadow is a plain copy of the weights.
    start_step: int = 0
    # False: constant `max_decay` from start_step on (useful for tests and fine-tuning).
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_decay < 1.0:
            raise ValueError(f"EMAConfig.max_decay must be in [0, 1), got {self.max_decay}")
        if self.start_step < 0:
            raise ValueError(f"EMAConfig.start_step must be >= 0, got {self.start_step}")

    def decay_at(self, step: int) -> float:
        """Decay used by `update(model, step)`; 0.0 means 'copy the weights'."""
        if step < self.start_step:
            return 0.0
        if not self.warmup:
            return self.max_decay
        k = step - self.start_step
        return min(self.max_decay, (1.0 + k) / (10.0 + k))


def _split(model: ModelLike) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(named parameters, named buffers); a plain iterable is treated as parameters only."""
    if isinstance(model, nn.Module):
        return list(model.named_parameters()), list(model.named_buffers())
    return list(model), []


class EMA:
    """Float32 shadow of a module's parameters, plus a copy of its buffers.

    device: where the shadow lives; None keeps each tensor on its parameter's device
    (pass "cpu" to keep the shadow off the accelerator).
    """

    def __init__(self, model: ModelLike, config: EMAConfig = EMAConfig(),
                 device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = None if device is None else torch.device(device)
        params, buffers = _split(model)
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: self._fp32_copy(p) for name, p in params}
            self.buffers: dict[str, torch.Tensor] = {
                name: b.detach().to(self._device_for(b), copy=True) for name, b in buffers}
        self.last_step: int | None = None  # step of the last update, None before the first
        self.last_decay: float | None = None

    def _device_for(self, t: torch.Tensor) -> torch.device:
        return t.device if self.device is None else self.device

    def _fp32_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self._device_for(t), torch.float32, copy=True)

    def _shadow_list(self, names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in names if n not in self.shadow]
        if missing:
            raise KeyError(f"EMA has no shadow for parameter(s) {missing[:5]}; "
                           f"was it built from a different model?")
        return [self.shadow[n] for n in names]

    @torch.no_grad()
    def update(self, model: ModelLike, step: int) -> float:
        """Move the shadow toward the current weights; returns the decay used."""
        decay = self.config.decay_at(step)
        params, buffers = _split(model)
        names = [n for n, _ in params]
        shadow = self._shadow_list(names)
        # Cast/move once so _foreach_lerp_ sees matching dtype and device pairs.
        current = [p.detach().to(s.device, torch.float32) for (_, p), s in zip(params, shadow)]
        if not shadow:
            pass  # nothing to average (a ZeRO rank that owns no master fragment); _foreach_* refuse empty lists
        elif decay == 0.0:
            torch._foreach_copy_(shadow, current)
        else:
            # lerp_(x, w): s += w * (x - s)  ==  decay * s + (1 - decay) * x
            torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for name, b in buffers:
            # Buffers (BatchNorm stats, fixed tables) are not averaged, just mirrored.
            if name in self.buffers:
                self.buffers[name].copy_(b.detach())
            else:
                self.buffers[name] = b.detach().to(self._device_for(b), copy=True)
        self.last_step, self.last_decay = step, decay
        return decay

    @torch.no_grad()
    def copy_to(self, model: ModelLike) -> None:
        """Write the shadow (cast to each parameter's dtype/device) into `model` in place."""
        params, buffers = _split(model)
        targets = [p for _, p in params]
        sources = self._shadow_list([n for n, _ in params])
        for t, s in zip(targets, sources):
            t.copy_(s)  # copy_ casts dtype and moves device
        for name, b in buffers:
            if name in self.buffers:
                b.copy_(self.buffers[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
            "last_step": self.last_step,
            "last_decay": self.last_decay,
            "config": dataclasses.asdict(self.config),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore shadow, buffers, step and decay settings.

        Names must match this EMA's (built from the same model), like nn.Module's strict load;
        the loaded values are copied into the existing tensors so their device is kept.
        """
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra, missing = set(shadow) - set(self.shadow), set(self.shadow) - set(shadow)
            raise KeyError(f"EMA state does not match: unexpected {sorted(extra)[:5]}, "
                           f"missing {sorted(missing)[:5]}")
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        for name, value in state.get("buffers", {}).items():
            if name in self.buffers:
                self.buffers[name].copy_(value)
            else:
                self.buffers[name] = value.detach().to(self._device_for(value), copy=True)
        self.config = EMAConfig(**state["config"])
        self.last_step = state.get("last_step")
        self.last_decay = state.get("last_decay")
