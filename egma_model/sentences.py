"""Report text to sentences: our rule and the authors' (re-implemented), by name (``SPLIT_RULES``).

Below the datasets and the ``Dataset`` (``egma_model.data`` re-exports every name); imports nothing from egma_model.
"""

from __future__ import annotations

import re
from typing import List


_ABBREV = re.compile(r"\b(?:dr|mr|mrs|ms|vs|e\.g|i\.e|approx|cf)\.$", re.IGNORECASE)


def split_sentences(text: str) -> List[str]:
    """Split a report into sentences at ``.``, ``?``, ``!``, ``;`` and line breaks.

    Decimal numbers (``2.5 cm``) and common abbreviations do not end a sentence; section headers such as
    ``FINDINGS:`` are dropped when alone; empty pieces are dropped; whitespace is collapsed.
    """
    text = str(text or "").replace("\r", "\n")
    pieces: List[str] = []
    buf = ""
    i = 0
    while i < len(text):
        c = text[i]
        buf += c
        end = False
        if c in "?!;\n":
            end = True
        elif c == ".":
            nxt = text[i + 1] if i + 1 < len(text) else " "
            prev = text[i - 1] if i > 0 else " "
            if prev.isdigit() and nxt.isdigit():
                end = False
            elif _ABBREV.search(buf) or (nxt.isalpha() and re.search(r"(?:^|\W)[A-Za-z]\.$", buf)):
                end = False  # "e.g.", "approx." ...
            else:
                end = True
        if end:
            pieces.append(buf)
            buf = ""
        i += 1
    pieces.append(buf)
    out = []
    for p in pieces:
        p = re.sub(r"\s+", " ", p).strip().strip(";").strip()
        if not p or re.fullmatch(r"[A-Z ]+:", p) or not re.search(r"[A-Za-z0-9]", p):
            continue
        p = re.sub(r"^[A-Z ]{3,}:\s*", "", p)  # "FINDINGS: The lungs..." -> "The lungs..."
        if p:
            out.append(p)
    return out


_NUMBERED = re.compile(r"[0-9]+\.+[^0-9]")  # "1. ", "2.The": a number, its dots and the next character


_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def split_sentences_egma(text: str, min_tokens: int = 1) -> List[str]:
    r"""The authors' sentence rule (EGMA/MedCLIP code), re-implemented.

    Line breaks become spaces; the text is cut at numbered markers (digits, one or more dots, and the
    character after them, which is dropped) and then at ``". "``; each piece is lowercased and split into
    word and punctuation runs (``\w+`` or ``[^\w\s]+``, NLTK's ``wordpunct_tokenize`` rule), non-ASCII
    characters are removed, and the tokens are re-joined with single spaces. Pieces with fewer than
    ``min_tokens`` tokens are dropped: 1 keeps every piece with a token (the authors' training dataset class),
    5 keeps pieces of more than 4 tokens only (MedCLIP's rule, in the authors' older dataset classes).
    """
    text = str(text or "").replace("\n", " ")
    out = []
    for part in _NUMBERED.split(text):
        for sent in part.split(". "):
            toks = [t.encode("ascii", "ignore").decode("ascii") for t in _WORDPUNCT.findall(sent.lower())]
            toks = [t for t in toks if t]
            if toks and len(toks) >= min_tokens:
                out.append(" ".join(toks))
    return out


def split_sentences_medclip(text: str) -> List[str]:
    """``split_sentences_egma`` keeping pieces of more than 4 tokens only (MedCLIP's rule)."""
    return split_sentences_egma(text, min_tokens=5)


# "ours": split_sentences (case kept); "egma": split_sentences_egma, every piece with a token (the authors'
# training dataset); "medclip": the same split, pieces of more than 4 tokens only
SPLIT_RULES = {"ours": split_sentences, "egma": split_sentences_egma, "medclip": split_sentences_medclip}


def _splitter(rule: str):
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown sentence split rule {rule!r}; use one of {list(SPLIT_RULES)}")
    return SPLIT_RULES[rule]
