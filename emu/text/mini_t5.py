"""The miniature's T5 encoder: a small, randomly initialised ``T5EncoderModel`` with a Unigram tokenizer trained on
haystack captions, saved in Hugging Face format and loaded by path like ``google/t5-v1_1-xxl``.

    python -m emu.text.mini_t5 --out outputs/demo/t5

Nothing pre-trains it here (no text corpus, no downloads): it stays random, as configs and notes say. A random
frozen encoder still gives the U-Net distinct, deterministic token features to attend to; the mini CLIP carries
the learned text understanding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from emu.data import haystack


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    specs = (haystack.scene_spec(seed, i) for i in range(n))
    return [haystack.caption_for(s["objects"], s["background"]) for s in specs]


def build_unigram_tokenizer(texts: list[str], vocab_size: int = 96):
    """A T5-style tokenizer (SentencePiece-like Unigram, Metaspace, ``</s>`` appended) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=64)  # fmt: skip


def build_mini_t5(out: str | Path, d_model: int = 128, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Write a random-initialised small T5 encoder and its trained tokenizer to ``out``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_unigram_tokenizer(caption_corpus())
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model,
                      num_layers=layers, num_heads=heads, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    out = Path(out)
    T5EncoderModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.text.mini_t5", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = build_mini_t5(args.out, args.d_model, args.layers, seed=args.seed)
    print(f"wrote a random-initialised mini T5 encoder and its Unigram tokenizer to {folder}")


if __name__ == "__main__":
    main()
