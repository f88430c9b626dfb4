"""Weights between emu's :class:`~emu.diffusion.unet.UNet` and diffusers' ``UNet2DConditionModel``.

The two share block structure and parameter names, so conversion maps the configs (:func:`unet_kwargs`; a folder's:
:func:`read_unet_kwargs`, which ``model.unet`` takes) and loads the state dict as it is. Supported diffusers models:
``DownBlock2D`` / ``CrossAttnDownBlock2D`` levels, a ``UNetMidBlock2DCrossAttn`` mid block, SiLU, GEGLU, and
optionally a pooled text embedding, either through ``class_embed_type="projection"`` or with the six size and crop ids
through SDXL's ``addition_embed_type="text_time"`` (emu's ``addition_time_embed_dim``; diffusers'
``added_cond_kwargs={"text_embeds", "time_ids"}`` are emu's ``pooled`` and ``size_cond``, ids in the same order).
Attention heads may differ in width per level (SD 1.x: 8 heads everywhere, widths 40 / 80 / 160; SD 2.x and SDXL:
64-wide heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emu.diffusion.unet import SIZE_CONDITIONS, UNet
from emu.errors import ConfigError
from emu.utils.checkpoint_header import diffusers_unet_folder


def _heads_per_level(c) -> list[int]:
    heads = c.get("num_attention_heads") or c["attention_head_dim"]  # diffusers' legacy name: head_dim = heads
    return [heads] * len(c["block_out_channels"]) if isinstance(heads, int) else list(heads)


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def unet_kwargs(c: Mapping[str, Any]) -> dict[str, Any]:
    """emu's :class:`~emu.diffusion.unet.UNet` keyword arguments for a diffusers ``UNet2DConditionModel`` config (all
    its keys, as a model's ``.config`` has them); a ``ValueError`` for what has no counterpart."""
    n = len(c["block_out_channels"])
    allowed_down = {"DownBlock2D", "CrossAttnDownBlock2D"}
    if not set(c["down_block_types"]) <= allowed_down or c["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported block types {c['down_block_types']} / {c['mid_block_type']}")
    text_time = c.get("addition_embed_type") == "text_time"
    embeds = (c.get("class_embed_type"), c.get("addition_embed_type"))
    if c["act_fn"] != "silu" or embeds not in ((None, None), ("projection", None), (None, "text_time")):
        raise ValueError("only SiLU U-Nets with class_embed_type None or 'projection', or addition_embed_type "
                         "'text_time' (SDXL) and no class embedding, convert")  # fmt: skip
    pooled_dim = c["projection_class_embeddings_input_dim"] if c.get("class_embed_type") == "projection" else None
    if text_time:
        pooled_dim = c["projection_class_embeddings_input_dim"] - SIZE_CONDITIONS * c["addition_time_embed_dim"]
        if pooled_dim <= 0:
            raise ValueError(f"text_time: projection_class_embeddings_input_dim "
                             f"{c['projection_class_embeddings_input_dim']} leaves no room for a pooled text embedding "
                             f"beside {SIZE_CONDITIONS} ids of {c['addition_time_embed_dim']}")  # fmt: skip
    if not c["flip_sin_to_cos"] or c["freq_shift"] != 0 or c["time_embedding_type"] != "positional":
        raise ValueError("only positional time embeddings with flip_sin_to_cos=True, freq_shift=0 convert")
    for key in ("only_cross_attention", "dual_cross_attention", "mid_block_only_cross_attention"):
        if any(_as_list(c.get(key) or False)):
            raise ValueError(f"{key}=True has no counterpart in emu's U-Net")
    if c["resnet_time_scale_shift"] != "default" or c.get("time_cond_proj_dim") is not None:
        raise ValueError("only resnet_time_scale_shift='default' without time_cond_proj_dim converts")
    if c.get("encoder_hid_dim_type") is not None or c.get("attention_type", "default") != "default":
        raise ValueError("encoder_hid_dim_type and gated attention have no counterpart in emu's U-Net")
    heads = _heads_per_level(c)
    if len(heads) != n or any(ch % h for ch, h in zip(c["block_out_channels"], heads, strict=True)):
        raise ValueError(f"attention heads {heads} do not divide the block widths {list(c['block_out_channels'])}")
    widths = [ch // h for ch, h in zip(c["block_out_channels"], heads, strict=True)]
    head_dim = widths[0] if len(set(widths)) == 1 else widths  # one width (SDXL, SD 2.x) or one per level (SD 1.x)
    tdepth = c["transformer_layers_per_block"]
    tdepth = [tdepth] * n if isinstance(tdepth, int) else list(tdepth)
    depth = [d if t == "CrossAttnDownBlock2D" else 0 for d, t in zip(tdepth, c["down_block_types"], strict=True)]
    if tdepth[-1] != max(depth[-1], 1):
        raise ValueError("the mid block's transformer depth must equal the last level's")
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        block_channels=list(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"],
        transformer_depth=depth,
        head_dim=head_dim,
        context_dim=c["cross_attention_dim"],
        pooled_dim=pooled_dim,
        norm_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        linear_projection=c["use_linear_projection"],
        addition_time_embed_dim=c["addition_time_embed_dim"] if text_time else None,
    )


def read_unet_kwargs(path: str | Path, key: str = "model.unet") -> dict[str, Any]:
    """:func:`unet_kwargs` of a diffusers U-Net folder or a pipeline folder's ``unet/`` (SDXL-base's), read from its
    ``config.json`` (diffusers' defaults for the keys it leaves out) without loading weights; a
    :class:`~emu.errors.ConfigError` naming ``key`` for anything else."""
    from diffusers import UNet2DConditionModel

    folder = diffusers_unet_folder(path)
    if folder is None:
        raise ConfigError(key, f"'{path}' is neither a diffusers UNet2DConditionModel folder nor a pipeline folder "
                          "with one in unet/ (config.json naming UNet2DConditionModel)")  # fmt: skip
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))
    try:
        return unet_kwargs(unet.config)
    except ValueError as e:
        raise ConfigError(key, f"the U-Net of '{folder}' does not convert to emu's: {e}") from e


