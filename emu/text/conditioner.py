"""The text conditioner: frozen encoders (CLIP, T5, ...) -> one context sequence for cross-attention + a pooled vector.

Each encoder's per-token hidden states are projected (trainable) to the U-Net's context width and concatenated
along the sequence with their masks; the pooled CLIP text embedding conditions globally. Classifier-free
guidance dropout replaces, per sample, **all** encoders' outputs together by the unconditional embedding (the empty
prompt's, or zeros), so that ``dropout`` is the rate at which the input that guidance samples with (every encoder
empty) is trained. ``encoder_dropout`` adds independent per-encoder drops on top (SD3's recipe, which lets a large
encoder such as T5 be left out at inference). The frozen part (:meth:`TextConditioner.encode`) can be
precomputed for a dataset and cached (:func:`precompute_embeddings`, :class:`EmbeddingCache`).

``join="features"`` is SDXL's way instead: the encoders' hidden states (all of one length) are concatenated along the
feature axis with no projection (SDXL: CLIP ViT-L's and OpenCLIP bigG's penultimate states, 768 + 1280 = 2048 wide,
the pooled embedding bigG's; encoders with ``hidden_state="penultimate"`` and ``mask_padding=False``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from emu.errors import ConfigError
from emu.text.encoders import FrozenTextEncoder, TextEmbedding


@dataclass
class Conditioning:
    context: torch.Tensor  # B x L x C, the concatenated projected tokens
    mask: torch.Tensor  # B x L, True where a token is real
    pooled: torch.Tensor | None  # B x P


class TextConditioner(nn.Module):
    """Frozen text encoders with trainable projections to ``context_dim``.

    Args:
        encoders: name -> :class:`~emu.text.encoders.FrozenTextEncoder` (e.g. ``clip``, ``t5``), in sequence order.
        context_dim: width of the U-Net's cross-attention context.
        dropout: CFG dropout probability: one draw per sample replaces every encoder's output by its unconditional one.
        encoder_dropout: extra per-encoder drop probabilities (name -> p), drawn independently of each other and of
            ``dropout``; encoders not named get none.
        uncond: ``empty`` (the empty prompt's embedding) or ``zeros``.
        pooled_from: the encoder whose pooled embedding is returned (None: no pooled vector).
        join: ``sequence`` (each encoder projected to ``context_dim``, concatenated along the tokens) or ``features``
            (SDXL: concatenated along the features, unprojected; ``context_dim`` is the sum of the encoders' widths, a
            position is a token where any encoder's mask says so).
    """

    def __init__(
        self,
        encoders: dict[str, FrozenTextEncoder],
        context_dim: int,
        dropout: float = 0.1,
        encoder_dropout: dict[str, float] | None = None,
        uncond: str = "empty",
        pooled_from: str | None = "clip",
        join: str = "sequence",
    ):
        super().__init__()
        if not encoders:
            raise ConfigError("model.text.encoders", "needs at least one text encoder")
        if uncond not in ("empty", "zeros"):
            raise ConfigError("model.text.uncond", f"must be 'empty' or 'zeros', got {uncond!r}")
        if pooled_from is not None and (pooled_from not in encoders or encoders[pooled_from].pooled_size is None):
            raise ConfigError("model.text.pooled_from", f"{pooled_from!r} is not an encoder with a pooled output")
        if join not in ("sequence", "features"):
            raise ConfigError("model.text.join", f"must be 'sequence' or 'features', got {join!r}")
        if join == "features":
            width, lengths = sum(e.hidden_size for e in encoders.values()), {e.max_length for e in encoders.values()}
            if width != context_dim or len(lengths) > 1:
                raise ConfigError("model.text.join", f"'features' joins the encoders' hidden states unprojected: they "
                                  f"need one max_length (got {sorted(lengths)}) and the U-Net's context_dim their total"
                                  f" width {width} (got {context_dim})")  # fmt: skip
        self.join = join
        self.encoders = nn.ModuleDict(encoders)
        widths = {} if join == "features" else {n: e.hidden_size for n, e in encoders.items()}
        self.proj = nn.ModuleDict({n: nn.Linear(w, context_dim) for n, w in widths.items()})
        if not isinstance(dropout, (int, float)):
            raise ConfigError(
                "model.text.dropout",
                f"must be one probability (all encoders are dropped together), got {dropout!r}; per-encoder drops on "
                "top of it go in model.text.encoder_dropout",
            )
        rates = dict(encoder_dropout or {})
        unknown = set(rates) - set(encoders)
        if unknown:
            raise ConfigError("model.text.encoder_dropout", f"names unknown encoders {sorted(unknown)}")
        for key, p in [("dropout", dropout), *((f"encoder_dropout.{n}", p) for n, p in rates.items())]:
            if not 0.0 <= float(p) <= 1.0:
                raise ConfigError(f"model.text.{key}", f"is a probability in [0, 1], got {p}")
        self.dropout = float(dropout)
        self.encoder_dropout = {n: float(rates.get(n, 0.0)) for n in encoders}
        self.uncond, self.pooled_from, self.context_dim = uncond, pooled_from, context_dim
        self._uncond_cache: dict[str, TextEmbedding] = {}

    @property
    def pooled_dim(self) -> int | None:
        return self.encoders[self.pooled_from].pooled_size if self.pooled_from else None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, TextEmbedding]:
        """The frozen part: each encoder's output for ``prompts`` (what a cache stores)."""
        return {name: enc(list(prompts)) for name, enc in self.encoders.items()}

    def unconditional(self, name: str) -> TextEmbedding:
        """The unconditional embedding of one encoder, batch size 1."""
        if name not in self._uncond_cache:
            emb = self.encoders[name]([""])
            if self.uncond == "zeros":
                emb = TextEmbedding(
                    torch.zeros_like(emb.tokens),
                    torch.ones_like(emb.mask),
                    None if emb.pooled is None else torch.zeros_like(emb.pooled),
                )
            self._uncond_cache[name] = emb
        return self._uncond_cache[name]

    def forward(
        self, embeddings: dict[str, TextEmbedding], drop: bool = False, generator: torch.Generator | None = None
    ) -> Conditioning:
        """Project and concatenate; with ``drop``, apply CFG dropout (:meth:`keep_masks`)."""
        contexts, masks, pooled = [], [], None
        batch = next(iter(embeddings.values())).tokens.shape[0]
        keeps = self.keep_masks(batch, generator) if drop else {}
        for name, emb in embeddings.items():
            tokens, mask, pool = emb.tokens, emb.mask, emb.pooled
            keep = keeps.get(name)
            if keep is not None:
                u = self.unconditional(name)
                keep = keep.to(tokens.device)
                tokens = torch.where(keep[:, None, None], tokens, u.tokens.to(tokens))
                mask = torch.where(keep[:, None], mask, u.mask.to(mask.device))
                if pool is not None:
                    pool = torch.where(keep[:, None], pool, u.pooled.to(pool))
            proj = self.proj[name] if self.join == "sequence" else None
            contexts.append(tokens if proj is None else proj(tokens.to(proj.weight.dtype)))
            masks.append(mask)
            if name == self.pooled_from:
                pooled = pool
        if self.join == "features":
            return Conditioning(torch.cat(contexts, -1), torch.stack(masks).any(0), pooled)
        return Conditioning(torch.cat(contexts, 1), torch.cat(masks, 1), pooled)

    def keep_masks(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per encoder, which of ``batch_size`` samples keep their text (bool, on the CPU); encoders that are never
        dropped are left out. One draw per sample decides ``dropout`` for all encoders at once, then one draw per
        sample and encoder for each ``encoder_dropout`` rate above 0 (in encoder order)."""

        def keep(p: float) -> torch.Tensor | None:
            return torch.rand(batch_size, generator=generator, device="cpu") >= p if p > 0 else None

        keep_all = keep(self.dropout)
        keeps = {}
        for name, p in self.encoder_dropout.items():
            own = keep(p)
            if keep_all is not None and own is not None:
                keeps[name] = keep_all & own
            elif keep_all is not None or own is not None:
                keeps[name] = keep_all if own is None else own
        return keeps

    def condition(self, prompts: list[str], drop: bool = False) -> Conditioning:
        return self(self.encode(prompts), drop=drop)

    def unconditional_batch(self, batch_size: int) -> Conditioning:
        """The conditioning of ``batch_size`` empty prompts (for classifier-free guidance at sampling)."""
        embs = {}
        for n in self.encoders:
            u = self.unconditional(n)
            pooled = None if u.pooled is None else u.pooled.expand(batch_size, -1)
            embs[n] = TextEmbedding(u.tokens.expand(batch_size, -1, -1), u.mask.expand(batch_size, -1), pooled)
        return self(embs)


# --------------------------------------------------------------------------------------------- caching
def precompute_embeddings(
    conditioner: TextConditioner, prompts: list[str], path: str | Path, batch_size: int = 256
) -> Path:
    """Encode ``prompts`` once with the frozen encoders and save them (safetensors + the prompt list)."""
    from safetensors.torch import save_file

    unique = list(dict.fromkeys(prompts))
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(unique), batch_size):
        for name, emb in conditioner.encode(unique[i : i + batch_size]).items():
            parts.setdefault(f"{name}.tokens", []).append(emb.tokens.cpu())
            parts.setdefault(f"{name}.mask", []).append(emb.mask.cpu())
            if emb.pooled is not None:
                parts.setdefault(f"{name}.pooled", []).append(emb.pooled.cpu())
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(path), metadata={"prompts": json.dumps(unique), "encoders": json.dumps(list(conditioner.encoders))}
    )
    return path


class EmbeddingCache:
    """Cached frozen-encoder outputs, looked up by prompt; a drop-in for :meth:`TextConditioner.encode`."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self.prompts = {p: i for i, p in enumerate(json.loads(meta["prompts"]))}
        self.names = json.loads(meta["encoders"])
        self.tensors = load_file(str(path))

    def __call__(self, prompts: list[str]) -> dict[str, TextEmbedding]:
        missing = [p for p in prompts if p not in self.prompts]
        if missing:
            raise KeyError(f"{len(missing)} prompts are not in the embedding cache, e.g. {missing[0]!r}")
        idx = torch.tensor([self.prompts[p] for p in prompts])
        out = {}
        for n in self.names:
            pooled = self.tensors.get(f"{n}.pooled")
            out[n] = TextEmbedding(
                self.tensors[f"{n}.tokens"][idx],
                self.tensors[f"{n}.mask"][idx],
                None if pooled is None else pooled[idx],
            )
        return out
