import math

import lightning as L
import pytest
import torch

from emu.autoencoder import AutoencoderKL
from emu.autoencoder.losses import AutoencoderLoss, PerceptualLoss
from emu.autoencoder.module import AutoencoderModule, load_autoencoder
from emu.autoencoder.stats import measure_latent_statistics
from emu.data import EmuDataModule
from emu.errors import ConfigError
from emu.mini.autoencoder import PatchShortcutAutoencoderKL
from emu.mini.source import HaystackSource
from tests.conftest import haystack_batch

TINY = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def test_overfitting_one_batch_halves_the_reconstruction_loss():
    torch.manual_seed(0)
    x = haystack_batch()["image"]
    model = AutoencoderKL(latent_channels=16, fourier_frequencies=(64.0, 128.0), **TINY)
    loss_fn = AutoencoderLoss(disc_start=10**9)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):  # the batch holds a striped background (fine detail): 40 steps were not always enough
        posterior = model.encode(x)
        loss, logs = loss_fn.generator_loss(x, model.decode(posterior.sample()), posterior, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(logs["l1"]))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # the last few: L1 of a sampled posterior is noisy


class Snapshots(L.Callback):
    """Discriminator weights after every training step, keyed by the step that produced them."""

    def __init__(self):
        self.disc = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.disc[trainer.global_step - 1] = [p.detach().clone() for p in module.loss.discriminator.parameters()]


def tiny_module(tmp_path, disc_start=3, **kw):
    ae = AutoencoderKL(latent_channels=8, **TINY)
    loss = AutoencoderLoss(disc_start=disc_start, disc_width=8, disc_layers=2)
    return AutoencoderModule(ae, loss, lr=1e-3, **kw)


def tiny_trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )


def tiny_data(n_train=16, n_val=8):
    return EmuDataModule(
        HaystackSource(n_train=n_train, n_val=n_val, resolution=32), resolution=32, batch_size=4, require_caption=False
    )


def test_discriminator_trains_only_from_disc_start(tmp_path):
    torch.manual_seed(0)
    module, snaps = tiny_module(tmp_path, disc_start=3), Snapshots()
    initial = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    tiny_trainer(tmp_path, max_steps=6, callbacks=[snaps]).fit(module, datamodule=tiny_data())
    assert sorted(snaps.disc) == [0, 1, 2, 3, 4, 5]  # global_step counts autoencoder steps only
    for step in (0, 1, 2):
        assert all(torch.equal(a, b) for a, b in zip(initial, snaps.disc[step])), step
    for step in (3, 4, 5):
        before = snaps.disc[step - 1]
        assert any(not torch.equal(a, b) for a, b in zip(before, snaps.disc[step])), step


