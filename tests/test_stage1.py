"""Stage 1: the LightningModule overfits, keeps an EMA, checkpoints round-trip; sample.py writes its files."""

import json
import subprocess
import sys
from dataclasses import replace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu.diffusion.checkpoints import load_diffusion
from emu.diffusion.module import DiffusionModule
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from tests.conftest import ROOT, SDXL_TINY_UNET, TINY_UNET, haystack_batch, sdxl_text_config

UNET = TINY_UNET


def text_config(tiny_clip, tiny_t5, dropout=0.1):
    return {
        "encoders": {
            "clip": {"name_or_path": str(tiny_clip), "kind": "clip", "max_length": 16},
            "t5": {"name_or_path": str(tiny_t5), "kind": "t5", "max_length": 16},
        },
        "dropout": dropout,
    }


def tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, **kw):
    torch.manual_seed(0)
    defaults = dict(warmup_steps=0, lr=2e-3, weight_decay=0.0, ema_half_life_images=64, ema_ramp=None,
                    val_prompts=["a large red circle in the center on a black background"],
                    val_sampling={"steps": 2})  # fmt: skip
    text = OmegaConf.create(text_config(tiny_clip, tiny_t5, kw.pop("dropout", 0.1)))  # as Hydra passes them
    return DiffusionModule(OmegaConf.create(UNET), text, str(tiny_autoencoder),
                           **{**defaults, **kw})  # fmt: skip


@pytest.mark.parametrize("parameterization", ["eps", "v", "flow"])
def test_overfits_four_pairs(tiny_autoencoder, tiny_clip, tiny_t5, parameterization):
    flow = {"p_mean": 0.0, "p_std": 1.0} if parameterization == "flow" else {}  # SD3's logit-normal times
    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, parameterization=parameterization, dropout=0.0,
                         sample_latents=False, **flow)  # fmt: skip
    batch = haystack_batch()

    def fixed_loss():  # the same noise and noise levels every time
        with torch.no_grad():
            return float(module.diffusion_loss(batch, torch.Generator().manual_seed(0), drop=False))

    opt = module.configure_optimizers()["optimizer"]
    before = fixed_loss()
    for _ in range(120):
        loss = module.diffusion_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)


def test_refuses_mismatched_autoencoder_and_bad_settings(tmp_path, tiny_clip, tiny_t5, tiny_autoencoder):
    from emu.autoencoder.model import AutoencoderKL

    four = AutoencoderKL(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    four.save_pretrained(tmp_path / "ae4")
    with pytest.raises(ConfigError, match="latent_channels"):
        tiny_module(tmp_path / "ae4", tiny_clip, tiny_t5)
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, noise_schedule={"zero_terminal_snr": True})
    with pytest.raises(ConfigError, match="pooled_dim"):
        DiffusionModule({**UNET, "pooled_dim": 7}, text_config(tiny_clip, tiny_t5), str(tiny_autoencoder))
    with pytest.raises(ConfigError, match=r"^model\.latent_scaling: must be one of \('channel', 'global', 'factor'\)"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, latent_scaling="pixel")
    with pytest.raises(ConfigError, match=r"^model\.weighting: 'uniform' is now called 'simple'"):  # the old name
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, weighting="uniform")


