import pytest
import torch

from emu.autoencoder import AutoencoderKL, FourierFeatures
from emu.autoencoder.convert import from_diffusers, to_diffusers

TINY = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


@pytest.mark.parametrize("channels", [4, 8, 16])
@pytest.mark.parametrize("fourier", [(), (64.0, 128.0)])
def test_shapes(channels, fourier):
    model = AutoencoderKL(latent_channels=channels, fourier_frequencies=fourier, **TINY)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mode().shape == posterior.sample().shape == (2, channels, 4, 6)
    assert posterior.kl().shape == (2,) and (posterior.kl() >= 0).all()
    assert model.decode(posterior.mode()).shape == x.shape == model(x).shape
    assert model.downsample_factor == 8
    if fourier:
        assert model.encoder.conv_in.in_channels == 15  # 3 + 3 * 2 * 2: five times the RGB channels


def test_default_fourier_features_carry_intensity_structure_below_the_8bit_nyquist():
    """On a 256-level ramp over [-1, 1] every default feature changes sign as often as the continuous sin does (4f
    times) with at least 2 levels per half-period. The old [64, 128] failed both: sin(2π·64x) flipped at every level
    (the last bit's parity) and sin(2π·128x) aliased to 1 flip."""
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    default = OmegaConf.load(ROOT / "conf/model/autoencoder.yaml").autoencoder.fourier_frequencies
    assert len(default) >= 2 and FourierFeatures().frequencies.tolist() == list(default)
    ramp = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for f in default:
        s = torch.sin(2 * torch.pi * f * ramp)
        flips = int((torch.sign(s[1:]) * torch.sign(s[:-1]) < 0).sum())
        assert abs(flips - 4 * f) <= 2 and 4 * f <= 255 / 2, (f, flips)


