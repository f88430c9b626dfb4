"""Exports: the safetensors folder round-trips bit-exactly and loads in sample.py / eval.py; the diffusers pipeline
makes sample.py's images; wrong inputs get clear errors; the model card says what the model is."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from emu.diffusion.checkpoints import load_for_sampling
from emu.diffusion.export import read_export_config
from emu.diffusion.pipeline import SamplingSettings
from emu.evaluation.items import item_kind
from emu.export.__main__ import main as export_main
from emu.export.diffusers import load_pipeline
from tests.conftest import ROOT, SDXL_TINY_UNET, sdxl_text_config

PROMPTS = ["a large red circle in the center on a black background", "a small blue star at the top"]
SEEDS = [0, 1]
# measured on CPU, images in [-1, 1]: Euler 8e-5 max; DPM++ 2M 0.037 max / 0.0018 mean, because diffusers rounds its
# Karras timesteps to integers and starts from unit-variance noise in its VP space
TOLERANCE = {"euler": (1e-3, 1e-4), "dpmpp_2m": (0.08, 0.006)}  # (max, mean) absolute difference


@pytest.fixture(scope="module")
def fourier_autoencoder(tmp_path_factory):
    """The miniature's kind of autoencoder (Fourier features, patch shortcut, latent statistics), random."""
    torch.manual_seed(1)
    from emu.mini.autoencoder import PatchShortcutAutoencoderKL

    ae = PatchShortcutAutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, fourier_frequencies=(64.0, 128.0))  # fmt: skip
    ae.set_latent_statistics(torch.randn(16) * 0.1, torch.rand(16) + 0.5)
    return ae.save_pretrained(tmp_path_factory.mktemp("fourier_ae"))


@pytest.fixture(scope="module")
def exported(tiny_stage1_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert export_main(["safetensors", str(tiny_stage1_checkpoint), str(out)]) == 0
    return out


def test_safetensors_export_round_trips_bit_exactly(tiny_stage1_checkpoint, exported, tmp_path):
    ckpt = torch.load(tiny_stage1_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    weights = load_file(str(exported / "model.safetensors"))
    ema = {k.replace("ema.shadow.text_proj.", "conditioner.proj.").replace("ema.shadow.", ""): v
           for k, v in ckpt.items() if k.startswith("ema.shadow.")}  # fmt: skip
    assert set(weights) == set(ema) and all(torch.equal(weights[k], ema[k]) for k in ema)
    config = json.loads((exported / "config.json").read_text())
    assert config["weights"] == "ema" and config["step"] == 1 and config["resolution"] == 64
    assert {p.name for p in (exported / "text_encoders").iterdir()} == {"clip", "t5"}
    assert (exported / "autoencoder" / "model.safetensors").is_file() and (exported / "README.md").is_file()

    raw = tmp_path / "raw"
    assert export_main(["safetensors", str(tiny_stage1_checkpoint), str(raw), "--raw"]) == 0
    raw_weights = load_file(str(raw / "model.safetensors"))
    assert all(torch.equal(raw_weights[k], ckpt[k]) for k in raw_weights)
    assert json.loads((raw / "config.json").read_text())["weights"] == "raw"

    # loading: the same weights, the same images, no pickle; a copied folder still loads (paths are relative)
    from_ckpt, from_folder = load_for_sampling(tiny_stage1_checkpoint), load_for_sampling(exported)
    ckpt_state, folder_state = from_ckpt.state_dict(), from_folder.state_dict()
    assert set(folder_state) == {k for k in ckpt_state if not k.startswith("ema.")}  # one set of weights
    assert all(torch.equal(v, ckpt_state[k]) for k, v in folder_state.items())
    settings = SamplingSettings(steps=2, guidance=3.0)
    # equal weights; the images agree to ~2e-5, not bit for bit, because the frozen CLIP the checkpoint refers to sits
    # at 64-byte-unaligned addresses (memory-mapped from its file) and its re-saved copy does not: the CPU kernels
    # take another vector path and the unconditional pooled embedding differs in the last bit
    a, b = from_ckpt.sample(PROMPTS, SEEDS, settings), from_folder.sample(PROMPTS, SEEDS, settings)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="EMA weights only"):
        load_for_sampling(exported, ema=False)
    assert item_kind(exported) == "diffusion"


def test_sample_py_takes_the_export_folder(exported, tmp_path):
    import sample

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={exported}", f"prompt={PROMPTS[0]}", "sampling.steps=2",
                                           f"out={tmp_path}", f"paths.output_dir={tmp_path}"])  # fmt: skip
    sample.run(cfg)
    row = json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[0])
    assert row["ckpt"] == str(exported.resolve()) and (tmp_path / row["file"]).is_file()