def test_latent_scaling_is_what_training_sees(tiny_clip, tiny_t5, tiny_autoencoder):
    """The U-Net trains on latents scaled as ``model.latent_scaling`` says (sampling decodes with the same)."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for scaling in ("channel", "global"):
        module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, sample_latents=False, latent_scaling=scaling)
        ae = module.autoencoder
        ae.set_latent_statistics(torch.linspace(-1, 1, 16), torch.linspace(0.2, 3.0, 16))
        expected = ae.normalize(ae.encode(images).mode(), scaling)
        torch.testing.assert_close(module.encode_images(images), expected)


class _Data(L.LightningDataModule):
    resolution = 32

    def __init__(self):
        super().__init__()
        self.batch = haystack_batch()

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch] * 3, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader([self.batch], batch_size=None)


class _SeeWeights(L.Callback):
    def on_validation_batch_start(self, trainer, module, *args):
        self.during = [p.detach().clone() for p in module.unet.parameters()]


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
                                *callbacks])  # fmt: skip


def test_the_frozen_networks_follow_the_model_until_offloaded_then_stay_on_the_cpu(tiny_autoencoder, tiny_clip, tiny_t5,
                                                                                   monkeypatch):  # fmt: skip
    """Moves and casts reach the frozen networks (autoencoder, text encoders) as any submodule until they are offloaded
    (training on precomputed latents); then they pass them by (the networks stay in float32 on the CPU) while every
    trained part still moves, and ``frozen.on(device)`` brings them to a device for a block and back. The module tree
    and its state-dict keys stay as they are."""
    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5)
    keys, children = list(module.state_dict()), list(dict(module.named_children()))
    frozen = [module.autoencoder, *module.conditioner.encoders.values()]
    trained = [module.unet, module.conditioner.proj, module.ema]
    params = lambda modules: [p for m in modules for p in m.parameters()]
    assert not any(p.requires_grad for p in params(frozen)) and all(p.requires_grad for p in params(trained[:2]))

    module.to(torch.float64)  # not offloaded: everything follows
    assert {p.dtype for p in params(frozen + trained)} == {torch.float64}
    module.to(torch.float32)

    module.frozen.offload()
    module.to(torch.float64)
    assert {p.dtype for p in params(trained)} == {torch.float64}
    assert {p.dtype for p in params(frozen)} == {torch.float32}
    module.to("meta")
    assert module.device.type == "meta" and {p.device.type for p in params(trained)} == {"meta"}
    assert {p.device.type for p in params(frozen)} == {"cpu"}
    assert list(module.state_dict()) == keys and list(dict(module.named_children())) == children

    moves = []  # where frozen.on sends them (a real move to another device needs one)
    monkeypatch.setattr(module.frozen, "_to", moves.append)
    with module.frozen.on(torch.device("cpu")):  # already there
        assert moves == []
    with module.frozen.on(module.device):
        assert moves == [module.device]
    assert moves == [module.device, torch.device("cpu")]
    module.frozen.offloaded = False  # following the model, they are where it put them
    with module.frozen.on(module.device):
        assert moves == [module.device, torch.device("cpu")]


def test_ema_is_used_for_validation_and_restored_and_checkpoint_round_trips(tmp_path, tiny_autoencoder, tiny_clip,
                                                                           tiny_t5):  # fmt: skip
    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5)
    data = _Data()
    see = _SeeWeights()
    trainer = _trainer(tmp_path, 3, [see])
    trainer.fit(module, datamodule=data)
    live = [p.detach().clone() for p in module.unet.parameters()]
    shadow = list(module.ema.shadow["unet"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(live, shadow, strict=True))  # EMA differs from the raw weights
    trainer.validate(module, datamodule=data, verbose=False)
    for a, b in zip(see.during, shadow, strict=True):  # validation ran on the EMA weights ...
        assert torch.equal(a, b)
    for a, b in zip(module.unet.parameters(), live, strict=True):  # ... and the raw ones came back
        assert torch.equal(a, b)

    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert ckpt["emu"]["kind"] == "diffusion" and ckpt["emu"]["resolution"] == 32
    assert not any(k.startswith(("autoencoder.", "conditioner.encoders.")) for k in ckpt["state_dict"])
    loaded = load_diffusion(tmp_path / "ckpt/last.ckpt")
    for a, b in zip(loaded.unet.parameters(), module.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.ema.images_seen, module.ema.images_seen)
    torch.save({"emu": {"kind": "autoencoder"}, "state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a diffusion"):
        load_diffusion(tmp_path / "other.ckpt")

    # stage 2 initialises from the EMA weights (not a resume: a fresh EMA of them, no optimizer state)
    tuned = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, init_from=str(tmp_path / "ckpt/last.ckpt"))
    for a, b in zip(tuned.unet.parameters(), shadow, strict=True):
        assert torch.equal(a, b)
    assert float(tuned.ema.images_seen) == 0.0
    with pytest.raises(ConfigError, match="init_from"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, init_from=str(tmp_path / "other.ckpt"))

    # the same seed gives the same images; another seed others
    prompts = ["a large red circle in the center on a black background"] * 2
    settings = SamplingSettings(resolution=32, steps=3)
    a = loaded.sample(prompts, [1, 2], settings)
    b = loaded.sample(prompts, [1, 3], settings)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert loaded.val_sampling == SamplingSettings(steps=2)  # model.val_sampling survives the checkpoint


def test_next_stage_initialises_from_a_sharded_checkpoint_folder(tmp_path, tiny_autoencoder, tiny_clip, tiny_t5):
    """An FSDP run's last.ckpt is a folder of shards: the next stage (512 from 256, stage 2 from 1024) reads its EMA
    weights alone from it, and config validation reads its header to check the U-Net."""
    import torch.distributed.checkpoint as dcp

    from emu.utils.checkpoint_header import read_header
    from emu.utils.validate import _init_from_links

    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5)
    with torch.no_grad():
        for p in module.ema.shadow["unet"].parameters():
            p.add_(1.0)  # the EMA differs from the live weights
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(module.frozen.prefixes)}
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=str(folder))  # as Lightning's ModelParallelStrategy saves it
    torch.save({"emu": {"kind": "diffusion", "unet_config": dict(module.unet.config)}}, folder / "meta.pt")
    assert read_header(folder)["kind"] == "diffusion"
    tuned = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, init_from=str(folder))
    for a, b in zip(tuned.unet.parameters(), module.ema.shadow["unet"].parameters(), strict=True):
        assert torch.equal(a, b)
    problems = []
    _init_from_links(OmegaConf.create({"init_from": str(folder)}), OmegaConf.create({"head_dim": 999}), problems)
    assert problems and problems[0][0] == "model.unet.head_dim"


def test_checkpoints_with_the_old_setting_names_load(tmp_path, tiny_autoencoder, tiny_clip, tiny_t5):
    """Checkpoints written before ``schedule`` became ``noise_schedule``, ``val_sampler/steps/guidance/schedule``
    became ``val_sampling``, ``text.dropout`` became one joint rate, the ``uniform`` loss weighting became ``simple``
    and the sampling setting ``sigmas`` became ``spacing`` (issue 40) load with their settings under the new names
    (the old per-encoder dropout dict as the independent draws it meant); so do export folders whose config holds
    the old names."""
    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, parameterization="v",
                         noise_schedule={"steps": 500, "zero_terminal_snr": True})  # fmt: skip
    _trainer(tmp_path, 1).fit(module, datamodule=_Data())
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["weighting"] == "simple" and hp["val_sampling"]["spacing"] == "auto"

    # between the renames: val_sampling, but its spacing under `sigmas`, and the weighting called `uniform`
    hp["weighting"] = "uniform"
    hp["val_sampling"] = {**{k: v for k, v in hp["val_sampling"].items() if k != "spacing"}, "sigmas": "discrete"}
    torch.save(ckpt, tmp_path / "sigmas.ckpt")
    between = load_diffusion(tmp_path / "sigmas.ckpt")
    assert between.val_sampling == replace(module.val_sampling, spacing="discrete")
    assert between.hparams.val_sampling["spacing"] == "discrete" and "sigmas" not in between.hparams.val_sampling
    assert between.hparams.weighting == between.denoiser.weighting == "simple"

    # before val_sampling
    hp["schedule"] = hp.pop("noise_schedule")
    del hp["val_sampling"]
    hp.update(val_sampler="heun", val_steps=7, val_guidance=3.0, val_schedule="discrete")
    hp["text"] = {**hp["text"], "dropout": {"clip": 0.1, "t5": 0.2}}
    hp["text"].pop("encoder_dropout", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = load_diffusion(tmp_path / "old.ckpt")
    assert old.conditioner.dropout == 0.0 and old.conditioner.encoder_dropout == {"clip": 0.1, "t5": 0.2}
    assert old.val_sampling == SamplingSettings(sampler="heun", steps=7, guidance=3.0, spacing="discrete")
    assert len(old.noise_schedule.sigmas) == 500
    assert torch.equal(old.noise_schedule.sigmas, module.noise_schedule.sigmas)
    assert old.hparams.weighting == old.denoiser.weighting == "simple"

    # an export folder of those days: its config.json holds the hyper-parameters under their old names
    from emu.export.__main__ import main as export_main

    assert export_main(["safetensors", str(tmp_path / "sigmas.ckpt"), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export/config.json").read_text())
    sampling = config["hyper_parameters"]["val_sampling"]
    config["hyper_parameters"].update(weighting="uniform", val_sampling={**sampling, "sigmas": sampling.pop("spacing")})
    (tmp_path / "export/config.json").write_text(json.dumps(config))
    exported = load_diffusion(tmp_path / "export")
    assert exported.hparams.weighting == exported.denoiser.weighting == "simple"
    assert exported.val_sampling == between.val_sampling


def test_sample_py_writes_images_metadata_and_grid(tmp_path, tiny_autoencoder, tiny_clip, tiny_t5):
    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5)
    _trainer(tmp_path, 1).fit(module, datamodule=_Data())
    ckpt = tmp_path / "ckpt/last.ckpt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the center on a black background\n\na small blue star at the top\n")
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"prompts={prompts}", "n=2", "sampling.steps=2",
           "sampling.batch_size=3", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and [x["seed"] for x in lines] == [0, 1, 2, 3]
    assert lines[2]["prompt"] == "a small blue star at the top" and lines[0]["sampler"] == "dpmpp_2m"
    assert all((out / x["file"]).is_file() for x in lines) and (out / "grid.png").is_file()

    # bad input: one clear line, exit 2, before any work
    bad = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"prompts={tmp_path / 'missing.txt'}",
           f"hydra.run.dir={tmp_path / 'bad'}"]  # fmt: skip
    r = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "config error: prompts: " in r.stderr and "is not a file" in r.stderr, r.stderr
    import sample

    for args, expected in [
        (["prompt=x", "sampling.guidance=-1"], "sampling.guidance: must be in [0, 50]"),
        (["prompt=x", "sampling.steps=0"], "sampling.steps: must be in 1..1000"),
        (["prompt=x", "sampling.sampler=plms"], "sampling.sampler: must be one of"),
        (["prompt=x", "+sampling.stepz=3"], "sampling.stepz: is not a sampling setting"),
        (["prompt=x", f"prompts={prompts}"], "give exactly one"),
        (["prompt=x", "sampling.resolution=40"], "sampling.resolution: 40 is not a positive multiple of 16"),
        (["prompt=x", f"ckpt={prompts}"], "ckpt: "),  # not a checkpoint at all
    ]:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "sample", overrides=[f"ckpt={ckpt}", f"out={tmp_path}", f"paths.output_dir={tmp_path}", *args]
            )
        with pytest.raises(ConfigError) as err:
            sample.run(cfg)
        assert expected in str(err.value)


def test_prompt_files(tmp_path):
    from emu.diffusion.prompts import read_prompts

    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na red cube\tArtifacts\tColor\t\n")
    assert read_prompts(tsv) == ["bond", "a red cube"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n  two  \n")
    assert read_prompts(txt) == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.tsv").write_text("text\tx\nhello\t1\n")
    with pytest.raises(ConfigError, match="Prompt"):
        read_prompts(tmp_path / "bad.tsv")
    with pytest.raises(ConfigError, match="is not a file"):
        read_prompts(tmp_path / "missing.txt")


def test_partiprompts_ship_with_emu_and_parti_n_spreads_over_the_categories(tmp_path):
    """The paper-scale configs log a grid of ``parti:32`` at every validation (they logged none: ``val_prompts``
    was null); the TSV and its Apache-2.0 licence are in the package, identical to ../shared/data's."""
    import csv

    from hydra import compose, initialize_config_dir

    from emu.diffusion.prompts import PARTI_TSV, parti_prompts, read_prompts

    assert "Apache License" in (PARTI_TSV.parent / "LICENSE").read_text()
    with PARTI_TSV.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(read_prompts("parti")) == len(rows) == 1632
    category = {r["Prompt"].strip(): r["Category"] for r in rows}
    val = read_prompts("parti:32", "model.val_prompts")
    assert len(set(val)) == 32 and val == parti_prompts("parti:32")  # fixed
    counts = {c: sum(category[p] == c for p in val) for c in set(category.values())}
    assert len(counts) == 12 and set(counts.values()) == {2, 3}  # every category, 32 = 8 x 3 + 4 x 2
    assert sum(len(p.split()) > 3 for p in val) >= 16  # spread through each category, not its one-word head
    small = tmp_path / "small.tsv"
    small.write_text("Prompt\tCategory\na\tX\nb\tY\nc\tY\nd\tY\n")
    assert parti_prompts("parti:4", path=small) == ["a", "b", "d", "c"]  # X has 1 of its 2, Y 2 spread; then the rest
    for spec in ("parti:0", "parti:x", "parti:5000"):
        with pytest.raises(ConfigError, match=r"model\.val_prompts: 'parti:"):
            read_prompts(spec, "model.val_prompts")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for experiment in ("stage1_pretrain", "stage1_pretrain_512", "stage1_pretrain_1024", "stage2_quality_tune"):
            assert compose("train", overrides=[f"experiment={experiment}"]).model.val_prompts == "parti:32"
        assert compose("train", overrides=["experiment=mini/stage1_pretrain"]).model.val_prompts[0].startswith("a ")


