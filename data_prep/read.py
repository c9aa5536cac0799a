"""Step 1 of the corpus: read ``<raw>/<lang>/`` into one normalised sentence per line.

Input files, found recursively and read in sorted order:

- plain text, one sentence or paragraph per line: ``.txt`` and the compressed ``.gz``, ``.bz2``, ``.xz``
  (any name, e.g. ``wiki.txt.gz``);
- WikiExtractor output: ``--json`` lines ``{"text": ...}`` (files ``wiki_00`` without extension, or
  ``.json``/``.jsonl``, optionally compressed); its plain ``<doc ...>`` wrapper lines are skipped too.

Every line is decoded strictly as UTF-8 (undecodable lines are skipped and counted), split into sentences,
normalised (NFKC; ``spoken``: lower-case and without punctuation) and kept if 1..max_chars characters long.
A byte-order mark at the start of a file is dropped (:mod:`ds_kd.textfile`), and so is U+FEFF anywhere in a
line (files joined with ``cat`` carry one at each join; it is an invisible format character, never text),
so it never reaches the vocabulary.
Output: ``<out>/read/<lang>.txt`` and a manifest with per-language counts of kept and dropped lines by reason.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from ds_kd.errors import UsageError
from ds_kd.textfile import BOM, iter_byte_lines

TEXT_SUFFIXES = {".txt", ".json", ".jsonl", ""}
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# Drop reasons, in the order of the summary table.
DROP_REASONS = ("undecodable", "bad_json", "empty", "too_long")

# A sentence ends at . ! ? followed by space, or right after the full-width/CJK and Devanagari enders
# (。！？ and the danda । ॥), which are not followed by a space in Japanese or often in Hindi.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？।॥])\s*")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class ReadConfig:
    """How raw lines become sentences."""

    max_chars: int = 256
    """Sentences longer than this (in characters, after normalisation) are dropped."""
    spoken: bool = False
    """Spoken form as the paper's tokenizer: lower-case and strip Unicode punctuation (after NFKC)."""


def open_binary(path: Path) -> BinaryIO:
    opener = OPENERS.get(path.suffix)
    return opener(path, "rb") if opener else open(path, "rb")


def is_input_file(path: Path) -> bool:
    """True for the files the reader takes: text/JSON lines, plain or compressed; hidden files are skipped."""
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = path.suffix
    if suffix in OPENERS:
        suffix = Path(path.stem).suffix
    return suffix in TEXT_SUFFIXES


def list_input_files(lang_dir: Path) -> list[Path]:
    return sorted(p for p in lang_dir.rglob("*") if is_input_file(p))


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(paragraph)) if s]


def normalize(text: str, spoken: bool = False) -> str:
    """NFKC, whitespace collapsed; ``spoken`` also lower-cases and removes every Unicode punctuation mark."""
    text = unicodedata.normalize("NFKC", text)
    if spoken:
        text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _SPACES.sub(" ", text).strip()


def extract_paragraphs(line: str) -> tuple[list[str], str | None]:
    """The paragraphs of one raw line and a drop reason (or None). JSON lines are WikiExtractor records."""
    stripped = line.strip()
    if stripped.startswith("<doc ") or stripped == "</doc>":
        return [], None  # WikiExtractor's plain-text document wrappers, not text
    if stripped.startswith('{"'):  # a JSON record (WikiExtractor --json); plain prose does not start so
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError:
            return [], "bad_json"
        if not isinstance(record, dict) or "text" not in record:
            return [], "bad_json"
        return [p for p in str(record["text"]).split("\n")], None
    return [line], None


def read_file(path: Path, config: ReadConfig, drops: Counter) -> Iterator[str]:
    """Yield the kept sentences of one file, streaming, adding drop reasons to ``drops``."""
    with open_binary(path) as f:
        for raw in iter_byte_lines(f):
            try:
                line = raw.decode("utf-8").replace(BOM, "")  # a BOM at a join of files: see the module doc
            except UnicodeDecodeError:
                drops["undecodable"] += 1
                continue
            paragraphs, reason = extract_paragraphs(line)
            if reason:
                drops[reason] += 1
                continue
            for paragraph in paragraphs:
                if not paragraph.strip():
                    drops["empty"] += 1
                    continue
                for sentence in split_sentences(paragraph):
                    sentence = normalize(sentence, config.spoken)
                    if not sentence:
                        drops["empty"] += 1
                    elif len(sentence) > config.max_chars:
                        drops["too_long"] += 1
                    else:
                        yield sentence


def check_lang_dir(lang_dir: Path) -> list[Path]:
    """The input files of a language directory; a missing or file-less directory is an error naming it (and,
    when it is missing, the ``--raw`` folder or the language folders found there, for ``--langs``)."""
    if not lang_dir.is_dir():
        raw = lang_dir.parent
        if not raw.is_dir():
            raise FileNotFoundError(f"--raw {raw}: no such directory (expected <raw>/<lang>/ per language)")
        found = sorted(d.name for d in raw.iterdir() if d.is_dir())
        raise FileNotFoundError(f"{lang_dir}: language directory does not exist (expected <raw>/<lang>/ holding "
                                f".txt/.gz/.bz2/.xz or WikiExtractor files); language folders in {raw}: "
                                f"{', '.join(found) or 'none'}: name those with --langs")
    files = list_input_files(lang_dir)
    if not files:
        raise UsageError(f"{lang_dir}: language directory holds no input files (.txt, .gz, .bz2, .xz, "
                         f".json/.jsonl or WikiExtractor wiki_NN)")
    return files


def read_language(lang_dir: Path, out_path: Path, config: ReadConfig) -> dict:
    """Write the sentences of one language to ``out_path`` (atomically) and return its counts."""
    files = check_lang_dir(lang_dir)
    drops: Counter = Counter()
    num_sentences = num_chars = 0
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for path in files:
            for sentence in read_file(path, config, drops):
                out.write(sentence + "\n")
                num_sentences += 1
                num_chars += len(sentence)
    if num_sentences == 0:
        tmp.unlink()
        raise UsageError(f"{lang_dir}: no sentence survived reading ({dict(drops)} dropped) in "
                         f"{', '.join(str(p) for p in files)}")
    os.replace(tmp, out_path)
    return {"num_sentences": num_sentences, "num_chars": num_chars, "num_bytes": out_path.stat().st_size,
            "dropped": {reason: drops.get(reason, 0) for reason in DROP_REASONS},
            "files": [str(p) for p in files]}


def read_language_job(job: tuple[str, str, str, ReadConfig]) -> tuple[str, dict]:
    lang, lang_dir, out_path, config = job
    return lang, read_language(Path(lang_dir), Path(out_path), config)