def test_re_export_of_an_export_and_what_it_refuses(exported, tmp_path, capsys):
    again = tmp_path / "again"
    assert export_main(["safetensors", str(exported), str(again)]) == 0  # an export of an export keeps its label
    assert json.loads((again / "config.json").read_text())["weights"] == "ema"
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(exported / "model.safetensors")).keys()
    assert export_main(["safetensors", str(exported), str(tmp_path / "raw"), "--raw"]) == 2
    assert "EMA weights only" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert export_main(["safetensors", str(exported), str(tmp_path / "m"), "--metrics", str(bad)]) == 2
    assert "not an eval.py metrics.json" in capsys.readouterr().err and not (tmp_path / "m").exists()
    import shutil

    shutil.rmtree(again / "text_encoders" / "t5")  # a partial copy: the missing frozen model is named
    with pytest.raises(FileNotFoundError, match="lacks 'text_encoders/t5'"):
        load_for_sampling(again)


def test_shipped_code_needs_only_torch_diffusers_and_transformers():
    import ast

    allowed = {"__future__", "math", "typing", "torch", "diffusers", "transformers"}
    for path in (ROOT / "emu/export/hub").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)


def test_wrong_inputs_get_clear_errors(tiny_autoencoder, tiny_stage1_checkpoint, tmp_path, capsys):
    # an autoencoder export has a config.json and a model.safetensors too: it must not pass for a diffusion model
    with pytest.raises(ValueError, match="not an exported emu diffusion model"):
        read_export_config(tiny_autoencoder)
    assert export_main(["diffusers", str(tiny_autoencoder), str(tmp_path / "x")]) == 2
    assert "not an emu export" in capsys.readouterr().err
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    assert export_main(["safetensors", str(not_ckpt)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not an exported emu diffusers pipeline"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_diffusers_pipeline_makes_sample_py_images(sampler, tiny_stage1_checkpoint, fourier_autoencoder, tmp_path):
    pytest.importorskip("diffusers")
    ours = load_for_sampling(tiny_stage1_checkpoint, autoencoder=str(fourier_autoencoder))
    if sampler == "euler":  # the strict case also takes the other unconditional embedding: zeros
        text = {**ours.hparams.text, "uncond": "zeros"}
        ours = load_for_sampling(tiny_stage1_checkpoint, autoencoder=str(fourier_autoencoder), text=text)
    out = tmp_path / "pipe"
    from emu.export.diffusers import export_diffusers

    export_diffusers(ours, out, sampler=sampler)
    pipe = load_pipeline(out)

    def theirs(**kw):
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        return pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="pt",
                    **kw).images * 2 - 1  # fmt: skip

    def close(a, b):
        diff = (a - b).abs()
        limit_max, limit_mean = TOLERANCE[sampler]
        assert diff.max() < limit_max and diff.mean() < limit_mean, (diff.max(), diff.mean())

    settings = SamplingSettings(sampler=sampler, steps=4, guidance=3.0)
    close(theirs(), ours.sample(PROMPTS, SEEDS, settings))
    negative = "a large green square on a white background"
    close(theirs(negative_prompt=negative), ours.sample(PROMPTS, SEEDS, SamplingSettings(
        sampler=sampler, steps=4, guidance=3.0, negative_prompt=negative)))  # fmt: skip
    close(theirs(height=32, width=48), ours.sample(PROMPTS, SEEDS, SamplingSettings(
        sampler=sampler, steps=4, guidance=3.0, height=32, width=48)))  # fmt: skip
    if sampler == "euler":
        assert torch.equal(theirs(negative_prompt=""), theirs())  # an empty negative prompt is none
        interval = SamplingSettings(sampler=sampler, steps=4, guidance=3.0, guidance_interval=(0.5, 5.0))
        close(theirs(guidance_interval=(0.5, 5.0)), ours.sample(PROMPTS, SEEDS, interval))
        rescaled = SamplingSettings(sampler=sampler, steps=4, guidance=3.0, guidance_rescale=0.7)  # on the eps, both
        close(theirs(guidance_rescale=0.7), ours.sample(PROMPTS, SEEDS, rescaled))
        with pytest.raises(ValueError, match="positive multiples of 16"):
            theirs(height=40)
        # the autoencoder's encoder side (Fourier features, patch path) too
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(pipe.vae.encode(x).latent_dist.mean, ours.autoencoder.encode(x).mode(),
                                       atol=1e-5, rtol=1e-5)  # fmt: skip


def test_model_card(exported, tiny_stage1_checkpoint, tmp_path):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: emu") and "license: #" in card
    assert "stage 1 (pre-trained)" in card and "1 optimizer steps at 64 px" in card
    assert "None given" in card  # no metrics asked for
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"clip_score": {"a": 0.31}, "n": 8, "config": {"x": 1}}))
    out = tmp_path / "with_metrics"
    assert export_main(["safetensors", str(tiny_stage1_checkpoint), str(out), "--metrics", str(metrics)]) == 0
    card = (out / "README.md").read_text()
    assert "| clip_score/a | 0.31 |" in card and "| n | 8 |" in card and "| config" not in card
    assert "source: HaystackSource" in card and "n_train: 8" in card  # the data the checkpoint says it trained on
    # a stage-2 checkpoint says so (its init_from survives loading, though loading does not initialise from it)
    from emu.diffusion.checkpoints import load_diffusion

    ckpt = torch.load(tiny_stage1_checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["init_from"] = "/runs/stage1/last.ckpt"
    stage2 = tmp_path / "stage2.ckpt"
    torch.save(ckpt, stage2)
    assert load_diffusion(stage2).hparams.init_from == "/runs/stage1/last.ckpt"
    assert export_main(["safetensors", str(stage2), str(tmp_path / "s2")]) == 0
    assert "stage 2 (quality-tuned from `/runs/stage1/last.ckpt`)" in (tmp_path / "s2" / "README.md").read_text()

    # the diffusers export of a safetensors export: its card, and a pipeline that loads
    pipe_dir = tmp_path / "pipe"
    assert export_main(["diffusers", str(exported), str(pipe_dir), "--sampler", "euler"]) == 0
    card = (pipe_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "trust_remote_code=True" in card
    assert "(EMA weights)" in card and "1 optimizer steps" in card
    assert type(load_pipeline(pipe_dir).scheduler).__name__ == "EulerDiscreteScheduler"


def test_an_sdxl_conditioned_model_exports_and_its_pipeline_makes_the_same_images(tiny_autoencoder, sdxl_text_encoders,
                                                                                   tmp_path):  # fmt: skip
    """Two CLIP encoders joined along the features (penultimate states, no padding mask) and a text_time U-Net: the
    exported pipeline runs the encoders as the conditioner does and passes SDXL's time_ids for the output's size."""
    pytest.importorskip("diffusers")
    from emu.diffusion.module import DiffusionModule
    from emu.export.diffusers import export_diffusers

    torch.manual_seed(0)
    ours = DiffusionModule(SDXL_TINY_UNET, sdxl_text_config(sdxl_text_encoders), str(tiny_autoencoder)).eval()
    for p in ours.unet.parameters():  # every weight matters (the embeddings included)
        p.data.normal_(0, 0.05)
    pipe = load_pipeline(export_diffusers(ours, tmp_path / "pipe", sampler="euler"))
    assert pipe.unet.config.addition_embed_type == "text_time" and len(pipe.text_projection.proj) == 0
    (context, mask, pooled), uncond = pipe.encode_prompt(PROMPTS, ["", ""], torch.device("cpu"))
    c, u = ours.conditioner.condition(PROMPTS), ours.conditioner.unconditional_batch(2)
    assert torch.equal(context, c.context) and torch.equal(mask, c.mask) and torch.equal(pooled, c.pooled)
    assert all(torch.equal(a, b) for a, b in zip(uncond, (u.context, u.mask, u.pooled), strict=True))
    for height, width in ((64, 64), (32, 48)):
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="pt",
                      height=height, width=width).images * 2 - 1  # fmt: skip
        settings = SamplingSettings(sampler="euler", steps=4, guidance=3.0, height=height, width=width)
        diff = (theirs - ours.sample(PROMPTS, SEEDS, settings)).abs()
        assert diff.max() < TOLERANCE["euler"][0] and diff.mean() < TOLERANCE["euler"][1], (diff.max(), diff.mean())
