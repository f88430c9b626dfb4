"""The masked generative transformer (issue 42): FSQ tokens, MaskGIT's cosine schedule and its parallel decoding with
classifier-free guidance, each against hand-computed values; the tokenizer's round trip; the LightningModule's
overfitting, sampling, checkpoints and exact resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from emu.autoencoder.fsq import FSQ
from emu.autoencoder.module import load_autoencoder
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from emu.maskgit.decoding import decode
from emu.maskgit.module import MaskGITModule, load_text_to_image, masked_cross_entropy
from emu.maskgit.schedule import cosine_schedule, masked_after, training_mask
from emu.maskgit.tokenizer import LatentTokenizer
from emu.utils.checkpoint_header import header
from tests.conftest import TINY_MASKGIT, haystack_batch, save_tiny_autoencoder
from tests.test_stage1 import text_config


def test_fsq_rounds_each_channel_to_its_levels_and_every_token_round_trips():
    fsq = FSQ([8, 5, 3])
    assert fsq.codebook_size == 120 and fsq.dim == 3
    z = torch.randn(64, 3, 4, 4) * 3
    q = fsq(z)
    for c, (level, values) in enumerate(zip([8, 5, 3], [torch.arange(-4, 4) / 4, torch.arange(-2, 3) / 2,
                                                          torch.arange(-1, 2) / 1])):  # fmt: skip
        seen = torch.unique(q[:, c])
        assert len(seen) == level and torch.allclose(seen, values.float())  # every level reached, nothing else
    every = torch.arange(120).view(1, 120)
    codes = fsq.indices_to_codes(every)
    assert codes.shape == (1, 3, 120) and torch.equal(fsq.codes_to_indices(codes), every)
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(q)), q)  # tokens hold exactly the quantized values
    assert fsq.codes_to_indices(codes)[0, 7] == 7 and torch.allclose(codes[0, :, 7], torch.tensor([3 / 4, -1.0, -1.0]))
    z.requires_grad_(True)
    fsq(z).sum().backward()  # straight through the rounding: the bound's derivative, nonzero
    assert (z.grad.abs() > 0).float().mean() > 0.5
    assert torch.allclose(fsq.bound(torch.zeros(1, 3)), torch.tensor([[0.0, 0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match=r"\[0, 120\)"):
        fsq.indices_to_codes(torch.tensor([[120]]))


def test_cosine_schedule_and_training_masks():
    assert float(cosine_schedule(0.0)) == 1.0 and abs(float(cosine_schedule(1.0))) < 1e-12
    assert float(cosine_schedule(0.5)) == pytest.approx(math.sqrt(0.5))
    # 64 tokens in 8 steps: floor(cos(pi/2 * t/8) * 64) left masked after each
    expected = [math.floor(math.cos(math.pi / 2 * (t + 1) / 8) * 64) for t in range(8)]
    assert [masked_after(t, 8, 64) for t in range(8)] == expected and expected[-1] == 0 and expected[0] == 62
    g = torch.Generator().manual_seed(0)
    mask = training_mask(4096, 16, g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    # E[ceil(cos(pi r / 2) 16)] over r ~ U(0, 1): the masked fraction averages 2/pi (plus the ceiling's ~1/32)
    assert float(counts.float().mean() / 16) == pytest.approx(2 / math.pi + 0.5 / 16, abs=0.02)
    assert torch.equal(mask, training_mask(4096, 16, torch.Generator().manual_seed(0)))  # seeded: reproducible


def test_decoding_fills_every_token_in_the_stated_steps_following_the_schedule():
    K, N, B, steps = 10, 16, 3, 6
    calls, left = [], []

    def logits_fn(tokens, cond):
        calls.append(cond)
        assert (tokens >= 0).all() and (tokens <= K).all()
        return torch.randn(tokens.shape[0], tokens.shape[1], K, generator=torch.Generator().manual_seed(len(calls)))

    out = decode(logits_fn, B, N, mask_id=K, steps=steps, guidance=3.0, generator=torch.Generator().manual_seed(0),
                 callback=lambda step, t: left.append(int((t == K).sum(1).max())))  # fmt: skip
    assert out.shape == (B, N) and (out < K).all() and (out >= 0).all()  # every token filled, never the mask id
    assert calls == [True, False] * steps  # guided: the conditional and unconditional pass at each step
    assert left == [masked_after(t, steps, N) for t in range(steps)]  # the schedule, step by step
    left.clear()  # more steps than the schedule can give tokens: MaskGIT's clamp decides at least one a step
    decode(logits_fn, 1, 4, mask_id=K, steps=6, callback=lambda step, t: left.append(int((t == K).sum())))
    assert [masked_after(t, 6, 4) for t in range(6)] == [3, 3, 2, 2, 1, 0] and left == [3, 2, 1, 0, 0, 0]


def test_decoding_keeps_decided_tokens_and_guidance_one_is_the_conditional_model():
    K, N = 4, 8
    seen = []

    def logits_fn(tokens, cond):  # a model sure of token 2 with the prompt, of token 1 without
        seen.append(tokens.clone())
        logits = torch.full((tokens.shape[0], N, K), -5.0)
        logits[..., 2 if cond else 1] = 5.0
        return logits

    out = decode(logits_fn, 2, N, mask_id=K, steps=4, guidance=1.0, temperature=0.0)
    assert torch.equal(out, torch.full((2, N), 2)) and len(seen) == 4  # one pass a step without guidance
    for before, after in itertools.pairwise(seen):
        kept = before != K
        assert torch.equal(after[kept], before[kept])  # a token once decided is never masked again
    steered = decode(logits_fn, 2, N, mask_id=K, steps=4, guidance=0.0, temperature=0.0)
    assert torch.equal(steered, torch.full((2, N), 1))  # guidance 0: the unconditional model alone
    with pytest.raises(ValueError, match="at least one step"):
        decode(logits_fn, 1, N, mask_id=K, steps=0)


def test_token_transformer_overfits_masked_tokens_of_one_batch():
    """Logits at every position; trained on one batch with MaskGIT's training masks, the cross-entropy on the masked
    tokens falls, and decoding from its logits reproduces a learnt image's tokens from its caption alone."""
    from emu.maskgit.schedule import training_mask
    from emu.maskgit.transformer import MaskedTokenTransformer

    torch.manual_seed(0)
    K, (h, w) = 16, (4, 4)
    net = MaskedTokenTransformer(K, width=64, depth=2, heads=4, context_dim=8, pooled_dim=8)
    tokens = torch.randint(0, K, (4, h * w), generator=torch.Generator().manual_seed(1))
    context, pooled = torch.randn(4, 3, 8), torch.randn(4, 8)  # one "caption" per image
    assert net(tokens, (h, w), context, None, pooled).shape == (4, h * w, K)
    with pytest.raises(ValueError, match="do not fill a 3 x 4 grid"):
        net(tokens, (3, 4), context, None, pooled)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def loss_on(mask):
        logits = net(tokens.masked_fill(mask, net.mask_id), (h, w), context, None, pooled)
        return torch.nn.functional.cross_entropy(logits[mask], tokens[mask])

    fixed = training_mask(4, h * w, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = float(loss_on(fixed))
    for _ in range(300):
        loss = loss_on(training_mask(4, h * w, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = float(loss_on(fixed))
    assert after < 0.2 * before, (before, after)
    out = decode(lambda t, cond: net(t, (h, w), context, None, pooled), 4, h * w, net.mask_id, steps=6,
                 temperature=0.0)  # fmt: skip
    assert (out == tokens).float().mean() > 0.9


# ------------------------------------------------------------------------------------------ the trained model
def test_decoding_with_one_generator_per_image_gives_each_image_its_own_tokens_whatever_its_batch():
    K, N = 6, 9

    def logits_fn(tokens, cond):  # flat logits: every choice is the draws'
        return torch.zeros(tokens.shape[0], N, K)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = decode(logits_fn, 2, N, mask_id=K, steps=3, generator=gens([7, 8]))
    alone = decode(logits_fn, 1, N, mask_id=K, steps=3, generator=gens([8]))
    assert torch.equal(both[1:], alone) and not torch.equal(both[0], both[1])


def test_masked_cross_entropy_counts_the_masked_tokens_only():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    tokens, mask = torch.tensor([[0, 1, 1]]), torch.tensor([[True, True, False]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2  # the third position is not masked: not counted
    assert float(masked_cross_entropy(logits, tokens, mask)) == pytest.approx(expected, rel=1e-6)
    smoothed = masked_cross_entropy(logits, tokens, mask, label_smoothing=0.1)  # 0.95 / 0.05 targets
    p0 = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    by_hand = (-(0.95 * p0[0] + 0.05 * p0[1]) + math.log(2.0)) / 2
    assert float(smoothed) == pytest.approx(float(by_hand), rel=1e-6)


def _latents(tiny_autoencoder, n=64, resolution=32):
    ae = load_autoencoder(str(tiny_autoencoder))
    with torch.no_grad():
        return ae.normalize(ae.encode(haystack_batch(n, resolution)["image"]).mode(), "channel")


def test_tokenizer_round_trips_latents_within_the_stated_error(tiny_autoencoder):
    """Trained on the tiny autoencoder's latents of 64 haystack images, the tokenizer's reconstruction error is below
    half their variance (untrained: about their variance); the tokens hold everything its decoder sees (tokens ->
    latents is the forward pass exactly) and a token per latent position."""
    torch.manual_seed(0)
    z = _latents(tiny_autoencoder)
    tok = LatentTokenizer(16, levels=[8, 5, 5, 5], hidden=64)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)

    def relative_mse():
        with torch.no_grad():
            return float(((tok(z)[0] - z) ** 2).mean() / z.var())

    before = relative_mse()
    for _ in range(300):
        loss = ((tok(z)[0] - z) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = relative_mse()
    assert after < 0.5 and after < 0.5 * before, (before, after)
    tokens = tok.tokenize(z)
    assert tokens.shape == (64, 4, 4) and tokens.dtype == torch.int64 and int(tokens.max()) < 1000
    with torch.no_grad():
        assert torch.allclose(tok.detokenize(tokens), tok(z)[0], atol=1e-5)


def _module(tiny_autoencoder, tiny_clip, tiny_t5, tokenizer, cfg_dropout=0.0, **kw):
    torch.manual_seed(0)
    defaults = dict(lr=2e-3, warmup_steps=0, weight_decay=0.0, ema_half_life_images=64, ema_ramp=None,
                    label_smoothing=0.0, val_prompts=["a large red circle in the center"])  # fmt: skip
    text = text_config(tiny_clip, tiny_t5, cfg_dropout)
    return MaskGITModule(TINY_MASKGIT, text, str(tiny_autoencoder), str(tokenizer), **{**defaults, **kw})


def test_maskgit_module_overfits_one_batch_and_samples_from_its_seeds(tiny_autoencoder, tiny_clip, tiny_t5,
                                                                      tiny_tokenizer):  # fmt: skip
    m = _module(tiny_autoencoder, tiny_clip, tiny_t5, tiny_tokenizer)
    batch = haystack_batch(4, 32)
    tokens = m.tokens(batch)
    assert tokens.shape == (4, 4, 4)  # one token per latent position of the f=8 autoencoder

    def fixed_loss():
        with torch.no_grad():
            return float(m.masked_token_loss(batch, torch.Generator().manual_seed(0), drop=False))

    opt = m.configure_optimizers()["optimizer"]
    before = fixed_loss()
    for _ in range(150):
        loss = m.masked_token_loss(batch, drop=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.3 * before, (before, after)
    m.eval()
    settings = SamplingSettings(sampler="maskgit", steps=4, guidance=2.0, resolution=32)
    images = m.sample(["a", "b", "c"], [1, 2, 3], settings)
    assert images.shape == (3, 3, 32, 32) and images.abs().max() <= 1
    # an image depends on its prompt and seed alone (its tokens; the decoders' batched arithmetic differs by ~1e-6)
    assert torch.allclose(m.sample(["b"], [2], settings), images[1:2], atol=1e-4)
    with pytest.raises(ConfigError, match=r"sampling\.sampler: is 'euler', a diffusion sampler"):
        m.sample(["a"], [0], SamplingSettings(sampler="euler"))


def test_maskgit_checkpoints_resume_exactly_load_for_sampling_and_refuse_a_mismatched_tokenizer(
        tmp_path, tiny_autoencoder, tiny_clip, tiny_t5, tiny_tokenizer, tiny_stage1_checkpoint):  # fmt: skip
    """Four steps in one run equal two, a checkpoint and two more: the weights, the EMA and the training step's draws
    (masks, CFG dropout: ExactResume) continue exactly; the checkpoint references the frozen networks by path."""
    import shutil

    from tests.test_lora import _Data, _trainer

    tokenizer = shutil.copy(tiny_tokenizer, tmp_path / "tokenizer.ckpt")  # rewritten below

    def fit(root, steps, ckpt=None):
        module = _module(tiny_autoencoder, tiny_clip, tiny_t5, tokenizer, val_prompts=None,
                         cfg_dropout=0.5)  # fmt: skip
        _trainer(root, steps).fit(module, datamodule=_Data(), ckpt_path=ckpt)
        return root / "ckpt" / "last.ckpt"

    path = fit(tmp_path / "straight", 4)
    fit(tmp_path / "split", 2)
    split_path = fit(tmp_path / "split", 4, tmp_path / "split" / "ckpt" / "last.ckpt")
    straight, split = (torch.load(p, weights_only=False) for p in (path, split_path))
    assert straight["global_step"] == split["global_step"] == 4
    assert header(straight)["kind"] == "maskgit" and header(straight)["resolution"] == 32
    frozen = ("tokenizer.", "autoencoder.", "conditioner.encoders.")  # referenced by path, not copied
    assert not any(k.startswith(frozen) for k in straight["state_dict"])
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, split["state_dict"][k]), k  # the weights and the EMA, as if never stopped

    m = load_text_to_image(path)
    assert isinstance(m, MaskGITModule) and m.sampled_weights == "ema" and m.trained_steps == 4
    assert torch.equal(m.transformer.state_dict()["proj_out.weight"],
                       straight["state_dict"]["ema.shadow.transformer.proj_out.weight"])  # fmt: skip
    assert m.sample(["a"], [0], SamplingSettings(sampler="maskgit", steps=2)).shape[-1] == 32  # its own resolution
    other = tmp_path / "other_ae"
    save_tiny_autoencoder(other, seed=1)
    with pytest.raises(ConfigError, match=r"model\.tokenizer: .* whose weights differ from model\.autoencoder"):
        _module(other, tiny_clip, tiny_t5, tiny_tokenizer)
    with pytest.raises(ConfigError, match="is a maskgit checkpoint, not a tokenizer checkpoint"):
        _module(tiny_autoencoder, tiny_clip, tiny_t5, path)
    with pytest.raises(ConfigError, match=r"a/b: .* is a diffusion checkpoint, not a masked transformer"):
        from emu.maskgit.module import load_maskgit

        load_maskgit(tiny_stage1_checkpoint, key="a/b")
    retrained = torch.load(tokenizer, weights_only=False)  # the tokenizer's run trained on: other tokens, same shapes
    retrained["state_dict"] = {k: v + 0.1 if v.is_floating_point() else v for k, v in retrained["state_dict"].items()}
    torch.save(retrained, tokenizer)
    with pytest.raises(ConfigError, match=r"model\.tokenizer: the checkpoint was trained on the tokens of another"):
        load_text_to_image(path)
    with pytest.raises(ConfigError, match=r"model\.tokenizer: .* \(model\.init_from\) was trained on the tokens"):
        _module(tiny_autoencoder, tiny_clip, tiny_t5, tokenizer, init_from=str(path))


def test_the_image_loss_adds_the_decoded_images_error_and_eval_measures_a_tokenizer_as_an_autoencoder(
        tiny_autoencoder, tiny_tokenizer):  # fmt: skip
    """``image_weight`` adds exactly that weight times the MSE of the decoded reconstruction against the decoded
    latents; eval.py takes a tokenizer checkpoint as an autoencoder item: its images' round trip through both."""
    from emu.evaluation.items import item_kind, load_reconstructor
    from emu.evaluation.reconstruction import reconstruction_metrics
    from emu.maskgit.tokenizer import TokenizerModule, TokenRoundTrip

    torch.manual_seed(0)
    tokenizer = {"levels": [8, 5, 5, 5], "hidden": 16, "depth": 1}
    plain, weighted = (TokenizerModule(tokenizer, str(tiny_autoencoder), image_weight=w) for w in (0.0, 5.0))
    weighted.tokenizer.load_state_dict(plain.tokenizer.state_dict())
    assert plain.offloads_frozen and not weighted.offloads_frozen  # the image loss needs the decoder at every step
    z = _latents(tiny_autoencoder, n=8)
    with torch.no_grad():
        base, recon = plain.reconstruction_loss(z)
        images = torch.nn.functional.mse_loss(plain.decoded(recon), plain.decoded(z))
        assert torch.allclose(weighted.reconstruction_loss(z)[0], base + 5.0 * images)
    with pytest.raises(ConfigError, match=r"model\.image_weight"):
        TokenizerModule(tokenizer, str(tiny_autoencoder), image_weight=-1.0)
    from types import SimpleNamespace

    from emu.training.distributed import FSDPStrategy

    plain._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ConfigError, match=r"trainer: a tokenizer is small enough for every GPU"):
        plain.configure_model()

    assert item_kind(tiny_tokenizer) == "autoencoder"
    round_trip = load_reconstructor(tiny_tokenizer)
    assert isinstance(round_trip, TokenRoundTrip) and round_trip.latent_channels == 16
    x = haystack_batch(4, 32)["image"]
    with torch.no_grad():
        ae, tok = round_trip.autoencoder, round_trip.tokenizer
        by_hand = ae.decode(ae.denormalize(tok.detokenize(tok.tokenize(ae.normalize(ae.encode(x).mode()))), "channel"))
        assert torch.allclose(round_trip(x), by_hand)
    mse = float((((round_trip(x).clamp(-1, 1) + 1) / 2 - (x + 1) / 2) ** 2).mean())
    assert reconstruction_metrics(round_trip, x)["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)


def test_each_kind_of_model_refuses_the_others_sampler_and_selection_keeps_full_checkpoints_of_a_maskgit_model(
        tiny_autoencoder, tiny_clip, tiny_t5, tiny_tokenizer, tmp_path):  # fmt: skip
    from emu.diffusion.selection import CheckpointSelection
    from tests.test_architectures import DIT, module

    with pytest.raises(ConfigError, match=r"model\.val_sampling\.sampler: is 'maskgit', a masked token model's"):
        module(DIT, tiny_autoencoder, tiny_clip, tiny_t5, val_sampling={"sampler": "maskgit"})
    with pytest.raises(ConfigError, match=r"model\.val_sampling\.sampler: is 'euler', a diffusion sampler"):
        _module(tiny_autoencoder, tiny_clip, tiny_t5, tiny_tokenizer, val_sampling={"sampler": "euler"})
    m = _module(tiny_autoencoder, tiny_clip, tiny_t5, tiny_tokenizer)
    selection = CheckpointSelection(judge=object(), prompts=["a"], dirpath=tmp_path, keep="ema")
    with pytest.raises(ConfigError, match=r"callbacks\.selection\.keep: 'ema' keeps export folders"):
        selection.setup(None, m, "fit")
    CheckpointSelection(judge=object(), prompts=["a"], dirpath=tmp_path, keep="full").setup(None, m, "fit")