def test_fourier_features_are_fixed_sin_cos():
    ff = FourierFeatures((1.0, 2.0))
    x = torch.tensor([0.25, -0.1, 0.5]).view(1, 3, 1, 1)
    out = ff(x).flatten()
    assert out.shape == (15,) and not list(ff.parameters())
    torch.testing.assert_close(out[:3], x.flatten())
    # channel 0's features: sin(2π·1·x), sin(2π·2·x), cos(2π·1·x), cos(2π·2·x)
    torch.testing.assert_close(out[3:7], torch.tensor([1.0, 0.0, 0.0, -1.0]), atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = AutoencoderKL(latent_channels=4, **TINY)
    x = torch.randn(1, 3, 16, 16)
    model(x).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x).square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = AutoencoderKL(latent_channels=16, fourier_frequencies=(64.0, 128.0), **TINY).eval()
    model.set_latent_statistics(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    model.save_pretrained(tmp_path / "ae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.latent_std, model.latent_std)
    with pytest.raises(FileNotFoundError, match="not an exported emu autoencoder"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_latent_scaling_channel_and_global():
    """``channel`` whitens each latent channel; ``global`` divides all by one scale (the RMS of the channel stds), so
    the latents have unit variance on average and each channel keeps its share; both invert exactly."""
    model = AutoencoderKL(latent_channels=4, **TINY)
    std = torch.tensor([4.0, 2.0, 1.0, 0.5])
    model.set_latent_statistics(torch.tensor([1.0, -1.0, 0.0, 2.0]), std)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 4, 4, 4, generator=g) * std.view(1, -1, 1, 1) + model.latent_mean.view(1, -1, 1, 1)
    per_channel = model.normalize(z, "channel").transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(per_channel, torch.ones(4), atol=0.05, rtol=0)
    glob = model.normalize(z, "global").transpose(0, 1).flatten(1)
    assert abs(glob.square().mean().item() - 1.0) < 0.05  # unit variance on average over channels
    torch.testing.assert_close(
        glob.std(1) / glob.std(1)[-1], std / std[-1], atol=0, rtol=0.05
    )  # the channels' ratios kept
    for scaling in ("channel", "global"):
        torch.testing.assert_close(model.denormalize(model.normalize(z, scaling), scaling), z)
    with pytest.raises(ValueError, match="unknown latent scaling 'pixel'"):
        model.normalize(z, "pixel")


def test_diffusers_equivalence_both_ways():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=8, norm_num_groups=8,
    ).eval()  # fmt: skip
    with torch.no_grad():  # random weights everywhere, not the zero-initialised defaults of some layers
        for p in vae.parameters():
            p.normal_(0, 0.1)
    ours = from_diffusers(vae).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # equal up to float32 rounding (tests/test_public_autoencoders.py: assert_float_close)
        ref_post = vae.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, ref_post.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(post.std, ref_post.std, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.decode(post.mean), vae.decode(ref_post.mean).sample, rtol=0, atol=1e-6)
        back = to_diffusers(ours).eval()
        assert torch.equal(back(x).sample, vae(x).sample)


def test_fourier_model_refuses_diffusers_export():
    with pytest.raises(ValueError, match="Fourier"):
        to_diffusers(AutoencoderKL(latent_channels=4, fourier_frequencies=(64.0,), **TINY))


def _psnr(x, y):
    return float(-10 * torch.log10(((x.clamp(-1, 1) - y) / 2).pow(2).mean()))


def test_patch_shortcut_starts_at_the_best_linear_autoencoder(tmp_path):
    from emu.mini.autoencoder import PatchShortcutAutoencoderKL, patch_second_moment
    from tests.conftest import haystack_batch

    x = haystack_batch(n=8, resolution=32)["image"]
    mean_colour = x.mean((2, 3), keepdim=True).expand_as(x)
    psnr = {}
    for channels in (4, 16):
        torch.manual_seed(0)
        model = PatchShortcutAutoencoderKL(latent_channels=channels, fourier_frequencies=(64.0,), **TINY)
        model.init_patch_shortcut(patch_second_moment(x, model.downsample_factor))
        with torch.no_grad():
            recon = model.decode(model.encode(x).mode())
            linear = model.patch_decoder(model.patch_encoder(x))
        torch.testing.assert_close(recon, linear)  # the deep paths start at zero
        psnr[channels] = _psnr(recon, x)
        model.save_pretrained(tmp_path / str(channels))
        loaded = AutoencoderKL.from_pretrained(tmp_path / str(channels))  # the class its config names
        assert type(loaded) is PatchShortcutAutoencoderKL and loaded.config["patch_shortcut"]
        torch.testing.assert_close(loaded.decode(loaded.encode(x).mode()), recon)
    assert psnr[4] > _psnr(mean_colour, x) + 2, psnr
    assert psnr[16] > psnr[4] + 2, psnr  # more latent channels hold more of the patch


def test_patch_shortcut_model_refuses_diffusers_export():
    from emu.mini.autoencoder import PatchShortcutAutoencoderKL

    with pytest.raises(ValueError, match=r"PatchShortcutAutoencoderKL .* has no diffusers counterpart"):
        to_diffusers(PatchShortcutAutoencoderKL(latent_channels=4, **TINY))


def test_the_paper_scale_autoencoder_is_diffusers_layout_and_old_configs_rebuild_their_class(tmp_path):
    """AutoencoderKL holds diffusers' layout and nothing else; a stored config names a subclass by ``class``, and a
    config written before that (``patch_shortcut: true``, today's demo exports) still rebuilds the miniature's."""
    from emu.autoencoder.model import autoencoder_from_config
    from emu.mini.autoencoder import PatchShortcutAutoencoderKL

    plain = AutoencoderKL(latent_channels=4, **TINY)
    assert plain.diffusers_layout and not hasattr(plain, "patch_encoder") and "patch_shortcut" not in plain.config
    assert set(plain.state_dict()) == set(to_diffusers(plain).state_dict()) | {"latent_mean", "latent_std"}
    assert type(autoencoder_from_config(plain.config)) is AutoencoderKL
    mini = PatchShortcutAutoencoderKL(latent_channels=4, **TINY)
    assert type(autoencoder_from_config(mini.config)) is PatchShortcutAutoencoderKL
    legacy = {k: v for k, v in mini.config.items() if k != "class"}  # as configs were written before
    rebuilt = autoencoder_from_config(legacy)
    assert type(rebuilt) is PatchShortcutAutoencoderKL and set(rebuilt.state_dict()) == set(mini.state_dict())
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        autoencoder_from_config({**plain.config, "class": "torch.nn.Linear"})