def from_diffusers(unet) -> UNet:
    """A diffusers ``UNet2DConditionModel`` -> ours, with identical outputs."""
    model = UNet(**unet_kwargs(unet.config))
    model.load_state_dict(unet.state_dict())  # strict: any naming difference is an error
    return model.to(next(unet.parameters()).dtype)


def to_diffusers(model: UNet):
    """Ours -> a diffusers ``UNet2DConditionModel`` with the same weights."""
    from diffusers import UNet2DConditionModel

    c = model.config
    if c.get("size_conditioning"):
        raise ValueError("size and crop conditioning has no counterpart in diffusers' UNet2DConditionModel as emu's "
                         "size_conditioning adds it (SDXL's text_time embedding concatenates it with the pooled text "
                         "instead: addition_time_embed_dim): this U-Net does not convert")  # fmt: skip
    text_time = c.get("addition_time_embed_dim")
    add_dim = c["pooled_dim"] + SIZE_CONDITIONS * text_time if text_time else c["pooled_dim"]
    depth = c["transformer_depth"]
    widths = c["head_dim"] if isinstance(c["head_dim"], list | tuple) else [c["head_dim"]] * len(depth)
    heads = [ch // w for ch, w in zip(c["block_channels"], widths, strict=True)]
    unet = UNet2DConditionModel(
        sample_size=None,
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depth[::-1]),
        block_out_channels=tuple(c["block_channels"]),
        layers_per_block=tuple(c["layers_per_block"]),
        transformer_layers_per_block=tuple(max(d, 1) if i == len(depth) - 1 else d for i, d in enumerate(depth)),
        attention_head_dim=tuple(heads),
        cross_attention_dim=c["context_dim"],
        norm_num_groups=c["norm_groups"],
        norm_eps=c["norm_eps"],
        use_linear_projection=c["linear_projection"],
        class_embed_type="projection" if c["pooled_dim"] and not text_time else None,
        addition_embed_type="text_time" if text_time else None,
        addition_time_embed_dim=text_time or None,
        projection_class_embeddings_input_dim=add_dim,
        dropout=c["dropout"],
    )
    unet.load_state_dict(model.state_dict())
    return unet.to(next(model.parameters()).dtype)
