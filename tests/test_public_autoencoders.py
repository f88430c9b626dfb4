"""Public autoencoders in and out: diffusers' ``AutoencoderKL`` of SD / SDXL (quant convs, one scale factor) and of
SD3 / FLUX.1 (16 channels, no quant convs, shift and scale factors) convert both ways (to float32 rounding), keep
diffusers' latent normalisation exactly, and load wherever an autoencoder is named (stages 0-2, validation, the
memory plan)."""

import json
from types import SimpleNamespace

import pytest
import torch

from emu.autoencoder.convert import from_diffusers, to_diffusers
from emu.autoencoder.model import AutoencoderKL
from emu.autoencoder.module import load_autoencoder

pytest.importorskip("diffusers")

# diffusers' (shift_factor, scaling_factor) of the public autoencoders (SD and SDXL have no shift)
SD3, FLUX, SD, SDXL = (0.0609, 1.5305), (0.1159, 0.3611), (None, 0.18215), (None, 0.13025)
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)  # f=2


def assert_float_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """emu's network against diffusers' with the same weights: equal up to float32 rounding. The mid-block attention
    runs diffusers' operations in another memory layout (its group norm over b c h w, not b c (h w)), so sums round
    differently: at most 1.2e-7 on these models (2026-12-06). Bit-for-bit needs diffusers' layout, which moves the
    miniature's numbers at float noise: it lands with a fresh demo."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def diffusers_vae(factors=SD3, quant=False, channels=16, seed=0):
    """A random diffusers AutoencoderKL: SD3 / FLUX.1 layout (no quant convs) or SD's (quant convs); every weight drawn
    at random (none of diffusers' zero initialisations left)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    shift, scale = factors
    vae = DiffusersAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=channels, use_quant_conv=quant, use_post_quant_conv=quant, shift_factor=shift,
        scaling_factor=scale, **TINY,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.1)
    return vae


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """An SD3-like VAE saved as diffusers does: alone, and as a pipeline folder's vae/."""
    root = tmp_path_factory.mktemp("public")
    vae = diffusers_vae(SD3)
    vae.save_pretrained(root / "vae_only")
    vae.save_pretrained(root / "pipeline" / "vae")
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root


def images(n=2, h=16, w=24):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


LAYOUTS = [(SD3, False, 16), (FLUX, False, 16), (SD, True, 4), (SDXL, True, 4)]  # factors, quant convs, channels


@pytest.mark.parametrize("factors,quant,channels", LAYOUTS)
@torch.no_grad()
def test_public_autoencoders_convert_both_ways(factors, quant, channels):
    vae = diffusers_vae(factors, quant, channels)
    ours = from_diffusers(vae).eval()
    assert (ours.quant_conv is not None, ours.post_quant_conv is not None) == (quant, quant)
    assert set(ours.state_dict()) == set(vae.state_dict()) | {"latent_mean", "latent_std"}
    x = images()
    ref, post = vae.encode(x).latent_dist, ours.encode(x)
    for a, b in ((post.mean, ref.mean), (post.logvar, ref.logvar), (post.std, ref.std)):
        assert_float_close(a, b)
    z = ref.sample(torch.Generator().manual_seed(2))
    assert_float_close(ours.decode(z), vae.decode(z).sample)
    back = to_diffusers(ours).eval()
    c = back.config
    assert (c.shift_factor, c.scaling_factor) == factors and c.latents_mean is None and c.latents_std is None
    assert (c.use_quant_conv, c.use_post_quant_conv) == (quant, quant)
    assert torch.equal(back(x).sample, vae(x).sample)


@pytest.mark.parametrize("factors", [SD3, FLUX, SD, SDXL])
def test_latent_normalisation_is_diffusers_exactly(factors):
    """``factor`` is diffusers' ``(z - shift_factor) * scaling_factor`` and its inverse bit for bit; ``global`` divides
    by exactly the stored std ``1 / scaling_factor`` (float32), as ``channel`` does, and both agree with diffusers to
    float32 rounding: at most 3 half-ulps, relative 2^-22 (a division by the rounded reciprocal against a product)."""
    ours = from_diffusers(diffusers_vae(factors, quant=factors[0] is None, channels=16))
    shift, scale = factors
    record = ours.latent_statistics
    assert ours.latent_factors() == factors and (record["shift_factor"], record["scaling_factor"]) == factors
    assert "shift_factor / scaling_factor" in record["of"]
    assert torch.equal(ours.latent_mean, torch.full((16,), shift or 0.0))
    assert torch.equal(ours.latent_std, torch.full((16,), 1 / scale))
    assert torch.equal(ours._scale("global"), ours.latent_std.view(1, -1, 1, 1))  # the RMS of equal stds: that std

    z = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    theirs = z * scale if shift is None else (z - shift) * scale  # SD / SDXL pipelines; SD3 / FLUX.1 pipelines
    normed = ours.normalize(z, "factor")
    assert torch.equal(normed, theirs)
    inverse = normed / scale if shift is None else normed / scale + shift
    assert torch.equal(ours.denormalize(normed, "factor"), inverse)
    for scaling in ("channel", "global"):
        assert torch.equal(ours.normalize(z, scaling), ours.normalize(z, "channel"))
        torch.testing.assert_close(ours.normalize(z, scaling), theirs, rtol=2**-22, atol=0)
        back = ours.denormalize(normed, scaling)
        assert ((back - inverse).abs() <= 2**-22 * ((normed / scale).abs() + inverse.abs())).all()


