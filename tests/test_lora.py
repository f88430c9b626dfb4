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
    from emu.training.resume import ExactResume

    torch.manual_seed(0)  # the training step's draws (noise, levels, dropout): ExactResume continues them on resume
    return L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt",
                                                                                         save_last=True),
                                                     ExactResume()])  # fmt: skip


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
    assert 0 < n_adapters < sum(p.numel() for p in base.unet.parameters()) / 4  # rank 16 on a tiny U-Net: 13%
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

    # what checkpoint selection keeps with keep=ema: the EMA adapters, the base and frozen models referenced by path
    from emu.diffusion.export import save_export

    save_export(straight, tmp_path / "kept", ema=True, copy_frozen=False)
    kept = load_for_sampling(tmp_path / "kept")
    assert kept.adapters is not None and torch.equal(kept.sample(PROMPTS, SEEDS, settings), expected)

    # the safetensors export is a whole model: the EMA adapters merged into their base (no base needed to load it)
    from emu.export.__main__ import main as export_main

    assert export_main(["safetensors", str(tmp_path / "a/ckpt/last.ckpt"), str(tmp_path / "merged")]) == 0
    merged = load_for_sampling(tmp_path / "merged")
    assert merged.adapters is None and merged.hparams.lora is None and merged.exported_weights == "ema"
    assert (merged.sample(PROMPTS, SEEDS, settings) - expected).abs().max() < 1e-4
    # ... which a next stage (or another LoRA) starts from: init_from an export folder
    again = lora_module(tiny_stage1_checkpoint, rank=0, init_from=str(tmp_path / "merged"))
    assert all(torch.equal(v, merged.unet.state_dict()[k]) for k, v in again.unet.state_dict().items())
    with pytest.raises(ValueError, match="merge_lora"):  # unmerged adapters are no self-contained export
        save_export(straight, tmp_path / "unmerged", copy_frozen=True)

    with pytest.raises(ConfigError, match="LoRA adapters over"):
        lora_module(tiny_stage1_checkpoint, rank=0, init_from=str(tmp_path / "a/ckpt/last.ckpt"))


def test_adapters_refuse_another_base_than_theirs(tiny_stage1_checkpoint, tmp_path):
    """LoRA needs a base (init_from), stored by absolute path with a fingerprint of its weights: adapters whose base was
    rewritten since refuse to load (checkpoint and kept folder alike) instead of sampling nonsense."""
    import shutil

    from emu.diffusion.export import save_export

    with pytest.raises(ConfigError, match=r"^model\.lora: trains adapters over a base model: set model\.init_from"):
        lora_module(tiny_stage1_checkpoint, init_from=None)
    base = tmp_path / "base.ckpt"
    shutil.copy(tiny_stage1_checkpoint, base)
    module = lora_module(base)
    _trainer(tmp_path, 1).fit(module, datamodule=_Data())
    save_export(module, tmp_path / "kept", copy_frozen=False)
    load_diffusion(tmp_path / "ckpt/last.ckpt")  # the same base: loads
    ckpt = torch.load(base, weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.startswith("ema.shadow.unet.") and k.endswith("to_q.weight"))
    ckpt["state_dict"][key] += 0.01  # stage 1 rewritten since
    torch.save(ckpt, base)
    for path in (tmp_path / "ckpt/last.ckpt", tmp_path / "kept"):
        with pytest.raises(ValueError, match="trained over another base"):
            load_for_sampling(path)


def test_gradient_checkpointing_is_a_model_setting(tiny_stage1_checkpoint):
    """model.gradient_checkpointing: the U-Net recomputes its activations (for a U-Net given as a diffusers folder,
    whose kwargs cannot carry it), with the same loss."""
    module = lora_module(tiny_stage1_checkpoint, gradient_checkpointing=True)
    module.configure_model()
    levels = [m for m in module.unet.modules() if hasattr(m, "gradient_checkpointing")]
    assert levels and all(m.gradient_checkpointing for m in levels)


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


# ------------------------------------------------------------------------------------------------ exports
def _randomised(module):
    """Every adapter given a say (B is zero at the start), the EMA's copy too: what an export writes is unambiguous."""
    for p in module.adapters.parameters():
        p.data.normal_(0, 0.2)
    module.ema.shadow["lora"].load_state_dict(module.adapters.state_dict())
    return module.eval()


def _loads_whole(pipe, folder, caplog, **kw):
    """``pipe.load_lora_weights``, asserting that diffusers and peft complain of no key (unexpected or missing)."""
    assert not _complaints(pipe, folder, caplog, **kw)


