"""The three roles of DMD (teacher, student, fake) over one backbone.

`LoraRoles`: student and fake are two peft LoRA adapters on one frozen base; the teacher is the base with
adapters off. Memory is one base plus two small adapters and their optimizer states.
`FullRoles`: three full copies (teacher frozen), for small models or when LoRA capacity is not enough.
Both initialise student and fake as the teacher (Algorithm 1, lines 2-3).
"""

from __future__ import annotations

import copy
import functools
import warnings
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor, nn

from .config import ConfigError

ROLES = ("teacher", "student", "fake")
TRAINABLE_ROLES = ("student", "fake")


class Roles(ABC):
    """Selects which weights a forward pass of the backbone uses."""

    @abstractmethod
    def activate(self, role: str) -> nn.Module:
        """Put `role`'s weights in use (for every later call of the backbone, until another role is activated)
        and return the (unwrapped) module that computes it."""

    @abstractmethod
    def trainable_parameters(self, role: str) -> list[nn.Parameter]: ...

    @abstractmethod
    def trainable_state_dict(self, role: str) -> dict[str, Tensor]:
        """Exactly the trained tensors of `role`, under stable names (for resume and export)."""

    @abstractmethod
    def load_trainable_state_dict(self, role: str, state: dict[str, Tensor]) -> None: ...

    @abstractmethod
    def merged_state_dict(self, role: str) -> dict[str, Tensor]:
        """`role`'s complete backbone weights under the backbone's original names (for export)."""

    @abstractmethod
    def trained_modules(self) -> dict[str, nn.Module]:
        """Modules the trainer must wrap for data parallelism; two roles may share one module."""


def check_lora_targets(base: nn.Module, targets) -> None:
    """Every target must name a layer (peft's rule: the module's name, or its last dotted parts); ConfigError
    listing the ones that match nothing, with the closest layer names."""
    import difflib

    names = [name for name, _ in base.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        hints = {t: difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=2) for t in unmatched}
        said = "; ".join(f"{t!r}" + (f" (did you mean {' or '.join(map(repr, h))}?)" if h else "")
                         for t, h in hints.items())
        raise ConfigError(f"lora_target_modules: {said} match no layer of this model; leave the key empty for the "
                          "family's default targets")


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the module's floating-point weights and buffers that hold NaN or inf (a damaged checkpoint).
    fp8 storage (ComfyUI's fp8 UNets) has no isfinite kernel: such a tensor is checked in float32, one at a time."""
    def finite(tensor: Tensor) -> bool:
        return bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all())

    return [name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
            if tensor.is_floating_point() and tensor.device.type != "meta" and not finite(tensor)]


