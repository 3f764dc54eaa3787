"""One rule for reading the text files of the datasets, used by every reader and tool.

- **Encoding:** UTF-8, strictly. A leading byte-order mark is skipped (spreadsheet exports carry one). Bytes
  that are not UTF-8 raise :class:`TextDecodeError`, naming the file and the byte position, so that what
  ``egma-prepare`` accepts, training and evaluation accept too (no reader decodes "with replacement").
- **Compression:** a path ending in ``.gz`` is read through gzip. The datasets' owners distribute some CSVs
  gzipped (MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-metadata.csv.gz`` and ``-split.csv.gz``);
  :func:`find_published` finds a file under either name.
"""

import codecs
import csv
import gzip
import io
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["TextDecodeError", "read_text", "read_csv_rows", "find_published"]


class TextDecodeError(ValueError):
    """A text file that is not valid UTF-8; the message names the file and the first bad byte's offset."""


def _raw_bytes(path: str) -> bytes:
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:  # a truncated, corrupt or non-gzip file under a .gz name
            raise TextDecodeError(f"{path}: not a readable gzip file ({e})") from None
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The whole file as text under the rule above (``.gz`` decompressed, BOM skipped, strict UTF-8)."""
    data = _raw_bytes(path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextDecodeError(
            f"{path}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_csv_rows(path: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """The header and the rows (dicts) of a CSV file read under the rule above."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def find_published(folder: str, name: str, alternatives: Sequence[str] = ()) -> Optional[str]:
    """The path of ``name`` (or one of ``alternatives``) in ``folder``, as published or gzipped; None if absent.

    Plain names are preferred over ``.gz`` (a user who decompressed a file keeps using it).
    """
    for candidate in (name, *alternatives):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, candidate + suffix)
            if os.path.isfile(path):
                return path
    return None
