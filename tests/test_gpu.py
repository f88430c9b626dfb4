"""The GPU paths, on one CUDA device (``pytest -m gpu``; ``make gpu-check`` runs them first; without CUDA they skip).

bf16 autocast, as Lightning's ``bf16-mixed`` runs it (float32 weights, bf16 compute), of the autoencoder, the U-Net,
the text conditioner and sampling: finite, in bf16 where autocast computes, and close to the same network in float32
(TF32 off) within the relative L2 errors of :data:`TOLERANCE`; backward passes give finite gradients.
``trainer=fsdp`` with one rank trains, saves a sharded checkpoint and resumes from it (bench/stage1_fsdp.py's tiny
scale). The U-Net's attention runs on the flash SDPA kernel in bf16 (only that kernel allowed): all of it without a
text mask; with one, every self-attention does, while the masked cross-attention runs on the memory-efficient kernel
(flash takes no mask), never on the slow math fallback.
"""

import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
sys.path.insert(0, str(ROOT / "bench"))

DEVICE = torch.device("cuda")
BF16 = torch.bfloat16
# Relative L2 error of bf16 autocast against float32, about twice what CPU bf16 autocast gives on these random
# networks (autoencoder 0.067, U-Net 0.014, conditioner 0.007, 10 sampling steps 0.021): bf16 keeps 8 bits of
# mantissa, an untrained decoder amplifies the rounding, a sampling trajectory compounds it. A float32-only part run
# in bf16 (the Fourier features' sin(2π·128·x), say) or an overflow is far above these.
TOLERANCE = {"autoencoder": 0.15, "unet": 0.05, "conditioner": 0.03, "sampling": 0.1}
PROMPTS = ["a large red circle in the top left on a navy background", "a small blue star at the bottom"]
UNET = dict(in_channels=16, out_channels=16, block_channels=[64, 128], layers_per_block=1, transformer_depth=[1, 1],
            head_dim=64, context_dim=64, pooled_dim=32, norm_groups=32)  # fmt: skip


@pytest.fixture(autouse=True)
def float32_reference():
    """Without TF32 the float32 reference is float32; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast():
    return torch.autocast(DEVICE.type, dtype=BF16)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_finite_gradients(module: torch.nn.Module) -> None:
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"
    assert any(g.abs().sum() > 0 for g in grads.values())


def unet_and_inputs(batch: int = 2, latent: int = 16, tokens: int = 24):
    from unet_step import make_inputs

    from emu.diffusion.unet import UNet

    torch.manual_seed(0)
    unet = UNet(**UNET).to(DEVICE)
    inputs = {k: None if v is None else v.to(DEVICE) for k, v in make_inputs(UNET, batch, latent, tokens).items()}
    return unet, inputs


def test_autoencoder_bf16_autocast_is_close_to_float32_and_trains():
    from emu.autoencoder.model import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(latent_channels=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                       norm_num_groups=32, fourier_frequencies=(64.0, 128.0)).to(DEVICE)  # fmt: skip
    x = torch.rand(2, 3, 64, 64, device=DEVICE) * 2 - 1
    with torch.no_grad():
        reference = ae.decode(ae.encode(x).mode())
    with autocast():
        latent = ae.encode(x).mode()
        out = ae.decode(latent)
    assert out.dtype == BF16 and torch.isfinite(out).all() and torch.isfinite(latent).all()
    assert relative_error(out, reference) < TOLERANCE["autoencoder"]
    (out.float() - x).abs().mean().backward()
    assert_finite_gradients(ae)


def test_unet_bf16_autocast_is_close_to_float32_and_trains():
    unet, i = unet_and_inputs()
    with torch.no_grad():
        reference = unet(i["x"], i["t"], i["context"], i["mask"], pooled=i["pooled"])
    with autocast():
        out = unet(i["x"], i["t"], i["context"], i["mask"], pooled=i["pooled"])
    assert out.dtype == BF16 and torch.isfinite(out).all()
    assert relative_error(out, reference) < TOLERANCE["unet"]
    torch.nn.functional.mse_loss(out.float(), i["target"]).backward()
    assert_finite_gradients(unet)


def test_text_conditioner_bf16_encoders_and_autocast_are_close_to_float32(tiny_clip, tiny_t5):
    """The paper configs load CLIP and T5 in bf16 and project under autocast; the reference loads them in float32."""
    from emu.text.conditioner import TextConditioner
    from emu.text.encoders import FrozenTextEncoder

    def conditioner(dtype: str) -> TextConditioner:
        encoders = {"clip": FrozenTextEncoder(str(tiny_clip), "clip", 16, dtype),
                    "t5": FrozenTextEncoder(str(tiny_t5), "t5", 16, dtype)}  # fmt: skip
        torch.manual_seed(0)  # the same projections in both
        return TextConditioner(encoders, context_dim=64).to(DEVICE)

    reference = conditioner("float32").condition(PROMPTS)
    bf16 = conditioner("bfloat16")
    assert next(bf16.encoders["t5"].parameters()).dtype == BF16
    with autocast():
        c = bf16.condition(PROMPTS)
    assert c.context.dtype == BF16 and torch.isfinite(c.context).all() and torch.isfinite(c.pooled).all()
    assert torch.equal(c.mask, reference.mask)
    assert relative_error(c.context, reference.context) < TOLERANCE["conditioner"]
    assert relative_error(c.pooled, reference.pooled) < TOLERANCE["conditioner"]


def test_sampling_bf16_autocast_is_close_to_float32():
    """bench/sampling.py's tiny networks through ``generate`` (DPM++ 2M, CFG), bf16 autocast against float32."""
    from sampling import build

    from emu.diffusion.pipeline import generate

    denoiser, conditioner, autoencoder = build("tiny", DEVICE)
    seeds = [0, 1]

    def sample(dtype):
        return generate(denoiser, conditioner, autoencoder, PROMPTS, seeds, 16, 16, steps=10, guidance=5.0,
                        autocast_dtype=dtype, progress=False)  # fmt: skip

    reference, images = sample(None), sample(BF16)
    assert images.shape == reference.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert relative_error(images, reference) < TOLERANCE["sampling"]