def test_checkpoint_round_trip_and_latent_statistics(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(tmp_path, disc_start=2)
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=data)
    trainer.validate(module, datamodule=data)
    # the statistics are those of posterior samples over the validation images, with where they came from
    mean, std, n = measure_latent_statistics(module.autoencoder, data.dataloader("val"), 10**6, progress=False)
    assert n == 8
    assert module.autoencoder.latent_statistics == {"of": "posterior samples", "step": 4, "images": 8, "split": "val"}
    torch.testing.assert_close(module.autoencoder.latent_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.autoencoder.latent_std, std, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(std, torch.ones_like(std))
    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_autoencoder(ckpt)
    x = haystack_batch(2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.autoencoder.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.latent_std, module.autoencoder.latent_std)
    assert loaded.latent_statistics["step"] == 4
    resumed = tiny_module(tmp_path, disc_start=2)
    resumed.on_load_checkpoint(torch.load(ckpt, weights_only=False))  # what a resume calls
    assert resumed.autoencoder.latent_statistics == module.autoencoder.latent_statistics
    normalized = loaded.normalize(loaded.encode(haystack_batch(8)["image"]).mode())
    torch.testing.assert_close(loaded.denormalize(normalized), loaded.encode(haystack_batch(8)["image"]).mode())
    exported = load_autoencoder(module.autoencoder.save_pretrained(tmp_path / "export"))
    torch.testing.assert_close(exported.latent_mean, module.autoencoder.latent_mean)
    assert exported.latent_statistics == module.autoencoder.latent_statistics
    assert (tmp_path / "export" / "model.safetensors").exists()  # on_fit_end wrote one into the run dir too
    assert (tmp_path / "export" / "config.json").exists()


def test_bad_checkpoints_and_settings(tmp_path):
    torch.save({"state_dict": {}, "emu": {"kind": "diffusion"}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is a diffusion checkpoint, not a stage-0 autoencoder"):
        load_autoencoder(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "missing.ckpt")
    folder = AutoencoderKL(latent_channels=4, **TINY).save_pretrained(tmp_path / "ae4")
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.latent_channels: is 16 but the checkpoint .* has 4"):
        AutoencoderModule(AutoencoderKL(latent_channels=16, **TINY), AutoencoderLoss(), init_from=str(folder))
    module = tiny_module(tmp_path)
    data = EmuDataModule(
        HaystackSource(n_train=8, n_val=0, resolution=36),
        resolution=36,
        batch_size=4,
        require_caption=False,
    )
    expected = r"data\.resolution: 36 is not a positive multiple of 8 \(the autoencoder's downsampling f=8\); try 32"
    with pytest.raises(ConfigError, match=expected):
        tiny_trainer(tmp_path, 1).fit(module, datamodule=data)
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKL(block_out_channels=(12, 24), norm_num_groups=8)


def test_lpips_needs_local_weights_and_loads_them_from_a_path(tmp_path):
    import torchvision

    with pytest.raises(ConfigError, match=r"squeezenet1_1 weights at .* \(no downloads at run time\)"):
        PerceptualLoss("squeeze", weights_dir=str(tmp_path / "empty"))
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    torch.save(torchvision.models.squeezenet1_1().state_dict(), hub / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    previous = torch.hub.get_dir()
    lpips = PerceptualLoss("squeeze", weights_dir=str(hub))
    assert torch.hub.get_dir() == previous
    x = haystack_batch(2, 64)["image"]
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d_same, d_noisy = lpips(x, x), lpips(x, y)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_noisy > d_same).all()
    d_noisy.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())


def test_reconstruction_cli_compares_checkpoints_on_the_same_images(tmp_path, capsys):
    import json

    from emu.evaluation.reconstruction import main
    from emu.utils import named_sets
    from tests.conftest import ROOT

    a = AutoencoderKL(latent_channels=4, **TINY).save_pretrained(tmp_path / "a")
    b = AutoencoderKL(latent_channels=16, **TINY).save_pretrained(tmp_path / "b")
    out = tmp_path / "eval.json"
    try:
        main([str(a), str(b), "--images", "haystack:4", "--sets", str(ROOT / "conf/sets/mini.yaml"), "--resolution",
              "32", "--photos", "--photo-resolution", "32", "--out", str(out)])  # fmt: skip
    finally:
        named_sets.register(None)
    results = json.loads(out.read_text())
    assert [r["latent_channels"] for r in results] == [4, 16]
    for r in results:
        assert r["haystack:4@32"]["images"] == 4 and r["photos@32"]["images"] == 8
        assert 0 < r["haystack:4@32"]["psnr"] < 60 and -1 <= r["photos@32"]["ssim"] <= 1
    assert "photos@32 PSNR/SSIM" in capsys.readouterr().out


def test_latent_statistics_cli_writes_an_export_with_them(tmp_path, capsys):
    from emu.autoencoder.stats import main

    src = AutoencoderKL(latent_channels=4, **TINY).save_pretrained(tmp_path / "src")
    main(["--ckpt", str(src), "--out", str(tmp_path / "out"), "--images", "12", "--device", "cpu",
          "data=haystack", "data.resolution=32", "data.batch_size=4", "data.source.n_train=8",
          "data.source.n_val=12"])  # fmt: skip
    out = AutoencoderKL.from_pretrained(tmp_path / "out")
    assert "latent statistics over 12 val images" in capsys.readouterr().out
    mean, std, _ = measure_latent_statistics(out, tiny_data(n_train=8, n_val=12).dataloader("val"), 12, progress=False)
    torch.testing.assert_close(out.latent_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.latent_std, std, atol=1e-5, rtol=1e-4)


def test_latent_statistics_are_those_of_posterior_samples_and_sum_over_ranks(caplog):
    """Stage 1 trains on posterior samples: their std includes the posterior noise. A channel whose means are constant
    is normalised by its noise (unit std after normalising), not blown up by a std clamped at 1e-6; the old statistics
    of the means alone gave it ~0. Statistics of two ranks' halves, summed, are those of the whole."""
    from emu.autoencoder.model import DiagonalGaussian, collapsed_channels
    from emu.autoencoder.module import LatentStatistics

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5, 0.0]).view(1, 4, 1, 1)
    logvar = torch.full_like(mean, math.log(0.3**2))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], 1))
    stats = LatentStatistics(4)
    stats.update(posterior)
    m, std = stats.compute()
    samples = torch.cat([posterior.sample(g) for _ in range(20)])
    torch.testing.assert_close(std, samples.transpose(0, 1).flatten(1).std(1), atol=0.01, rtol=0.01)
    assert abs(std[3] - 0.3) < 1e-4 and collapsed_channels(std) == []
    model = AutoencoderKL(latent_channels=4, **TINY)
    model.set_latent_statistics(m, std)
    assert abs(float(model.normalize(samples)[:, 3].std()) - 1.0) < 0.02
    means_only = LatentStatistics(4)
    means_only.update(mean)
    with caplog.at_level("WARNING", logger="emu.autoencoder.model"):
        assert model.set_latent_statistics(*means_only.compute()) == [3]
    assert "latent channels [3] have collapsed" in caplog.text

    halves = [LatentStatistics(4), LatentStatistics(4)]
    for half, part in zip(halves, (slice(0, 40), slice(40, 64))):
        half.update(DiagonalGaussian(torch.cat([mean[part], logvar[part]], 1)))
    other = []
    halves[1].reduced(lambda t: other.append(t) or t)
    summed = halves[0].reduced(lambda t: t + other[0])
    assert summed.images == 64 and summed.count == stats.count
    for a, b in zip(summed.compute(), stats.compute()):
        torch.testing.assert_close(a, b)


