"""Inference features: negative prompts, non-square sizes, a guidance interval, guidance rescale, and sample.py's
guidance grid."""

import json
import subprocess
import sys

import pytest
import torch

from emu.diffusion.checkpoints import load_for_sampling
from emu.diffusion.denoiser import preconditioning
from emu.diffusion.pipeline import SamplingSettings
from emu.diffusion.sampling import CFGDenoiser
from emu.errors import ConfigError
from tests.conftest import ROOT

PROMPTS = ["a large red circle in the center on a black background", "a small blue star at the top"]


@pytest.fixture(scope="module")
def module(tiny_stage1_checkpoint):
    return load_for_sampling(tiny_stage1_checkpoint)


def _sample(module, **settings):
    s = SamplingSettings(steps=3, guidance=4.0, **settings)
    return module.sample(PROMPTS, [0, 1], s)


def test_negative_prompt_changes_the_images_and_an_empty_one_is_none(module):
    plain = _sample(module)
    assert torch.equal(_sample(module, negative_prompt=""), plain)
    negative = _sample(module, negative_prompt="a large green square on a white background")
    assert (negative - plain).abs().mean() > 1e-3
    # per image: an empty entry is that image's unconditional embedding, whatever the others ask
    from emu.diffusion.pipeline import generate

    kw = dict(height=32, width=32, steps=3, guidance=4.0, progress=False)
    mixed = generate(module.denoiser, module.conditioner, module.autoencoder, PROMPTS, [0, 1],
                     negative_prompts=["", "a large green square on a white background"], **kw)  # fmt: skip
    ref = generate(module.denoiser, module.conditioner, module.autoencoder, PROMPTS, [0, 1], **kw)
    torch.testing.assert_close(mixed[0], ref[0], atol=1e-5, rtol=0)
    assert (mixed[1] - ref[1]).abs().mean() > 1e-3


def test_with_zeros_as_the_unconditional_embedding_an_empty_negative_prompt_is_still_none(tiny_stage1_checkpoint,
                                                                                        module):  # fmt: skip
    text = {**module.hparams.text, "uncond": "zeros"}
    zeros = load_for_sampling(tiny_stage1_checkpoint, text=text)
    plain = _sample(zeros)
    assert (plain - _sample(module)).abs().mean() > 1e-4  # zeros are not the empty prompt's embedding
    assert torch.equal(_sample(zeros, negative_prompt=""), plain)
    from emu.diffusion.pipeline import negative_conditioning

    mixed = negative_conditioning(zeros.conditioner, ["", "a large green square"])
    u = zeros.conditioner.unconditional_batch(2)
    assert torch.equal(mixed.context[0], u.context[0]) and not torch.equal(mixed.context[1], u.context[1])
    assert torch.equal(mixed.pooled[0], torch.zeros_like(mixed.pooled[0]))


def test_non_square_sizes(module):
    images = _sample(module, width=48, height=32)
    assert images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()
    with pytest.raises(ConfigError, match=r"sampling\.width: 40 is not a positive multiple of 16"):
        SamplingSettings(width=40).image_size(32, module.resolution_multiple, module.downsampling)


class _Fake:
    """A denoiser whose output is its conditioning value: guidance arithmetic is visible in the result."""

    calls = 0

    def __call__(self, x, sigma, value):
        self.calls += 1
        return x * 0 + value.view(-1, 1, 1, 1)


def test_guidance_interval_guides_only_inside_it():
    x, cond, uncond = torch.zeros(2, 1, 2, 2), {"value": torch.ones(2)}, {"value": torch.zeros(2)}
    fake = _Fake()
    cfg = CFGDenoiser(fake, scale=3.0, interval=(1.0, 5.0))
    assert cfg(x, torch.tensor([2.0, 2.0]), cond, uncond).flatten().unique().tolist() == [3.0]  # inside: guided
    before = fake.calls
    assert cfg(x, torch.tensor([9.0, 9.0]), cond, uncond).flatten().unique().tolist() == [1.0]  # outside: cond only
    assert fake.calls == before + 1  # ... in one call (no unconditional batch)
    mixed = cfg(x, torch.tensor([0.5, 5.0]), cond, uncond)  # per sample; hi is inside, lo is not
    assert mixed[0].unique().tolist() == [1.0] and mixed[1].unique().tolist() == [3.0]
    with pytest.raises(ValueError, match="guidance interval"):
        CFGDenoiser(fake, interval=(5.0, 1.0))
    with pytest.raises(ConfigError, match=r"sampling\.guidance_interval"):
        SamplingSettings.from_config({"guidance_interval": [3, 1]})


class _Preconditioned:
    """A denoiser ``D = c_skip x + c_out F`` whose network output ``F`` is its conditioning value."""

    sigma_data = 1.0

    def __init__(self, parameterization: str | None):
        self.parameterization = parameterization

    def __call__(self, x, sigma, value):
        c_skip, c_out, _ = (c.view(-1, 1, 1, 1) for c in preconditioning(self.parameterization or "eps", sigma, 1.0))
        return c_skip * x + c_out * value


