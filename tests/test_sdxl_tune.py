"""Quality-tuning a public SDXL folder (issue 41 item 3): ``experiment=stage2_quality_tune_sdxl base=<folder>`` trains
from the folder's U-Net with Emu's stage-2 recipe, and ``python -m emu.export diffusers`` hands back a stock
``StableDiffusionXLPipeline`` folder whose images are ``sample.py``'s; what SDXL's pipeline cannot express is refused
with the reasons, and ``auto`` falls back to emu's own pipeline."""

import json
from typing import ClassVar

import lightning as L
import pytest
import torch

from emu.data.samples import size_conditions
from emu.diffusion.checkpoints import load_for_sampling
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from emu.export.__main__ import main as export_main
from tests.test_export import PROMPTS, SEEDS, TOLERANCE

pytest.importorskip("diffusers")


class InitProbe(L.Callback):
    """The U-Net's weights when training starts, and what the text_time embedding receives in each step beside the
    batch's size and crop conditioning (kept on the class: Hydra builds the instance)."""

    seen: ClassVar[dict] = {}

    def __init__(self):
        InitProbe.seen = {"add_embedding": [], "size_cond": []}

    def on_train_start(self, trainer, pl_module):
        InitProbe.seen["unet_at_start"] = {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()}
        seen = InitProbe.seen["add_embedding"]
        pl_module.unet.add_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        InitProbe.seen["size_cond"].append(size_conditions(batch["meta"]))


