"""PAWS-X as released (``x-final.tar.gz``): ``x-final/<lang>/{dev_2k,test_2k}.tsv``, the English training set
``x-final/en/train.tsv`` and the machine-translated ``x-final/<lang>/translated_train.tsv`` of other languages.

Every file has a header ``id sentence1 sentence2 label`` and no CSV quoting. Release quirks, documented by the
PAWS-X authors (failed machine translations leave blank cells): rows whose sentence1 or sentence2 is empty,
and rows whose label is empty, are removed and counted in the manifest (with file and line in
``removed.jsonl``). Any other label than 0/1, or a wrong field count, is an error naming the file and line.

XTREME's ``download_data.sh`` output and ``datasets`` save_to_disk folders are read too (:mod:`.xtreme`,
:mod:`.hfdisk`), with the same rules.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.tasks import hfdisk, xtreme
from data_prep.tasks.taskdata import LangChoice, TaskData, read_tsv_with_header, row_error

LABELS = ("0", "1")
EVAL_FILES = {"dev": "dev_2k.tsv", "test": "test_2k.tsv"}
REASON_EMPTY_SENTENCE = "empty sentence (blank cell in the release, e.g. a failed translation)"
REASON_EMPTY_LABEL = "empty label"


def find_root(src: Path) -> Path:
    root = src / "x-final" if (src / "x-final").is_dir() else src
    if not any(root.glob("*/dev_2k.tsv")) and not any(root.glob("*/test_2k.tsv")):
        raise FileNotFoundError(f"{src}: no <lang>/dev_2k.tsv or <lang>/test_2k.tsv (nor under x-final/), no "
                                "XTREME pawsx/{train,dev,test}-<lang>.tsv, no datasets save_to_disk folders <lang>/")
    return root


def train_file(root: Path, lang: str) -> Path:
    """English ships the original PAWS-Wiki ``train.tsv``; other languages its translation."""
    return root / lang / ("train.tsv" if lang == "en" else "translated_train.tsv")


def add_pair(data: TaskData, split: str, lang: str, where: Path | str, line: int, row_id: str, sentence1: str,
             sentence2: str, label: str) -> None:
    """Add one pair, or remove and count it (blank cell); a label other than 0/1 is an error naming ``where:line``."""
    if not sentence1.strip() or not sentence2.strip():
        data.remove(split, lang, where, line, REASON_EMPTY_SENTENCE, row_id)
        return
    if not label.strip():
        data.remove(split, lang, where, line, REASON_EMPTY_LABEL, row_id)
        return
    if label.strip() not in LABELS:
        raise row_error(where, line, f"label {label!r} is not 0 or 1")
    data.add(split, lang, {"id": row_id, "text_a": sentence1, "text_b": sentence2, "label": label.strip()})


def read_file(path: Path, split: str, lang: str, data: TaskData) -> None:
    for lineno, row in read_tsv_with_header(path, ("id", "sentence1", "sentence2", "label")):
        add_pair(data, split, lang, path, lineno, row["id"], row["sentence1"], row["sentence2"], row["label"])
    data.source_files.append(str(path))


def load(src: Path, choice: LangChoice = LangChoice()) -> TaskData:
    """The release layout, XTREME's processed files or per-language ``datasets`` folders, found by their files."""
    if hfdisk.is_saved_dataset(src):
        return hfdisk.load_pairs(src, choice, "pawsx", add_pair, ("sentence1", "sentence2"))
    if (xtreme_dir := xtreme.find_task_dir(src, "pawsx")) is not None:
        return xtreme.load_pairs(xtreme_dir, src, choice, "pawsx", add_pair)
    root = find_root(src)
    langs = sorted(d.name for d in root.iterdir() if d.is_dir() and any((d / f).is_file() for f in EVAL_FILES.values()))
    choice.check_available(langs, root, train_available=[lang for lang in langs if train_file(root, lang).is_file()])
    data = TaskData("pawsx", str(src), "PAWS-X x-final tsv")
    for lang in langs:
        if choice.wants("train", lang):
            read_file(train_file(root, lang), "train", lang, data)
        for split, name in EVAL_FILES.items():
            if choice.wants(split, lang) and (root / lang / name).is_file():
                read_file(root / lang / name, split, lang, data)
    data.notes.append("train: en/train.tsv for en, <lang>/translated_train.tsv (machine-translated) otherwise; "
                      "dev: dev_2k.tsv; test: test_2k.tsv; labels kept as the strings '0'/'1' (1 = paraphrase)")
    return data