@pytest.mark.parametrize("kind", ["eps", "v", None])
def test_guidance_rescale_acts_where_diffusers_applies_it(kind):
    """On the network's output (eps or v), through diffusers' own ``rescale_noise_cfg``, so that ``sample.py`` and a
    diffusers export of the same model agree; a denoiser that does not say its parameterization: on x0."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    x, f_cond, f_uncond = (torch.randn(2, 4, 8, 8, generator=g) * s for s in (3.0, 1.0, 0.4))
    sigma, scale, rescale = torch.tensor([3.0, 0.7]), 5.0, 0.7
    denoiser = _Preconditioned(kind)
    got = CFGDenoiser(denoiser, scale, rescale)(x, sigma, {"value": f_cond}, {"value": f_uncond})
    c_skip, c_out, _ = (c.view(-1, 1, 1, 1) for c in preconditioning(kind or "eps", sigma, 1.0))
    if kind is None:  # a plain k-diffusion denoiser: x0 is all there is
        d_cond, d_uncond = (c_skip * x + c_out * f for f in (f_cond, f_uncond))
        expected = rescale_noise_cfg(d_uncond + scale * (d_cond - d_uncond), d_cond, guidance_rescale=rescale)
    else:
        f = rescale_noise_cfg(f_uncond + scale * (f_cond - f_uncond), f_cond, guidance_rescale=rescale)
        expected = c_skip * x + c_out * f
        on_x0 = CFGDenoiser(lambda x, sigma, value: denoiser(x, sigma, value), scale, rescale)  # hides the kind
        assert (on_x0(x, sigma, {"value": f_cond}, {"value": f_uncond}) - expected).abs().max() > 0.1  # not the same
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_guidance_interval_on_the_model(module):
    plain = _sample(module)
    assert torch.equal(_sample(module, guidance_interval=[0.0, 1e9]), plain)  # every level: as no interval
    unguided = module.sample(PROMPTS, [0, 1], SamplingSettings(steps=3, guidance=1.0))
    torch.testing.assert_close(_sample(module, guidance_interval=[1e8, 1e9]), unguided, atol=1e-5, rtol=0)


def test_ddim_eta_noise_comes_from_each_images_seed(module):
    """``sampling.eta`` reaches DDIM; the noise it re-injects is drawn per image from its seed, so an image is the same
    in a batch of 1 or 2; another seed gives another image; eta=0 is the deterministic DDIM of before."""
    ddim = dict(sampler="ddim", steps=4, guidance=4.0, resolution=32)
    ones = module.sample(PROMPTS, [0, 1], SamplingSettings(eta=1.0, batch_size=1, **ddim))
    pair = module.sample(PROMPTS, [0, 1], SamplingSettings(eta=1.0, batch_size=2, **ddim))
    torch.testing.assert_close(pair, ones, atol=1e-4, rtol=0)  # (batched kernels: ~1e-5; a wrong noise: ~0.3)
    assert torch.equal(module.sample(PROMPTS, [0, 1], SamplingSettings(eta=1.0, batch_size=2, **ddim)), pair)
    # the same prompt twice: its seeds set it apart, and seed 0 gives the image it gave beside the other prompt
    same = module.sample([PROMPTS[0]] * 2, [0, 7], SamplingSettings(eta=1.0, **ddim))
    torch.testing.assert_close(same[0], ones[0], atol=1e-4, rtol=0)
    assert (same[1] - same[0]).abs().mean() > 1e-2
    # the injected noise is the seed's own, not the starting noise's: only it differs from eta=0
    deterministic = module.sample(PROMPTS, [0, 1], SamplingSettings(**ddim))
    assert (pair - deterministic).abs().mean() > 1e-3
    # eta=0 draws nothing: DDIM as before (its steps are Euler's, x + (sigma_next - sigma) (x - x0) / sigma)
    from emu.diffusion.pipeline import generate

    kw = dict(height=32, width=32, steps=4, guidance=4.0, progress=False, latent_scaling=module.hparams.latent_scaling)
    before = generate(module.denoiser, module.conditioner, module.autoencoder, PROMPTS, [0, 1], sampler="ddim", **kw)
    assert torch.equal(module.sample(PROMPTS, [0, 1], SamplingSettings(eta=0.0, **ddim)), before)
    euler = generate(module.denoiser, module.conditioner, module.autoencoder, PROMPTS, [0, 1], sampler="euler", **kw)
    torch.testing.assert_close(before, euler, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="eta must be >= 0 and is for the ddim sampler only"):
        generate(module.denoiser, module.conditioner, module.autoencoder, PROMPTS, [0, 1], sampler="euler", eta=0.5,
                 **kw)  # fmt: skip


def test_sample_py_guidance_grid(tmp_path, tiny_stage1_checkpoint):
    from PIL import Image

    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt={tiny_stage1_checkpoint}", f"prompt={PROMPTS[0]}", "n=2",
           "sampling.steps=2", "grid_guidance=[1,3]", "sampling.negative_prompt=a small blue star",
           "sampling.width=48", "sampling.height=32", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for g in (1, 3):
        rows = [json.loads(x) for x in (out / f"guidance_{g}" / "metadata.jsonl").read_text().splitlines()]
        assert [x["guidance"] for x in rows] == [g, g] and rows[0]["negative_prompt"] == "a small blue star"
        assert rows[0]["width"] == 48 and rows[0]["height"] == 32
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 2 * (48 + 2), 2 + 2 * (32 + 2))  # 2 columns (scales) x 2 rows (images), 2 px padding
