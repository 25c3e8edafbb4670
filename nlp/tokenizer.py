"""Tokenizers: a real checkpoint's own (transformers.AutoTokenizer, local path or hub id),
or a byte-level tokenizer built in code for tiny models trained from scratch (demo, tests).

The byte tokenizer (``name="byte"``) maps every UTF-8 byte to one id after four special
tokens, so any text round-trips exactly and the vocabulary (260) needs no training data.
"""

from __future__ import annotations

from functools import lru_cache

from core.errors import ConfigError

BYTE = "byte"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_VOCAB_SIZE = len(SPECIALS) + 256


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over UTF-8 bytes: pad 0, bos 1, eos 2, unk 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet)  # any fixed bijection bytes -> ids will do
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    return fast


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
