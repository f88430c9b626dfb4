import logging

import pytest
import torch

from emu.errors import ConfigError
from emu.mini.clip import haystack_vocabulary_text
from emu.text.encoders import FrozenTextEncoder
from emu.text.tokenizer import build_word_tokenizer
from tests.conftest import CAPTIONS


def test_clip_and_t5_load_by_path_and_encode(tiny_clip, tiny_t5):
    clip = FrozenTextEncoder(str(tiny_clip), "clip", max_length=16)
    out = clip([*CAPTIONS, ""])
    assert out.tokens.shape == (3, 16, 32) and out.pooled.shape == (3, 24) and out.mask.dtype == torch.bool
    assert out.mask[0].sum() == len(CAPTIONS[0].split()) + 2 and out.mask[2].sum() == 2  # bos + eos only
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.train().training
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_clip).eval()  # the same weights as the full model's text tower
    ids = clip.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = full.get_text_features(**ids).pooler_output  # projected pooled text embedding
    torch.testing.assert_close(expected, clip(CAPTIONS).pooled)
    t5 = FrozenTextEncoder(str(tiny_t5), "t5", max_length=12)
    out = t5(CAPTIONS)
    assert out.tokens.shape == (2, 12, 32) and out.pooled is None
    assert out.mask[1].sum() == len(CAPTIONS[1].split()) + 1  # eos


def test_long_prompts_truncate_with_one_warning(tiny_clip, caplog):
    clip = FrozenTextEncoder(str(tiny_clip), "clip", max_length=8)
    with caplog.at_level(logging.WARNING, logger="emu.text"):
        out = clip([CAPTIONS[0], CAPTIONS[0]])
        clip([CAPTIONS[0]])
    assert out.mask.all() and out.tokens.shape[1] == 8
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_bad_paths_and_mismatched_tokenizers(tmp_path, tiny_clip):
    with pytest.raises(ConfigError, match="not a model folder"):
        FrozenTextEncoder(str(tmp_path), "clip")
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_clip, folder)
    build_word_tokenizer(
        [*CAPTIONS, *haystack_vocabulary_text(), "many more words than the model knows zebra yak"]
    ).save_pretrained(folder)
    with pytest.raises(ConfigError, match="do not belong together"):
        FrozenTextEncoder(str(folder), "clip")
    with pytest.raises(ConfigError, match="must be 'clip' or 't5'"):
        FrozenTextEncoder(str(tiny_clip), "bert")


def make_conditioner(tiny_clip, tiny_t5, **kw):
    from emu.text.conditioner import TextConditioner

    encoders = {"clip": FrozenTextEncoder(str(tiny_clip), "clip", 16), "t5": FrozenTextEncoder(str(tiny_t5), "t5", 16)}
    return TextConditioner(encoders, context_dim=20, **kw)


def test_conditioner_shapes_masks_and_pooled(tiny_clip, tiny_t5):
    cond = make_conditioner(tiny_clip, tiny_t5, dropout=0.0)
    out = cond.condition(CAPTIONS)
    assert out.context.shape == (2, 16 + 16, 20) and out.mask.shape == (2, 32) and out.pooled.shape == (2, 24)
    n0 = len(CAPTIONS[0].split())
    assert out.mask[0, :16].sum() == n0 + 2 and out.mask[0, 16:].sum() == n0 + 1  # clip then t5 tokens
    out.context.sum().backward()  # the projections train, the encoders do not
    assert all(p.grad is not None for p in cond.proj.parameters())
    assert all(p.grad is None for p in cond.encoders.parameters())
    uncond = cond.unconditional_batch(3)
    assert uncond.context.shape == (3, 32, 20) and uncond.mask[0, :16].sum() == 2


def _dropped(cond, out, name):
    """Which rows of ``out`` carry ``name``'s unconditional embedding (by its slice of the context)."""
    sizes = {n: e.max_length for n, e in cond.encoders.items()}
    start = sum(sizes[n] for n in list(sizes)[: list(sizes).index(name)])
    u = cond.unconditional_batch(out.context.shape[0]).context[:, start : start + sizes[name]]
    return torch.isclose(out.context[:, start : start + sizes[name]], u).all(-1).all(-1)


