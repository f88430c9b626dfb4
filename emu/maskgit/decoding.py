"""MaskGIT's iterative parallel decoding with classifier-free guidance: a small pure function over a logits callable.

Every token starts masked. At each of ``steps`` steps the network predicts every masked token at once; a token is
drawn for each from its (guided, temperature-scaled) distribution, and the least confident draws are masked again so
that :func:`~emu.maskgit.schedule.masked_after` tokens stay masked (clamped as MaskGIT does: each step but the last
decides at least one token and leaves at least one); tokens kept once are never revisited. Confidence
is the drawn token's probability plus Gumbel noise scaled by ``choice_temperature`` annealed to zero over the steps
(MaskGIT's randomised choice). After the last step no token is masked.

Guidance mixes the conditional and unconditional logits as Muse does, ``u + g (c - u)``; ``g = 1`` is the
conditional model alone (one network call per step instead of two).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from emu.maskgit.schedule import masked_after

# logits(tokens, cond) -> B x N x K: tokens B x N (the mask id where masked), cond True: the prompts', False: uncond
LogitsFn = Callable[[torch.Tensor, bool], torch.Tensor]


def _gumbel(shape, generator: torch.Generator | list[torch.Generator] | None, device) -> torch.Tensor:
    if isinstance(generator, list | tuple):  # one generator per image: its draws depend on its own seed alone
        u = torch.stack([torch.rand(tuple(shape[1:]), generator=g) for g in generator]).clamp(1e-20, 1.0)
    else:
        u = torch.rand(shape, generator=generator).clamp(1e-20, 1.0)
    return (-torch.log(-torch.log(u))).to(device)


@torch.no_grad()
def decode(logits_fn: LogitsFn, batch: int, n_tokens: int, mask_id: int, steps: int = 12, guidance: float = 1.0,
           temperature: float = 1.0, choice_temperature: float = 4.5,
           generator: torch.Generator | list[torch.Generator] | None = None,
           device: torch.device | str = "cpu", callback: Callable[[int, torch.Tensor], None] | None = None,
           ) -> torch.Tensor:  # fmt: skip
    """``batch x n_tokens`` token ids decoded in ``steps`` network passes (twice that with ``guidance != 1``).

    ``temperature`` scales the logits before drawing (0: the most likely token); ``generator`` draws every random
    choice on the CPU, so a seed gives the same tokens on any device (a list: one generator per image, so that an
    image's tokens depend on its own seed, not on its batch); ``callback(step, tokens)`` sees the tokens after
    each step (the mask id where still masked).
    """
    if steps < 1 or n_tokens < 1:
        raise ValueError(f"decoding needs at least one step and one token, got steps={steps}, n_tokens={n_tokens}")
    tokens = torch.full((batch, n_tokens), mask_id, dtype=torch.long, device=device)
    for step in range(steps):
        masked = tokens == mask_id
        logits = logits_fn(tokens, True).float()
        if guidance != 1.0:
            uncond = logits_fn(tokens, False).float()
            logits = uncond + guidance * (logits - uncond)
        logits[..., mask_id:] = -torch.inf  # never draw the mask itself (nor any id past the codebook)
        if temperature > 0:
            gumbel = _gumbel(logits.shape, generator, logits.device)
            drawn = (logits / temperature + gumbel).argmax(-1)
        else:
            drawn = logits.argmax(-1)
        probs = logits.softmax(-1).gather(-1, drawn[..., None])[..., 0]
        drawn = torch.where(masked, drawn, tokens)
        keep_masked = masked_after(step, steps, n_tokens)
        if step < steps - 1:  # MaskGIT's clamp: decide at least one token a step, leave one for the next
            n_masked = int(masked.sum(1).min())
            keep_masked = max(1, min(keep_masked, n_masked - 1)) if n_masked > 1 else 0
        if keep_masked > 0:
            anneal = choice_temperature * (1.0 - (step + 1) / steps)
            confidence = probs.log() + anneal * _gumbel(probs.shape, generator, probs.device)
            confidence = torch.where(masked, confidence, torch.inf)  # decided tokens stay
            remask = confidence.argsort(-1)[:, :keep_masked]
            drawn = drawn.scatter(1, remask, mask_id)
        tokens = drawn
        if callback is not None:
            callback(step, tokens)
    return tokens