def test_paper_optimizer_decays_weights_only_and_scales_its_rate_with_the_batch(tiny_autoencoder, tiny_clip, tiny_t5):
    """Issue 38 row 8: the 512 / 1024 stages kept 1e-4 while the global batch fell 16x (2048 -> 128), had no cooldown,
    and decayed norms, biases and embeddings. Now: weight decay on weight matrices and kernels only; the rate given
    at a reference batch and scaled (sqrt) to the run's; each stage ends on a linear cooldown to 0."""
    from hydra import compose, initialize_config_dir

    from emu.training.optim import weight_decay_groups
    from emu.utils.schedules import scaled_lr, warmup_constant_cooldown

    module = tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, weight_decay=0.01)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trained = [p for m in module.trained_modules().values() for p in m.parameters()]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trained) and len(no_decay["params"]) > 0
    table = torch.nn.Embedding(10, 4)
    (only,) = weight_decay_groups([torch.nn.Sequential(torch.nn.Linear(4, 4), table)], 0.0)  # no decay: one group
    assert len(only["params"]) == 3
    groups = weight_decay_groups([torch.nn.Sequential(torch.nn.Linear(4, 4), table)], 0.1)
    assert [len(g["params"]) for g in groups] == [1, 2]  # the Linear's weight; its bias and the embedding table

    assert [round(warmup_constant_cooldown(s, 2, 10, 4), 2) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75,
                                                                                  0.5, 0.25]  # fmt: skip
    with pytest.raises(ConfigError, match="cooldown_steps"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, cooldown_steps=10, lr_schedule="cosine")
    with pytest.raises(ConfigError, match="lr_scaling"):
        tiny_module(tiny_autoencoder, tiny_clip, tiny_t5, lr_scaling="quadratic")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        stages = {e: compose("train", overrides=[f"experiment={e}"]) for e in
                  ("stage1_pretrain", "stage1_pretrain_512", "stage1_pretrain_1024")}  # fmt: skip
    per_gpu = {e: c.data.batch_size for e, c in stages.items()}
    assert per_gpu == {"stage1_pretrain": 64, "stage1_pretrain_512": 16, "stage1_pretrain_1024": 4}
    rates = [scaled_lr(c.model.lr, c.model.lr_scaling, 32 * c.data.batch_size, c.model.lr_reference_batch)
             for c in stages.values()]  # fmt: skip
    assert rates == pytest.approx([1e-4, 5e-5, 2.5e-5])  # 32 GPUs, as the configs' comments say
    assert all(c.model.cooldown_steps > 0 and c.model.weight_decay > 0 for c in stages.values())