def test_per_channel_diffusers_statistics_keep_diffusers_meaning():
    """``latents_mean`` / ``latents_std`` (SDXL pipelines: ``(z - mean) * scaling_factor / std``) become the
    per-channel statistics; emu's own statistics go out as them with ``scaling_factor`` 1, and come back unchanged."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    mean, std = torch.linspace(-0.5, 0.5, 4), torch.linspace(0.5, 2.0, 4)
    config = to_diffusers(AutoencoderKL(latent_channels=4, **TINY)).config
    vae = DiffusersAutoencoderKL(**{**config, "latents_mean": mean.tolist(), "latents_std": std.tolist(),
                                    "scaling_factor": 0.5})  # fmt: skip
    ours = from_diffusers(vae)
    assert ours.latent_factors() is None and "latents_mean / latents_std" in ours.latent_statistics["of"]
    assert torch.equal(ours.latent_mean, mean) and torch.equal(ours.latent_std, std / 0.5)
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(ours.normalize(z), (z - mean.view(1, -1, 1, 1)) * 0.5 / std.view(1, -1, 1, 1),
                               rtol=2**-21, atol=0)  # fmt: skip
    c = to_diffusers(ours).config
    assert c.scaling_factor == 1.0 and c.shift_factor is None and c.latents_std == (std / 0.5).tolist()
    again = from_diffusers(to_diffusers(ours))
    assert torch.equal(again.latent_mean, ours.latent_mean) and torch.equal(again.latent_std, ours.latent_std)
    with pytest.raises(ValueError, match="latent scaling 'factor' needs diffusers' shift_factor / scaling_factor"):
        ours.normalize(z, "factor")


@torch.no_grad()
def test_load_autoencoder_takes_diffusers_folders_pipelines_and_cached_hub_ids(sd3_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    reference = from_diffusers(diffusers_vae(SD3)).eval()
    x = images()
    expected = reference(x)
    cache = tmp_path / "hub"  # a Hugging Face cache holding one pipeline repo (nothing is downloaded)
    snapshot = cache / "models--org--sd3-like" / "snapshots" / ("0" * 40)
    snapshot.parent.parent.joinpath("refs").mkdir(parents=True)
    snapshot.parent.parent.joinpath("refs", "main").write_text("0" * 40)
    (snapshot / "vae").mkdir(parents=True)
    for f in (sd3_folder / "pipeline" / "vae").iterdir():
        (snapshot / "vae" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in (sd3_folder / "vae_only", sd3_folder / "pipeline", "org/sd3-like"):
        model = load_autoencoder(name)
        assert type(model) is AutoencoderKL and model.quant_conv is None and model.post_quant_conv is None
        assert model.latent_factors() == SD3 and model.latent_statistics["source"].endswith(("vae", "vae_only"))
        assert torch.equal(model(x), expected)
    # through an emu export (stage 0's, a diffusion export's copy): the same model, factors and all
    exported = load_autoencoder(model.save_pretrained(tmp_path / "emu"))
    assert exported.latent_factors() == SD3 and torch.equal(exported(x), expected)
    assert json.loads((tmp_path / "emu" / "config.json").read_text())["use_quant_conv"] is False
    with pytest.raises(FileNotFoundError, match="nor a hub id in the local Hugging Face cache"):
        load_autoencoder("org/not-cached")
    with pytest.raises(FileNotFoundError, match="is neither an autoencoder export folder"):
        load_autoencoder(tmp_path / "nowhere")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel"):
        load_autoencoder(other)


def test_validation_and_the_memory_plan_read_public_autoencoders(sd3_folder):
    from emu.autoencoder.convert import read_emu_config
    from emu.plan import autoencoder_model
    from emu.utils.validate import autoencoder_config

    assert autoencoder_config(sd3_folder / "pipeline")["latent_channels"] == 16
    skeleton = autoencoder_model(str(sd3_folder / "pipeline"))
    assert skeleton.config == AutoencoderKL(**read_emu_config(sd3_folder / "pipeline" / "vae")).config
    assert skeleton.quant_conv is None and skeleton.config["block_out_channels"] == [8, 16]


def test_stage0_starts_from_a_public_autoencoder(sd3_folder):
    from emu.autoencoder.convert import read_emu_config
    from emu.autoencoder.losses import AutoencoderLoss
    from emu.autoencoder.module import AutoencoderModule
    from emu.errors import ConfigError

    config = read_emu_config(sd3_folder / "pipeline" / "vae")
    module = AutoencoderModule(AutoencoderKL(**config), AutoencoderLoss(), init_from=str(sd3_folder / "pipeline"))
    public = load_autoencoder(sd3_folder / "pipeline")
    for key, value in public.state_dict().items():
        assert torch.equal(module.autoencoder.state_dict()[key], value), key
    assert module.autoencoder.latent_statistics == public.latent_statistics
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.use_quant_conv: is True but"):
        AutoencoderModule(AutoencoderKL(**{**config, "use_quant_conv": True}), AutoencoderLoss(),
                          init_from=str(sd3_folder / "vae_only"))  # fmt: skip


def test_stages_1_and_2_train_on_a_public_autoencoder(sd3_folder, tiny_autoencoder, tiny_clip, tiny_t5):
    from emu.errors import ConfigError
    from tests.test_stage1 import tiny_module

    module = tiny_module(sd3_folder / "pipeline", tiny_clip, tiny_t5, sample_latents=False, latent_scaling="factor")
    x = images(2, 16, 16)
    vae = diffusers_vae(SD3)
    with torch.no_grad():
        assert_float_close(module.encode_images(x), (vae.encode(x).latent_dist.mean - SD3[0]) * SD3[1])
    with pytest.raises(ConfigError, match=r"^model\.latent_scaling: factor needs an autoencoder with diffusers'"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, latent_scaling="factor")


@torch.no_grad()
def test_exported_pipeline_decodes_a_public_autoencoders_latents_as_emu_does(tmp_path):
    """The shipped ``EmuPipeline`` maps normalised latents back as emu's ``denormalize`` does, for an exported VAE whose
    config has diffusers' factors (no latents_mean), in every scaling (to float32 rounding: the decoder's attention)."""
    from emu.export.diffusers import _hub_module, export_vae

    ours = from_diffusers(diffusers_vae(FLUX)).eval()
    vae = export_vae(ours, tmp_path / "vae")
    assert (vae.config.shift_factor, vae.config.scaling_factor) == FLUX and vae.config.latents_mean is None
    pipe_cls = _hub_module("pipeline_emu.py").EmuPipeline
    zn = torch.randn(2, 16, 4, 4)
    for scaling in ("channel", "global", "factor"):
        pipe = SimpleNamespace(vae=vae.eval(), config=SimpleNamespace(latent_scaling=scaling))
        pipe._latent_scale = pipe_cls._latent_scale.__get__(pipe)
        expected = ours.decode(ours.denormalize(zn, scaling)).clamp(-1, 1)
        assert_float_close(pipe_cls.decode_latents(pipe, zn), expected)


def test_old_exports_without_the_new_keys_keep_their_quant_convs(tmp_path):
    """A config.json written before ``use_quant_conv`` existed means quant convs; the state-dict keys are unchanged,
    and the miniature's patch-shortcut model still starts nearly sharp with or without them."""
    from emu.mini.autoencoder import INITIAL_LOGVAR, PatchShortcutAutoencoderKL

    model = AutoencoderKL(latent_channels=4, **TINY).eval()
    assert {"quant_conv.weight", "post_quant_conv.weight"} <= set(model.state_dict())
    folder = model.save_pretrained(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["use_quant_conv"], config["use_post_quant_conv"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoencoderKL.from_pretrained(folder)
    assert loaded.quant_conv is not None and loaded.config["use_quant_conv"] is True
    x = images()
    assert torch.equal(loaded(x), model(x))
    for quant in (True, False):
        mini = PatchShortcutAutoencoderKL(latent_channels=4, use_quant_conv=quant, use_post_quant_conv=quant, **TINY)
        assert torch.equal(mini.encode(x).logvar, torch.full_like(mini.encode(x).logvar, INITIAL_LOGVAR))
