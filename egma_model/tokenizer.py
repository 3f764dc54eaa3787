"""Tokenizers: a real one from a local path, or a small word-level WordPiece vocabulary built locally.

``load_tokenizer(path)`` loads any tokenizer saved with ``save_pretrained`` or a hub id (e.g.
``emilyalsentzer/Bio_ClinicalBERT``, downloaded or read from the hub cache); ``build_word_tokenizer(texts)`` writes a BERT-style
``vocab.txt`` (special tokens, the corpus's words by frequency, single characters and ``##`` suffix
characters as a fallback, so any word still tokenises) and returns a fast WordPiece tokenizer over it (BERT normalisation and [CLS]/[SEP] template).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from typing import Iterable, Optional

__all__ = ["build_word_tokenizer", "load_tokenizer"]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def build_word_tokenizer(texts: Iterable[str], *, max_words: int = 8000, min_count: int = 1,
                         save_dir: Optional[str] = None):
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is the corpus's words (plus characters)."""
    from transformers import PreTrainedTokenizerFast

    counts: Counter = Counter()
    for t in texts:
        counts.update(_WORD.findall(str(t).lower()))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,;:-()/%'")
    vocab = list(SPECIAL)
    seen = set(vocab)
    for c in chars + ["##" + c for c in chars[:36]]:
        if c not in seen:
            vocab.append(c)
            seen.add(c)
    for w, n in counts.most_common():
        if len(vocab) >= max_words + len(SPECIAL):
            break
        if n >= min_count and w not in seen:
            vocab.append(w)
            seen.add(w)
    d = save_dir or tempfile.mkdtemp(prefix="egma_tok_")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    from tokenizers import BertWordPieceTokenizer

    core = BertWordPieceTokenizer(path, lowercase=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=core._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if save_dir:
        tok.save_pretrained(save_dir)
    return tok


def load_tokenizer(path: str):
    """A tokenizer from a local directory, or by hub id (``emilyalsentzer/Bio_ClinicalBERT``; the hub cache
    only when ``HF_HUB_OFFLINE=1``)."""
    from transformers import AutoTokenizer

    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    from .hub import load_tokenizer_any

    return load_tokenizer_any(path)
