"""Frozen text encoders loaded through transformers by hub name or local folder: CLIP text and T5.

The paper-scale configs name ``openai/clip-vit-large-patch14`` and ``google/t5-v1_1-xxl``; the miniature's own
encoders are folders in the same formats, loaded by exactly this code. Nothing is downloaded: a name must be in
the local Hugging Face cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from emu.errors import ConfigError

log = logging.getLogger("emu.text")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextEmbedding:
    """Per-token hidden states (B x L x D), their attention mask (B x L, bool) and a pooled vector (B x P) or None."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None


class FrozenTextEncoder(nn.Module):
    """A frozen CLIP text tower (``kind="clip"``) or T5 encoder (``kind="t5"``) with its tokenizer.

    Args:
        name_or_path: hub name (from the local cache) or a folder written by ``save_pretrained``.
        kind: ``clip`` or ``t5``.
        max_length: tokens per prompt (77 for CLIP); longer prompts are truncated with one warning.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (bf16 on GPU).
        hidden_state: the per-token states returned: ``last`` (the final layer's, after CLIP's final layer norm) or
            ``penultimate`` (the next-to-last layer's output, no final norm: SDXL's, and "CLIP skip 2").
        mask_padding: the padding is masked in the encoder's attention and in the returned mask (True), or, as SDXL's
            pipeline, the encoder runs without an attention mask and every position counts as a token (False).
        tokenizer: where the tokenizer is, when not beside the model: a diffusers pipeline keeps them apart
            (SDXL: ``text_encoder_2/`` with ``tokenizer_2/``).
    """

    def __init__(self, name_or_path: str, kind: str = "clip", max_length: int = 77, dtype: str = "float32",
                 hidden_state: str = "last", mask_padding: bool = True, tokenizer: str | None = None):  # fmt: skip
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
        from transformers.utils import logging as hf_logging

        if kind not in ("clip", "t5"):
            raise ConfigError("model.text.kind", f"must be 'clip' or 't5', got {kind!r}")
        if dtype not in DTYPES:
            raise ConfigError("model.text.dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        if hidden_state not in ("last", "penultimate"):
            raise ConfigError("model.text.hidden_state", f"must be 'last' or 'penultimate', got {hidden_state!r}")
        self.name_or_path, self.kind, self.max_length = str(name_or_path), kind, max_length
        self.hidden_state, self.mask_padding = hidden_state, bool(mask_padding)
        path = Path(name_or_path).expanduser()
        looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~"))
        if looks_local and not (path / "config.json").is_file():
            raise ConfigError("text encoder path", f"'{name_or_path}' is not a model folder (no config.json)")
        model_cls = CLIPTextModelWithProjection if kind == "clip" else T5EncoderModel
        try:
            where = Path(tokenizer).expanduser() if tokenizer else name_or_path
            self.tokenizer = AutoTokenizer.from_pretrained(str(where))
            config = AutoConfig.from_pretrained(str(name_or_path))
            if kind == "clip" and config.model_type == "clip":  # the text tower out of a full CLIP checkpoint
                text_config = config.text_config
                text_config.projection_dim = config.projection_dim
                config = text_config
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the unused vision weights of a full CLIP are expected
            hf_logging.disable_progress_bar()
            try:
                self.model = model_cls.from_pretrained(str(name_or_path), config=config, dtype=DTYPES[dtype])
            finally:
                hf_logging.set_verbosity(verbosity)
                hf_logging.enable_progress_bar()
        except OSError as e:
            raise ConfigError(
                "text encoder path",
                f"could not load '{name_or_path}' ({kind}): not a local folder nor in the Hugging Face cache "
                f"(no downloads at run time): {str(e).splitlines()[0]}",
            ) from e
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                "text encoder path",
                f"the tokenizer of '{name_or_path}' has {len(self.tokenizer)} tokens but the model only {vocab}: "
                "they do not belong together",
            )
        self.model.requires_grad_(False).eval()
        self._warned_truncation = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if self.kind == "clip" else self.model.config.d_model

    @property
    def pooled_size(self) -> int | None:
        return self.model.config.projection_dim if self.kind == "clip" else None

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if not self._warned_truncation:
            lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
            if max(lengths, default=0) > self.max_length:
                log.warning("prompts longer than %d tokens are truncated (longest: %d)", self.max_length, max(lengths))
                self._warned_truncation = True
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(prompts).items()}
        mask = batch["attention_mask"].bool()
        penultimate = self.hidden_state == "penultimate"
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"] if self.mask_padding
                         else None, output_hidden_states=penultimate)  # fmt: skip
        tokens = out.hidden_states[-2] if penultimate else out.last_hidden_state
        if not self.mask_padding:
            mask = torch.ones_like(mask)
        return TextEmbedding(tokens, mask, out.text_embeds if self.kind == "clip" else None)
