"""Other architectures (issue 42): a diffusion transformer trained by rectified flow and pixel-space diffusion, each
through the same DiffusionModule, conditioner, samplers, EMA and checkpoints; ``make generality``'s plan and report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from emu.autoencoder.module import load_autoencoder
from emu.autoencoder.pixel import PixelSpace
from emu.diffusion.dit import DiT, sincos_2d
from emu.diffusion.module import DiffusionModule
from emu.diffusion.networks import build_network
from emu.errors import ConfigError
from tests.conftest import TINY_DIT, TINY_UNET, haystack_batch, tiny_stage1_overrides
from tests.test_stage1 import text_config

DIT = {"arch": "dit", "in_channels": 16, "out_channels": 16, **TINY_DIT}
PIXEL_UNET = {**TINY_UNET, "in_channels": 3, "out_channels": 3}


def module(net, autoencoder, tiny_clip, tiny_t5, **kw):
    torch.manual_seed(0)
    defaults = dict(warmup_steps=0, lr=2e-3, weight_decay=0.0, ema_half_life_images=64, ema_ramp=None,
                    val_prompts=["a large red circle in the center on a black background"], val_sampling={"steps": 2},
                    sample_latents=False)  # fmt: skip
    return DiffusionModule(OmegaConf.create(net), OmegaConf.create(text_config(tiny_clip, tiny_t5, 0.0)),
                           str(autoencoder), **{**defaults, **kw})  # fmt: skip


def overfit(m, steps: int = 120) -> tuple[float, float]:
    """The fixed-noise loss on four pairs before and after ``steps`` AdamW steps on them."""
    batch = haystack_batch()

    def fixed_loss():
        with torch.no_grad():
            return float(m.diffusion_loss(batch, torch.Generator().manual_seed(0), drop=False))

    opt = m.configure_optimizers()["optimizer"]
    before = fixed_loss()
    for _ in range(steps):
        loss = m.diffusion_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, fixed_loss()


# ------------------------------------------------------------------------------------------ the DiT
def test_sincos_2d_embeds_rows_and_columns_as_hand_computed():
    emb = sincos_2d(2, 3, 8)  # 6 tokens, 8 channels: [sin, cos] of the row, then of the column, 2 frequencies each
    assert emb.shape == (6, 8)
    token = 5  # row 1, column 2
    freqs = [1.0, 1.0 / 100.0]  # 1 / 10000 ** (k / 2)
    expected = [math.sin(1 * f) for f in freqs] + [math.cos(1 * f) for f in freqs]
    expected += [math.sin(2 * f) for f in freqs] + [math.cos(2 * f) for f in freqs]
    assert torch.allclose(emb[token], torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_dit_patchifies_starts_at_zero_and_masks_padding_tokens():
    torch.manual_seed(0)
    net = build_network(DIT)
    assert isinstance(net, DiT) and net.downsample_factor == 2 and net.config["arch"] == "dit"
    x, ctx, pooled = torch.randn(2, 16, 8, 12), torch.randn(2, 5, 32), torch.randn(2, 24)  # a non-square grid
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    t = torch.tensor([10.0, 500.0])
    out = net(x, t, ctx, mask, pooled)
    assert out.shape == x.shape and out.abs().max() == 0  # the output projection starts at 0
    c = torch.randn(2, TINY_DIT["width"])
    for block in net.blocks:  # adaLN-Zero: every shift, scale and gate starts at 0, whatever the conditioning
        assert block.adaLN_modulation(c).abs().max() == 0
    for p in net.parameters():  # trained-like weights: the padding of a caption changes nothing, its words do
        torch.nn.init.normal_(p, std=0.05)
    changed = ctx.clone()
    changed[:, 2:] = 7.0  # row 0: real tokens; row 1: padding
    a, b = net(x, t, ctx, mask, pooled), net(x, t, changed, mask, pooled)
    assert a.abs().max() > 0 and torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        net(torch.randn(1, 16, 7, 8), torch.tensor(1.0), ctx[:1], mask[:1], pooled[:1])
    with pytest.raises(ValueError, match="unknown network architecture 'vit'"):
        build_network({**DIT, "arch": "vit"})


@pytest.mark.parametrize("parameterization", ["flow", "v"])
def test_dit_overfits_one_batch(tiny_autoencoder, tiny_clip, tiny_t5, parameterization):
    flow = {"p_mean": 0.0, "p_std": 1.0} if parameterization == "flow" else {}
    m = module({**DIT, "patch_size": 1}, tiny_autoencoder, tiny_clip, tiny_t5, parameterization=parameterization,
               **flow)  # fmt: skip
    before, after = overfit(m)
    assert after < 0.5 * before, (before, after)


def test_dit_lora_targets_its_attention(tiny_autoencoder, tiny_clip, tiny_t5, tmp_path):
    """LoRA's default targets (to_q, to_k, to_v, to_out.0) are the DiT's attention projections too."""
    from emu.diffusion.export import save_export
    from emu.diffusion.lora import trainable_count

    base = save_export(module(DIT, tiny_autoencoder, tiny_clip, tiny_t5), tmp_path / "base", copy_frozen=False)
    tuned = module(DIT, tiny_autoencoder, tiny_clip, tiny_t5, init_from=str(base), lora={"rank": 2})
    per_block = 2 * 2 * (2 * 32 + 32 + 32) + 2 * 2 * (2 * 32 + 32 + 32)  # self + cross attention: rank x (in + out)
    assert trainable_count(tuned.trained_modules().values()) == TINY_DIT["depth"] * per_block
    from emu.export.lora import export_lora

    with pytest.raises(ValueError, match="no diffusers LoRA file can hold its adapters"):
        export_lora(tuned, tmp_path / "lora")


# ------------------------------------------------------------------------------------------ pixel space
def test_pixel_space_is_the_identity_and_round_trips_as_an_export(tmp_path):
    px = load_autoencoder("pixels")
    assert isinstance(px, PixelSpace) and px.downsample_factor == 1 and px.latent_channels == 3
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    posterior = px.encode(x)
    assert torch.equal(posterior.mode(), x) and torch.equal(px.decode(x), x)
    assert (posterior.sample(torch.Generator().manual_seed(0)) - x).abs().max() < 1e-5  # far under one 8-bit level
    assert torch.equal(px.normalize(x), x) and torch.equal(px.denormalize(x), x)
    folder = px.save_pretrained(tmp_path / "pixels")
    again = load_autoencoder(folder)
    assert isinstance(again, PixelSpace) and torch.equal(again.encode(x).mode(), x)
    with pytest.raises(ValueError, match="only `channels`"):
        PixelSpace(channels=3, latent_channels=4)
    gray = load_autoencoder(PixelSpace(channels=1).save_pretrained(tmp_path / "gray"))  # rebuilt from its own config
    assert gray.latent_channels == 1 and gray.encode(x[:, :1]).mode().shape == (2, 1, 8, 8)


def test_pixel_model_overfits_samples_and_exports(tiny_clip, tiny_t5, tmp_path):
    from emu.diffusion.checkpoints import load_diffusion
    from emu.diffusion.export import save_export
    from emu.export.card import model_card
    from emu.export.diffusers import export_diffusers

    m = module(PIXEL_UNET, "pixels", tiny_clip, tiny_t5, sigma_data=0.5, parameterization="v",
               noise_schedule={"zero_terminal_snr": True, "beta_start": 0.0001, "beta_end": 0.02})  # fmt: skip
    before, after = overfit(m)
    assert after < 0.5 * before, (before, after)
    images = m.sample(["a red circle"], [0])
    assert images.shape == (1, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    folder = save_export(m, tmp_path / "export", ema=False)  # the pixel "autoencoder" is copied like any other
    loaded = load_diffusion(folder)
    assert isinstance(loaded.autoencoder, PixelSpace)
    assert torch.allclose(loaded.sample(["a red circle"], [0]), images, atol=1e-5)
    with pytest.raises(ValueError, match="pixel-space model has no autoencoder"):
        export_diffusers(m, tmp_path / "diffusers")
    card = model_card(loaded, str(folder), "safetensors", "raw")
    assert (
        "# Text-to-image pixel-space diffusion model" in card and "* **Autoencoder**: none, diffusion on pixels" in card
    )


def test_diffusers_export_refuses_a_dit(tiny_autoencoder, tiny_clip, tiny_t5, tmp_path):
    from emu.export.card import model_card
    from emu.export.diffusers import export_diffusers

    dit = module(DIT, tiny_autoencoder, tiny_clip, tiny_t5, parameterization="flow", p_mean=0.0, p_std=1.0)
    with pytest.raises(ValueError, match="network is a dit"):
        export_diffusers(dit, tmp_path / "diffusers")
    card = model_card(dit, "run/last.ckpt", "safetensors", "ema")
    assert "* **DiT**: " in card and "2x2 patches, 2 blocks of width 32" in card
    assert "rectified flow (velocity target), logit-normal t (mean 0.0, std 1.0)" in card


def test_config_validation_knows_each_network(tiny_autoencoder, tmp_path):
    """A DiT's settings are checked against the DiT's (not the U-Net's) and the resolution against its patches; a
    pixel model's against f = 1."""
    from emu.utils.validate import validate
    from tests.test_train import compose_train

    cfg = compose_train(["experiment=mini/stage1_dit", f"model.autoencoder={tiny_autoencoder}",
                         "+model.unet.block_channels=[8]", "model.unet.patch_size=3"])  # fmt: skip
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "model.unet.block_channels is not a setting of DiT" in str(e.value)
    assert "DiT patch 3x" in str(e.value) and "model.unet.width" not in str(e.value)
    cfg = compose_train(["experiment=mini/stage1_pixel", "data.resolution=34"])
    with pytest.raises(ConfigError, match=r"autoencoder f=1 x U-Net 4x"):
        validate(cfg)
    validate(compose_train(["experiment=mini/stage1_pixel", "+model.unet.arch=unet"]))  # the default, said aloud


def test_validation_refuses_initialising_one_network_from_the_other(tmp_path, tiny_stage1_checkpoint,
                                                                    tiny_autoencoder):  # fmt: skip
    from emu.utils.validate import validate
    from tests.test_train import compose_train

    cfg = compose_train(["experiment=mini/stage2_quality_tune_dit", f"model.autoencoder={tiny_autoencoder}",
                         f"model.init_from={tiny_stage1_checkpoint}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.unet is a dit but model\.init_from's network is a unet"):
        validate(cfg)


def test_paper_scale_configs_build_the_networks_they_describe():
    """experiment=stage1_dit and stage1_pixel: the DiT-XL/2-sized DiT by rectified flow, and Imagen's 64 px base shape
    on pixels (built on the meta device: sizes only)."""
    from tests.test_train import compose_train

    dit = compose_train(["experiment=stage1_dit"]).model
    pixel = compose_train(["experiment=stage1_pixel"])
    assert dit.parameterization == "flow" and dit.p_mean == 0 and dit.val_sampling.sampler == "euler"
    assert pixel.model.autoencoder == "pixels" and pixel.data.resolution == 64 and pixel.model.sigma_data == 0.5
    with torch.device("meta"):
        n_dit = sum(p.numel() for p in build_network(OmegaConf.to_container(dit.unet)).parameters())
        n_pix = sum(p.numel() for p in build_network(OmegaConf.to_container(pixel.model.unet)).parameters())
    assert 1.0e9 < n_dit < 1.1e9 and 2.0e9 < n_pix < 3.0e9, (n_dit, n_pix)


# ------------------------------------------------------------------------------------------ each arm's chain
@pytest.mark.parametrize("arch", ["dit", "pixel", "maskgit"])
def test_each_architecture_runs_stage1_stage2_and_eval(arch, tmp_path, tiny_autoencoder, tiny_clip, tiny_t5,
                                                       tiny_curated, aesthetic_head, tiny_judge, request):  # fmt: skip
    """make generality's chain, tiny: mini/stage1_<arch> -> mini/stage2_quality_tune_<arch> (checkpoint selection) ->
    eval.py of the selected checkpoint against the arm's own pre-trained one (the masked transformer over the
    tiny tokenizer that mini/tokenizer trained)."""
    import eval as eval_py
    import train
    from tests.test_evaluation import compose_eval
    from tests.test_train import compose_train

    tokenizer = request.getfixturevalue("tiny_tokenizer") if arch == "maskgit" else None
    tiny = tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5, arch=arch, tokenizer=tokenizer)
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    train.train(compose_train([f"experiment=mini/stage1_{arch}", f"paths.output_dir={s1}", "trainer.max_steps=2",
                               "trainer.limit_val_batches=0", "data.batch_size=4", "data.num_workers=0",
                               "data.source.n_train=8", *tiny]))  # fmt: skip
    pretrained = s1 / "checkpoints" / "last.ckpt"
    train.train(compose_train([
        f"experiment=mini/stage2_quality_tune_{arch}", f"paths.output_dir={s2}", f"model.init_from={pretrained}",
        f"data.source.root={tiny_curated}", "data.source.val_fraction=0.25", "data.batch_size=2",
        "data.num_workers=0", "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1000", "model.warmup_steps=1",
        f"callbacks.selection.judge.clip={tiny_clip}", f"callbacks.selection.judge.head={aesthetic_head}",
        "callbacks.selection.limit=2", "callbacks.selection.sampling.steps=2", "callbacks.selection.every_n_steps=2",
        *tiny]))  # fmt: skip
    best = s2 / "checkpoints" / "select" / "best.ckpt"
    assert best.is_file()
    out = eval_py.run(compose_eval([
        "experiment=mini/eval", f"a={best}", f"b={pretrained}", f"name_a={arch}_quality_tuned", "name_b=pretrained",
        "prompts=haystack:4", "sampling.steps=2", f"clip={tiny_clip}", "aesthetic=null", f"judge.path={tiny_judge}",
        "checks.judge_accuracy.n=0", "checks.clip_accuracy.n=0", "checks.headroom.n=0",
        "fid.reference=haystack_needles:4", "fid.inception=false", f"fid.cache_dir={tmp_path}/cache",
        f"out={tmp_path}/eval", "bootstrap=50", "logger=csv",
        *({"dit": ["sampling.sampler=euler"], "maskgit": ["sampling.sampler=maskgit"]}.get(arch, []))]))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    size = 32 if arch == "pixel" else 64  # the pixel U-Net trains (and so samples) at 32 px
    assert m["models"][f"{arch}_quality_tuned"]["settings"]["resolution"] == size
    assert "appeal" in m["paired"] and (out / f"samples_{arch}_quality_tuned").is_dir()
    assert (out / "side_by_side.png").is_file()
    if arch == "maskgit":  # sample.py loads a masked transformer's checkpoint too, and refuses a diffusion sampler
        from hydra import compose, initialize_config_dir

        import sample
        from tests.conftest import ROOT

        def sample_cfg(*extra):
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                return compose("sample", overrides=[f"ckpt={best}", "prompt=a red circle", "sampling.steps=2",
                                                    f"out={tmp_path}/sample", f"paths.output_dir={tmp_path}",
                                                    *extra])  # fmt: skip

        sample.run(sample_cfg("sampling.sampler=maskgit", "grid_guidance=[1.0,3.0]"))
        assert (tmp_path / "sample" / "guidance_3" / "metadata.jsonl").is_file()
        with pytest.raises(ConfigError, match=r"sampling\.sampler: is 'dpmpp_2m', a diffusion sampler"):
            sample.run(sample_cfg())


# ------------------------------------------------------------------------------------------ make generality
def test_generality_plans_each_arm_from_the_finished_demo(tmp_path):
    from emu.demo.driver import load_scale
    from emu.demo.generality import plan
    from emu.demo.stages import command

    scale = load_scale("tiny")
    rows = plan(scale)
    assert [r.name for r in rows] == ["unet", "dit", "pixel", "maskgit"] and rows[0].stage is None
    dit = [" ".join(command(s, tmp_path, scale, resume=False)) for s in rows[1].stage.steps]
    assert "experiment=mini/stage1_dit" in dit[0] and "data=latents" in dit[0] and "trainer.max_steps=4" in dit[0]
    assert "experiment=mini/stage2_quality_tune_dit" in dit[1] and "callbacks.selection.every_n_steps=2" in dit[1]
    assert f"b={tmp_path}/generality/dit/stage1/checkpoints/last.ckpt" in dit[2] and "sampling.sampler=euler" in dit[2]
    pixel = " ".join(command(rows[2].stage.steps[0], tmp_path, scale, resume=False))
    assert "experiment=mini/stage1_pixel" in pixel and "data=webdataset" in pixel
    assert [s.needs for s in rows[1].stage.steps] == [(), ("dit/stage1",), ("dit/stage2",)]
    maskgit = [" ".join(command(s, tmp_path, scale, resume=False)) for s in rows[3].stage.steps]
    assert "experiment=mini/tokenizer" in maskgit[0] and "data=latents" in maskgit[0]  # its tokenizer first
    assert "trainer.max_steps=4" in maskgit[0] and "val_sampling" not in maskgit[0]  # the scale's tokenizer overrides
    assert "experiment=mini/stage1_maskgit" in maskgit[1] and "data=latents" in maskgit[1]
    assert "sampling.sampler=maskgit" in maskgit[3]
    assert [s.needs for s in rows[3].stage.steps] == [(), ("maskgit/tokenizer",), ("maskgit/stage1",),
                                                      ("maskgit/stage2",)]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown arm"):
        plan({**scale, "generality": {"arms": ["muse"]}})
    (tmp_path / "latents").mkdir()  # a demo folder without the precomputed latents: the DiT arm makes them first
    lacking = plan(scale, tmp_path)
    first = lacking[1].stage.steps[0]
    assert first.name == "dit/latents" and "emu.diffusion.precompute" in " ".join(first.argv)
    assert lacking[3].stage.steps[0].name == "maskgit/tokenizer"  # one precompute, for both arms:
    assert lacking[3].stage.steps[0].needs == ("dit/latents",)  # the masked transformer's waits for the DiT's
    (tmp_path / "latents" / "precompute.json").write_text("{}")
    assert plan(scale, tmp_path)[1].stage.steps[0].name == "dit/stage1"
    assert plan(scale, tmp_path)[2].stage.steps[0].name == "pixel/stage1"  # it reads the images


def test_generality_report_judges_each_arm(tmp_path):
    """GENERALITY.md from metrics the arms left: the table, the targets met and missed, the pictures."""
    from emu.demo.driver import load_scale
    from emu.demo.generality import plan
    from emu.demo.generality_report import faithfulness_kept, write_generality
    from emu.demo.report import Targets, section_generality

    def paired(win, loss, half=0.05):
        return {"win": win, "win_ci": [win - half, win + half], "tie": 1 - win - loss, "tie_ci": [0, 1], "loss": loss,
                "loss_ci": [max(loss - half, 0), loss + half], "n": 256, "level": 0.95}  # fmt: skip

    def metrics(appeal, faith, aesthetic, clip):
        models = {"tuned": {"clip_score": clip[0]}, "pretrained": {"clip_score": clip[1]}}
        return {"n_prompts": 256, "prompts": "haystack:256", "models": models,
                "config": {"name_a": "tuned", "name_b": "pretrained"},
                "paired": {"appeal": paired(*appeal), "faithfulness": paired(*faith),
                           "aesthetic": paired(*aesthetic)}}  # fmt: skip

    scale = load_scale("tiny")
    rows = plan(scale)
    written = {"unet": metrics((0.86, 0.05), (0.4, 0.1), (0.6, 0.2), (66, 62)),
               "dit": metrics((0.72, 0.2), (0.2, 0.4), (0.3, 0.5), (60, 62))}  # fmt: skip
    for row in rows[:2]:
        path = tmp_path / row.metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(written[row.name]))
    state = {"steps": {"dit/stage1": {"seconds": 600.0}, "dit/stage2": {"seconds": 300.0},
                       "maskgit/tokenizer": {"seconds": 120.0}, "maskgit/stage1": {"seconds": 600.0}}}  # fmt: skip
    report = write_generality(tmp_path, scale, rows, state, {"steps": {"stage1": {"seconds": 1200.0}}}).read_text()
    assert "| dit: diffusion transformer" in report and "| 10.0 min | 5.0 min (n/a) |" in report
    assert "| 12.0 min (tokenizer 2.0) | not run (n/a) |" in report  # a masked transformer's stage 1: and tokenizer
    targets = json.loads((tmp_path / "generality" / "targets.json").read_text())["targets"]
    met = {(t["arch"], t["target"].split(": ")[1].split(" ")[0]): t["met"] for t in targets}
    assert met[("unet", "appeal")] and met[("unet", "faithfulness")] and met[("unet", "the")]
    assert met[("dit", "appeal")] is True  # 72% with its interval above 50%
    assert met[("dit", "faithfulness")] is False  # 40% losses against 20% wins: more than the interval apart
    assert met[("dit", "the")] is False  # the aesthetic head disagrees with the judge's appeal
    assert met[("pixel", "appeal")] is None and "no picture yet" in report
    assert faithfulness_kept({"win": 0.2, "loss": 0.28, "win_ci": [0.1, 0.3], "loss_ci": [0.2, 0.36]})
    table = Targets()  # REPORT.md: the other architectures' targets join its table, with a link
    lines = section_generality(tmp_path, table)
    assert "[GENERALITY.md](GENERALITY.md)" in " ".join(lines)
    assert sum("generality: dit" in row for row in table.markdown()) == 3
    assert not any("generality: unet" in row for row in table.markdown())  # the headline is already there


