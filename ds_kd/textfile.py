"""Reading users' text files: one place that drops a UTF-8 byte-order mark (BOM).

Editors on Windows (Notepad, Excel's "UTF-8 CSV") start files with U+FEFF. Read as plain UTF-8 it stays glued
to the first sentence, token or header field (a corpus learns ``▁\\ufeffThe`` as a word, a TSV header's first
column is not found, ``json.loads`` refuses the file). Every reader of a file a user brings (corpus text,
task files, held-out texts, JSON configs, model ``config.json``) goes through these functions, so a BOM at the
start of a file is dropped everywhere, compressed or not. Python's ``utf-8-sig`` codec does it for text
opened whole; :func:`iter_byte_lines` does it for files read line by line as bytes (decoded per line so a bad
byte names its line).
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import IO, Any, Iterator

ENCODING = "utf-8-sig"
"""Decodes UTF-8 and drops one BOM at the start (a file without one reads the same as with ``utf-8``)."""
BOM = "\ufeff"
BOM_BYTES = codecs.BOM_UTF8


def read_text(path: Path | str, errors: str = "strict") -> str:
    """The whole text of a user's file, without a leading BOM. Raises ``FileNotFoundError``,
    ``UnicodeDecodeError`` (with ``errors="strict"``)."""
    return Path(path).read_text(encoding=ENCODING, errors=errors)


def open_text(path: Path | str) -> IO[str]:
    """A user's text file opened for reading, without a leading BOM."""
    return open(path, encoding=ENCODING)


def read_json(path: Path | str) -> Any:
    """A user's JSON file (a BOM at its start, which ``json.loads`` refuses, is dropped).
    Raises ``json.JSONDecodeError`` for invalid JSON."""
    return json.loads(read_text(path))


def iter_byte_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary stream (plain or decompressing), the first without a leading UTF-8 BOM."""
    first = True
    for raw in stream:
        if first:
            raw = raw.removeprefix(BOM_BYTES)
            first = False
        yield raw