class FlatColours(torch.utils.data.Dataset):
    """Images of one random colour each: the mean colour is the whole image."""

    def __init__(self, n=64, resolution=32):
        g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, resolution, resolution).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def test_flat_colours_survive_a_few_training_steps_and_resume_keeps_the_patch_init(tmp_path):
    """Today's colour loss would fail this: the deep autoencoder alone returned every flat colour as grey
    (~12 dB after 200 steps); with the patch shortcut, PCA-initialised on the first batch, colours stay."""
    torch.manual_seed(0)
    data = FlatColours()
    ae = PatchShortcutAutoencoderKL(latent_channels=4, **TINY)
    module = AutoencoderModule(ae, AutoencoderLoss(l1_weight=0.0, l2_weight=1.0, disc_start=10**9), lr=1e-3)
    assert bool(module.patch_init_pending)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    trainer = tiny_trainer(tmp_path, max_steps=5)
    trainer.fit(module, train_dataloaders=loader)
    assert not bool(module.patch_init_pending)
    module.eval()
    with torch.no_grad():
        x = FlatColours(n=32, resolution=32).x.flip(0)
        recon = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    psnr = float(-10 * torch.log10(((recon - x) / 2).pow(2).mean()))
    assert psnr > 30, psnr
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = AutoencoderModule(PatchShortcutAutoencoderKL(latent_channels=4, **TINY), AutoencoderLoss())
    resumed.load_state_dict(torch.load(tmp_path / "a.ckpt", weights_only=False)["state_dict"])
    assert not bool(resumed.patch_init_pending)  # a resumed run is never re-initialised
    torch.testing.assert_close(resumed.autoencoder.patch_encoder.weight, ae.patch_encoder.weight)


def test_learning_rate_scaling_rules():
    from emu.utils.schedules import scaled_lr

    assert scaled_lr(4.5e-6, "none", 64) == 4.5e-6
    assert scaled_lr(4.5e-6, "linear", 64) == pytest.approx(2.88e-4)  # LDM: base x GPUs x batch
    assert scaled_lr(1e-4, "sqrt", 64) == pytest.approx(8e-4)
    with pytest.raises(ValueError, match="unknown learning-rate scaling 'cubic'"):
        scaled_lr(1e-4, "cubic", 8)
    with pytest.raises(ConfigError, match=r"model\.lr_scaling: must be one of"):
        tiny_module(None, lr_scaling="cubic")


def test_linear_scaling_gives_the_optimizers_the_rate_per_image_times_the_global_batch(tmp_path):
    """The paper's autoencoder rate 4.5e-6 is per image (the LDM recipe multiplies it by GPUs x batch): as an absolute
    rate it trains 50-100x too slowly. Batch 4 on one process: 4 images per step."""
    module = tiny_module(tmp_path, lr_scaling="linear", warmup_steps=1)
    module.hparams.lr = module.hparams.disc_lr = 4.5e-6
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=tiny_data())
    opt_ae, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in module.optimizers())
    assert module.global_batch() == 4
    assert opt_ae.param_groups[0]["initial_lr"] == pytest.approx(1.8e-5)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1.8e-5)


def test_the_paper_config_scales_warms_up_and_clips_and_the_miniature_keeps_its_rate():
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        paper = compose("train", overrides=["experiment=autoencoder"]).model
        mini = compose("train", overrides=["experiment=mini/autoencoder"]).model
    assert (paper.lr, paper.lr_scaling) == (4.5e-6, "linear") and paper.warmup_steps > 0 and paper.grad_clip > 0
    assert (mini.lr, mini.lr_scaling, mini.warmup_steps, mini.grad_clip) == (1e-3, "none", 100, 1.0)
