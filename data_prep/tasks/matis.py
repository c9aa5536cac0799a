"""MultiATIS++ as released: ``{train,dev,test}_<LANG>.tsv`` (``LANG`` upper-case: EN, FR, DE, ES, PT, HI, ...),
anywhere under ``--src``.

Each file has a header ``id utterance slot_labels intent``; the utterance's tokens and the BIO slot labels are
space-separated, one label per token. Intents may join several with ``#`` (``atis_flight#atis_airfare``); such a
label is kept as one string. Release quirk (the paper, §4): a few *test* utterances have a different number
of slot labels than tokens; they are removed and counted in the manifest. The same mismatch in train or dev
(the public Spanish train file has such rows) is an error naming the file and line, or, with
``misaligned="remove"``, removed and counted too. A label that is not ``O``/``B-x``/``I-x``, an empty utterance
or intent is an error naming the file and line.
"""
from __future__ import annotations

import re
from pathlib import Path

from ds_kd.errors import UsageError
from data_prep.tasks.taskdata import LangChoice, TaskData, TaskDataError, read_tsv_with_header, row_error

FILE_PATTERN = re.compile(r"^(train|dev|test)_([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*)\.tsv$")
"""``train_EN.tsv``; any language code (``test_ZH.tsv``, ``test_pt-br.tsv``), lower-cased when read."""
REASON_TAG_COUNT = "slot label count differs from token count (removed from test, as in the paper)"
REASON_TAG_COUNT_TRAIN = "slot label count differs from token count (removed: misaligned='remove')"


def find_files(src: Path) -> dict[tuple[str, str], Path]:
    """``{(split, lang): path}``; two files for one split and language is an error naming both."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(src.rglob("*.tsv")):
        m = FILE_PATTERN.match(path.name)
        if not m:
            continue
        key = (m.group(1), m.group(2).lower())
        if key in found:
            raise TaskDataError(f"{path}: a second file for {key[0]}/{key[1]} (first: {found[key]})")
        found[key] = path
    if not found:
        raise FileNotFoundError(f"{src}: no {{train,dev,test}}_<LANG>.tsv files found")
    return found


def check_slot_label(path: Path, lineno: int, label: str) -> None:
    if label != "O" and not (label[:2] in ("B-", "I-") and len(label) > 2):
        raise row_error(path, lineno, f"slot label {label!r} is not O, B-<slot> or I-<slot>")


def read_file(path: Path, split: str, lang: str, data: TaskData, misaligned: str = "error") -> None:
    for lineno, row in read_tsv_with_header(path, ("id", "utterance", "slot_labels", "intent")):
        tokens, slots, intent = row["utterance"].split(), row["slot_labels"].split(), row["intent"].strip()
        if not tokens:
            raise row_error(path, lineno, "empty utterance")
        if not intent:
            raise row_error(path, lineno, "empty intent")
        if len(tokens) != len(slots):
            if split == "test" or misaligned == "remove":
                reason = REASON_TAG_COUNT if split == "test" else REASON_TAG_COUNT_TRAIN
                data.remove(split, lang, path, lineno, reason, row["id"])
                continue
            raise row_error(path, lineno, f"{len(tokens)} tokens but {len(slots)} slot labels "
                                          "(--matis-misaligned remove drops and counts such rows)")
        for label in slots:
            check_slot_label(path, lineno, label)
        data.add(split, lang, {"id": row["id"], "tokens": tokens, "slots": slots, "intent": intent})
    data.source_files.append(str(path))


def load(src: Path, choice: LangChoice = LangChoice(), misaligned: str = "error") -> TaskData:
    """``misaligned``: ``error`` (default) or ``remove`` train/dev rows whose slot labels and tokens differ in
    number (test rows with that fault are always removed and counted, as in the paper)."""
    if misaligned not in ("error", "remove"):
        raise UsageError(f"misaligned must be 'error' or 'remove', not {misaligned!r}")
    files = find_files(src)
    choice.check_available({lang for split, lang in files if split != "train"}, src,
                           train_available={lang for split, lang in files if split == "train"})
    data = TaskData("matis", str(src), "MultiATIS++ {split}_<LANG>.tsv")
    for (split, lang), path in sorted(files.items()):
        if choice.wants(split, lang):
            read_file(path, split, lang, data, misaligned)
    data.notes.append("tokens and slot labels split on whitespace; multi-intent labels such as "
                      "'atis_flight#atis_airfare' kept as one intent string; language codes lower-cased")
    return data
