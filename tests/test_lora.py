"""LoRA quality-tuning (model.lora, emu/diffusion/lora.py): only the adapters train and the EMA averages them alone;
checkpoints hold the adapters and name their base; exports merge them or write LoRA files diffusers loads whole."""

import lightning as L
import pytest
import torch

from emu.diffusion.checkpoints import load_diffusion, load_for_sampling
from emu.diffusion.lora import lora_settings
from emu.diffusion.module import DiffusionModule
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from tests.conftest import haystack_batch

pytest.importorskip("peft")

PROMPTS = ["a large red circle in the center on a black background", "a small blue star at the bottom"]
SEEDS = [3, 4]


class _Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.batch = haystack_batch()
        self.resolution = 32

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch] * 4, batch_size=None)


def _trainer(root, max_steps):
    return L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt",
                                                                                         save_last=True)])  # fmt: skip


def lora_module(base_ckpt, rank=16, **kw) -> DiffusionModule:
    """A LoRA module over the tests' one-step stage-1 checkpoint, with its own settings."""
    hp = dict(torch.load(base_ckpt, map_location="cpu", weights_only=False)["hyper_parameters"])
    torch.manual_seed(0)
    settings = dict(warmup_steps=0, lr=1e-2, ema_half_life_images=16, ema_ramp=None, val_prompts=None,
                    init_from=str(base_ckpt), lora={"rank": rank, "alpha": 2 * rank} if rank else None)  # fmt: skip
    return DiffusionModule(**{**hp, **settings, **kw})


def _denoised(module, z, sigma, cond):
    with torch.no_grad():
        return module.denoiser(z, sigma, **cond)


def test_settings_are_checked_and_completed():
    assert lora_settings(None) is None and lora_settings({"rank": 0}) is None and lora_settings({}) is None
    assert lora_settings({"rank": 8}) == {"rank": 8, "alpha": 8.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"],
                                          "dropout": 0.0}  # fmt: skip
    for bad, key in (({"rank": -1}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": 4, "alpha": 0}, "alpha"),
                     ({"rank": 4, "targets": "to_q"}, "targets"), ({"rank": 4, "dropout": 1.0}, "dropout"),
                     ({"rank": 4, "ranks": 3}, "lora")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^model\.lora(\.{key})?:"):
            lora_settings(bad)


def test_only_the_adapters_train_the_ema_averages_them_and_the_base_stays(tiny_stage1_checkpoint, tmp_path):
    """At step 0 the LoRA model is its base exactly (B = 0); the optimizer and the EMA hold the adapters alone (the
    U-Net's other weights and the text projections frozen); a fit changes the adapters and nothing else; the loss on a
    batch falls when overfitting it (measured: 1.17 -> 1.09 in 60 steps at rank 16; the base is a one-step model, and
    attention adapters alone move it slowly)."""
    base = load_for_sampling(tiny_stage1_checkpoint)  # init_from reads the base's EMA weights, as this does
    module = lora_module(tiny_stage1_checkpoint)
    adapters = dict(module.adapters.named_parameters())
    n_adapters = sum(p.numel() for p in adapters.values())
    assert 0 < n_adapters < sum(p.numel() for p in base.unet.parameters()) / 10
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters.values()}
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert set(module.ema.shadow) == {"lora"} and sum(p.numel() for p in module.ema.parameters()) == n_adapters

    batch = haystack_batch()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    cond = module.conditioning(PROMPTS, drop=False)
    assert torch.equal(_denoised(module, z, sigma, cond), _denoised(base, z, sigma, cond))  # step 0: the base

    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if ".lora_" not in k and "ema." not in k}
    _trainer(tmp_path, 3).fit(module, datamodule=_Data())
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())  # the base and the projections
    live, avg = dict(module.adapters.named_parameters()), dict(module.ema.shadow["lora"].named_parameters())
    assert set(live) == set(avg) and any(not torch.equal(live[k], avg[k]) for k in live)
    assert not torch.equal(_denoised(module, z, sigma, cond), _denoised(base, z, sigma, cond))

    fixed = lambda: float(module.diffusion_loss(batch, torch.Generator().manual_seed(1), drop=False).detach())
    before, opt = fixed(), module.configure_optimizers()["optimizer"]
    for _ in range(30):  # overfitting the batch through the adapters alone (the base: a one-step model)
        loss = module.diffusion_loss(batch, drop=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed() < 0.95 * before, (before, fixed())


def test_checkpoints_hold_the_adapters_and_load_over_their_base(tiny_stage1_checkpoint, tmp_path):
    """The checkpoint's U-Net weights are the adapters alone (the base is init_from, by path); it loads for sampling
    (EMA adapters in place) with the images of the module that wrote it, and a resumed fit equals an uninterrupted
    one. A LoRA checkpoint is no init_from for a whole model."""
    straight = lora_module(tiny_stage1_checkpoint)
    _trainer(tmp_path / "a", 4).fit(straight, datamodule=_Data())

    first = lora_module(tiny_stage1_checkpoint)
    _trainer(tmp_path / "b", 2).fit(first, datamodule=_Data())
    ckpt = torch.load(tmp_path / "b/ckpt/last.ckpt", weights_only=False)
    unet_keys = [k for k in ckpt["state_dict"] if k.startswith("unet.")]
    assert unet_keys and all(".lora_A." in k or ".lora_B." in k for k in unet_keys)
    assert ckpt["hyper_parameters"]["init_from"] == str(tiny_stage1_checkpoint)
    resumed = lora_module(tiny_stage1_checkpoint)
    _trainer(tmp_path / "b", 4).fit(resumed, datamodule=_Data(), ckpt_path=tmp_path / "b/ckpt/last.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded = load_for_sampling(tmp_path / "a/ckpt/last.ckpt")
    assert loaded.adapters is not None and loaded.sampled_weights == "ema"
    settings = SamplingSettings(resolution=32, steps=3)
    with straight.ema.swapped(straight.trained_modules()):
        expected = straight.eval().sample(PROMPTS, SEEDS, settings)
    assert torch.equal(loaded.sample(PROMPTS, SEEDS, settings), expected)
    raw = load_diffusion(tmp_path / "a/ckpt/last.ckpt")
    assert all(torch.equal(v, a[k]) for k, v in raw.state_dict().items())

    with pytest.raises(ConfigError, match="LoRA adapters over"):
        lora_module(tiny_stage1_checkpoint, rank=0, init_from=str(tmp_path / "a/ckpt/last.ckpt"))


def test_merging_gives_the_same_model_as_the_adapters(tiny_stage1_checkpoint):
    """merge_lora: the adapters added into the base weights (peft's merge), a plain U-Net with the base's keys whose
    outputs equal the LoRA model's to float32 rounding."""
    module = lora_module(tiny_stage1_checkpoint).eval()
    for p in module.adapters.parameters():  # B is zero at the start: give every adapter a say
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    z, sigma = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([0.5, 3.0])
    cond = module.conditioning(PROMPTS, drop=False)
    before = _denoised(module, z, sigma, cond)
    keys = set(lora_module(tiny_stage1_checkpoint, rank=0).unet.state_dict())
    module.merge_lora()
    assert module.adapters is None and module.ema is None and module.hparams.lora is None
    assert set(module.unet.state_dict()) == keys and module.denoiser.net is module.unet
    diff = (_denoised(module, z, sigma, cond) - before).abs().max()
    assert diff < 1e-5, diff
