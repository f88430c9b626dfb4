"""Diffusion-DPO and Diffusion-KTO (model.objective, emu/diffusion/preference.py): the losses against hand-computed
values; the module's reference is exactly the weights init_from gave (the loss is log 2 / KTO's 1/2 at step 0), stays
frozen while the model learns a batch, leaves checkpoints and resumes exactly; LoRA's reference is its base; the data:
Pick-a-Pic pairs, a pair task's confident pairs by the stated rules, the curation's human passes as likes."""

import json
import math

import lightning as L
import pytest
import torch

from emu.diffusion.preference import (
    dpo_logits,
    dpo_loss,
    implicit_reward,
    kto_loss,
    kto_reference_point,
    preference_settings,
)
from emu.errors import ConfigError
from tests.conftest import haystack_batch
from tests.test_lora import _trainer, lora_module


def test_dpo_loss_equals_hand_computed_values_and_diffusers_form():
    err_w, err_l, ref_w, ref_l = (torch.tensor([v]) for v in (0.1, 0.3, 0.2, 0.2))
    # r_w = (0.2 - 0.1) / 2 = 0.05, r_l = -0.05: logits 10 x 0.1 = 1; loss log(1 + e^-1)
    assert dpo_logits(err_w, err_l, ref_w, ref_l, 10.0).item() == pytest.approx(1.0)
    assert dpo_loss(err_w, err_l, ref_w, ref_l, 10.0).item() == pytest.approx(math.log1p(math.exp(-1)))
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 8, generator=g)
    diffusers = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((e[0] - e[2]) - (e[1] - e[3])))
    assert torch.allclose(dpo_loss(e[0], e[1], e[2], e[3], 5000.0), diffusers)
    same = torch.rand(8, generator=g)  # the model equals its reference: log 2, whatever the errors
    assert torch.allclose(dpo_loss(same, same.flip(0), same, same.flip(0), 5000.0), torch.full((8,), math.log(2)))


def test_kto_loss_equals_hand_computed_values():
    err, ref = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])
    assert implicit_reward(err, ref).tolist() == pytest.approx([0.05, -0.05])
    z0 = kto_reference_point(err, ref)
    assert z0.item() == 0.0  # mean reward 0 (clamped at 0 anyway)
    loss = kto_loss(err, ref, torch.tensor([True, False]), 10.0, z0, desirable_weight=2.0)
    s = 1 / (1 + math.exp(-0.5))  # both rewards are 0.5 on the right side of z0 once scaled by beta
    assert loss.tolist() == pytest.approx([2 * (1 - s), 1 - s])
    err, ref = torch.tensor([0.1, 0.1]), torch.tensor([0.3, 0.2])  # rewards 0.1, 0.05: z0 = 0.075
    z0 = kto_reference_point(err, ref)
    assert z0.item() == pytest.approx(0.075)
    loss = kto_loss(err, ref, torch.tensor([True, True]), 10.0, z0)
    assert loss.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-0.25)), 1 - 1 / (1 + math.exp(0.25))])


def test_settings_are_checked():
    assert preference_settings("dpo", None) == {"beta": 5000.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    for objective, settings, key in (("ppo", None, "model.objective"), ("dpo", {"bta": 1}, "model.preference"),
                                     ("kto", {"beta": 0}, "model.preference.beta")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            preference_settings(objective, settings)


def pair_batch(n=4):
    """Haystack images preferred to their colour-inverted selves (a preference a model can learn)."""
    batch = haystack_batch(n)
    return {**batch, "image_l": -batch["image"]}


class _Pairs(L.LightningDataModule):
    def __init__(self, batch):
        super().__init__()
        self.batch, self.resolution = batch, 32

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch] * 4, batch_size=None)


def dpo_module(ckpt, rank=0, objective="dpo", beta=200.0, **kw):
    return lora_module(ckpt, rank=rank, objective=objective, preference={"beta": beta}, **kw)