def test_fsdp_one_rank_trains_saves_a_sharded_checkpoint_and_resumes(tmp_path):
    """``experiment=stage1_pretrain trainer=fsdp`` on one GPU in bf16 (FSDP's bf16 parameters, bf16-mixed), tiny
    models: bench/stage1_fsdp.py fails unless the resumed run starts at the step the first one saved."""
    import stage1_fsdp

    r = stage1_fsdp.main(["--scale", "tiny", "--device", "cuda", "--out", str(tmp_path / "stage1_fsdp")])
    assert r["first"]["world_size"] == 1 and r["precision"].startswith("bf16")
    assert (r["first"]["end_step"], r["resumed"]["start_step"], r["resumed"]["end_step"]) == (2, 2, 3)
    assert r["checkpoint"]["shards"] == 1 and r["checkpoint"]["ema"]
    assert r["first"]["median_step_seconds"] > 0 and r["first"]["peak_memory_gb"] > 0


def test_unet_attention_runs_on_flash_sdpa_in_bf16(monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unet, i = unet_and_inputs()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast():  # only flash: raises if any call cannot use it
        out = unet(i["x"], i["t"], i["context"], None, pooled=i["pooled"])
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()

    # with the text mask: unmasked calls (self-attention) on flash only, masked ones (cross-attention) on the
    # memory-efficient kernel only; no call may fall back to the math kernel
    sdpa, kernels = torch.nn.functional.scaled_dot_product_attention, []

    def only_fast_kernels(q, k, v, attn_mask=None, **kw):
        backend = SDPBackend.FLASH_ATTENTION if attn_mask is None else SDPBackend.EFFICIENT_ATTENTION
        kernels.append(backend)
        with sdpa_kernel(backend):
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", only_fast_kernels)
    with autocast():
        out = unet(i["x"], i["t"], i["context"], i["mask"], pooled=i["pooled"])
    assert torch.isfinite(out).all()
    layers = sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    assert kernels.count(SDPBackend.FLASH_ATTENTION) == kernels.count(SDPBackend.EFFICIENT_ATTENTION) == layers