def _tune_cfg(tmp_path, request, *extra):
    from tests.test_train import compose_train

    fixture = request.getfixturevalue
    return compose_train([
        "experiment=stage2_quality_tune_sdxl", f"base={fixture('tiny_sdxl')}", f"paths.output_dir={tmp_path}",
        f"data.source.root={fixture('tiny_curated')}", "data.resolution=64", "data.min_size=64", "data.batch_size=2",
        "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false",
        "trainer=cpu", "trainer.devices=1", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "model.compile=false", "model.channels_last=false", "model.warmup_steps=1", "model.size_cond_dropout=0",
        "model.text.encoders.clip_l.max_length=16", "model.text.encoders.clip_g.max_length=16",
        "model.text.encoders.clip_l.dtype=float32", "model.text.encoders.clip_g.dtype=float32",
        f"callbacks.selection.judge.clip={fixture('tiny_clip')}",
        f"callbacks.selection.judge.head={fixture('aesthetic_head')}",
        f"callbacks.selection.prompts=['{PROMPTS[0]}','{PROMPTS[1]}']", "callbacks.selection.every_n_steps=2",
        "callbacks.selection.sampling.steps=2", "callbacks.selection.sampling.batch_size=2",
        "callbacks.progress_bar=null",
        "+callbacks.probe._target_=tests.test_sdxl_tune.InitProbe", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, request):
    """A two-step stage2_quality_tune_sdxl run over the tiny SDXL folder: its output folder."""
    import train

    out = tmp_path_factory.mktemp("sdxl_tune")
    train.train(_tune_cfg(out, request))
    return out


def test_sdxl_experiment_tunes_from_the_folder_with_the_stage2_recipe(tuned, tiny_sdxl):
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import Timesteps

    from emu.diffusion.convert import read_unet_kwargs

    # the recipe (a difference over stage2_quality_tune) and the model's settings, as composed
    cfg = json.loads(json.dumps(torch.load(tuned / "checkpoints" / "last.ckpt", map_location="cpu",
                                           weights_only=False)["hyper_parameters"], default=str))  # fmt: skip
    assert cfg["noise_offset"] == 0.1 and cfg["lr_schedule"] == "constant" and cfg["ema_half_life_images"] == 50000
    assert cfg["unet"] == read_unet_kwargs(tiny_sdxl) and cfg["unet"]["addition_time_embed_dim"] == 8  # kwargs kept
    assert cfg["init_from"] == str(tiny_sdxl) and cfg["latent_scaling"] == "factor"
    assert cfg["text"]["join"] == "features" and cfg["text"]["uncond"] == "zeros"
    # the first step starts from the folder's U-Net, bit for bit (emu's parameter names are diffusers')
    theirs = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").state_dict()
    start = InitProbe.seen["unet_at_start"]
    assert set(start) == set(theirs) and all(torch.equal(start[k], theirs[k]) for k in theirs)
    # the batch's size and crop conditioning reaches the text_time embedding as diffusers embeds time_ids
    ids = InitProbe.seen["size_cond"][0]
    inputs = InitProbe.seen["add_embedding"][0]
    assert inputs.shape == (2, 40 + 6 * 8) and ids[0, 0] == 64
    torch.testing.assert_close(inputs[:, 40:], Timesteps(8, True, 0)(ids.flatten()).reshape(2, -1))
    # trained, scored by the selection judge at step 0 and 2, and a checkpoint written
    summary = json.loads((tuned / "checkpoints" / "select" / "selection.json").read_text())
    assert [r["step"] for r in summary["rows"]] == [0, 2]
    module = load_for_sampling(tuned / "checkpoints" / "last.ckpt", ema=False)
    assert any(not torch.equal(v, theirs[k]) for k, v in module.unet.state_dict().items())


def test_the_tuned_sdxl_exports_as_a_stock_pipeline_with_sample_py_images(tuned, tmp_path, capsys):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    ckpt = tuned / "checkpoints" / "last.ckpt"
    out = tmp_path / "sdxl"
    assert export_main(["diffusers", str(ckpt), str(out), "--sampler", "euler"]) == 0  # auto: SDXL's
    assert "StableDiffusionXLPipeline" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert not list(out.rglob("*.py"))  # no shipped code
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "trust_remote_code" not in card
    pipe = DiffusionPipeline.from_pretrained(str(out))  # no trust_remote_code
    assert type(pipe) is StableDiffusionXLPipeline and pipe.watermark is None
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64  # its default size: the training resolution

    ours = load_for_sampling(ckpt)  # the EMA weights, as exported

    def theirs(height, width, negative):
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=3.0, generator=gens,
                    height=height, width=width, output_type="pt").images * 2 - 1  # fmt: skip

    diffs = []
    for height, width, negative in ((64, 64, None), (32, 48, "a large green square on a white background")):
        settings = SamplingSettings(sampler="euler", steps=4, guidance=3.0, height=height, width=width,
                                    negative_prompt=negative or "")  # fmt: skip
        images = ours.sample(PROMPTS, SEEDS, settings)
        diff = (theirs(height, width, negative and [negative] * 2) - images).abs()
        diffs.append((diff.max().item(), diff.mean().item()))
        assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], diffs
        assert images.std() > 0.05 and (images[0] - images[1]).abs().mean() > 0.01  # images, and two of them
    print("SDXL export vs sample.py (max, mean):", diffs)
    # SDXL's pipeline zeroes the unconditional embedding only when no negative prompt is given; an explicit "" is the
    # empty prompt's embedding there (emu: "" is no negative prompt), and makes other images
    assert (theirs(64, 64, ["", ""]) - theirs(64, 64, None)).abs().max() > TOLERANCE["euler"][0]
    # --pipeline emu: emu's own pipeline all the same
    assert export_main(["diffusers", str(ckpt), str(tmp_path / "emu"), "--sampler", "euler", "--pipeline", "emu"]) == 0
    assert json.loads((tmp_path / "emu" / "model_index.json").read_text())["_class_name"][1] == "EmuPipeline"


