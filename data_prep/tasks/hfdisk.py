"""Sentence-pair tasks saved by Hugging Face ``datasets`` (``save_to_disk``): XNLI and PAWS-X.

One ``DatasetDict`` per language, ``<src>/<lang>/``, as ``load_dataset("xnli", "fr").save_to_disk("<src>/fr")``
writes it (PAWS-X: ``load_dataset("paws-x", "fr")``). Splits ``train``, ``validation`` (written as dev) and
``test``; columns ``premise``/``hypothesis`` (XNLI) or ``sentence1``/``sentence2`` (PAWS-X) and ``label``, whose
``ClassLabel`` names are the labels (an int without names is read as its decimal string; -1, the datasets mark
of an unlabelled row, as an empty label). Each row goes through the release loader's ``add_pair``, so the same
checks and removals apply. A row's place in errors and ``removed.jsonl`` is ``<dir> [<split>]:<row index>``.
(WikiANN's saved datasets are read by :mod:`.wikiann`.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from data_prep.tasks.taskdata import LangChoice, TaskData, TaskDataError

HF_SPLITS = {"train": "train", "validation": "dev", "test": "test"}


def is_saved_dataset(src: Path) -> bool:
    """``src`` holds a saved ``DatasetDict``, or folders that do."""
    return src.is_dir() and ((src / "dataset_dict.json").is_file() or any(src.glob("*/dataset_dict.json")))


def saved_languages(src: Path) -> dict[str, Path]:
    """``{lang: folder}`` of the per-language ``DatasetDict`` folders; one at ``src`` itself has no language."""
    if (src / "dataset_dict.json").is_file():
        raise TaskDataError(f"{src}: one saved DatasetDict, whose language is unknown; save one per language as "
                            f"{src}/<lang>/ (load_dataset(name, lang).save_to_disk(...))")
    return {d.name: d for d in sorted(src.iterdir()) if (d / "dataset_dict.json").is_file()}


def label_text(feature, value) -> str:
    """A ``label`` cell as its name: ClassLabel name, else the decimal string; '' for None or -1."""
    if value is None or value == -1:
        return ""
    names = getattr(feature, "names", None)
    return names[value] if names else str(value)


def _open(saved: dict[str, Path]) -> dict:
    from datasets import load_from_disk  # slow to import; only this layout needs it

    opened = {}
    for lang, path in saved.items():
        dataset_dict = load_from_disk(str(path))
        unknown = sorted(set(dataset_dict) - set(HF_SPLITS))
        if unknown:
            raise TaskDataError(f"{path}: unexpected split(s) {unknown}; expected {', '.join(HF_SPLITS)}")
        opened[lang] = dataset_dict
    return opened


def load_pairs(src: Path, choice: LangChoice, task: str, add_pair: Callable, columns: tuple[str, str]) -> TaskData:
    """The pairs of every chosen (split, language); ``columns`` are the two text columns."""
    saved = saved_languages(src)
    opened = _open(saved)
    choice.check_available({lang for lang, dd in opened.items() if {"validation", "test"} & set(dd)}, src,
                           train_available={lang for lang, dd in opened.items() if "train" in dd})
    data = TaskData(task, str(src), "datasets save_to_disk (one DatasetDict per <lang>/)")
    for lang, dataset_dict in opened.items():
        for hf_split, ds in dataset_dict.items():
            split = HF_SPLITS[hf_split]
            if not choice.wants(split, lang):
                continue
            where = f"{saved[lang]} [{hf_split}]"
            missing = [c for c in (*columns, "label") if c not in ds.column_names]
            if missing:
                raise TaskDataError(f"{where}: no column(s) {missing} (columns: {', '.join(ds.column_names)})")
            feature = ds.features["label"]
            for i, row in enumerate(ds):
                row_id = str(row["id"]) if "id" in row else f"{hf_split}-{i}"
                add_pair(data, split, lang, where, i, row_id, row[columns[0]], row[columns[1]],
                         label_text(feature, row["label"]))
            data.source_files.append(where)
    data.notes.append("datasets save_to_disk layout; split 'validation' written as dev; record id: the 'id' "
                      "column, else '<hf split>-<row index>'")
    return data