def test_cfg_dropout_drops_all_encoders_together(tiny_clip, tiny_t5):
    """The empty input that guidance samples with is trained at the configured rate, and no sample is half-dropped
    (the old per-encoder draws trained the all-empty input 1% of the time at 0.1 each, and a half-empty one 18%)."""
    cond = make_conditioner(tiny_clip, tiny_t5, dropout=0.2)
    embs = cond.encode(CAPTIONS[:1] * 2000)
    out = cond(embs, drop=True, generator=torch.Generator().manual_seed(0))
    clip, t5 = _dropped(cond, out, "clip"), _dropped(cond, out, "t5")
    assert 0.17 < clip.float().mean() < 0.23
    assert torch.equal(clip, t5)
    empty = cond.unconditional("clip")
    assert (out.pooled[clip] == empty.pooled).all() and (out.mask[clip, :16].sum(-1) == 2).all()
    ref = cond(embs, drop=False)
    torch.testing.assert_close(out.context[~clip], ref.context[~clip])  # the others keep their text


def test_cfg_encoder_dropout_adds_independent_drops(tiny_clip, tiny_t5):
    cond = make_conditioner(tiny_clip, tiny_t5, dropout=0.1, encoder_dropout={"clip": 0.3})
    embs = cond.encode(CAPTIONS[:1] * 4000)
    out = cond(embs, drop=True, generator=torch.Generator().manual_seed(0))
    clip, t5 = _dropped(cond, out, "clip"), _dropped(cond, out, "t5")
    assert 0.08 < t5.float().mean() < 0.12  # t5: the joint drop only
    assert (clip[t5]).all()  # a joint drop drops clip too
    assert 0.35 < clip.float().mean() < 0.41  # 1 - 0.9 * 0.7 = 0.37
    zeros = make_conditioner(tiny_clip, tiny_t5, dropout=1.0, uncond="zeros")
    z = zeros(zeros.encode(CAPTIONS), drop=True)
    assert (z.pooled == 0).all() and z.mask.all()
    none = make_conditioner(tiny_clip, tiny_t5, dropout=0.0)
    torch.testing.assert_close(none(embs, drop=True).context, none(embs).context)


def test_cached_embeddings_equal_fresh_ones(tiny_clip, tiny_t5, tmp_path):
    from emu.text.conditioner import EmbeddingCache, precompute_embeddings

    cond = make_conditioner(tiny_clip, tiny_t5)
    prompts = [*CAPTIONS, CAPTIONS[0], "a small red star on the left"]
    cache = EmbeddingCache(precompute_embeddings(cond, prompts, tmp_path / "emb.safetensors", batch_size=2))
    assert len(cache.prompts) == 3
    fresh, cached = cond.encode(prompts[::-1]), cache(prompts[::-1])
    for name in ("clip", "t5"):
        torch.testing.assert_close(cached[name].tokens, fresh[name].tokens)
        assert torch.equal(cached[name].mask, fresh[name].mask)
    torch.testing.assert_close(cached["clip"].pooled, fresh["clip"].pooled)
    torch.testing.assert_close(cond(cached).context, cond(fresh).context)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cache(["never seen"])


def test_conditioner_config_errors(tiny_clip, tiny_t5):
    with pytest.raises(ConfigError, match="uncond"):
        make_conditioner(tiny_clip, tiny_t5, uncond="noise")
    with pytest.raises(ConfigError, match="pooled_from"):
        make_conditioner(tiny_clip, tiny_t5, pooled_from="t5")
    with pytest.raises(ConfigError, match="unknown encoders"):
        make_conditioner(tiny_clip, tiny_t5, encoder_dropout={"bert": 0.1})
    with pytest.raises(ConfigError, match="encoder_dropout"):  # the old per-encoder dict says where it went
        make_conditioner(tiny_clip, tiny_t5, dropout={"clip": 0.1, "t5": 0.1})
    with pytest.raises(ConfigError, match="probability"):
        make_conditioner(tiny_clip, tiny_t5, dropout=1.5)