def test_sdxl_shaped_model_trains_and_samples(tiny_autoencoder, sdxl_text_encoders):
    """SDXL's conditioning end to end: two CLIP encoders joined along the features (32 + 48 = 80 wide, no projection),
    bigG's pooled embedding and the batch's size and crop ids through the text_time embedding."""
    text = {**sdxl_text_config(sdxl_text_encoders), "dropout": 0.1}
    torch.manual_seed(0)
    module = DiffusionModule(SDXL_TINY_UNET, text, str(tiny_autoencoder), warmup_steps=0, lr=2e-3,
                             ema_half_life_images=64, ema_ramp=None, val_sampling={"steps": 2})  # fmt: skip
    batch = haystack_batch()
    loss = module.diffusion_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and module.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0
    assert len(module.conditioner.proj) == 0
    images = module.sample(["a large red circle"], [0], SamplingSettings(steps=2, guidance=3.0, height=32, width=48))
    assert images.shape == (1, 3, 32, 48) and torch.isfinite(images).all()


def test_init_from_a_diffusers_sdxl_unet_folder(tmp_path, tiny_autoencoder, sdxl_text_encoders):
    """``init_from`` a diffusers pipeline folder: its ``unet/`` (text_time) converted into the model bit for bit; a
    model.unet that does not fit it is refused by name."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        in_channels=16, out_channels=16, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2), cross_attention_dim=80, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8,
    )  # fmt: skip
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    ref.save_pretrained(tmp_path / "sdxl" / "unet")
    text, unet = sdxl_text_config(sdxl_text_encoders), SDXL_TINY_UNET
    module = DiffusionModule(unet, text, str(tiny_autoencoder), init_from=str(tmp_path / "sdxl"))
    theirs = ref.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in module.unet.state_dict().items())
    with pytest.raises(ConfigError, match=r"model\.init_from.*unet weights .* do not fit.*add_embedding"):
        DiffusionModule({**unet, "addition_time_embed_dim": 4}, text, str(tiny_autoencoder),
                        init_from=str(tmp_path / "sdxl" / "unet"))  # fmt: skip
    from emu.utils.validate import _init_from_links

    for path, problems in ((tmp_path / "sdxl", 0), (tmp_path / "sdxl" / "unet", 0), (tmp_path / "none", 1)):
        found = []
        _init_from_links(OmegaConf.create({"init_from": str(path)}), OmegaConf.create(unet), found)
        assert len(found) == problems, found  # train.py's config check lets a diffusers folder through