def test_an_emu_conditioned_model_is_refused_as_sdxl_and_falls_back(tiny_stage1_checkpoint, tmp_path, capsys):
    from emu.export.diffusers import choose_pipeline, sdxl_problems

    assert export_main(["diffusers", str(tiny_stage1_checkpoint), str(tmp_path / "x"), "--pipeline", "sdxl"]) == 2
    err = capsys.readouterr().err
    assert "not expressible as diffusers' StableDiffusionXLPipeline" in err and not (tmp_path / "x").exists()
    problems = sdxl_problems(load_for_sampling(tiny_stage1_checkpoint))
    assert all(p in err for p in problems)
    expected = ("no text_time embedding", "['clip', 't5'], not two CLIP", "not 'features'", "not 'zeros'",
                "not the penultimate", "masks its padding", "not 'factor'")  # fmt: skip
    assert all(any(e in p for p in problems) for e in expected), problems
    out = tmp_path / "auto"
    assert export_main(["diffusers", str(tiny_stage1_checkpoint), str(out), "--sampler", "euler"]) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline_emu", "EmuPipeline"]
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="choose one of"):
        choose_pipeline(load_for_sampling(tiny_stage1_checkpoint), "stock")


def test_model_unet_takes_a_diffusers_folder_and_names_a_wrong_one(tiny_sdxl, tmp_path):
    from emu.diffusion.convert import read_unet_kwargs, unet_kwargs

    kwargs = read_unet_kwargs(tiny_sdxl)
    assert kwargs == read_unet_kwargs(tiny_sdxl / "unet")  # the pipeline folder or its unet/
    assert kwargs["context_dim"] == 80 and kwargs["pooled_dim"] == 40 and kwargs["transformer_depth"] == [0, 1]
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match="only SiLU"):
        unet_kwargs({**config, "act_fn": "gelu"})
    with pytest.raises(ConfigError, match=r"model\.unet: '.*' is neither a diffusers UNet2DConditionModel folder"):
        read_unet_kwargs(tmp_path)
    # train.py's checks before anything is built: the folder's U-Net against the data's resolution, or a wrong folder
    from emu.utils.validate import validate
    from tests.test_train import compose_train

    def check(base, *extra):
        validate(compose_train(["experiment=stage2_quality_tune_sdxl", f"base={base}", "data.source.root=/d", *extra]))

    check(tiny_sdxl, "data.resolution=64")
    with pytest.raises(ConfigError, match=r"data\.resolution.*autoencoder f=8 x U-Net 2x"):
        check(tiny_sdxl, "data.resolution=72")
    with pytest.raises(ConfigError, match=r"model\.unet.*is neither U-Net settings nor a diffusers"):
        check(tmp_path)


def test_the_memory_plan_reads_the_sdxl_folder(tiny_sdxl):
    """The plan sizes the folder's U-Net, with SDXL's join: no projections, one 77-token (here 16) context."""
    from emu.diffusion.convert import read_unet_kwargs
    from emu.diffusion.unet import UNet
    from emu.plan import plan_config
    from tests.test_train import compose_train

    cfg = compose_train(["experiment=stage2_quality_tune_sdxl", f"base={tiny_sdxl}", "data.source.root=/data"])
    with torch.device("meta"):
        unet = UNet(**read_unet_kwargs(tiny_sdxl))
    plan = plan_config(cfg)
    assert plan.setup["trained_params"] == sum(p.numel() for p in unet.parameters())

    # with LoRA (under DDP): the adapters' states and EMA, beside the frozen U-Net, which no longer has any
    lora = plan_config(compose_train(["experiment=stage2_quality_tune_sdxl", f"base={tiny_sdxl}", "trainer=ddp",
                                      "data.source.root=/data", "model.lora.rank=4"]))  # fmt: skip
    adapters = sum(4 * (m.in_features + m.out_features) for n, m in unet.named_modules()
                   if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))  # fmt: skip
    assert lora.setup["trained_params"] == adapters
    assert lora.train["U-Net and projections (frozen LoRA base, float32)"] == 4 * plan.setup["trained_params"]
    assert lora.train["AdamW moments"] < plan.train["AdamW moments"] / 4
    from emu.utils.validate import validate

    with pytest.raises(ConfigError, match=r"model\.lora trains under DDP \(trainer=ddp\), not FSDP"):
        validate(compose_train(["experiment=stage2_quality_tune_sdxl", f"base={tiny_sdxl}", "model.lora.rank=4",
                                "data.source.root=/data"]))  # the experiment's trainer=fsdp  # fmt: skip