def test_generality_runs_every_arm_then_skips_and_resumes(tmp_path, monkeypatch):
    """The demo driver's machinery under --generality: each architecture's steps in order (the DiT's latents first,
    which this demo lacks), nothing again once finished, an interrupted stage 1 resumed from its own last.ckpt; then
    GENERALITY.md and a REPORT.md that links it; an unfinished demo is refused."""
    from emu.demo import driver, generality_report
    from tests.test_ablations import _fake_demo, record_steps

    with pytest.raises(SystemExit, match=r"\[generality\] .* not a finished demo"):
        driver.run_generality(tmp_path, driver.load_scale("tiny"))
    _fake_demo(tmp_path)
    scale = driver.load_scale("tiny")
    calls = record_steps(tmp_path, monkeypatch)
    monkeypatch.setattr(generality_report, "network_parameters", lambda path: None)  # the fake checkpoints are empty
    report = driver.run_generality(tmp_path, scale)
    assert report.name == "GENERALITY.md" and "GENERALITY.md" in (tmp_path / "REPORT.md").read_text()
    commands = [" ".join(c) for c in calls]
    # the latents, then 3 steps per architecture (the masked transformer's tokenizer before its 3)
    assert len(calls) == 11 and "emu.diffusion.precompute" in commands[0]
    assert "mini/stage1_dit" in commands[1] and "mini/stage2_quality_tune_pixel" in commands[5]
    assert "mini/tokenizer" in commands[7] and "mini/stage1_maskgit" in commands[8]

    calls.clear()
    driver.run_generality(tmp_path, scale)
    assert calls == []  # every architecture finished: nothing reruns
    state_file = tmp_path / "generality" / "generality_state.json"
    state = json.loads(state_file.read_text())
    del state["steps"]["pixel/stage1"]  # killed mid-run, its last.ckpt left behind
    state_file.write_text(json.dumps(state))
    driver.run_generality(tmp_path, scale)
    assert len(calls) == 1 and "mini/stage1_pixel" in " ".join(calls[0]) and calls[0][-1] == "ckpt_path=last"
