"""The networks a diffusion model uses but never trains (the autoencoder and the text encoders), and where they live.

A :class:`~emu.diffusion.module.DiffusionModule` trains its U-Net and text projections on the outputs of frozen
networks. These stay registered where they always were (``autoencoder``, ``conditioner.encoders.<name>``): the model's
state-dict keys, ``named_parameters`` and checkpoints are unchanged, and the conditioner finds its encoders as before.
:class:`FrozenNetworks` is a plain object beside them, outside the module tree (it adds no key), that freezes them and
decides their placement:

- by default they follow the model: ``.to(device)``, ``.cuda()``, ``.half()`` ... reach them as any submodule;
- offloaded (:meth:`~FrozenNetworks.offload`, when training on precomputed latents and embeddings reads their outputs
  from the data) they live on the CPU, in their own dtype: every move and cast of the model runs its ``_apply``, which
  the model hands to :meth:`~FrozenNetworks.apply_around` (``nn.Module._apply`` with the frozen networks left out), so
  a T5-XXL never takes GPU memory; :meth:`~FrozenNetworks.on` brings them to a device for a block (validation
  sampling encodes prompts and decodes latents) and back.

Nothing reaches into another module's children: the model is walked through ``children()`` and each module's own
``_apply``. (Registered as a submodule, a holder would put its own name into the frozen networks' state-dict keys;
taking them out of the tree would drop keys that FSDP's sharded checkpoints hold, and the encoders from the
conditioner that calls them.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HOME = torch.device("cpu")  # where offloaded networks live


class FrozenNetworks:
    """The frozen networks of a model by their path in it (``{"autoencoder": ..., "conditioner.encoders.clip": ...}``);
    their parameters stop requiring gradients."""

    def __init__(self, networks: dict[str, nn.Module]):
        self.networks = dict(networks)
        self.offloaded = False
        for net in self.networks.values():
            net.requires_grad_(False)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The model's state-dict keys of the frozen networks start with one of these."""
        return tuple(f"{path}." for path in self.networks)

    def eval(self) -> None:
        """Frozen networks never switch to training behaviour (the model calls this whenever it switches modes)."""
        for net in self.networks.values():
            net.eval()

    def _to(self, device: torch.device | str) -> None:
        for net in self.networks.values():
            net.to(device)

    def offload(self) -> None:
        """From now on the frozen networks live on the CPU, whatever the model is moved or cast to."""
        self.offloaded = True
        self._to(HOME)

    def apply_around(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        """``model._apply(fn)`` as :class:`torch.nn.Module` does it (each child's ``_apply``, then the module's own
        tensors), except that it leaves the frozen networks alone: a module holding one is entered instead."""
        held = {id(net) for net in self.networks.values()}

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in held:
                    continue
                if any(id(m) in held for m in child.modules()):
                    visit(child)
                else:
                    child._apply(fn)
            module._apply(fn, recurse=False)

        visit(model)
        return model

    @contextmanager
    def on(self, device: torch.device) -> Iterator[None]:
        """Inside the block the frozen networks are on ``device``, even while offloaded (then back on the CPU)."""
        params = [p for net in self.networks.values() for p in net.parameters()]
        if not self.offloaded or all(p.device == device for p in params):
            yield
            return
        self._to(device)
        try:
            yield
        finally:
            self._to(HOME)