def _complaints(pipe, folder, caplog, **kw) -> list[str]:
    """What diffusers (its loggers propagated to pytest's, as they are not by default) says of keys it left over."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()  # other code may have quieted diffusers (set_verbosity_error)
    diffusers_logging.set_verbosity_warning()
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            pipe.load_lora_weights(str(folder), **kw)
    finally:
        diffusers_logging.disable_propagation()
        diffusers_logging.set_verbosity(verbosity)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said = [m for m in said if not m.startswith("No LoRA keys associated to")]  # the text encoders': none, rightly
    return [m for m in said if any(w in m.lower() for w in ("unexpected", "missing", "not loaded", "not found"))]


def _pipe_images(pipe, height=32, width=32):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="pt", height=height,
                width=width).images * 2 - 1  # fmt: skip


def test_lora_files_load_whole_in_diffusers_and_merged_exports_match(tiny_stage1_checkpoint, tmp_path, caplog):
    """The base model's diffusers export + the LoRA file (diffusers' layout, alpha != rank in its metadata; then kohya's
    through diffusers' own converter) make sample.py's images of the LoRA model within the export tests' Euler
    tolerance, every key loaded; the merged exports (diffusers, safetensors) match it too."""
    from peft import get_peft_model_state_dict

    from emu.diffusion.lora import lora_layers
    from emu.export.diffusers import export_diffusers, load_pipeline
    from emu.export.lora import export_lora
    from tests.test_export import TOLERANCE

    module = _randomised(lora_module(tiny_stage1_checkpoint, rank=4))  # alpha 8: a scale of 2
    settings = SamplingSettings(sampler="euler", steps=4, guidance=3.0, resolution=32)
    ours = module.sample(PROMPTS, SEEDS, settings)
    base_dir = export_diffusers(load_for_sampling(tiny_stage1_checkpoint), tmp_path / "base", sampler="euler")
    base_images = _pipe_images(load_pipeline(base_dir))
    assert (base_images - ours).abs().max() > 0.05  # the adapters matter

    path = export_lora(module, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    pipe = load_pipeline(base_dir)
    _loads_whole(pipe, path.parent, caplog)
    (name,) = pipe.unet.peft_config  # diffusers names the adapter it loads (default_0)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    assert pipe.unet.peft_config[name].lora_alpha == 8 and pipe.unet.peft_config[name].r == 4  # from the metadata
    assert len(lora_layers(pipe.unet)) == len(lora_layers(module.unet))
    theirs, mine = loaded, get_peft_model_state_dict(module.unet)
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    diff = (_pipe_images(pipe) - ours).abs()
    assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], (diff.max(), diff.mean())
    print(f"LoRA file (diffusers layout) vs sample.py: max {diff.max():.2g}, mean {diff.mean():.2g}")

    kohya = export_lora(module, tmp_path / "kohya", layout="kohya")
    from safetensors.torch import load_file

    keys = load_file(str(kohya))
    assert all(k.startswith("lora_unet_") for k in keys) and {float(v) for k, v in keys.items()
                                                              if k.endswith(".alpha")} == {8.0}  # fmt: skip
    pipe = load_pipeline(base_dir)
    _loads_whole(pipe, kohya.parent, caplog, weight_name=kohya.name)
    diff = (_pipe_images(pipe) - ours).abs()
    assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], (diff.max(), diff.mean())
    print(f"LoRA file (kohya layout) vs sample.py: max {diff.max():.2g}, mean {diff.mean():.2g}")

    merged_dir = export_diffusers(module, tmp_path / "merged", sampler="euler")  # the caller's module unchanged
    assert module.adapters is not None
    diff = (_pipe_images(load_pipeline(merged_dir)) - ours).abs()
    assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], (diff.max(), diff.mean())
    print(f"merged diffusers export vs sample.py: max {diff.max():.2g}, mean {diff.mean():.2g}")
    # the check above can fail: a file with a key of no layer of the U-Net is complained about
    from safetensors.torch import save_file

    extra = {**load_file(str(path)), "unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    assert _complaints(load_pipeline(base_dir), tmp_path, caplog, weight_name="extra.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_lora(load_for_sampling(tiny_stage1_checkpoint), tmp_path / "none")


def test_lora_under_fsdp_is_refused_with_what_to_use(tiny_stage1_checkpoint):
    """The frozen base is replicated under DDP; FSDP would shard the adapters' live weights and not their EMA."""
    from types import SimpleNamespace

    from emu.training.distributed import FSDPStrategy

    module = lora_module(tiny_stage1_checkpoint)
    module._trainer = SimpleNamespace(strategy=object.__new__(FSDPStrategy))  # no process group needed to refuse
    with pytest.raises(ConfigError, match=r"^model\.lora: trains under DDP \(trainer=ddp\), not FSDP"):
        module.configure_model()