def test_dpo_starts_at_log_2_learns_the_pairs_and_keeps_its_reference(tiny_stage1_checkpoint):
    module = dpo_module(tiny_stage1_checkpoint, lr=2e-3)
    start = {k: v.clone() for k, v in module.unet.state_dict().items()}
    batch = pair_batch()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    terms = module.objective_terms(batch, g(), drop=False)
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # the model is its reference, noise shared
    opt = torch.optim.Adam([p for m in module.trained_modules().values() for p in m.parameters()], lr=2e-3)
    for _ in range(25):  # one batch at one noise draw: overfit
        loss = module.diffusion_loss(batch, g(), drop=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.objective_terms(batch, g(), drop=False)
    assert after["loss"].item() < 0.5 * math.log(2) and after["accuracy"].item() == 1.0
    reference = module.reference.shadow["unet"].state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start)  # frozen: the weights init_from gave
    assert not all(torch.equal(module.unet.state_dict()[k], start[k]) for k in start)


def test_lora_dpo_refers_to_its_base_and_kto_starts_at_one_half(tiny_stage1_checkpoint):
    base = dpo_module(tiny_stage1_checkpoint, objective="sft")
    module = dpo_module(tiny_stage1_checkpoint, rank=4)
    assert module.reference is None  # LoRA: the base with its adapters bypassed, no copy
    with torch.no_grad():
        for p in module.adapters.parameters():
            p.add_(0.05)
    z = torch.randn(2, base.unet.config["in_channels"], 8, 8, generator=torch.Generator().manual_seed(0))
    cond = base.conditioning(["a red circle", "a blue star"], drop=False)
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        with module.reference_weights():
            ref = module.denoiser(z, sigma, **cond)
        moved = module.denoiser(z, sigma, **cond)
        expected = base.denoiser(z, sigma, **cond)
    assert torch.allclose(ref, expected, atol=1e-6) and not torch.allclose(moved, expected, atol=1e-4)

    kto = dpo_module(tiny_stage1_checkpoint, objective="kto")
    batch = haystack_batch()
    batch["meta"] = [{**m, "label": i % 2 == 0} for i, m in enumerate(batch["meta"])]
    terms = kto.objective_terms(batch, torch.Generator().manual_seed(0), drop=False)
    assert terms["loss"].item() == pytest.approx(0.5) and terms["desirable"].item() == 0.5
    batch["meta"][0]["label"] = "yes"
    with pytest.raises(ConfigError, match="label"):
        kto.objective_terms(batch, drop=False)


def test_preference_objectives_refuse_what_they_cannot_train(tiny_stage1_checkpoint):
    module = dpo_module(tiny_stage1_checkpoint)
    with pytest.raises(ConfigError, match="data=pairs"):
        module.objective_terms(haystack_batch(), drop=False)  # no image_l: not pairs
    with pytest.raises(ConfigError, match="precomputed latents"):
        module.objective_terms({**pair_batch(), "latent": torch.zeros(4, 8, 4, 4)}, drop=False)
    hp = dict(torch.load(tiny_stage1_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"])
    orphan = type(module)(**{**hp, "objective": "dpo", "init_from": None, "val_prompts": None})
    with pytest.raises(ConfigError, match=r"model\.init_from"):
        orphan.reference_weights()


def test_dpo_checkpoints_leave_the_reference_out_load_for_sampling_and_resume_exactly(tiny_stage1_checkpoint,
                                                                                      tmp_path):  # fmt: skip
    from emu.diffusion.checkpoints import load_for_sampling

    data = _Pairs(pair_batch())
    straight = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "a", 4).fit(straight, datamodule=data)
    first = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "b", 2).fit(first, datamodule=data)
    resumed = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "b", 4).fit(resumed, datamodule=data, ckpt_path=tmp_path / "b/ckpt/last.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "a/ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["objective"] == "dpo"
    model = load_for_sampling(tmp_path / "a/ckpt/last.ckpt")
    assert model.reference is None  # sampling needs none
    images = model.sample(["a red circle"], [0], SamplingSteps())
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def SamplingSteps():
    from emu.diffusion.pipeline import SamplingSettings

    return SamplingSettings(steps=2, resolution=32)
