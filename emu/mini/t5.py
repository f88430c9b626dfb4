"""The miniature's T5 encoder: a small, randomly initialised ``T5EncoderModel`` with a T5-style BPE tokenizer trained
on haystack captions, saved in Hugging Face format and loaded by path like ``google/t5-v1_1-xxl``.

    python -m emu.mini.t5 --out outputs/demo/t5

The tokenizer is word-level in practice: by default it learns every BPE merge the caption corpus offers, so each
haystack word is a single piece (``▁red``, ``▁background``) and a caption costs one token per word plus ``</s>``.
Its base alphabet is ``a-z0-9`` whatever the corpus holds, so other lower-case words still encode, letter by letter,
without ``<unk>``.

Nothing pre-trains the encoder here (no text corpus, no downloads): it stays random, as configs and notes say. A
random frozen encoder still gives the U-Net distinct, deterministic token features to attend to; the mini CLIP
carries the learned text understanding.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch

from emu.mini import haystack


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    specs = (haystack.scene_spec(seed, i) for i in range(n))
    return [haystack.caption_for(s["objects"], s["background"]) for s in specs]


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5
BASE_ALPHABET = string.ascii_lowercase + string.digits


def build_bpe_tokenizer(texts: list[str], vocab_size: int | None = None):
    """A T5-style BPE tokenizer (lower-casing, Metaspace ``▁`` word marks, ``</s>`` appended) trained on ``texts``.

    ``vocab_size`` counts everything: the three special tokens, the base alphabet (``a-z0-9``, the ``▁`` mark and any
    other character of ``texts``) and the learned merges. ``None`` learns every merge ``texts`` offer, so each of
    their words becomes one piece; an int gives exactly that many entries, or a ValueError when it is below the
    alphabet or above what ``texts`` can fill (the trainer runs out of merges once every word is one piece).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    words = {w for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))}
    alphabet = set(BASE_ALPHABET).union("▁", *words)
    smallest = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size is not None and vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} is below the {smallest} entries of the special tokens and alphabet")
    most = smallest + sum(len(w) - 1 for w in words)  # each merge joins two pieces of at least one distinct word
    # the trainer reserves room for vocab_size entries up front: never ask it for more than ``most``
    trainer = BpeTrainer(vocab_size=min(vocab_size or most, most), special_tokens=list(SPECIAL_TOKENS),
                         initial_alphabet=sorted(alphabet), show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is more than these texts can fill: every word is one piece at "
                         f"{tok.get_vocab_size()} entries, the most BPE can reach on them")  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=64)  # fmt: skip


def build_mini_t5(out: str | Path, d_model: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
                  vocab_size: int | None = None) -> Path:  # fmt: skip
    """Write a random-initialised small T5 encoder and its trained tokenizer (see :func:`build_bpe_tokenizer`)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_bpe_tokenizer(caption_corpus(), vocab_size)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model,
                      num_layers=layers, num_heads=heads, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    out = Path(out)
    T5EncoderModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.mini.t5", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = build_mini_t5(args.out, args.d_model, args.layers, seed=args.seed)
    print(f"wrote a random-initialised mini T5 encoder and its BPE tokenizer to {folder}")


if __name__ == "__main__":
    main()
