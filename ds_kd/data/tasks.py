"""The fine-tuning tasks as rows of data (paper §4), and the normalised task-data layout.

``python -m data_prep tasks`` writes, per task::

    <root>/<task>/manifest.json          counts per split and language, label sets, removed rows
    <root>/<task>/<split>.<lang>.jsonl   split in train/dev/test; one JSON record per line

Records by kind:

- ``pair``        {"id", "text_a", "text_b", "label"}                 (XNLI, PAWS-X; a task of one's own may leave
                  out ``text_b``: one-sentence classification)
- ``tagging``     {"id", "tokens": [...], "tags": [...]}               (WikiANN, BIO tags)
- ``intent_slot`` {"id", "tokens": [...], "slots": [...], "intent"}    (MultiATIS++, BIO slots)
- ``parse``       {"id", "tokens": [...], "logical_form"}              (mTOP: decoupled form, space-separated;
                  ontology tokens "[IN:X", "[SL:Y", "]"; every other token is a copy of a source token)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ds_kd.errors import UsageError
from ds_kd.textfile import open_text


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # pair | tagging | intent_slot | parse
    metric: str  # the paper's headline metric, a key of the result's per-language scores
    test_langs: tuple[str, ...]  # the languages of the paper's tables (en first)
    zero_shot_exclude: tuple[str, ...] = ()  # test languages the paper leaves out of its zero-shot average
    paper_table: int = 0  # the paper's per-language table


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("xnli", "pair", "accuracy", ("en", "fr", "de", "es", "hi"), paper_table=6),
        TaskSpec("pawsx", "pair", "accuracy", ("en", "fr", "de", "es", "ja"), ("ja",), paper_table=7),
        TaskSpec("wikiann", "tagging", "f1", ("en", "fr", "de", "es", "pt", "it", "hi"), paper_table=8),
        TaskSpec("matis", "intent_slot", "exact_match", ("en", "fr", "de", "es", "pt", "hi"), paper_table=9),
        TaskSpec("mtop", "parse", "exact_match", ("en", "fr", "de", "es", "hi"), paper_table=10),
    )
}


OWN_TASK_METRICS = {"pair": "accuracy", "tagging": "f1"}
"""The kinds a task of one's own may have (``python -m data_prep tasks --task own``: sentence or sentence-pair
classification, tagging), with their headline metric."""


def own_task(name: str, kind: str) -> TaskSpec:
    """The spec of a task of one's own: its kind's metric; no paper table, every language with test data
    tested, the zero-shot average over every one but English."""
    if kind not in OWN_TASK_METRICS:
        raise UsageError(f"task {name!r}: kind {kind!r} cannot be a task of one's own (known: "
                         f"{', '.join(OWN_TASK_METRICS)})")
    return TaskSpec(name, kind, OWN_TASK_METRICS[kind], ())


def get_task(name: str, data: Path | str | None = None) -> TaskSpec:
    """A benchmark of :data:`TASKS`, else a task of one's own written under ``data`` (its
    ``<data>/<name>/manifest.json`` names the kind). UsageError naming both when it is neither."""
    if name in TASKS:
        return TASKS[name]
    manifest = Path(data) / name / "manifest.json" if data is not None else None
    if manifest is not None and manifest.is_file():
        with open_text(manifest) as f:
            return own_task(name, json.load(f)["kind"])
    where = f" nor a task of one's own under {data} (no {manifest})" if data is not None else ""
    raise UsageError(f"unknown task {name!r}: not one of {', '.join(TASKS)}{where}; write one of your own with "
                     f"python -m data_prep tasks --task own --name {name} --src DIR --out DATA")


def present_tasks(data: Path | str) -> list[str]:
    """The tasks whose normalised data is under ``data`` (``<data>/<task>/manifest.json``, written last): the
    benchmarks in :data:`TASKS` order, then the tasks of one's own by name."""
    found = {p.parent.name for p in Path(data).glob("*/manifest.json")}
    return [t for t in TASKS if t in found] + sorted(found - set(TASKS))


def zero_shot_langs(spec: TaskSpec) -> tuple[str, ...]:
    """The languages averaged into the paper's zero-shot score: every test language but English and exclusions."""
    return tuple(lang for lang in spec.test_langs if lang != "en" and lang not in spec.zero_shot_exclude)


def split_path(root: Path | str, task: str, split: str, lang: str) -> Path:
    return Path(root) / task / f"{split}.{lang}.jsonl"


def load_split(root: Path | str, task: str, split: str, lang: str) -> list[dict]:
    """Read one normalised split; a missing file is an error naming it."""
    path = split_path(root, task, split, lang)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} data for {task}/{lang} (run `python -m data_prep tasks` first)")
    with open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]
