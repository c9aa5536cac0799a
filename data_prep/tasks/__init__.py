"""Task data: the five fine-tuning benchmarks read in their released formats and written in the normalised
layout of :mod:`ds_kd.data.tasks` (``python -m data_prep tasks --help``).

One module per release format (:mod:`.xnli`, :mod:`.pawsx`, :mod:`.wikiann`, :mod:`.matis`, :mod:`.mtop`), each
with ``load(src, choice) -> TaskData``, and :mod:`.own` for a task of one's own in plain files (TSV, JSONL,
CoNLL); :mod:`.taskdata` holds the shared readers and the writer.
"""
from __future__ import annotations

from pathlib import Path

from ds_kd.errors import UsageError
from data_prep.tasks.taskdata import LangChoice, TaskData, TaskDataError, write_task_data

TASK_NAMES = ("xnli", "pawsx", "wikiann", "matis", "mtop")


def load_task(task: str, src: Path | str, choice: LangChoice = LangChoice(), *, wikiann_format: str = "auto",
              wikiann_whitespace: str = "keep", mtop_uncopyable: str = "error",
              matis_misaligned: str = "error", own: bool = False) -> TaskData:
    """Read one benchmark from ``src``: its release layout, XTREME's ``download_data.sh`` output (xnli, pawsx,
    wikiann) or a ``datasets`` save_to_disk folder (xnli, pawsx, wikiann), recognised by their files
    (``wikiann_whitespace``: see ``data_prep.tasks.wikiann``); with ``own``, the task of one's own named
    ``task`` in plain files (``data_prep.tasks.own``)."""
    from data_prep.tasks import matis, mtop, own as own_files, pawsx, wikiann, xnli

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory")
    if own:
        return own_files.load(task, src, choice)
    if task == "wikiann":
        return wikiann.load(src, choice, wikiann_format, wikiann_whitespace)
    if task == "mtop":
        return mtop.load(src, choice, mtop_uncopyable)
    if task == "matis":
        return matis.load(src, choice, matis_misaligned)
    loaders = {"xnli": xnli.load, "pawsx": pawsx.load}
    if task not in loaders:
        raise UsageError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")
    return loaders[task](src, choice)


def prepare_task(task: str, src: Path | str, out: Path | str, choice: LangChoice = LangChoice(),
                 **options) -> dict:
    """Read ``src`` and write ``<out>/<task>/``; returns the manifest."""
    data = load_task(task, src, choice, **options)
    settings = task_settings(src, choice, options)
    del settings["source"]  # the manifest's "source" is the loader's
    return write_task_data(data, out, extra=settings)


def task_settings(src: Path | str, choice: LangChoice, options: dict) -> dict:
    """What a task's output depends on besides the source files' content, as its manifest records it."""
    return {"source": str(src), "options": dict(options),
            "langs": sorted(choice.langs) if choice.langs else "all", "train_langs": sorted(choice.train_langs)}


__all__ = ["TASK_NAMES", "LangChoice", "TaskData", "TaskDataError", "load_task", "prepare_task", "task_settings",
           "write_task_data"]
