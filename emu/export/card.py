"""The model card (README.md) an export writes: what the model is, how it was trained, on what, how it scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from emu.autoencoder.pixel import PixelSpace

MAX_METRICS = 40
LATENT_SCALING_WORDS = {"channel": "per channel", "global": "per model (one scale)",
                        "factor": "by the autoencoder's shift_factor / scaling_factor (as diffusers)"}  # fmt: skip


def _network_line(net) -> str:
    """The card's line on the denoising network: a U-Net's widths and attention, or a DiT's patches and blocks."""
    c = net.config
    pooled = f"pooled text embedding {c['pooled_dim'] or 'none'}"
    if c.get("arch") == "dit":
        return (f"* **DiT**: {_params(net) / 1e6:.1f}M parameters, {c['patch_size']}x{c['patch_size']} patches, "
                f"{c['depth']} blocks of width {c['width']} ({c['heads']} heads), cross-attention to a context of "
                f"{c['context_dim']}, {pooled}.")  # fmt: skip
    return (f"* **U-Net**: {_params(net) / 1e6:.1f}M parameters, widths {c['block_channels']}, attention depth "
            f"{c['transformer_depth']}, context {c['context_dim']}, {pooled}.")  # fmt: skip


def _objective(hp) -> str:
    """The training objective in words: rectified flow and EDM by their noise distribution, eps / v by their
    schedule."""
    if hp.parameterization == "flow":
        return f"rectified flow (velocity target), logit-normal t (mean {hp.p_mean}, std {hp.p_std})"
    if hp.parameterization == "edm":
        return f"EDM preconditioning, log-normal sigma (mean {hp.p_mean}, std {hp.p_std}), sigma_data {hp.sigma_data}"
    schedule = dict(hp.noise_schedule or {})
    return (f"{hp.parameterization}-prediction, scaled-linear schedule of {schedule.get('steps', 1000)} steps "
            f"({schedule.get('beta_start', 0.00085)} to {schedule.get('beta_end', 0.012)}, zero terminal SNR "
            f"{schedule.get('zero_terminal_snr', False)})")  # fmt: skip


