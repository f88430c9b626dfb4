"""The U-Net: shapes, gradient checkpointing, and numerical equivalence with diffusers' UNet2DConditionModel."""

import pytest
import torch

from emu.diffusion.convert import from_diffusers, to_diffusers
from emu.diffusion.unet import UNet

TINY = dict(in_channels=4, out_channels=4, block_channels=(32, 64), layers_per_block=1, transformer_depth=(0, 1),
            head_dim=16, context_dim=24, norm_groups=8)  # fmt: skip


def _inputs(b=2, c=4, hw=8, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, hw, hw, generator=g)
    t = torch.tensor([10.0, 731.5])[:b]
    ctx = torch.randn(b, length, 24, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, ctx, mask


@pytest.mark.parametrize("pooled", [None, 12])
def test_unet_shapes_and_mask(pooled):
    torch.manual_seed(0)
    net = UNet(**TINY, pooled_dim=pooled).eval()
    x, t, ctx, mask = _inputs()
    kw = {"pooled": torch.randn(2, 12)} if pooled else {}
    out = net(x, t, ctx, mask, **kw)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # masked tokens do not matter; real ones do
    ctx2 = ctx.clone()
    ctx2[0, 4] += 5.0
    assert torch.allclose(net(x, t, ctx2, mask, **kw)[0], out[0], atol=1e-6)
    ctx2[0, 1] += 5.0
    assert not torch.allclose(net(x, t, ctx2, mask, **kw)[0], out[0], atol=1e-4)
    # odd latent sizes go through (upsampling to the skip's size)
    kw = {k: v[:1] for k, v in kw.items()}
    assert net(torch.randn(1, 4, 6, 10), t[:1], ctx[:1], **kw).shape == (1, 4, 6, 10)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    net = UNet(**TINY)
    x, t, ctx, mask = _inputs()
    net(x, t, ctx, mask).square().mean().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.set_gradient_checkpointing(True)
    net(x, t, ctx, mask).square().mean().backward()
    for a, p in zip(ref, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("linear,pooled,depth", [(True, None, (0, 1)), (False, 12, (1, 2))])
def test_matches_diffusers(linear, pooled, depth):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depth[::-1]),
        transformer_layers_per_block=depth, attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8,
        use_linear_projection=linear, class_embed_type="projection" if pooled else None,
        projection_class_embeddings_input_dim=pooled,
    ).eval()  # fmt: skip
    for p in ref.parameters():  # diffusers zero-initialises some outputs; make every weight matter
        p.data.normal_(0, 0.05)
    ours = from_diffusers(ref).eval()
    x, t, ctx, mask = _inputs()
    pool = torch.randn(2, pooled) if pooled else None
    with torch.no_grad():
        expected = ref(x, t, ctx, class_labels=pool, encoder_attention_mask=mask.float()).sample
        got = ours(x, t, ctx, mask, pooled=pool)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    back = to_diffusers(ours).eval()
    with torch.no_grad():
        again = back(x, t, ctx, class_labels=pool, encoder_attention_mask=mask.float()).sample
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-6)


# SD 1.x: 8 heads at every level (widths 40 / 80 / 160 at full size), conv projections, three attention levels then a
# plain one; SD 2.x: heads [5, 10, 20, 20] (64 wide), linear projections, upcast attention. Here at a tiny width.
SD_SHAPED = {
    "sd1": dict(block_out_channels=(16, 32, 64, 64), attention_head_dim=2, use_linear_projection=False),
    "sd2": dict(block_out_channels=(16, 32, 64, 64), attention_head_dim=(1, 2, 4, 4), use_linear_projection=True,
                upcast_attention=True),
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(SD_SHAPED))
def test_sd_shaped_unets_convert_both_ways(shape):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=24, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **SD_SHAPED[shape],
    ).eval()  # fmt: skip
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    ours = from_diffusers(ref).eval()
    widths = ours.config["head_dim"]
    assert widths == ([8, 16, 32, 32] if shape == "sd1" else 16)  # per-level widths only where they differ
    x, t, ctx, mask = _inputs(hw=16)
    with torch.no_grad():
        expected = ref(x, t, ctx, encoder_attention_mask=mask.float()).sample
        got = ours(x, t, ctx, mask)
        again = to_diffusers(ours).eval()(x, t, ctx, encoder_attention_mask=mask.float()).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-6)


