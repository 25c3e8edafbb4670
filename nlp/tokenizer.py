"""Tokenizers: a real checkpoint's own (transformers.AutoTokenizer, local path or hub id),
or ones made here for tiny models trained from scratch (demo, tests).

The byte tokenizer (``name="byte"``) maps every UTF-8 byte to one id after four special
tokens, so any text round-trips exactly and the vocabulary (260) needs no training data.
``train_bpe`` learns a byte-level BPE (Sennrich et al., 2016) on a corpus with the
``tokenizers`` library and saves it as a folder ``load_tokenizer`` reads: the repeated
instruction template and code idioms become single tokens, so sequences are several times
shorter than in bytes (the demo trains and decodes that much faster).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from core.errors import ConfigError

BYTE = "byte"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_VOCAB_SIZE = len(SPECIALS) + 256


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over UTF-8 bytes: pad 0, bos 1, eos 2, unk 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet)  # any fixed bijection bytes -> ids will do
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def train_bpe(texts: Iterable[str], vocab_size: int, folder: str | Path) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids (the four specials first, then the 256
    byte symbols, then merges) on ``texts`` and save it to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} cannot hold the {BYTE_VOCAB_SIZE} special and byte "
            "symbols; give at least that."
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    folder = Path(folder)
    _wrap(tok).save_pretrained(str(folder))
    return folder


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """``"byte"`` for the built-in byte tokenizer, else a local path or hub id for
    ``AutoTokenizer``. A tokenizer without a pad token pads with its eos token."""
    if name == BYTE:
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load a tokenizer from {name!r}: {err}. Give a local folder holding "
                "tokenizer files, a hub id (needs network), or 'byte' for the built-in one."
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
