"""Cell and file rules shared by the gaze readers (``reflacx``, ``egd_cxr``, ``mimic_eye``): a published or
gzipped file, a CSV that must exist and have its columns, a number cell (empty = NaN, text = an error naming
file, row and column). Every error is a ``GazeFormatError``.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from ..gaze import GazeFormatError
from ..textio import TextDecodeError, find_published, read_csv_rows, read_text


def gaze_file(folder: str, name: str) -> str:
    """``folder/name`` as published or gzipped (the plain path when neither exists, for the error message)."""
    return find_published(folder, name) or os.path.join(folder, name)


def read_gaze_csv(path: str) -> Tuple[List[str], List[dict]]:
    if not os.path.isfile(path):
        raise GazeFormatError(f"{path}: file not found")
    try:
        return read_csv_rows(path)
    except TextDecodeError as e:  # not UTF-8 (or a broken .gz): a malformed gaze file like any other
        raise GazeFormatError(str(e)) from None


def read_gaze_text(path: str) -> str:
    """A gaze reading's text file (a transcript) under the one text rule; not UTF-8 is a GazeFormatError."""
    try:
        return read_text(path)
    except TextDecodeError as e:
        raise GazeFormatError(str(e)) from None


def need_columns(path: str, header: List[str], cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in header]
    if missing:
        raise GazeFormatError(f"{path}: missing column(s) {missing}; found {header}")


def number_cell(path: str, row_no: int, row: dict, col: str) -> float:
    """A number cell; an empty cell is NaN (a missing value as pandas writes it), text is an error."""
    v = row.get(col)
    if v is not None and v.strip() == "":
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise GazeFormatError(f"{path}: row {row_no}: column {col!r} is not a number: {row.get(col)!r}") from None
