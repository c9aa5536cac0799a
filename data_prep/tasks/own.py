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
``file:line: what is wrong``; so does a dev or test label (a tag's entity type) that English train never has, a
model fine-tuned on it could not predict it. An empty file, a task without English train or dev, and a file
that looks like task data (a ``.tsv``/``.jsonl``/``.conll`` file, or a name starting with a split) but is not
named ``<split>.<lang>.<ext>`` are refused, naming the file; other files (a README) are passed over.
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
NAMING = f"<split>.<lang>.<ext> (split: {', '.join(SPLITS)}; ext: {', '.join(FORMATS)}), e.g. train.en.tsv"
TAG = re.compile(r"O|[BI]-(\S+)")
"""A BIO tag; its group is the entity type."""
WHY_EN = {"train": "fine-tuning learns from it", "dev": "model selection (the epoch kept) needs it"}
"""The English splits a task must have, and what needs each."""


def looks_like_task_data(path: Path) -> bool:
    """A file whose name is not ``<split>.<lang>.<ext>`` but that was meant as task data: a task format's
    extension (``trian.en.tsv``, ``dev_de.tsv``) or a name starting with a split (``train.en.txt``)."""
    return path.suffix[1:].lower() in FORMATS or re.match(rf"({'|'.join(SPLITS)})[^a-z]", path.name.lower()) is not None


def source_files(src: Path) -> dict[tuple[str, str], Path]:
    """``(split, lang) -> file`` of ``src``; UsageError for no such file, several formats, a bad language code,
    or files that look like task data but are not named ``<split>.<lang>.<ext>`` (other files are passed over)."""
    files, misnamed = {}, []
    for path in sorted(src.iterdir()):
        split, _, rest = path.name.partition(".")
        lang, _, ext = rest.rpartition(".")
        if split in SPLITS and ext in FORMATS and lang:
            if (problem := lang_code_problem(lang)) is not None:
                raise UsageError(f"{path}: {problem}")
            files[split, lang] = path
        elif path.is_file() and not path.name.startswith(".") and looks_like_task_data(path):
            misnamed.append(path.name)
    if misnamed:
        raise UsageError(f"{src}: {', '.join(misnamed)}: not named {NAMING}; rename them, or move them out of "
                         f"the folder (a task reads only files named so)")
    formats = sorted({p.suffix[1:] for p in files.values()})
    if not formats:
        raise UsageError(f"{src}: no {NAMING} files")
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
    """Sentences of ``token ... tag`` lines separated by blank lines; a tag that is not BIO (``O``, ``B-TYPE``,
    ``I-TYPE``) is an error naming its line. ``lines``: each tag's line."""
    out, tokens, tags, lines = [], [], [], []
    for lineno, line in [*read_lines(path), (None, "")]:
        if line.strip().startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if tokens:
                out.append({"id": str(lines[0]), "tokens": tokens, "tags": tags, "line": lines[0], "lines": lines})
            tokens, tags, lines = [], [], []
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or not fields[-1].strip():
            raise row_error(path, lineno, "expected a token and its tag (token<TAB>tag or token tag)")
        tag = fields[-1].strip()
        if not TAG.fullmatch(tag):
            raise row_error(path, lineno, f"tag {tag!r} is not BIO: expected O, B-TYPE or I-TYPE (e.g. B-PER, I-PER)")
        tokens.append(fields[0])
        tags.append(tag)
        lines.append(lineno)
    return out


READERS = {"tsv": tsv_records, "jsonl": jsonl_records, "conll": conll_records}


def check_pair_shape(records: list[tuple[Path, dict]]) -> None:
    """Every classification row of a task has one text, or every row two."""
    shapes = {"text_b" in r for _, r in records}
    if len(shapes) > 1:
        path, row = next((p, r) for p, r in records if ("text_b" in r) != ("text_b" in records[0][1]))
        raise row_error(path, row["line"], "one text here but two in the first row of the task (or the reverse); "
                                           "a task is all one-sentence or all sentence-pair classification")


def check_labels_seen(records: list[tuple[Path, dict]], train: list[dict], kind: str) -> None:
    """Every dev and test label is one of English train's (for tagging: every entity type, whether seen as
    ``B-`` or ``I-``); else an error naming file, line and label: a model fine-tuned on train never predicts it."""
    if kind == "pair":
        known = {r["label"] for r in train}
        for path, r in records:
            if r["label"] not in known:
                raise row_error(path, r["line"], f"label {r['label']!r} is not among English train's "
                                                 f"({', '.join(sorted(known))}): a model fine-tuned on it never "
                                                 f"predicts it")
        return
    types = {TAG.fullmatch(t).group(1) for r in train for t in r["tags"]} - {None}
    for path, r in records:
        for tag, lineno in zip(r["tags"], r["lines"]):
            if TAG.fullmatch(tag).group(1) not in types | {None}:
                raise row_error(path, lineno, f"tag {tag!r}: English train has no {tag[2:]} entity (as B- or I-; "
                                              f"its types: {', '.join(sorted(types)) or 'none'}): a model fine-tuned "
                                              f"on it never predicts it")


def load(name: str, src: Path | str, choice: LangChoice = LangChoice()) -> TaskData:
    """Read the task ``name`` from ``src`` (see the module doc); UsageError for a name of a benchmark or one that
    is not a folder name, for files that do not fit their format, an empty file, no English train or dev split,
    and dev or test labels English train does not have."""
    if name in TASKS or not NAME.fullmatch(name):
        raise UsageError(f"--name {name!r}: a task of one's own needs a name of lower-case letters, digits, '-' "
                         f"and '_' that is not a benchmark's ({', '.join(TASKS)})")
    src = Path(src)
    files = source_files(src)
    ext = next(iter(files.values())).suffix[1:]
    choice.check_available({lang for s, lang in files if s != "train"}, src,
                           {lang for s, lang in files if s == "train"})
    data = TaskData(name, str(src), f"own {ext}", kind=FORMATS[ext])
    read, evaluated = [], []
    for (split, lang), path in sorted(files.items()):
        if not choice.wants(split, lang):
            continue
        data.source_files.append(str(path))
        records = READERS[ext](path)
        if not records:
            raise row_error(path, None, f"no rows: an empty {split} split")
        for record in records:
            read.append((path, record))
            if split != "train":
                evaluated.append((path, record))
            data.add(split, lang, {k: v for k, v in record.items() if k not in ("line", "lines")})
    if data.kind == "pair":
        check_pair_shape(read)
    for split, why in WHY_EN.items():
        if (split, "en") not in data.records:
            unwanted = f" (--{'train-' if split == 'train' else ''}langs leaves it out)" if (split, "en") in files else ""
            raise UsageError(f"{src}: no English {split} split ({split}.en.{ext}){unwanted}: {why}")
    check_labels_seen(evaluated, data.records["train", "en"], data.kind)
    return data