def test_sdxl_base_config_reads_as_its_2p6b_unet(tmp_path):
    """stable-diffusion-xl-base-1.0's unet/config.json (its keys as published) as emu's U-Net kwargs: 64-wide heads,
    transformer depths 0 / 2 / 10, the 2048-wide context, bigG's 1280-wide pooled embedding beside 6 ids of 256."""
    from emu.diffusion.convert import read_unet_kwargs
    from emu.diffusion.unet import UNet

    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
              "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
              "center_input_sample": False, "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D",
              "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "flip_sin_to_cos": True, "freq_shift": 0,
              "in_channels": 4, "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
              "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
              "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D",
              "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}  # fmt: skip
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    kwargs = read_unet_kwargs(tmp_path)
    assert kwargs["head_dim"] == 64 and kwargs["transformer_depth"] == [0, 2, 10] and kwargs["context_dim"] == 2048
    assert kwargs["pooled_dim"] == 1280 and kwargs["addition_time_embed_dim"] == 256
    with torch.device("meta"):
        unet = UNet(**kwargs)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # diffusers' count for SDXL-base's U-Net


def test_lora_on_sdxl_trains_the_adapters_alone_and_loads_onto_the_stock_folder(tmp_path, request, tiny_sdxl, caplog):
    """``experiment=stage2_quality_tune_sdxl model.lora.rank=4``: the checkpoint holds the adapters over the folder
    (by path); its LoRA file loads onto the *original* SDXL folder with diffusers' stock pipeline, every key used, and
    makes ``sample.py``'s images of the LoRA model within the Euler tolerance."""
    from diffusers import StableDiffusionXLPipeline

    import train
    from emu.export.diffusers import make_scheduler
    from tests.test_lora import _loads_whole, _randomised

    pytest.importorskip("peft")
    cfg = _tune_cfg(tmp_path, request, "model.lora.rank=4", "model.lora.alpha=8")
    train.train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    unet_keys = [k for k in saved["state_dict"] if k.startswith("unet.")]
    assert unet_keys and all(".lora_A." in k or ".lora_B." in k for k in unet_keys)
    assert saved["hyper_parameters"]["init_from"] == str(tiny_sdxl)

    from safetensors.torch import load_file

    from emu.diffusion.lora import lora_state_dict
    from emu.export.lora import export_lora

    for extra, ema in (([], True), (["--raw"], False)):  # the command, on the checkpoint: its EMA adapters, or raw
        assert export_main(["lora", str(ckpt), str(tmp_path / f"lora{extra}"), *extra]) == 0
        written = load_file(str(tmp_path / f"lora{extra}" / "pytorch_lora_weights.safetensors"))
        expected = lora_state_dict(load_for_sampling(ckpt, ema=ema).unet)
        assert written.keys() == {f"unet.{k}" for k in expected}
        assert all(torch.equal(written[f"unet.{k}"], v) for k, v in expected.items())
    module = _randomised(load_for_sampling(ckpt))  # B moved little in 2 steps at 1e-5: give every adapter a say

    path = export_lora(module, tmp_path / "lora_random")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), add_watermarker=False)
    pipe.scheduler = make_scheduler(module, "euler")  # the folder ships SDXL's leading-spacing Euler
    _loads_whole(pipe, path.parent, caplog)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, height=64, width=64,
                  output_type="pt").images * 2 - 1  # fmt: skip
    ours = module.sample(PROMPTS, SEEDS, SamplingSettings(sampler="euler", steps=4, guidance=3.0, resolution=64))
    diff = (theirs - ours).abs()
    assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], (diff.max(), diff.mean())
    print(f"SDXL + LoRA file vs sample.py: max {diff.max():.2g}, mean {diff.mean():.2g}")
