"""LoRA on the U-Net, through the ``peft`` library (``model.lora``): low-rank adapters beside the attention
projections of a frozen base, as diffusers' LoRA training scripts, SimpleTuner and kohya's sd-scripts train them.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` (by default ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` of every attention, self and cross: diffusers' ``train_text_to_image_lora*.py`` choice) with peft's
``lora.Linear``: ``base(x) + B(A(dropout(x))) * alpha / rank``, ``B`` zero at the start (so step 0 is the base model
exactly) and ``A`` Gaussian (``init_lora_weights="gaussian"``, as diffusers' scripts). The base's keys become
``...to_q.base_layer.weight``; the adapters' are ``...to_q.lora_A.default.weight`` and ``...lora_B.default.weight``.
emu's U-Net has diffusers' parameter names, so these are the names diffusers' ``UNet2DConditionModel`` gives the same
adapters, and :func:`lora_state_dict` is a LoRA file diffusers loads (``pipe.load_lora_weights``).

:class:`Adapters` is a view of a network's adapters and nothing else: what the optimizer and the EMA see, so that an
averaged copy is the size of the adapters, not of the base.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from emu.errors import ConfigError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"  # peft's adapter name (one adapter per network)
_DOT = "__"  # a dot in a network's module name, in a child's name of the view (module names cannot hold dots)


def lora_settings(lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``model.lora`` checked and completed: ``rank`` (>= 1), ``alpha`` (default: the rank, a scale of 1, as diffusers'
    scripts), ``targets`` (module names or name suffixes, peft's ``target_modules``), ``dropout``; None or an empty
    mapping or rank 0: no LoRA (full fine-tuning)."""
    if not lora or not lora.get("rank"):
        return None
    unknown = set(lora) - {"rank", "alpha", "targets", "dropout"}
    if unknown:
        raise ConfigError("model.lora", f"has unknown settings {sorted(unknown)}; known: rank, alpha, targets, dropout")
    rank, alpha = lora["rank"], lora.get("alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError("model.lora.rank", f"must be a positive integer (0 or null: full fine-tuning), got {rank!r}")
    if alpha is not None and (not isinstance(alpha, int | float) or alpha <= 0):
        raise ConfigError("model.lora.alpha", f"must be a positive number (null: the rank), got {alpha!r}")
    targets = lora.get("targets") or DEFAULT_TARGETS
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError("model.lora.targets", f"must be a list of module names, got {targets!r}")
    dropout = float(lora.get("dropout") or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("model.lora.dropout", f"must be in [0, 1), got {dropout}")
    alpha = float(alpha) if alpha is not None else float(rank)
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout}


def peft_config(settings: Mapping[str, Any]):
    """The ``peft.LoraConfig`` of :func:`lora_settings`' output."""
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], target_modules=list(settings["targets"]),
                      lora_dropout=settings["dropout"], init_lora_weights="gaussian")  # fmt: skip


def add_lora(net: nn.Module, settings: Mapping[str, Any]) -> Adapters:
    """Inject adapters into ``net`` in place (its other weights frozen); the view of them."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(peft_config(settings), net, adapter_name=ADAPTER)
    except ValueError as e:  # peft: none of the target modules is in the network
        raise ConfigError("model.lora.targets", f"{settings['targets']}: {e}") from e
    return Adapters(net)


def lora_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The network's LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


class Adapters(nn.Module):
    """The adapters of a network (its layers' ``lora_A`` / ``lora_B``, the same modules, not copies), as one module.

    Keep it outside the network's parent (a plain attribute), or its parameters would be registered twice. Its
    state-dict keys are the network's own with the dots of the layers' names as ``__``: :meth:`net_key` maps them back.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        layers = lora_layers(net)
        if not layers:
            raise ValueError("the network has no LoRA layers")
        for name, layer in layers.items():
            self.add_module(name.replace(".", _DOT) + _DOT + "lora_A", layer.lora_A)
            self.add_module(name.replace(".", _DOT) + _DOT + "lora_B", layer.lora_B)

    @staticmethod
    def net_key(key: str) -> str:
        """A key of this view's state dict as the network's."""
        return key.replace(_DOT, ".")

    @staticmethod
    def view_key(key: str) -> str:
        """A network's key of an adapter's weight as this view's."""
        head, _, tail = key.partition(".lora_")
        return head.replace(".", _DOT) + _DOT + "lora_" + tail

    def train(self, mode: bool = True):  # the network's train() / eval() decide (dropout): the view changes nothing
        return self


@contextmanager
def adapters_off(net: nn.Module) -> Iterator[None]:
    """The base network inside the block (every adapter bypassed, peft's ``enable_adapters(False)``), the adapters back
    after it, even on error: the preference objectives' reference model under LoRA, at no memory cost."""
    layers = list(lora_layers(net).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key (the network's or its parent's) is an adapter's weight."""
    return ".lora_A." in key or ".lora_B." in key


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's layout, adapter name dropped (``...to_q.lora_A.weight``): what diffusers'
    ``save_lora_weights`` takes as ``unet_lora_layers`` (prefixed ``unet.``) and ``load_lora_weights`` loads."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}


def merged_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with each adapter added into its base weight (peft's ``merge``) and the LoRA layers replaced by
    their base layers: the plain network, with the base's keys and no adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    return net.requires_grad_(True)


def plain_unet(net: nn.Module) -> nn.Module:
    """``net`` itself without LoRA layers, else :func:`merged_copy` of it: what a whole-model export converts."""
    return merged_copy(net) if lora_layers(net) else net


def base_fingerprint(state: Mapping[str, torch.Tensor], values: int = 256) -> str:
    """A short hash of the weights a LoRA trains over (each tensor's name, shape, dtype and first ``values`` values):
    stored with the adapters, checked when they load over ``init_from`` again, so that adapters never land on another
    base than theirs (a stage-1 checkpoint rewritten since) without an error. Cheap at any size."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1)[:values].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def trainable_count(modules: Sequence[nn.Module]) -> int:
    """The number of parameters the optimizer updates among ``modules`` (each counted once)."""
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in params.values())
