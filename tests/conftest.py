"""Fixtures: tiny data the tests write themselves (images, a bad-input corpus, WebDataset shards)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# the demo's Hydra entry points (as they appear in a step's argv) and the config each composes
ENTRY_CONFIGS = {
    "train.py": "train",
    "eval.py": "eval",
    "curate.py": "curate",
    "sample.py": "sample",
    "bench/data_throughput.py": "train",
    "emu.diffusion.precompute": "train",
    "emu.curation.subset": "curate",
}


@pytest.fixture(autouse=True)
def _no_named_sets_leak():
    """An entry point run in-process registers its config's named sets for the process: each test starts without."""
    from emu.utils import named_sets

    named_sets.register(None)
    yield
    named_sets.register(None)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    """A 48 wide x 64 high JPEG whose EXIF says 'rotate 90° CW' (orientation 6): upright it is 64 x 48."""
    img = rgb_image(48, 64, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    return png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)


def bad_corpus() -> list[tuple[str, bytes, bytes | None, str | None]]:
    """(name, image bytes, caption bytes or None, expected skip reason or None when usable)."""
    good = png_bytes(rgb_image())
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    items = [(f"good_{i}.png", png_bytes(rgb_image(seed=i)), b"a good image", None) for i in range(4)]
    items += [
        ("cmyk.jpg", png_bytes(rgb_image(seed=11).convert("CMYK"), "JPEG"), b"a cmyk image", None),
        ("gray16.png", png_bytes(gray16), b"a 16-bit image", None),
        ("gray.png", png_bytes(rgb_image(seed=12).convert("L")), b"a grayscale image", None),
        ("palette_alpha.png", png_bytes(palette), b"a palette image with alpha", None),
        ("exif.jpg", exif_rotated_jpeg(), b"an exif-rotated image", None),
        ("empty.png", b"", b"an empty file", "empty_file"),
        (
            "garbage.jpg",
            bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8)),
            b"noise",
            "not_an_image",
        ),
        ("text.jpg", b"this is not an image at all\n", b"a text file", "not_an_image"),
        ("truncated.png", good[: len(good) // 2], b"a truncated png", "truncated_image"),
        ("tiny.png", png_bytes(rgb_image(8, 8)), b"a tiny image", "too_small"),
        ("nocaption.png", good, None, "missing_caption"),
        ("blankcaption.png", good, b"   \n", "empty_caption"),
        ("latin1caption.png", good, "caf\xe9 cr\xe8me".encode("latin-1"), "caption_not_utf8"),
    ]
    return items


def expected_skips() -> Counter:
    return Counter(reason for *_, reason in bad_corpus() if reason)


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from threads, and one thread does not stall when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """The bad-input corpus as a folder of images with .txt captions."""
    root = tmp_path / "bad_folder"
    root.mkdir()
    rows = []
    for i, (name, data, caption, _) in enumerate(bad_corpus()):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
        rows.append(json.dumps({"file_name": name, **haystack_labels(i)}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")  # labels only: captions come from the .txt files
    return root


def haystack_labels(i: int) -> dict:
    """Haystack-style metadata (what the pixel judge learns from) for a non-haystack test image."""
    from emu.mini.haystack import metadata, scene_spec

    meta = metadata(scene_spec(0, i), 64, 64)
    return {k: meta[k] for k in ("appeal", "objects", "background")}


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> str:
    """Write samples with webdataset's own writer; returns a brace pattern of the shards."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    n = (len(samples) + per_shard - 1) // per_shard
    return str(folder / f"{{00000..{n - 1:05d}}}.tar")


@pytest.fixture
def bad_shards(tmp_path: Path) -> str:
    samples = []
    for name, data, caption, _ in bad_corpus():
        stem, ext = name.rsplit(".", 1)
        s = {"__key__": stem, ext: data, "json": b'{"source": "test"}'}
        if caption is not None:
            s["txt"] = caption
        samples.append(s)
    return write_shards(tmp_path / "bad_shards", samples, per_shard=6)


def haystack_batch(n=4, resolution=32):
    """The first ``n`` haystack images as one batch, through the DataModule."""
    from emu.data.datamodule import EmuDataModule
    from emu.mini.source import HaystackSource

    dm = EmuDataModule(HaystackSource(n_train=n, n_val=0, resolution=resolution), resolution=resolution, batch_size=n)
    return next(iter(dm.dataloader("train", shuffle=False)))


# ------------------------------------------------------------------------------------ tiny models, saved by path
CAPTIONS = ["a large red circle in the top left on a navy background", "a small blue star at the bottom"]


def save_clip(
    folder: Path,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 16,
    projection_dim: int = 24,
) -> Path:
    """A random CLIPModel folder with a word tokenizer over the haystack (and a tiny vision tower): the test
    fixture's sizes by default; bench/stage1_fsdp.py asks for CLIP ViT-L/14's text tower (768 wide, 12 layers)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from emu.mini.clip import haystack_vocabulary_text
    from emu.text.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([*CAPTIONS, *haystack_vocabulary_text()])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         max_position_embeddings=max_position_embeddings, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )  # fmt: skip
    with torch.random.fork_rng():  # the same weights whichever test asks first (curation depends on them)
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_t5(folder: Path, d_model: int = 32, d_kv: int = 8, d_ff: int = 64, num_layers: int = 2, num_heads: int = 4,
            **config) -> Path:  # fmt: skip
    """A random T5EncoderModel folder with a word tokenizer over the haystack: the test fixture's sizes by default;
    ``config``: other ``T5Config`` fields (``feed_forward_proj="gated-gelu"`` for T5 v1.1 / T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    from emu.mini.clip import haystack_vocabulary_text
    from emu.text.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([*CAPTIONS, *haystack_vocabulary_text()], add_bos=False)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      **config)  # fmt: skip
    with torch.random.fork_rng():  # the same weights whichever test asks first
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """A random 16-channel f=8 autoencoder export folder (widths 8), its weights drawn with ``seed``."""
    from emu.autoencoder.model import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    return ae.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIPModel folder (text width 32, projection 24, 16 positions) with a word tokenizer over the haystack."""
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def sdxl_text_encoders(tmp_path_factory):
    """SDXL's two text encoders in miniature: a CLIPTextModel (CLIP ViT-L's place) and a CLIPTextModelWithProjection
    (OpenCLIP bigG's), of different widths, each with its own tokenizer (16 tokens), saved as folders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from emu.mini.clip import haystack_vocabulary_text
    from emu.text.tokenizer import build_word_tokenizer

    folders = {}
    for name, cls, width, projection in (("clip_l", CLIPTextModel, 32, 24), ("clip_g", CLIPTextModelWithProjection,
                                                                              48, 40)):  # fmt: skip
        tok = build_word_tokenizer([*CAPTIONS, *haystack_vocabulary_text()])
        tok.model_max_length = 16
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                projection_dim=projection, eos_token_id=tok.eos_token_id,
                                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        folders[name] = tmp_path_factory.mktemp(name)
        with torch.random.fork_rng():
            torch.manual_seed(len(folders))
            cls(config).save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


def sdxl_text_config(folders: dict[str, Path]) -> dict:
    """``model.text`` for SDXL's conditioning over :func:`sdxl_text_encoders`: penultimate states, no padding mask,
    joined along the features (32 + 48 = 80 wide), bigG's pooled embedding, zeros for the unconditional one."""
    encoders = {n: {"name_or_path": str(p), "kind": "clip", "max_length": 16, "hidden_state": "penultimate",
                    "mask_padding": False} for n, p in folders.items()}  # fmt: skip
    return {"encoders": encoders, "uncond": "zeros", "pooled_from": "clip_g", "join": "features"}


@pytest.fixture(scope="session")
def tiny_sdxl(sdxl_text_encoders, tmp_path_factory) -> Path:
    """A public SDXL pipeline folder in miniature, as ``StableDiffusionXLPipeline.save_pretrained`` writes it: a random
    text_time U-Net (4 latent channels, widths 32, context 80 = 32 + 48, bigG's 40-wide pooled embedding + 6 ids of 8),
    a random 4-channel f=8 ``AutoencoderKL`` with SDXL's scaling_factor 0.13025, :func:`sdxl_text_encoders`' two
    encoders and tokenizers (16 tokens) and an ``EulerDiscreteScheduler`` of SDXL's schedule."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1, attention_head_dim=(2, 2), cross_attention_dim=80, norm_num_groups=8,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=40 + 6 * 8,
        )  # fmt: skip
        for p in unet.parameters():  # every weight matters (diffusers zero-initialises none, but keep them all live)
            p.data.normal_(0, 0.05)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=64, scaling_factor=0.13025)  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    first, second = sdxl_text_encoders["clip_l"], sdxl_text_encoders["clip_g"]
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(first),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(second),
        tokenizer=AutoTokenizer.from_pretrained(first), tokenizer_2=AutoTokenizer.from_pretrained(second), unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory) -> Path:
    """A random 16-channel f=8 autoencoder export folder."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("autoencoder"))


# The tests' U-Net over the tiny models (16 latent channels, the tiny CLIP's 24-wide pooled embedding): built
# directly by tests/test_stage1.py; its widths replace the mini U-Net's in tiny_stage1_overrides.
TINY_UNET = dict(in_channels=16, out_channels=16, block_channels=[32, 32], layers_per_block=1, transformer_depth=[0, 1],
                 head_dim=16, context_dim=32, pooled_dim=24, norm_groups=8)  # fmt: skip
TINY_UNET_WIDTHS = ("block_channels", "layers_per_block", "head_dim", "context_dim", "pooled_dim", "norm_groups")
SDXL_TINY_UNET = {**TINY_UNET, "context_dim": 80, "pooled_dim": 40, "addition_time_embed_dim": 8}  # SDXL-shaped


# The tests' DiT (arch=dit, emu/diffusion/dit.py) over the same tiny models: its widths replace the mini DiT's.
TINY_DIT = dict(patch_size=2, width=32, depth=2, heads=2, context_dim=32, pooled_dim=24)


# The tests' masked transformer (emu/maskgit/transformer.py) over the same tiny models and the tiny tokenizer.
TINY_MASKGIT = dict(width=32, depth=2, heads=2, context_dim=32, pooled_dim=24, mlp_ratio=2)


def arch_of(experiment: str) -> str:
    """The network family a mini experiment trains: ``dit``, ``pixel``, ``maskgit`` (make generality's arms) or
    ``unet``."""
    return next((a for a in ("dit", "pixel", "maskgit") if experiment.endswith(f"_{a}")), "unet")


def tiny_stage1_overrides(tiny_autoencoder: Path, tiny_clip: Path, tiny_t5: Path, arch: str = "unet",
                          tokenizer: Path | None = None) -> list[str]:  # fmt: skip
    """Hydra overrides that point the mini stage-1 model at the tiny test models; ``arch``: the network family of
    the experiment (:func:`arch_of`): a DiT gets the tiny DiT's widths, a pixel model keeps its autoencoder (none), a
    masked transformer gets its widths and ``tokenizer`` (the ``tiny_tokenizer`` fixture's)."""
    if arch == "maskgit":
        net = [f"model.transformer.{k}={v}" for k, v in TINY_MASKGIT.items()] + [f"model.tokenizer={tokenizer}"]
    elif arch == "dit":
        net = [f"model.unet.{k}={v}" for k, v in TINY_DIT.items()]
    else:  # the tiny U-Net's widths (0.46M parameters, ~7 MB checkpoints; the mini U-Net's checkpoints are ~100 MB
        # with their EMA and Adam state, and the fault tests keep one per step); the mini config's attention depth stays
        widths = (*TINY_UNET_WIDTHS, "transformer_depth") if arch == "pixel" else TINY_UNET_WIDTHS  # 3 levels -> 2
        net = [f"model.unet.{k}={str(TINY_UNET[k]).replace(' ', '')}" for k in widths]
    return [
        *([] if arch == "pixel" else [f"model.autoencoder={tiny_autoencoder}"]),
        f"model.text.encoders.clip.name_or_path={tiny_clip}",
        "model.text.encoders.clip.max_length=16",
        f"model.text.encoders.t5.name_or_path={tiny_t5}",
        "model.text.encoders.t5.max_length=16",
        *net,
        "model.val_sampling.steps=2",
    ]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_autoencoder, tmp_path_factory) -> Path:
    """A ``mini/tokenizer`` checkpoint over the tiny autoencoder, 30 steps on 64 haystack images."""
    from hydra import compose, initialize_config_dir

    import train

    out = tmp_path_factory.mktemp("tokenizer")
    overrides = ["experiment=mini/tokenizer", f"paths.output_dir={out}", "trainer.max_steps=30",
                 "trainer.limit_val_batches=0", "data.batch_size=16", "data.num_workers=0", "data.source.n_train=64",
                 f"model.autoencoder={tiny_autoencoder}", "model.warmup_steps=1"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train.train(compose("train", overrides=overrides))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_stage1_checkpoint(tiny_autoencoder, tiny_clip, tiny_t5, tmp_path_factory) -> Path:
    """A one-step ``mini/stage1_pretrain`` checkpoint over the tiny models."""
    from hydra import compose, initialize_config_dir

    import train

    out = tmp_path_factory.mktemp("stage1")
    overrides = ["experiment=mini/stage1_pretrain", f"paths.output_dir={out}", "trainer.max_steps=1",
                 "trainer.limit_val_batches=0", "data.batch_size=4", "data.num_workers=0", "data.source.n_train=8",
                 *tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train.train(compose("train", overrides=overrides))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_curated(tmp_path_factory) -> Path:
    """A curated-set folder as curate.py writes it: PNGs + metadata.jsonl (file_name, text)."""
    from emu.mini import haystack

    folder = tmp_path_factory.mktemp("curated")
    rows = []
    for i in range(8):
        image, meta = haystack.make_sample(0, i, 64)
        image.save(folder / f"{meta['key']}.png")
        rows.append(json.dumps({"file_name": f"{meta['key']}.png", "text": meta["caption"], "key": meta["key"]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_preference_data(tiny_curated, tmp_path_factory) -> dict[str, Path]:
    """The curated folder's images as DPO pairs (``pairs``: each preferred to the next, Pick-a-Pic's layout) and as KTO
    likes (``likes``: every other one desirable)."""
    rows = [json.loads(line) for line in (tiny_curated / "metadata.jsonl").read_text().splitlines()]
    pairs, likes = tmp_path_factory.mktemp("pairs"), tmp_path_factory.mktemp("likes")
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(
        {"caption": a["text"], "jpg_0": str(tiny_curated / a["file_name"]), "jpg_1": str(tiny_curated / b["file_name"]),
         "label_0": 1}) + "\n" for a, b in zip(rows[0::2], rows[1::2], strict=True)))  # fmt: skip
    for r in rows:
        (likes / r["file_name"]).write_bytes((tiny_curated / r["file_name"]).read_bytes())
    (likes / "metadata.jsonl").write_text("".join(json.dumps({**r, "label": i % 2 == 0}) + "\n"
                                                  for i, r in enumerate(rows)))  # fmt: skip
    return {"pairs": pairs, "likes": likes}


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> Path:
    """A random pixel judge (HaystackJudge on a tiny timm backbone) saved as a Lightning checkpoint."""
    import lightning as L
    import torch

    from emu.mini.judge import HaystackJudge

    torch.manual_seed(0)
    judge = HaystackJudge(backbone="resnet10t")
    path = tmp_path_factory.mktemp("judge") / "judge.ckpt"
    torch.save({"state_dict": judge.state_dict(), "hyper_parameters": dict(judge.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def aesthetic_head(tiny_clip, tmp_path_factory) -> Path:
    """An aesthetic head on the tiny CLIP, trained briefly on haystack ratings (curation tests)."""
    from emu.curation.aesthetic import train_head
    from emu.mini.aesthetic import haystack_ratings
    from emu.text.clip import ClipEmbedder

    emb, ratings = haystack_ratings(ClipEmbedder(tiny_clip), 64, seed=1, resolution=32)
    head, _ = train_head(emb, ratings, epochs=3)
    return head.save(tmp_path_factory.mktemp("aesthetic") / "head.safetensors")
