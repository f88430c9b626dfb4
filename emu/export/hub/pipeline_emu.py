"""Text -> image with a model trained by emu, as a diffusers pipeline.

Shipped at the root of a folder written by ``python -m emu.export diffusers`` (it needs only torch, diffusers and
transformers)::

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    image = pipe("a red circle on a black background", num_inference_steps=25, guidance_scale=5.0).images[0]

Components: ``unet`` (diffusers' ``UNet2DConditionModel``), ``vae`` (``EmuAutoencoderKL``: diffusers' autoencoder with
emu's Fourier features, patch path and per-channel latent statistics), ``text_encoder`` / ``tokenizer`` and
``text_encoder_2`` / ``tokenizer_2`` (the frozen CLIP and T5, in the conditioner's order), ``text_projection``
(``EmuTextProjection``: the conditioner's trained projections) and ``scheduler`` (the training schedule; any diffusers
scheduler of the same schedule can replace it, one with ``sigmas`` for ``guidance_interval``). What differs from
diffusers' own pipelines: the text conditioning (projected tokens of every encoder concatenated, with their attention
mask, and CLIP's pooled embedding added to the time embedding; or SDXL's: penultimate states side by side, the
pooled embedding and ``time_ids`` through the U-Net's ``text_time`` embedding) and the latents' per-channel
normalisation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class EmuPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_projection->unet->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(self, unet, vae, scheduler, text_projection, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, latent_scaling: str = "channel", sample_size: int | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_projection=text_projection,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2)  # fmt: skip
        if latent_scaling not in ("channel", "global", "factor"):
            raise ValueError(f"latent_scaling must be 'channel', 'global' or 'factor', got {latent_scaling!r}")
        self.register_to_config(latent_scaling=latent_scaling, sample_size=sample_size)
        self.image_processor = VaeImageProcessor(do_normalize=True)

    # ------------------------------------------------------------------------------------------------ text
    def _encoders(self):
        """``(spec, encoder, tokenizer)`` for each encoder of the conditioner, in its order."""
        parts = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        specs = self.text_projection.config.encoders
        if len(specs) > len(parts):
            raise ValueError(f"this pipeline runs at most {len(parts)} text encoders; the model has {len(specs)}")
        return [(spec, *parts[i]) for i, spec in enumerate(specs)]

    @torch.no_grad()
    def _embed(self, prompts: list[str], device) -> dict:
        out = {}
        for spec, encoder, tokenizer in self._encoders():
            batch = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=spec["max_length"],
                              return_tensors="pt")  # fmt: skip
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            masked, penultimate = spec.get("mask_padding", True), spec.get("hidden_state", "last") == "penultimate"
            result = encoder(input_ids=ids, attention_mask=mask if masked else None, output_hidden_states=penultimate)
            pooled = result.text_embeds if spec["kind"] == "clip" else None
            tokens = result.hidden_states[-2] if penultimate else result.last_hidden_state
            out[spec["name"]] = (tokens, mask.bool() if masked else torch.ones_like(mask, dtype=torch.bool), pooled)
        return out

    @torch.no_grad()
    def _unconditional(self, n: int, device) -> dict:
        out = {}
        for name, (tokens, mask, pooled) in self._embed([""], device).items():
            if self.text_projection.config.uncond == "zeros":
                tokens, mask = torch.zeros_like(tokens), torch.ones_like(mask)
                pooled = None if pooled is None else torch.zeros_like(pooled)
            out[name] = (tokens.expand(n, -1, -1), mask.expand(n, -1), None if pooled is None else pooled.expand(n, -1))
        return out

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompts: list[str], device):
        """``(conditional, negative)`` conditionings, each ``(context, mask, pooled)``; an empty negative prompt is the
        unconditional embedding (as no negative prompt)."""
        cond = self.text_projection(self._embed(prompts, device))
        uncond = self._unconditional(len(prompts), device)
        if any(negative_prompts):
            neg = self._embed([p or "" for p in negative_prompts], device)
            keep = torch.tensor([bool(p) for p in negative_prompts], device=device)
            for name, (tokens, mask, pooled) in neg.items():
                ut, um, up = uncond[name]
                uncond[name] = (torch.where(keep[:, None, None], tokens, ut), torch.where(keep[:, None], mask, um),
                                None if pooled is None else torch.where(keep[:, None], pooled, up))  # fmt: skip
        return cond, self.text_projection(uncond)

    # ------------------------------------------------------------------------------------------------ latents
    def _latent_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, std)`` that map the U-Net's normalised latents to the autoencoder's: the VAE's
        ``latents_mean`` and ``latents_std / scaling_factor`` (diffusers' meaning), else its one ``shift_factor`` and
        ``1 / scaling_factor`` for every channel (a public autoencoder: SD3's, FLUX.1's)."""
        c = self.vae.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean = torch.tensor(c.latents_mean).float()
            std = (torch.tensor(c.latents_std, dtype=torch.float64) / c.scaling_factor).float()
        else:
            mean = torch.full((c.latent_channels,), float(c.shift_factor or 0.0))
            std = torch.full((c.latent_channels,), 1.0 / c.scaling_factor)
        if self.config.latent_scaling == "global":
            std = std.double().square().mean().sqrt().float().expand_as(std)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        if self.config.latent_scaling == "factor":  # as diffusers' SD3 and FLUX.1 pipelines
            z = latents.float() / c.scaling_factor
            z = z if c.shift_factor is None else z + c.shift_factor
        else:
            mean, std = self._latent_scale()
            z = latents.float() * std.to(latents.device) + mean.to(latents.device)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for ``prompt``. ``guidance_interval = (sigma_lo, sigma_hi)`` guides only at noise levels in
        ``(lo, hi]`` (the conditional prediction elsewhere); ``guidance_rescale`` follows diffusers (on the guided
        model output). One generator per image (a list) gives each image its own noise, as emu's ``sample.py``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if guidance_interval is not None:
            if not 0 <= guidance_interval[0] < guidance_interval[1]:
                raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi), 0 <= lo < hi: {guidance_interval}")
            if getattr(self.scheduler, "sigmas", None) is None:
                name = type(self.scheduler).__name__
                raise ValueError(f"guidance_interval is in sigma and {name} has no sigmas: use the shipped DPM-Solver "
                                 "or Euler scheduler")  # fmt: skip
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        side = self.config.sample_size or 64
        height, width = height or side, width or side
        f_vae = 2 ** (len(self.vae.config.block_out_channels) - 1)
        f = f_vae * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height} x {width}")
        device = self._execution_device
        (ctx, mask, pooled), (u_ctx, u_mask, u_pooled) = self.encode_prompt(prompts, negatives, device)
        dtype = self.unet.dtype

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (len(prompts), self.unet.config.in_channels, height // f_vae, width // f_vae)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma
        both = (torch.cat([u_ctx, ctx]).to(dtype), torch.cat([u_mask, mask]).float(),
                None if pooled is None else torch.cat([u_pooled, pooled]).to(dtype))  # fmt: skip
        single = (ctx.to(dtype), mask.float(), None if pooled is None else pooled.to(dtype))
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            lo, hi = guidance_interval or (None, None)
            inside = guidance_interval is None or lo < float(self.scheduler.sigmas[i]) <= hi
            guided = guidance_scale != 1.0 and inside
            x = torch.cat([latents, latents]) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            c, m, p = both if guided else single
            extra = {"class_labels": p}
            if self.unet.config.addition_embed_type == "text_time":  # SDXL's: uncropped, the output's size
                ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
                extra = {"added_cond_kwargs": {"text_embeds": p, "time_ids": ids.expand(len(p), -1)}}
            out = self.unet(x.to(dtype), t, encoder_hidden_states=c, encoder_attention_mask=m, return_dict=False,
                            **extra)[0].float()  # fmt: skip
            if guided:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
                if guidance_rescale > 0:
                    dims = list(range(1, out.ndim))
                    rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                    out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
            latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