def test_mini_clip_exports_a_folder_public_loaders_read(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from emu.mini.clip import MiniClipModule, attribute_prompts

    module = MiniClipModule(image_size=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                            projection_dim=16, max_length=20)  # fmt: skip
    folder = module.save_pretrained(tmp_path / "clip")
    assert isinstance(CLIPModel.from_pretrained(folder), CLIPModel)
    caption = "a large red circle in the top left on a navy background"
    assert AutoTokenizer.from_pretrained(folder)(caption)["input_ids"] == module.tokenizer(caption)["input_ids"]
    assert module.tokenizer.unk_token_id not in module.tokenizer(caption)["input_ids"]
    enc = FrozenTextEncoder(str(folder), "clip", max_length=20)
    with torch.no_grad():
        expected = module.embed_texts([caption])
    torch.testing.assert_close(torch.nn.functional.normalize(enc([caption]).pooled, dim=-1), expected)
    prompts = attribute_prompts("color", "red")
    assert len(prompts) == 2 * 5 * 9 * 8 and all(" red " in p for p in prompts)


def test_mini_clip_metrics_on_constructed_embeddings():
    from emu.mini.clip import MiniClipModule

    module = MiniClipModule(image_size=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                            projection_dim=16, max_length=20, retrieval_candidates=4)  # fmt: skip
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    captions = [f"c{i}" for i in range(8)]
    assert module.evaluate(emb, emb, captions, [{}] * 8)["t2i_top1"] == 1.0
    shuffled = module.evaluate(emb, emb.roll(1, 0), captions, [{}] * 8)["t2i_top1"]
    assert shuffled < 0.5


def test_zero_shot_scores_every_attribute_against_constructed_text_embeddings():
    """A text embedder that one-hot encodes each caption's words, and images embedded as their own caption: the
    zero-shot prediction of every attribute is right, and flaw-free images are reported apart."""
    import torch.nn.functional as F

    from emu.mini.clip import ATTRIBUTES, haystack_vocabulary_text, retrieval_and_zero_shot
    from emu.mini.sets import heldout_haystack

    words = sorted(set(haystack_vocabulary_text()[0].split()))

    def embed(texts):
        return F.normalize(torch.tensor([[float(w in t.split()) for w in words] for t in texts]), dim=-1)

    _, metas = heldout_haystack(60, seed=0)
    captions = [m["caption"] for m in metas]
    metrics = retrieval_and_zero_shot(embed(captions), embed(captions), captions, metas, embed, candidates=20)
    assert set(ATTRIBUTES) == {"shape", "color", "size", "position", "background"}
    assert metrics["t2i_top1"] == 1.0
    for attribute in ATTRIBUTES:
        assert metrics[f"zeroshot_{attribute}"] == 1.0, attribute
    # Flawed images embedded as a caption that is wrong in every attribute: only the flaw-free score stays at 1.
    wrong = "a large white star in the bottom right on a forest background"
    seen = [m["caption"] if not m["flaws"] else wrong for m in metas]
    assert any(m["flaws"] for m in metas) and not all(m["flaws"] for m in metas)
    metrics = retrieval_and_zero_shot(embed(seen), embed(captions), captions, metas, embed, candidates=20)
    for attribute in ATTRIBUTES:
        assert metrics[f"zeroshot_{attribute}_clean"] == 1.0 > metrics[f"zeroshot_{attribute}"], attribute


@pytest.fixture(scope="module")
def t5_bpe():
    """The mini T5's default tokenizer: every BPE merge of the haystack captions."""
    from emu.mini.t5 import build_bpe_tokenizer, caption_corpus

    return build_bpe_tokenizer(caption_corpus())


def unseen_captions(n: int = 1000) -> list[str]:
    """Captions of haystack seed 0 far past the tokenizer's training corpus (its first 4000 images)."""
    from emu.mini.haystack import caption_for, scene_spec

    specs = (scene_spec(0, 1_000_000 + i) for i in range(n))
    return [caption_for(s["objects"], s["background"]) for s in specs]


def test_t5_bpe_tokenizer_has_the_vocabulary_asked_for(t5_bpe):
    from emu.mini.t5 import build_bpe_tokenizer, caption_corpus

    texts = caption_corpus()
    assert [t5_bpe.pad_token_id, t5_bpe.eos_token_id, t5_bpe.unk_token_id] == [0, 1, 2]  # as T5
    assert t5_bpe.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"] and t5_bpe.model_max_length == 64
    most = len(t5_bpe)  # the default learns every merge: the largest vocabulary these captions can fill
    for size in (64, 128, most):
        tok = build_bpe_tokenizer(texts, size)
        assert len(tok) == size == len(tok.get_vocab()) and max(tok.get_vocab().values()) == size - 1
    assert build_bpe_tokenizer(texts, most).get_vocab() == t5_bpe.get_vocab()
    # 3 special tokens + a-z0-9 + the ▁ word mark: the floor whatever the corpus
    assert len(build_bpe_tokenizer(texts, 40)) == 40
    with pytest.raises(ValueError, match="below the 40 entries"):
        build_bpe_tokenizer(texts, 39)
    with pytest.raises(ValueError, match=f"more than these texts can fill.* {most} entries"):
        build_bpe_tokenizer(texts, most + 1)
    with pytest.raises(ValueError, match=f"{most} entries"):
        build_bpe_tokenizer(texts, 10**9)  # capped before training: no huge allocation


def test_t5_bpe_tokenizer_is_one_token_per_caption_word(t5_bpe):
    from emu.mini.haystack import BACKGROUNDS, COLORS, POSITION_PHRASES, SHAPES, SIZES

    words = {"a", "and", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS, *SIZES}
    words |= {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
    for word in words:
        assert t5_bpe.convert_ids_to_tokens(t5_bpe(word)["input_ids"]) == [f"▁{word}", "</s>"]
    captions = unseen_captions()
    lengths = []
    for caption in captions:
        ids = t5_bpe(caption)["input_ids"]
        assert len(ids) == len(caption.split()) + 1 and ids[-1] == t5_bpe.eos_token_id
        assert t5_bpe.decode(ids, skip_special_tokens=True) == caption
        lengths.append(len(ids))
    assert sum(lengths) / len(lengths) <= 25 and max(lengths) <= t5_bpe.model_max_length
    assert t5_bpe(captions[0].upper())["input_ids"] == t5_bpe(captions[0])["input_ids"]  # lower-cased
    other = "a small striped star with dotted text 42"  # words it never saw: letters, no <unk>
    ids = t5_bpe(other)["input_ids"]
    assert t5_bpe.unk_token_id not in ids and t5_bpe.decode(ids, skip_special_tokens=True) == other


def test_mini_t5_folder_loads_by_path_and_tokenizes_captions_without_unknowns(tmp_path, t5_bpe):
    from transformers import AutoTokenizer, T5Config

    from emu.mini.t5 import caption_corpus, main

    main(["--out", str(tmp_path / "t5"), "--d-model", "32", "--layers", "1"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "t5")
    assert len(tok) == len(t5_bpe) == T5Config.from_pretrained(tmp_path / "t5").vocab_size
    assert tok.model_max_length == 64 and tok.get_vocab() == t5_bpe.get_vocab()
    for caption in [*caption_corpus(50, seed=5), *unseen_captions(50)]:  # another haystack's captions
        ids = tok(caption)["input_ids"]
        assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
        assert ids == t5_bpe(caption)["input_ids"] and tok.decode(ids, skip_special_tokens=True) == caption
    enc = FrozenTextEncoder(str(tmp_path / "t5"), "t5", max_length=32)
    out = enc(["a small red star on the left on a navy background", ""])
    assert out.tokens.shape == (2, 32, 32) and out.mask[1].sum() == 1


def test_mini_clip_hyperparameters_from_hydra_load_weights_only(tmp_path):
    """A config list (OmegaConf ListConfig) must not reach the checkpoint: resuming loads it weights-only."""
    from omegaconf import OmegaConf

    from emu.mini.clip import MiniClipModule

    negatives = OmegaConf.create({"n": ["shape", "color"]}).n
    module = MiniClipModule(image_size=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                            projection_dim=16, max_length=20, hard_negatives=negatives)  # fmt: skip
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "h.ckpt")
    loaded = torch.load(tmp_path / "h.ckpt", weights_only=True)
    assert loaded["hyper_parameters"]["hard_negatives"] == ["shape", "color"]


def test_hard_negatives_differ_in_exactly_the_attribute_asked_for():
    import random

    from emu.data.samples import swap_left_right
    from emu.mini.clip import NEGATIVE_ATTRIBUTES, hard_negative_captions
    from emu.mini.haystack import make_sample, parse_caption

    metas = [make_sample(0, i, 16)[1] for i in range(20)]
    for attribute in NEGATIVE_ATTRIBUTES:
        negs = hard_negative_captions(metas, random.Random(0), [attribute])
        assert len(negs) == 20
        for meta, neg in zip(metas, negs):
            parsed = parse_caption(neg)
            assert parsed["background"] == meta["background"] and len(parsed["objects"]) == len(meta["objects"])
            changed = [(o, n) for o, n in zip(meta["objects"], parsed["objects"]) if o != n]
            assert len(changed) == 1, (meta["caption"], neg)
            old, new = changed[0]
            assert [k for k in old if old[k] != new[k]] == [attribute]
            assert len({o["position"] for o in parsed["objects"]}) == len(parsed["objects"])  # one object per cell
    assert len(hard_negative_captions(metas, random.Random(0), NEGATIVE_ATTRIBUTES)) == 80
    flipped = [{**m, "flipped": True} for m in metas]  # a mirrored image's negative is mirrored too
    for meta, neg in zip(flipped, hard_negative_captions(flipped, random.Random(0), ["position"])):
        parsed = parse_caption(swap_left_right(neg))
        assert sum(o != n for o, n in zip(meta["objects"], parsed["objects"])) == 1
    assert hard_negative_captions([{}], random.Random(0)) == []
    with pytest.raises(ValueError, match="background"):
        hard_negative_captions(metas, random.Random(0), ["background"])


def test_features_join_is_sdxls_encode_prompt_exactly(sdxl_text_encoders):
    """CLIP-L's and bigG's penultimate hidden states side by side (32 + 48 wide), unprojected, bigG's pooled
    embedding, every position a token; the unconditional embedding zeros: bit for bit what diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` returns (with ``force_zeros_for_empty_prompt``)."""
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from emu.text.conditioner import TextConditioner

    paths = sdxl_text_encoders
    encoders = {n: FrozenTextEncoder(str(p), "clip", 16, hidden_state="penultimate", mask_padding=False)
                for n, p in paths.items()}  # fmt: skip
    cond = TextConditioner(encoders, context_dim=80, dropout=0.0, uncond="zeros", pooled_from="clip_g",
                           join="features")  # fmt: skip
    assert len(cond.proj) == 0 and not any(p.requires_grad for p in cond.parameters())  # nothing to train
    prompts = [*CAPTIONS, ""]
    ours, uncond = cond.condition(prompts), cond.unconditional_batch(len(prompts))
    pipe = SimpleNamespace(text_encoder=CLIPTextModel.from_pretrained(paths["clip_l"]).eval(),
                           text_encoder_2=CLIPTextModelWithProjection.from_pretrained(paths["clip_g"]).eval(),
                           tokenizer=AutoTokenizer.from_pretrained(paths["clip_l"]),
                           tokenizer_2=AutoTokenizer.from_pretrained(paths["clip_g"]),
                           config=SimpleNamespace(force_zeros_for_empty_prompt=True))  # fmt: skip
    with torch.no_grad():
        context, u_context, pooled, u_pooled = diffusers.StableDiffusionXLPipeline.encode_prompt(
            pipe, prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert ours.context.shape == (3, 16, 80) and ours.mask.all()
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert torch.equal(uncond.context, u_context) and torch.equal(uncond.pooled, u_pooled)
    last = FrozenTextEncoder(str(paths["clip_l"]), "clip", 16)(prompts)  # the default stays the final, masked states
    assert not torch.equal(last.tokens, context[..., :32]) and not last.mask.all()


def test_features_join_needs_the_unets_width_and_one_length(sdxl_text_encoders, tiny_clip):
    from emu.text.conditioner import TextConditioner

    encoders = {n: FrozenTextEncoder(str(p), "clip", 16) for n, p in sdxl_text_encoders.items()}
    with pytest.raises(ConfigError, match="total width 80"):
        TextConditioner(encoders, context_dim=64, pooled_from="clip_g", join="features")
    with pytest.raises(ConfigError, match="one max_length"):
        TextConditioner({**encoders, "clip_l": FrozenTextEncoder(str(sdxl_text_encoders["clip_l"]), "clip", 8)},
                        context_dim=80, pooled_from="clip_g", join="features")  # fmt: skip
    with pytest.raises(ConfigError, match="join"):
        TextConditioner(encoders, context_dim=80, pooled_from="clip_g", join="tokens")
    with pytest.raises(ConfigError, match="hidden_state"):
        FrozenTextEncoder(str(tiny_clip), "clip", 16, hidden_state="first")


def test_a_tokenizer_kept_apart_from_its_model_loads_by_its_own_path(tiny_clip, tmp_path):
    """A diffusers pipeline keeps an encoder and its tokenizer in separate folders (SDXL: text_encoder_2/ and
    tokenizer_2/): ``tokenizer=`` names the second, and the encoder tokenizes exactly as with both in one folder."""
    import shutil

    model_only, tokenizer_only = tmp_path / "text_encoder_2", tmp_path / "tokenizer_2"
    model_only.mkdir()
    tokenizer_only.mkdir()
    for p in tiny_clip.iterdir():
        is_model = p.name == "config.json" or p.suffix in (".safetensors", ".bin")
        shutil.copy(p, (model_only if is_model else tokenizer_only) / p.name)
    apart = FrozenTextEncoder(str(model_only), "clip", max_length=8, tokenizer=str(tokenizer_only))
    together = FrozenTextEncoder(str(tiny_clip), "clip", max_length=8)
    prompts = ["a large red circle in the center on a black background"]
    with torch.no_grad():
        a, b = apart(prompts), together(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
