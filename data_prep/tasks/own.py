"""A task of one's own in plain files (``python -m data_prep tasks --task own --name NAME --src DIR``).

``DIR`` holds ``<split>.<lang>.<ext>`` files, split in train/dev/test (English train is what fine-tuning learns
from; dev selects the epoch; every language with a test file is tested), all of one format:

- ``.tsv``, sentence or sentence-pair classification, no header, no quoting: ``text<TAB>label`` or
  ``text_a<TAB>text_b<TAB>label``; every row of the task has the same number of fields;
- ``.jsonl``, the same classification: one object per line, ``{"text": ..., "label": ...}`` or
  ``{"text_a": ..., "text_b": ..., "label": ...}``, an ``"id"`` optional;
- ``.conll``, tagging (BIO tags, scored by span F1 as WikiANN): one token per line, the token first and its tag
  last (tab- or space-separated), a blank line between sentences; ``-DOCSTART-`` lines are passed over.

Classification becomes the ``pair`` kind of :mod:`ds_kd.data.tasks` (``text_b`` left out for one sentence) and is
scored by accuracy; tagging the ``tagging`` kind. Any row that does not fit its format stops the run with
``file:line: what is wrong``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from data_prep.tasks.taskdata import SPLITS, LangChoice, TaskData, read_lines, row_error
from ds_kd.errors import UsageError
from ds_kd.schema import lang_code_problem
from ds_kd.data.tasks import TASKS

FORMATS = {"tsv": "pair", "jsonl": "pair", "conll": "tagging"}
"""File extension -> task kind."""
NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def source_files(src: Path) -> dict[tuple[str, str], Path]:
    """``(split, lang) -> file`` of ``src``; UsageError for no such file, several formats, or a bad name."""
    files = {}
    for path in sorted(src.iterdir()):
        split, _, rest = path.name.partition(".")
        lang, _, ext = rest.rpartition(".")
        if split in SPLITS and ext in FORMATS and lang:
            if (problem := lang_code_problem(lang)) is not None:
                raise UsageError(f"{path}: {problem}")
            files[split, lang] = path
    formats = sorted({p.suffix[1:] for p in files.values()})
    if not formats:
        raise UsageError(f"{src}: no <split>.<lang>.<ext> files (split: train, dev, test; ext: "
                         f"{', '.join(FORMATS)}), e.g. train.en.tsv")
    if len(formats) > 1:
        raise UsageError(f"{src}: files of several formats ({', '.join(formats)}); a task has one")
    return files


def tsv_records(path: Path) -> list[dict]:
    """``text<TAB>label`` or ``text_a<TAB>text_b<TAB>label`` rows (blank lines skipped)."""
    out = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not all(f.strip() for f in fields):
            raise row_error(path, lineno, f"expected text<TAB>label or text_a<TAB>text_b<TAB>label, non-empty, "
                                          f"found {len(fields)} field(s)")
        texts = {"text_a": fields[0]} if len(fields) == 2 else {"text_a": fields[0], "text_b": fields[1]}
        out.append({"id": str(lineno), **texts, "label": fields[-1].strip(), "line": lineno})
    return out


def jsonl_records(path: Path) -> list[dict]:
    """``{"text", "label"}`` or ``{"text_a", "text_b", "label"}`` objects, one per line."""
    out = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise row_error(path, lineno, f"not a JSON object ({e.msg})") from None
        keys = ("text", "label") if "text" in row else ("text_a", "text_b", "label")
        if not isinstance(row, dict) or any(not str(row.get(k, "")).strip() for k in keys):
            raise row_error(path, lineno, 'expected {"text": ..., "label": ...} or {"text_a": ..., "text_b": ..., '
                                          '"label": ...}, non-empty')
        texts = {"text_a": row["text"]} if "text" in row else {"text_a": row["text_a"], "text_b": row["text_b"]}
        out.append({"id": str(row.get("id", lineno)), **texts, "label": str(row["label"]), "line": lineno})
    return out


def conll_records(path: Path) -> list[dict]:
    """Sentences of ``token ... tag`` lines separated by blank lines."""
    out, tokens, tags, first = [], [], [], 0
    for lineno, line in [*read_lines(path), (None, "")]:
        if line.strip().startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if tokens:
                out.append({"id": str(first), "tokens": tokens, "tags": tags, "line": first})
            tokens, tags = [], []
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or not fields[-1].strip():
            raise row_error(path, lineno, "expected a token and its tag (token<TAB>tag or token tag)")
        first = first if tokens else lineno
        tokens.append(fields[0])
        tags.append(fields[-1].strip())
    return out


READERS = {"tsv": tsv_records, "jsonl": jsonl_records, "conll": conll_records}


def check_pair_shape(records: list[tuple[Path, dict]]) -> None:
    """Every classification row of a task has one text, or every row two."""
    shapes = {"text_b" in r for _, r in records}
    if len(shapes) > 1:
        path, row = next((p, r) for p, r in records if ("text_b" in r) != ("text_b" in records[0][1]))
        raise row_error(path, row["line"], "one text here but two in the first row of the task (or the reverse); "
                                           "a task is all one-sentence or all sentence-pair classification")


def load(name: str, src: Path | str, choice: LangChoice = LangChoice()) -> TaskData:
    """Read the task ``name`` from ``src`` (see the module doc); UsageError for a name of a benchmark or one that
    is not a folder name, and for files that do not fit their format."""
    if name in TASKS or not NAME.fullmatch(name):
        raise UsageError(f"--name {name!r}: a task of one's own needs a name of lower-case letters, digits, '-' "
                         f"and '_' that is not a benchmark's ({', '.join(TASKS)})")
    src = Path(src)
    files = source_files(src)
    ext = next(iter(files.values())).suffix[1:]
    choice.check_available({lang for s, lang in files if s != "train"}, src,
                           {lang for s, lang in files if s == "train"})
    data = TaskData(name, str(src), f"own {ext}", kind=FORMATS[ext])
    read = []
    for (split, lang), path in sorted(files.items()):
        if not choice.wants(split, lang):
            continue
        data.source_files.append(str(path))
        for record in READERS[ext](path):
            read.append((path, record))
            data.add(split, lang, {k: v for k, v in record.items() if k != "line"})
    if data.kind == "pair":
        check_pair_shape(read)
    return data
