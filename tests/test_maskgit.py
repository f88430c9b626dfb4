"""The masked generative transformer's parts (issue 42): FSQ tokens, MaskGIT's cosine schedule and its parallel
decoding with classifier-free guidance, each against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from emu.autoencoder.fsq import FSQ
from emu.maskgit.decoding import decode
from emu.maskgit.schedule import cosine_schedule, masked_after, training_mask


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
