"""XNLI as released: ``XNLI-1.0/xnli.{dev,test}.tsv`` and ``XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv``;
also XTREME's ``download_data.sh`` output and ``datasets`` save_to_disk folders (:mod:`.xtreme`, :mod:`.hfdisk`).

- ``xnli.{dev,test}.tsv``: a header row, then one row per (pair, language); we read the columns
  ``language``, ``gold_label``, ``sentence1``, ``sentence2`` and ``pairID`` (the id of a record).
- ``multinli.train.<lang>.tsv``: a header ``premise hypo label``. Release quirk: this file spells the class
  ``contradictory`` where XNLI-1.0 says ``contradiction``; we normalise it and count it in the manifest.

Neither file is CSV-quoted (quote characters are text), so rows are split on tabs only. Any other label,
an empty sentence or a wrong field count is an error naming the file and line.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.tasks import hfdisk, xtreme
from data_prep.tasks.taskdata import LangChoice, TaskData, read_tsv_with_header, row_error

LABELS = ("contradiction", "entailment", "neutral")
MT_LABEL_SPELLING = {"contradictory": "contradiction"}
QUIRK_CONTRADICTORY = "label 'contradictory' read as 'contradiction' (XNLI-MT spelling)"


def find_dirs(src: Path) -> tuple[Path, Path]:
    """``(XNLI-1.0, XNLI-MT-1.0)`` under ``src``; an error naming what is missing."""
    xnli, mt = src / "XNLI-1.0", src / "XNLI-MT-1.0"
    for d in (xnli, mt):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not found; --src must hold the XNLI-1.0 and XNLI-MT-1.0 folders, "
                                    "XTREME's xnli/{train,dev,test}-<lang>.tsv, or datasets save_to_disk "
                                    "folders <lang>/")
    return xnli, mt


def add_pair(data: TaskData, split: str, lang: str, where: Path | str, line: int, row_id: str, premise: str,
             hypothesis: str, label: str) -> None:
    """Check one pair (an error naming ``where:line``) and add it; the MT spelling of a label is normalised."""
    if label in MT_LABEL_SPELLING:
        label = MT_LABEL_SPELLING[label]
        data.normalise(split, lang, QUIRK_CONTRADICTORY)
    _check_pair(where, line, premise, hypothesis, label)
    data.add(split, lang, {"id": row_id, "text_a": premise, "text_b": hypothesis, "label": label})


def _check_pair(path: Path, lineno: int, premise: str, hypothesis: str, label: str) -> None:
    if label not in LABELS:
        raise row_error(path, lineno, f"label {label!r} is not one of {', '.join(LABELS)}")
    if not premise.strip() or not hypothesis.strip():
        raise row_error(path, lineno, "empty premise or hypothesis")


def read_eval_file(path: Path, split: str, choice: LangChoice, data: TaskData) -> set[str]:
    """Add the rows of ``xnli.<split>.tsv`` for the chosen languages; return every language the file has."""
    seen: set[str] = set()
    for lineno, row in read_tsv_with_header(path, ("language", "gold_label", "sentence1", "sentence2", "pairID")):
        lang = row["language"]
        seen.add(lang)
        if not choice.wants(split, lang):
            continue
        _check_pair(path, lineno, row["sentence1"], row["sentence2"], row["gold_label"])
        data.add(split, lang, {"id": row["pairID"], "text_a": row["sentence1"], "text_b": row["sentence2"],
                               "label": row["gold_label"]})
    data.source_files.append(str(path))
    return seen


def read_mt_train(path: Path, lang: str, data: TaskData) -> None:
    for lineno, row in read_tsv_with_header(path, ("premise", "hypo", "label")):
        label = row["label"]
        if label in MT_LABEL_SPELLING:
            label = MT_LABEL_SPELLING[label]
            data.normalise("train", lang, QUIRK_CONTRADICTORY)
        _check_pair(path, lineno, row["premise"], row["hypo"], label)
        data.add("train", lang, {"id": f"{path.name}:{lineno}", "text_a": row["premise"], "text_b": row["hypo"],
                                 "label": label})
    data.source_files.append(str(path))


def load(src: Path, choice: LangChoice = LangChoice()) -> TaskData:
    """The release layout, XTREME's processed files or per-language ``datasets`` folders, found by their files."""
    if hfdisk.is_saved_dataset(src):
        return hfdisk.load_pairs(src, choice, "xnli", add_pair, ("premise", "hypothesis"))
    if (root := xtreme.find_task_dir(src, "xnli")) is not None:
        return xtreme.load_pairs(root, src, choice, "xnli", add_pair)
    xnli_dir, mt_dir = find_dirs(src)
    data = TaskData("xnli", str(src), "XNLI-1.0 + XNLI-MT-1.0 tsv")
    available: set[str] = set()
    for split in ("dev", "test"):
        available |= read_eval_file(xnli_dir / f"xnli.{split}.tsv", split, choice, data)
    train_files = {p.name.split(".")[2]: p for p in (mt_dir / "multinli").glob("multinli.train.*.tsv")}
    choice.check_available(available, src, train_available=train_files)
    for lang in sorted(choice.train_langs):
        read_mt_train(train_files[lang], lang, data)
    data.notes.append("train: XNLI-MT-1.0 multinli.train.<lang>.tsv (machine-translated MultiNLI for lang != en); "
                      "dev/test: XNLI-1.0; id of a train record is '<file>:<line>'")
    return data