def test_unconvertible_diffusers_unet_is_refused_by_name():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8, only_cross_attention=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="only_cross_attention"):
        from_diffusers(ref)


def test_per_level_head_widths_must_divide_their_level():
    with pytest.raises(ValueError, match="head_dim 24"):
        UNet(**{**TINY, "head_dim": (16, 24)})
    net = UNet(**{**TINY, "head_dim": (16, 32)})
    assert net.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2


def _sdxl_like(diffusers, pooled=16, id_dim=8):
    """A tiny SDXL-shaped U-Net: a plain level then attention levels, 2 transformer blocks at the lowest resolution,
    linear projections, and SDXL's text_time addition embedding (pooled text + 6 size / crop ids -> one MLP)."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=40,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=id_dim,
        projection_class_embeddings_input_dim=pooled + 6 * id_dim,
    ).eval()  # fmt: skip
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    return ref


def _time_emb_inputs(net):
    """What the first ResNet's time projection receives (SiLU of the full time embedding) on the next call."""
    seen = []
    net.down_blocks[0].resnets[0].time_emb_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    return seen


def test_sdxl_text_time_unet_converts_both_ways():
    diffusers = pytest.importorskip("diffusers")
    ref = _sdxl_like(diffusers)
    ours = from_diffusers(ref).eval()
    assert ours.config["pooled_dim"] == 16 and ours.config["addition_time_embed_dim"] == 8
    assert ours.class_embedding is None and ours.add_embedding.linear_1.in_features == 16 + 6 * 8
    g = torch.Generator().manual_seed(1)
    x, ctx, pool = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 40, generator=g), torch.randn(2, 16)
    t = torch.tensor([10.0, 731.5])
    ids = torch.tensor([[1024.0, 768, 0, 32, 1024, 1024], [512, 900, 17, 0, 896, 1152]])  # SDXL's time_ids order
    added = {"text_embeds": pool, "time_ids": ids}
    seen_ref, seen_ours = _time_emb_inputs(ref), _time_emb_inputs(ours)
    back = to_diffusers(ours).eval()
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs=added).sample
        got = ours(x, t, ctx, pooled=pool, size_cond=ids)
        again = back(x, t, ctx, added_cond_kwargs=added).sample
        moved = ours(x, t, ctx, pooled=pool, size_cond=ids.flip(-1))
    # the time embedding with the pooled text and the ids in it is bit for bit diffusers'
    assert torch.equal(seen_ours[0], seen_ref[0])
    # the whole U-Net: float32 rounding of attention in another order (measured 2e-8 on outputs of ~0.03)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
    assert torch.equal(again, expected)  # back in diffusers: the same weights under the same names, same code
    assert (moved - got).abs().max() > 1e-4  # the ids matter
    assert back.config.addition_embed_type == "text_time" and back.config.class_embed_type is None
    with pytest.raises(ValueError, match="size_cond"):
        ours(x, t, ctx, pooled=pool)
    with pytest.raises(ValueError, match="pooled"):
        ours(x, t, ctx, size_cond=ids)


def test_text_time_needs_a_pooled_embedding_and_excludes_emu_size_conditioning():
    with pytest.raises(ValueError, match="needs pooled_dim"):
        UNet(**TINY, addition_time_embed_dim=8)
    with pytest.raises(ValueError, match="size_conditioning"):
        UNet(**TINY, pooled_dim=12, addition_time_embed_dim=8, size_conditioning=True)
    plain = UNet(**TINY, pooled_dim=12)  # off by default: the state dict and config of existing U-Nets are unchanged
    assert "addition_time_embed_dim" not in plain.config and not any(k.startswith("add_") for k in plain.state_dict())


def test_sdxls_own_unet_config_converts_on_the_meta_device():
    """SDXL-base-1.0's U-Net config (weights never allocated): every parameter lands under the same name both ways,
    2,567,463,684 in all, the pooled width 1280 = 2816 - 6 x 256."""
    diffusers = pytest.importorskip("diffusers")
    sdxl = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                use_linear_projection=True)  # fmt: skip
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**sdxl)
        ours = from_diffusers(ref)
        back = to_diffusers(ours)
    assert ours.config["pooled_dim"] == 1280 and ours.config["transformer_depth"] == [0, 2, 10]
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    assert {k: v.shape for k, v in back.state_dict().items()} == shapes
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
