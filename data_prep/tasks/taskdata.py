"""What every task loader shares: line readers with file:line errors, the loaded-task container, the writer.

A loader turns one benchmark release into a :class:`TaskData` (records per split and language, plus the rows it
removed and the release quirks it normalised); :func:`write_task_data` writes it in the layout of
:mod:`ds_kd.data.tasks` and writes the manifest last.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from tqdm import tqdm

from ds_kd.errors import UsageError
from ds_kd.manifest import write_manifest
from ds_kd.data.tasks import get_task, own_task, split_path
from ds_kd.textfile import iter_byte_lines

SPLITS = ("train", "dev", "test")
REMOVED_FILE = "removed.jsonl"


class TaskDataError(UsageError):
    """A source file that does not follow its release format; the message starts with ``file:line``."""


def row_error(path: Path | str, line: int | None, message: str) -> TaskDataError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    return TaskDataError(f"{where}: {message}")


def iter_lines(stream: IO[bytes], name: str, total_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text without the line ending)``; decoding per line so a bad byte names its line.

    Lines are split on ``\\n`` only (a stray ``\\r`` inside a field stays in the field, as with
    ``csv.QUOTE_NONE``); a UTF-8 byte-order mark at the start of the stream is dropped
    (:func:`ds_kd.textfile.iter_byte_lines`).
    """
    bar = tqdm(total=total_bytes, desc=Path(name).name, unit="B", unit_scale=True, leave=False, disable=None)
    with bar:
        for lineno, raw in enumerate(iter_byte_lines(stream), 1):
            bar.update(len(raw))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise row_error(name, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            yield lineno, text.rstrip("\r\n")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        yield from iter_lines(f, str(path), path.stat().st_size)


def read_tsv_with_header(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated file with a header, as ``(line number, {column: value})``.

    No quoting: quote characters are text (the releases are not CSV-quoted). Blank lines carry no row and
    are passed over; a row whose field count differs from the header's is an error naming its line.
    """
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        raise row_error(path, None, f"empty file; expected a header with columns {', '.join(required)}")
    header = first[1].split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise row_error(path, 1, f"header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
    for lineno, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise row_error(path, lineno, f"expected {len(header)} tab-separated fields "
                                          f"({', '.join(header)}), found {len(fields)}")
        yield lineno, dict(zip(header, fields))


@dataclass
class Removal:
    """One source row left out of the normalised data, and why."""

    split: str
    lang: str
    file: str
    line: int
    reason: str
    id: str = ""


@dataclass
class TaskData:
    """A benchmark read from its release: records per (split, language), removed rows, normalised quirks."""

    task: str
    source: str
    source_format: str
    records: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    removed: list[Removal] = field(default_factory=list)
    normalised: dict[str, Counter] = field(default_factory=dict)  # "split.lang" -> {quirk: count}
    source_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str | None = None
    """A task of one's own: its kind (``ds_kd.data.tasks.own_task``); None for a benchmark of ``ds_kd.data.tasks.TASKS``."""

    def add(self, split: str, lang: str, record: dict) -> None:
        self.records.setdefault((split, lang), []).append(record)

    def remove(self, split: str, lang: str, file: Path | str, line: int, reason: str, row_id: str = "") -> None:
        self.removed.append(Removal(split, lang, str(file), line, reason, row_id))

    def normalise(self, split: str, lang: str, quirk: str) -> None:
        self.normalised.setdefault(f"{split}.{lang}", Counter())[quirk] += 1

    def langs(self, split: str) -> list[str]:
        return sorted(lang for s, lang in self.records if s == split)


def label_sets(kind: str, records: Iterable[dict]) -> dict[str, list[str]]:
    """The sorted label inventory of some records, keyed by record field (ontology tokens for parses)."""
    sets: dict[str, set[str]] = {}
    for r in records:
        if kind == "pair":
            sets.setdefault("label", set()).add(r["label"])
        elif kind == "tagging":
            sets.setdefault("tags", set()).update(r["tags"])
        elif kind == "intent_slot":
            sets.setdefault("intent", set()).add(r["intent"])
            sets.setdefault("slots", set()).update(r["slots"])
        elif kind == "parse":
            sets.setdefault("ontology", set()).update(
                t for t in r["logical_form"].split() if t.startswith(("[IN:", "[SL:")) or t == "]")
        else:
            raise ValueError(f"unknown task kind {kind!r}")
    return {key: sorted(values) for key, values in sorted(sets.items())}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _nested_counts(items: Iterable[tuple[str, str, str]]) -> dict:
    out: dict = {}
    for split, lang, reason in items:
        per_lang = out.setdefault(split, {}).setdefault(lang, {})
        per_lang[reason] = per_lang.get(reason, 0) + 1
    return out


def write_task_data(data: TaskData, out_root: Path | str, extra: dict | None = None) -> dict:
    """Write ``<out_root>/<task>/<split>.<lang>.jsonl``, ``removed.jsonl`` and, last, ``manifest.json``."""
    spec = own_task(data.task, data.kind) if data.kind else get_task(data.task)
    task_dir = Path(out_root) / data.task
    task_dir.mkdir(parents=True, exist_ok=True)
    # A rebuild must not leave a finished-looking directory mixing old and new files.
    for stale in [task_dir / "manifest.json", *task_dir.glob("*.jsonl")]:
        stale.unlink(missing_ok=True)
    for (split, lang), rows in sorted(data.records.items()):
        _write_jsonl(split_path(out_root, data.task, split, lang), rows)
    _write_jsonl(task_dir / REMOVED_FILE, (vars(r) for r in data.removed))

    all_records = [r for rows in data.records.values() for r in rows]
    counts = {split: {lang: len(data.records[(split, lang)]) for lang in data.langs(split)}
              for split in SPLITS if data.langs(split)}
    normalised = {}
    for key, counter in sorted(data.normalised.items()):
        split, lang = key.split(".", 1)
        normalised.setdefault(split, {})[lang] = dict(sorted(counter.items()))
    return write_manifest(
        task_dir, stage="tasks",
        task=data.task, kind=spec.kind, source=data.source, source_format=data.source_format,
        counts=counts,
        labels=label_sets(spec.kind, all_records),
        train_labels=label_sets(spec.kind, data.records.get(("train", "en"), [])),
        missing_test_langs=[lang for lang in spec.test_langs if ("test", lang) not in data.records],
        num_removed=len(data.removed),
        removed=_nested_counts((r.split, r.lang, r.reason) for r in data.removed),
        removed_rows_file=REMOVED_FILE,
        normalised=normalised,
        source_files=sorted(data.source_files),
        notes=data.notes,
        **(extra or {}),
    )


@dataclass(frozen=True)
class LangChoice:
    """Which languages a loader writes."""

    langs: frozenset[str] | None = None
    """Dev and test languages; None: every language the release has."""
    train_langs: frozenset[str] = frozenset({"en"})
    """Training languages (the paper fine-tunes on English only; others are translated or native train sets)."""

    def wants(self, split: str, lang: str) -> bool:
        if split == "train":
            return lang in self.train_langs
        return self.langs is None or lang in self.langs

    def check_available(self, available: Iterable[str], where: Path | str,
                        train_available: Iterable[str] | None = None) -> None:
        """Raise naming the languages asked for that the release at ``where`` does not have.

        ``available``: languages with dev/test data; ``train_available``: with training data (default: the same).
        """
        available = set(available)
        train_available = available if train_available is None else set(train_available)
        missing = sorted(((self.langs or set()) - available) | (self.train_langs - train_available))
        if missing:
            raise TaskDataError(f"{where}: no data for language(s) {', '.join(missing)} "
                                f"(found: {', '.join(sorted(available | train_available)) or 'none'})")