class LoraRoles(Roles):
    def __init__(self, base: nn.Module, rank: int, alpha: float, target_modules: list[str]):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        base.requires_grad_(False)
        check_lora_targets(base, target_modules)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two adapters is the design
                for role in TRAINABLE_ROLES:
                    inject_adapter_in_model(copy.deepcopy(config), base, adapter_name=role)
        except ValueError as error:
            raise ConfigError(f"lora_target_modules {list(target_modules)} cannot be adapted: {error}") from None
        self.base = base
        self._layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        self._parameters = {
            role: {name: p for name, p in base.named_parameters() if f".{role}." in name and "lora_" in name}
            for role in TRAINABLE_ROLES
        }
        for params in self._parameters.values():
            for p in params.values():
                p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
        self._set_trainable()
        self._active: str | None = None
        self.use_fast_switch()

    def _set_trainable(self):
        # peft's set_adapter freezes inactive adapters; both stay trainable so that data parallelism sees a
        # fixed set of parameters (each optimizer only steps on its own role's gradients).
        for params in self._parameters.values():
            for p in params.values():
                p.requires_grad_(True)

    def use_fast_switch(self, fast: bool = True) -> None:
        """Switch roles by setting peft's two flags (the default where the layers have them) or, `fast` False,
        through peft's public calls (slower: they also toggle requires_grad on every LoRA tensor). The same
        switch either way; the public path stays to measure the gain and to check the fast one against it.
        The next `activate` switches afresh."""
        self._fast_switch = fast and all(hasattr(layer, "_disable_adapters") and hasattr(layer, "_active_adapter")
                                         for layer in self._layers)
        self._active = None

    def skip_input_casts(self, skip: bool = True) -> None:
        """Let each LoRA layer take its input in the dtype it comes in (peft casts it to the fp32 adapter weights
        first). Under autocast the adapter's matmul casts it back to the low dtype anyway, so the result is the
        same bit for bit, without two full-size copies of the activation per adapted layer; only for runs whose
        every call is under autocast (mixed precision)."""
        for layer in self._layers:
            layer.cast_input_dtype_enabled = not skip

    def activate(self, role: str) -> nn.Module:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if role != self._active:
            if self._fast_switch:
                # peft's enable_adapters / set_adapter also toggle requires_grad on every LoRA tensor (undone at
                # once by _set_trainable): ~40 ms a switch on an SDXL UNet, many switches per update. Setting
                # the two flags they set is the same switch (tested against the public calls).
                for layer in self._layers:
                    layer._disable_adapters = role == "teacher"
                    if role != "teacher":
                        layer._active_adapter = [role]
            else:
                for layer in self._layers:
                    if role == "teacher":
                        layer.enable_adapters(False)
                    else:
                        layer.enable_adapters(True)
                        layer.set_adapter(role)
                self._set_trainable()
            self._active = role
        return self.base

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        return list(self._parameters[role].values())

    def trainable_state_dict(self, role: str) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self._parameters[role].items()}

    def load_trainable_state_dict(self, role: str, state: dict[str, Tensor]) -> None:
        copy_exact(self._parameters[role], state, role)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"student": self.base, "fake": self.base}

    def lazy_delta_weights(self, role: str) -> dict[str, Callable[[], Tensor]]:
        """{base weight name: () -> (alpha / rank) * B @ A in float32}: one full-size delta in memory at a time."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        def delta(module):
            with torch.no_grad():
                return module.get_delta_weight(role).float()

        return {f"{name}.weight": functools.partial(delta, module) for name, module in self.base.named_modules()
                if isinstance(module, BaseTunerLayer) and role in module.lora_A}

    def merged_state_dict(self, role: str) -> dict[str, Tensor]:
        """The backbone's own state dict (original names) with `role`'s LoRA merged in, base left untouched."""
        deltas = self.lazy_delta_weights(role)
        merged = {}
        for name, value in self.base.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            merged[name] = (value.float() + deltas[name]()).to(value.dtype) if name in deltas else value
        return merged

    def load_role_lora(self, role: str, weights: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Set `role`'s A and B of the given modules ({module: (A, B)}, the rank of this adapter); the others keep
        their initialisation (B = 0: no change to the base)."""
        params = self._parameters[role]
        for module, (down, up) in weights.items():
            for part, value in (("lora_A", down), ("lora_B", up)):
                name = f"{module}.{part}.{role}.weight"
                if name not in params:
                    raise ConfigError(f"network_weights: layer {module} is not adapted (no {name})")
                if params[name].shape != value.shape:
                    raise ConfigError(f"network_weights: {module} {part} is {list(value.shape)} in the file, "
                                      f"{list(params[name].shape)} in this model; is it a LoRA for another model?")
                with torch.no_grad():
                    params[name].copy_(value.to(params[name].dtype))

    def peft_state_dict(self, role: str) -> dict[str, Tensor]:
        """The adapter in peft's naming (`...lora_A.weight`), as diffusers' LoRA loaders expect."""
        marker = f".{role}."
        return {name.replace(marker, "."): p.detach() for name, p in self._parameters[role].items()}


class FullRoles(Roles):
    def __init__(self, base: nn.Module):
        base.requires_grad_(False)
        self.teacher = base
        self.copies = {}
        for role in TRAINABLE_ROLES:
            network = copy.deepcopy(base).float()
            network.requires_grad_(True).train()
            self.copies[role] = network

    def activate(self, role: str) -> nn.Module:
        if role == "teacher":
            return self.teacher
        if role not in self.copies:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.copies[role]

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        return list(self.copies[role].parameters())

    def trainable_state_dict(self, role: str) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.copies[role].named_parameters()}

    def merged_state_dict(self, role: str) -> dict[str, Tensor]:
        return dict(self.activate(role).state_dict())

    def load_trainable_state_dict(self, role: str, state: dict[str, Tensor]) -> None:
        copy_exact(dict(self.copies[role].named_parameters()), state, role)

    def trained_modules(self) -> dict[str, nn.Module]:
        return dict(self.copies)


def copy_exact(params: dict[str, Tensor], state: dict[str, Tensor], role: str) -> None:
    """Copy `state` into `params` (same names, no more, no fewer), or fail naming what does not fit."""
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"saved {role} weights do not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}): was it trained with other LoRA settings?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
