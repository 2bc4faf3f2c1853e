"""Sentence tokenisation, done once: BERT WordPiece ids in a fixed (S, L) int32 array.

The tokenizer is ``transformers``' fast BERT tokenizer built from a *local* ``vocab.txt`` (or a
local tokenizer directory); nothing is fetched from a hub. Note: in transformers 5 the vocab is
passed as ``BertTokenizerFast(vocab=path)``; ``vocab_file=`` is silently ignored.

Each sentence becomes ``[CLS] w1 ... wk [SEP]`` truncated to ``max_len`` (20 in LXMERT: at most
18 word pieces, as the released code does) and padded with ``[PAD]`` (id 0 in BERT vocabs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from transformers import BertTokenizerFast

MAX_LEN = 20


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def never_masked(self) -> tuple[int, ...]:
        """Ids the MLM never selects: [CLS], [SEP], [PAD]."""
        return (self.cls, self.sep, self.pad)


def load_tokenizer(path: str, do_lower_case: bool = True):
    """Fast BERT tokenizer from a local ``vocab.txt`` or a local tokenizer directory."""
    if os.path.isdir(path):
        vocab = os.path.join(path, "vocab.txt")
        if os.path.exists(os.path.join(path, "tokenizer.json")) or \
                os.path.exists(os.path.join(path, "tokenizer_config.json")):
            return BertTokenizerFast.from_pretrained(path, local_files_only=True)
        path = vocab
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no vocab file at {path} (give a local vocab.txt or tokenizer "
                                f"directory; nothing is downloaded)")
    tok = BertTokenizerFast(vocab=path, do_lower_case=do_lower_case)
    vocab_lines = sum(1 for _ in open(path, encoding="utf-8"))
    if len(tok) < vocab_lines:  # e.g. an argument name that transformers ignored
        raise RuntimeError(f"tokenizer has {len(tok)} tokens but {path} has {vocab_lines} lines")
    return tok


def special_ids(tok) -> SpecialIds:
    ids = SpecialIds(pad=tok.pad_token_id, unk=tok.unk_token_id, cls=tok.cls_token_id,
                     sep=tok.sep_token_id, mask=tok.mask_token_id)
    if None in (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask):
        raise ValueError(f"tokenizer lacks a BERT special token: {ids}")
    return ids


def tokenize_sentences(tok, sentences: list[str], max_len: int = MAX_LEN,
                       batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (S, max_len) int32 padded with [PAD], lengths (S,) int16)`` incl. [CLS]/[SEP]."""
    s = len(sentences)
    ids_sl = np.full((s, max_len), tok.pad_token_id, np.int32)
    lens_s = np.zeros(s, np.int16)
    for b in range(0, s, batch):
        chunk = [x.strip() for x in sentences[b:b + batch]]
        enc = tok(chunk, max_length=max_len, truncation=True, padding="max_length",
                  return_attention_mask=True, return_token_type_ids=False)
        ids_sl[b:b + len(chunk)] = np.asarray(enc["input_ids"], np.int32)
        lens_s[b:b + len(chunk)] = np.asarray(enc["attention_mask"], np.int8).sum(1)
    return ids_sl, lens_s
