"""Preference objectives for a diffusion model: Diffusion-DPO (Wallace et al. 2023) and Diffusion-KTO (Li et al. 2024),
as short pure functions of per-sample denoising errors, the way :mod:`emu.diffusion.denoiser` computes them.

Both compare the model being tuned with a frozen **reference** (the pre-trained weights) on the same noisy input: the
same image, noise and noise level, ``err = |F_theta - target|^2`` and ``ref = |F_ref - target|^2`` (each the
denoiser's weighted, per-sample MSE: :meth:`~emu.diffusion.denoiser.Denoiser.loss`). A Gaussian step's log-likelihood
is ``-err / 2`` up to constants, so the model's implicit reward on a sample (its log-likelihood ratio to the reference,
Wallace et al.'s ELBO approximation at one noise level) is::

    r = (ref - err) / 2

* **DPO** on a pair (preferred ``w``, other ``l``, one prompt, shared noise): ``-log sigmoid(beta (r_w - r_l))``, which
  is ``-log sigmoid(-beta/2 ((err_w - ref_w) - (err_l - ref_l)))``, the term of diffusers' research script
  ``train_diffusion_dpo.py``; averaged over pairs, the paper's expectation (some ports take the log-sigmoid of the
  batch's mean term instead). The paper's beta: 5000 for SD 1.5 and SDXL on per-element mean errors.
* **KTO** on single samples labelled desirable or not (Ethayarajh et al. 2024's utility, Diffusion-KTO's rewards):
  ``lambda_y - v`` with ``v = lambda_D sigmoid(beta (r - z0))`` for a desirable sample and
  ``lambda_U sigmoid(beta (z0 - r))`` for an undesirable one; ``z0`` is the reference point, KTO's KL estimate: here
  the batch's mean reward, detached and clamped at 0 (KTO estimates it on mismatched prompt-image pairs; this skips
  those extra forward passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emu.errors import ConfigError

OBJECTIVES = ("sft", "dpo", "kto")  # supervised fine-tuning (Emu's quality-tuning), or a preference objective


def implicit_reward(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The model's log-likelihood ratio to the reference per sample from the denoising errors: ``(ref - err) / 2``."""
    return (ref - err) / 2


def dpo_logits(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float) -> torch.Tensor:  # fmt: skip
    """``beta (r_w - r_l)`` per pair: positive where the model prefers the preferred image more than the reference
    does (its sign is the implicit accuracy)."""
    return beta * (implicit_reward(err_w, ref_w) - implicit_reward(err_l, ref_l))


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:  # fmt: skip
    """Diffusion-DPO's loss per pair: ``-log sigmoid(beta (r_w - r_l))``."""
    return -F.logsigmoid(dpo_logits(err_w, err_l, ref_w, ref_l, beta))


def kto_reference_point(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: the batch's mean implicit reward, detached and clamped at 0."""
    return implicit_reward(err, ref).mean().detach().clamp(min=0)


def kto_loss(err: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float,
             reference_point: torch.Tensor | float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Diffusion-KTO's loss per sample: ``lambda_y - v(r)`` (see the module doc); ``desirable`` is a bool tensor."""
    r = implicit_reward(err, ref)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r)
    value = torch.where(desirable, torch.sigmoid(beta * (r - reference_point)),
                        torch.sigmoid(beta * (reference_point - r)))  # fmt: skip
    return weight * (1 - value)


PREFERENCE_DEFAULTS = {"beta": 5000.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def preference_settings(objective: str, settings: dict[str, float] | None) -> dict[str, float]:
    """``model.preference`` checked and completed (``beta``, KTO's ``desirable_weight`` / ``undesirable_weight``), for
    ``model.objective`` (one of :data:`OBJECTIVES`)."""
    if objective not in OBJECTIVES:
        raise ConfigError("model.objective", f"must be one of {list(OBJECTIVES)}, got {objective!r}")
    settings = dict(settings or {})
    unknown = set(settings) - set(PREFERENCE_DEFAULTS)
    if unknown:
        raise ConfigError("model.preference", f"has unknown settings {sorted(unknown)}; known: "
                          f"{', '.join(PREFERENCE_DEFAULTS)}")  # fmt: skip
    out = {k: float(settings.get(k, v)) for k, v in PREFERENCE_DEFAULTS.items()}
    for key, value in out.items():
        if not value > 0:
            raise ConfigError(f"model.preference.{key}", f"must be positive, got {value}")
    return out