def run_config(ckpt: str | Path) -> dict[str, Any] | None:
    """The Hydra config of the run that wrote a checkpoint (``<run>/.hydra/config.yaml`` beside ``<run>/checkpoints``),
    or None when the checkpoint travelled without its run folder."""
    path = Path(ckpt).expanduser().resolve()
    for folder in (path.parent.parent, path.parent):
        cfg = folder / ".hydra" / "config.yaml"
        if cfg.is_file():
            return yaml.safe_load(cfg.read_text())
    return None


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of an ``eval.py`` metrics.json, flattened to ``a/b/c`` keys (configs and lists left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "grids"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(flat_metrics(value, f"{name}/"))
    return out


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_card(module, source: str, fmt: str, weights: str, metrics_path: str | Path | None = None,
               pipeline: str = "emu") -> str:  # fmt: skip
    """README.md for an export of ``module`` (a DiffusionModule) made from ``source`` in format ``fmt``
    (``diffusers`` or ``safetensors``) with ``weights`` (``ema`` / ``raw``); a diffusers export's ``pipeline``: ``emu``
    (EmuPipeline, shipped code) or ``sdxl`` (a stock StableDiffusionXLPipeline)."""
    hp = module.hparams
    stage = f"stage 2 (quality-tuned from `{hp.init_from}`)" if hp.init_from else "stage 1 (pre-trained)"
    encoders = ", ".join(f"{n} (`{e.name_or_path}`, {e.kind}, {e.max_length} tokens)"
                         for n, e in module.conditioner.encoders.items())  # fmt: skip
    ae = module.autoencoder.config
    lines = [
        "---",
        f"library_name: {'diffusers' if fmt == 'diffusers' else 'emu'}",
        "pipeline_tag: text-to-image",
        "tags: [text-to-image, latent-diffusion, emu]",
        "license: # left to you: the licenses of the training data and of the text encoders apply",
        "---",
        "",
        f"# Text-to-image {'pixel-space' if isinstance(module.autoencoder, PixelSpace) else 'latent'} diffusion model "
        "trained with emu",
        "",
        f"Exported by `python -m emu.export {fmt}` from `{source}` ({weights.upper()} weights).",
        "",
        "## Model",
        "",
        f"* **Stage**: {stage}; {module.trained_steps if module.trained_steps is not None else 'unknown'} "
        f"optimizer steps at {module.train_resolution or 'unknown'} px.",
        _network_line(module.unet),
        f"* **Text encoders** (frozen): {encoders}; uncond: {hp.text.get('uncond', 'empty')}.",
        "* **Autoencoder**: none, diffusion on pixels."
        if isinstance(module.autoencoder, PixelSpace)
        else f"* **Autoencoder** (frozen): {ae['latent_channels']} latent channels, "
        f"f={module.autoencoder.downsample_factor}, Fourier features {ae['fourier_frequencies'] or 'none'}, "
        f"patch shortcut {ae.get('patch_shortcut', False)}; latents "
        f"normalised {LATENT_SCALING_WORDS.get(hp.latent_scaling, hp.latent_scaling)}.",
        f"* **Diffusion**: {_objective(hp)}, {hp.weighting} loss weighting, noise offset {hp.noise_offset}.",
        f"* **Optimisation**: AdamW lr {hp.lr}, {hp.lr_schedule} after {hp.warmup_steps} warm-up steps, EMA half-life "
        f"{hp.ema_half_life_images} images.",
        "",
        "## Training data",
        "",
    ]
    cfg = run_config(source) if Path(source).suffix == ".ckpt" else None
    if module.trained_on:
        lines += ["As recorded in the checkpoint:", "", "```yaml",
                  yaml.safe_dump(module.trained_on, sort_keys=False).strip(), "```"]  # fmt: skip
    if cfg and cfg.get("data"):
        lines += ["", f"The run `{cfg.get('task_name', '?')}`'s data config:", "", "```yaml",
                  yaml.safe_dump(cfg["data"], sort_keys=False).strip(), "```"]  # fmt: skip
    if not module.trained_on and not (cfg and cfg.get("data")):
        lines += ["Not recorded with this checkpoint (written before checkpoints described their data, and its run "
                  "folder's `.hydra/config.yaml` was not found)."]  # fmt: skip
    lines += ["", "## Evaluation", ""]
    if metrics_path is not None:
        numbers = flat_metrics(json.loads(Path(metrics_path).read_text()))
        lines += [f"From `{metrics_path}` (`eval.py`):", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in list(numbers.items())[:MAX_METRICS]]
        if len(numbers) > MAX_METRICS:
            lines.append(f"| ... | {len(numbers) - MAX_METRICS} more in the metrics file |")
    else:
        lines += ["None given (`--metrics` takes an `eval.py` metrics.json)."]
    lines += ["", "## Use", ""]
    if fmt == "diffusers" and pipeline == "sdxl":
        lines += ["A stock `StableDiffusionXLPipeline` (diffusers' and transformers' classes only):", "",
                  "```python", "from diffusers import DiffusionPipeline", "",
                  'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")  # add_watermarker=False: no '
                  "invisible watermark where that package is installed",
                  'image = pipe("a red circle on a black background", num_inference_steps=25, guidance_scale=5.0)'
                  ".images[0]", "```"]  # fmt: skip
    elif fmt == "diffusers":
        lines += ["```python", "from diffusers import DiffusionPipeline", "",
                  'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
                  'image = pipe("a red circle on a black background", negative_prompt="", num_inference_steps=25,',
                  "             guidance_scale=5.0).images[0]", "```"]  # fmt: skip
    else:
        lines += ["```bash", 'python sample.py ckpt=path/to/this/folder prompt="a red circle on a black background"',
                  "python eval.py a=path/to/this/folder b=path/to/another", "```"]  # fmt: skip
    return "\n".join(lines) + "\n"
