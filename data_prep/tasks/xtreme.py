"""XTREME's processed task files, as its ``scripts/download_data.sh`` leaves them (Hu et al., 2020)::

    <download>/xnli/{train,dev,test}-<lang>.tsv    sentence1<TAB>sentence2<TAB>label   (train: en only)
    <download>/pawsx/{train,dev,test}-<lang>.tsv   sentence1<TAB>sentence2<TAB>label   (train: en only)
    <download>/panx/{train,dev,test}-<lang>.tsv    token<TAB>tag per line, a blank line between sentences

``--src`` is the task folder or the download folder above it. The files have no header. The pair files are
written by Python's ``csv`` module with a tab delimiter, so a field holding a quote character is itself
quoted, its quotes doubled: they are read with the same dialect. Later XTREME versions strip the gold labels from
test files (pairs: two columns; panx: tokens only) so that test scores come from XTREME's server; such a file
is not written (there is nothing to score against) and the manifest's notes name it.

The rows go through the release loader's own checks (``add_pair`` of :mod:`.xnli` / :mod:`.pawsx`); in panx,
a sentence holding an empty token (XTREME strips each token, so a whitespace-only token becomes empty) is
removed and counted. Any other malformed line is an error naming the file and line.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Iterator

from data_prep.tasks.taskdata import LangChoice, TaskData, read_lines, row_error

FILE_PATTERN = re.compile(r"^(train|dev|test)-([A-Za-z][A-Za-z_-]*)\.tsv$")
REASON_EMPTY_TOKEN = "empty token (a whitespace-only token that XTREME's preprocessing stripped)"
PAIR_COLUMNS = ("sentence1", "sentence2", "label")


def task_files(directory: Path) -> dict[tuple[str, str], Path]:
    """``{(split, lang): path}`` of the ``<split>-<lang>.tsv`` files in ``directory``."""
    found = {}
    for path in sorted(directory.glob("*-*.tsv")):
        m = FILE_PATTERN.match(path.name)
        if m:
            found[(m.group(1), m.group(2))] = path
    return found


def find_task_dir(src: Path, folder: str) -> Path | None:
    """``src`` or ``src/<folder>`` (xnli, pawsx, panx) when it holds ``<split>-<lang>.tsv`` files, else None."""
    for directory in (src, src / folder):
        if directory.is_dir() and task_files(directory):
            return directory
    return None


def iter_csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` per row of a tab-delimited csv file (quoted fields may span lines: the row's last
    line is given); blank lines are passed over. Decoding errors name their line."""
    current = 0

    def lines() -> Iterator[str]:
        nonlocal current
        for lineno, text in read_lines(path):
            current = lineno
            yield text + "\n"

    try:
        for fields in csv.reader(lines(), delimiter="\t"):
            if fields and any(f.strip() for f in fields):
                yield current, fields
    except csv.Error as e:
        raise row_error(path, current, f"not a tab-separated csv row ({e})") from None


def _pairs_labelled(path: Path) -> bool:
    """The first row has a label column (test files of later XTREME versions have two columns)."""
    return next((len(fields) for _, fields in iter_csv_rows(path)), 0) == len(PAIR_COLUMNS)


def _panx_labelled(path: Path) -> bool:
    """The first token line has a tag (test files of later XTREME versions hold tokens only)."""
    return next((len(fields) for _, fields in iter_token_lines(path) if fields), 0) == 2


def _choose(files: dict, labelled: Callable[[Path], bool], choice: LangChoice, where: Path) -> tuple[dict, list]:
    """The files to read, after checking the asked languages exist; and the test files without labels."""
    with_labels = {key: path for key, path in files.items() if labelled(path)}
    choice.check_available({lang for (split, lang) in with_labels if split != "train"}, where,
                           train_available={lang for (split, lang) in with_labels if split == "train"})
    unlabelled = sorted(str(path) for key, path in files.items() if key not in with_labels
                        and choice.wants(*key))
    return {key: path for key, path in with_labels.items() if choice.wants(*key)}, unlabelled


def _note_unlabelled(data: TaskData, unlabelled: list[str]) -> None:
    if unlabelled:
        data.notes.append("files without gold labels, not written (XTREME scores tests on its server): "
                          + ", ".join(Path(p).name for p in unlabelled))


def load_pairs(root: Path, src: Path, choice: LangChoice, task: str, add_pair: Callable) -> TaskData:
    """XNLI or PAWS-X from ``root/<split>-<lang>.tsv``; each row goes through the task's ``add_pair``."""
    files = task_files(root)
    chosen, unlabelled = _choose(files, _pairs_labelled, choice, root)
    data = TaskData(task, str(src), "XTREME download_data.sh <split>-<lang>.tsv")
    for (split, lang), path in sorted(chosen.items()):
        for line, fields in iter_csv_rows(path):
            if len(fields) != len(PAIR_COLUMNS):
                raise row_error(path, line, f"expected {len(PAIR_COLUMNS)} tab-separated fields "
                                            f"({', '.join(PAIR_COLUMNS)}), found {len(fields)}")
            add_pair(data, split, lang, path, line, f"{path.name}:{line}", *fields)
        data.source_files.append(str(path))
    _note_unlabelled(data, unlabelled)
    data.notes.append("XTREME download_data.sh layout (csv-quoted, no header); record id '<file>:<line>'")
    return data


def iter_token_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of a ``token<TAB>tag`` file, blank lines included as ``[]`` (sentence breaks)."""
    for lineno, text in read_lines(path):
        yield lineno, text.split("\t") if text.strip() else []


def _sentences(path: Path) -> Iterator[tuple[int, list[list[str]]]]:
    start, rows = 0, []
    for lineno, fields in iter_token_lines(path):
        if not fields:
            if rows:
                yield start, rows
            rows = []
            continue
        if not rows:
            start = lineno
        rows.append([lineno, *fields])
    if rows:
        yield start, rows


def read_panx_file(path: Path, split: str, lang: str, data: TaskData, tags: tuple[str, ...]) -> None:
    for start, rows in _sentences(path):
        for lineno, *fields in rows:
            if len(fields) != 2:
                raise row_error(path, lineno, f"expected 'token<TAB>tag', found {len(fields)} field(s)")
            if fields[1].strip() not in tags:
                raise row_error(path, lineno, f"tag {fields[1]!r} is not one of {' '.join(tags)}")
        tokens = [fields[0].strip() for _, *fields in rows]
        if not all(tokens):
            data.remove(split, lang, path, start, REASON_EMPTY_TOKEN, f"{path.name}:{start}")
            continue
        data.add(split, lang, {"id": f"{path.name}:{start}", "tokens": tokens,
                               "tags": [fields[1].strip() for _, *fields in rows]})
    data.source_files.append(str(path))


def load_panx(root: Path, src: Path, choice: LangChoice, tags: tuple[str, ...]) -> TaskData:
    """WikiANN (PAN-X) from XTREME's ``panx/<split>-<lang>.tsv``."""
    files = task_files(root)
    chosen, unlabelled = _choose(files, _panx_labelled, choice, root)
    data = TaskData("wikiann", str(src), "XTREME download_data.sh panx/<split>-<lang>.tsv")
    for (split, lang), path in sorted(chosen.items()):
        read_panx_file(path, split, lang, data, tags)
    _note_unlabelled(data, unlabelled)
    data.notes.append("XTREME download_data.sh panx layout (language prefix already removed); record id "
                      "'<file>:<first line of the sentence>'")
    return data
