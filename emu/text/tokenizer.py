"""Tokenizers for the miniature's domain encoders, built from captions with the ``tokenizers`` library.

The result is a ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes and ``AutoTokenizer`` loads, so the
mini encoders are loaded by exactly the code that loads public ones.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"


def build_word_tokenizer(texts: Iterable[str], add_bos: bool = True):
    """A lower-casing word-level tokenizer over the words of ``texts`` (a closed, template vocabulary).

    Token ids: pad 0, unk 1, bos 2, eos 3, then the words in sorted order. Every encoding ends with eos (and
    starts with bos when ``add_bos``), as CLIP's does.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().replace(",", " ").split()})
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    single = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
    special = [(EOS, vocab[EOS])] + ([(BOS, vocab[BOS])] if add_bos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=77
    )
