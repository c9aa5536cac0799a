"""Task data in the layouts users already hold: XTREME's download_data.sh output, datasets save_to_disk folders,
and MultiATIS++ train rows whose slot labels and words disagree. Every file is written here."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import tests.helpers.taskfixtures as fx
from data_prep.tasks import LangChoice, TaskDataError, load_task
from data_prep.tasks.cli import main, task_source
from data_prep.tasks.pawsx import REASON_EMPTY_LABEL, REASON_EMPTY_SENTENCE
from ds_kd.manifest import read_manifest
from ds_kd.data.tasks import load_split

QUOTED = 'He said "go" and\tleft'  # csv.writer quotes this field (quote characters and a tab inside)


def _csv(path: Path, rows: list[list[str]]) -> Path:
    """A file as XTREME's utils_preprocess.py writes it: csv.writer with a tab delimiter, no header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    return path


def write_xtreme_xnli(download: Path) -> Path:
    d = download / "xnli"
    _csv(d / "train-en.tsv", [[QUOTED, "A man left.", "entailment"], ["One.", "Two.", "neutral"],
                              ["Up.", "Down.", "contradiction"]])
    _csv(d / "dev-en.tsv", [["Yes.", "No.", "contradiction"], ["Hi.", "Hello.", "entailment"]])
    _csv(d / "dev-fr.tsv", [["Oui.", "Non.", "contradiction"]])
    _csv(d / "test-en.tsv", [["Sun.", "Moon.", "neutral"]])  # an older XTREME: test labels kept
    _csv(d / "test-fr.tsv", [["Soleil.", "Lune."], ["Jour.", "Nuit."]])  # later XTREME: no labels
    return d


def counts(data) -> dict:
    return {key: len(rows) for key, rows in data.records.items()}


def test_xtreme_xnli_reads_csv_quoting_and_leaves_unlabelled_tests_out(tmp_path):
    write_xtreme_xnli(tmp_path / "download")
    data = load_task("xnli", tmp_path / "download", LangChoice(None, frozenset({"en"})))  # the folder above
    assert counts(data) == {("train", "en"): 3, ("dev", "en"): 2, ("dev", "fr"): 1, ("test", "en"): 1}
    first = data.records[("train", "en")][0]
    assert first == {"id": "train-en.tsv:1", "text_a": QUOTED, "text_b": "A man left.", "label": "entailment"}
    assert any("test-fr.tsv" in note and "without gold labels" in note for note in data.notes)


def test_xtreme_pairs_go_through_the_release_checks(tmp_path):
    d = tmp_path / "pawsx"
    _csv(d / "train-en.tsv", [["a b", "b a", "1"], ["c", "d", "0"]])
    _csv(d / "dev-de.tsv", [["x", "", "1"], ["y", "z", "0"]])  # a blank cell: removed and counted
    _csv(d / "test-de.tsv", [["y", "z", "0"]])
    data = load_task("pawsx", d)
    assert counts(data) == {("train", "en"): 2, ("dev", "de"): 1, ("test", "de"): 1}
    assert [(r.split, r.lang, Path(r.file).name, r.line) for r in data.removed] == [("dev", "de", "dev-de.tsv", 1)]
    _csv(d / "dev-de.tsv", [["x", "y", "1"], ["y", "z", "maybe"]])
    with pytest.raises(TaskDataError, match=f"{d / 'dev-de.tsv'}:2: label 'maybe' is not 0 or 1"):
        load_task("pawsx", d)
    _csv(d / "dev-de.tsv", [["x", "y", "1"], ["y", "z", "0", "extra"]])
    with pytest.raises(TaskDataError, match=f"{d / 'dev-de.tsv'}:2: expected 3 tab-separated fields"):
        load_task("pawsx", d)
    _csv(tmp_path / "xnli" / "dev-en.tsv", [["p", "h", "maybe"]])
    _csv(tmp_path / "xnli" / "train-en.tsv", [["p", "h", "neutral"]])
    with pytest.raises(TaskDataError, match="dev-en.tsv:1: label 'maybe' is not one of"):
        load_task("xnli", tmp_path / "xnli")


def _panx(path: Path, sentences: list[list[tuple[str, ...]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("".join("\t".join(t) + "\n" for t in s) + "\n" for s in sentences), encoding="utf-8")
    return path


def write_xtreme_panx(download: Path) -> Path:
    d = download / "panx"
    _panx(d / "train-en.tsv", [[("Angela", "B-PER"), ("Merkel", "I-PER"), ("spoke", "O")],
                               [("Paris", "B-LOC")]])
    # A whitespace-only token that XTREME's stripping left empty: the sentence is removed and counted.
    _panx(d / "dev-ja.tsv", [[("東京", "B-LOC")], [("日本", "B-LOC"), ("", "O"), ("語", "O")]])
    _panx(d / "test-en.tsv", [[("Berlin",), ("is",), ("big",)]])  # later XTREME: tokens only
    _panx(d / "test-ja.tsv", [[("京都", "B-LOC")]])
    return d


def test_xtreme_panx_through_the_command(tmp_path, capsys):
    write_xtreme_panx(tmp_path / "download")
    out = tmp_path / "out"
    assert main(["--task", "wikiann", "--src", str(tmp_path / "download"), "--out", str(out)]) == 0
    manifest = read_manifest(out / "wikiann")
    assert manifest["source_format"].startswith("XTREME download_data.sh panx")
    assert manifest["counts"] == {"train": {"en": 2}, "dev": {"ja": 1}, "test": {"ja": 1}}
    assert manifest["num_removed"] == 1 and list(manifest["removed"]["dev"]["ja"].values()) == [1]
    assert any("test-en.tsv" in note for note in manifest["notes"])
    assert load_split(out, "wikiann", "train", "en")[0] == {
        "id": "train-en.tsv:1", "tokens": ["Angela", "Merkel", "spoke"], "tags": ["B-PER", "I-PER", "O"]}


def test_xtreme_panx_malformed_tag_names_file_and_line(tmp_path):
    d = write_xtreme_panx(tmp_path)
    _panx(d / "test-ja.tsv", [[("京都", "B-LOC")], [("大阪", "B-CITY")]])
    with pytest.raises(TaskDataError, match=f"{d / 'test-ja.tsv'}:3: tag 'B-CITY' is not one of"):
        load_task("wikiann", d)


def test_task_all_reads_xtremes_panx_folder_for_wikiann(tmp_path):
    (tmp_path / "panx").mkdir()
    assert task_source(tmp_path, "wikiann") == tmp_path / "panx"
    (tmp_path / "wikiann").mkdir()
    assert task_source(tmp_path, "wikiann") == tmp_path / "wikiann"
    assert task_source(tmp_path, "xnli") == tmp_path / "xnli"


# --- datasets save_to_disk -----------------------------------------------------------------------------------

def save_pairs(src: Path, lang: str, names: list[str], columns: tuple[str, str], rows: dict[str, list[tuple]],
               with_id: bool = False) -> None:
    """One DatasetDict per language, as load_dataset(name, lang).save_to_disk(src/lang) leaves it."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    spec = {columns[0]: Value("string"), columns[1]: Value("string"), "label": ClassLabel(names=names)}
    if with_id:
        spec = {"id": Value("int32"), **spec}
    features = Features(spec)
    splits = {}
    for split, split_rows in rows.items():
        table = {c: [r[i] for r in split_rows] for i, c in enumerate((*columns, "label"))}
        if with_id:
            table = {"id": list(range(1, len(split_rows) + 1)), **table}
        splits[split] = Dataset.from_dict(table, features=features)
    DatasetDict(splits).save_to_disk(str(src / lang))


def test_xnli_saved_by_datasets(tmp_path):
    names = ["entailment", "neutral", "contradiction"]
    cols = ("premise", "hypothesis")
    save_pairs(tmp_path, "en", names, cols, {"train": [("a", "b", 0), ("c", "d", 2)], "validation": [("e", "f", 1)],
                                             "test": [("g", "h", 2)]})
    save_pairs(tmp_path, "fr", names, cols, {"validation": [("i", "j", 0)], "test": [("k", "l", 1), ("m", "n", 0)]})
    data = load_task("xnli", tmp_path)
    assert counts(data) == {("train", "en"): 2, ("dev", "en"): 1, ("test", "en"): 1, ("dev", "fr"): 1,
                            ("test", "fr"): 2}
    assert data.records[("train", "en")][1] == {"id": "train-1", "text_a": "c", "text_b": "d", "label": "contradiction"}
    assert data.source_format.startswith("datasets save_to_disk")


def test_pawsx_saved_by_datasets_removes_blank_cells_and_unlabelled_rows(tmp_path):
    cols = ("sentence1", "sentence2")
    save_pairs(tmp_path, "en", ["0", "1"], cols, {"train": [("a", "b", 1), ("", "c", 0)],
                                                  "validation": [("d", "e", 0)], "test": [("f", "g", -1)]},
               with_id=True)
    data = load_task("pawsx", tmp_path)
    assert counts(data) == {("train", "en"): 1, ("dev", "en"): 1}
    assert data.records[("train", "en")][0] == {"id": "1", "text_a": "a", "text_b": "b", "label": "1"}
    assert sorted((r.split, r.reason) for r in data.removed) == [("test", REASON_EMPTY_LABEL),
                                                                 ("train", REASON_EMPTY_SENTENCE)]


def test_one_saved_dataset_without_a_language_is_refused(tmp_path):
    save_pairs(tmp_path, "all", ["0", "1"], ("sentence1", "sentence2"), {"test": [("a", "b", 1)]})
    (tmp_path / "all").rename(tmp_path / "one")
    with pytest.raises(TaskDataError, match="one saved DatasetDict, whose language is unknown"):
        load_task("pawsx", tmp_path / "one")


# --- MultiATIS++ train rows whose tags and words disagree ----------------------------------------------------

def test_matis_misaligned_train_rows_are_an_error_or_removed_and_counted(tmp_path):
    src, expected, (path, line) = fx.write_matis(tmp_path, malformed="count")
    with pytest.raises(TaskDataError, match=f"{path}:{line}: 3 tokens but 2 slot labels.*--matis-misaligned"):
        load_task("matis", src)
    out = tmp_path / "out"
    assert main(["--task", "matis", "--src", str(src), "--out", str(out), "--matis-misaligned", "remove"]) == 0
    manifest = read_manifest(out / "matis")
    assert manifest["counts"]["train"]["en"] == expected[("train", "en")]
    assert manifest["num_removed"] == 2  # the train row, and the test row the paper removes
    assert set(manifest["removed"]) == {"train", "test"}
    removed = [json.loads(x) for x in (out / "matis" / "removed.jsonl").read_text().splitlines()]
    assert {(r["split"], r["id"], r["line"]) for r in removed} == {("train", "5", line), ("test", "4", 5)}


# --- any language code present in the files --------------------------------------------------------------------

def test_languages_outside_the_papers_are_read_written_and_tested(tmp_path):
    from ds_kd.finetune.job import test_langs
    from ds_kd.data.tasks import get_task

    d = tmp_path / "download" / "pawsx"
    _csv(d / "train-en.tsv", [["a b", "b a", "1"], ["c", "d", "0"]])
    _csv(d / "dev-en.tsv", [["a", "b", "1"]])
    for lang in ("sw", "zh-hans", "de"):
        _csv(d / f"dev-{lang}.tsv", [["x", "y", "1"]])
        _csv(d / f"test-{lang}.tsv", [["x", "y", "1"], ["y", "z", "0"]])
    out = tmp_path / "out"
    assert main(["--task", "pawsx", "--src", str(tmp_path / "download"), "--out", str(out)]) == 0
    assert read_manifest(out / "pawsx")["counts"]["test"] == {"de": 2, "sw": 2, "zh-hans": 2}
    assert load_split(out, "pawsx", "test", "zh-hans")[1]["label"] == "0"
    # fine-tuning tests the paper's languages first, then every other one present
    assert test_langs(out, get_task("pawsx")) == ["de", "sw", "zh-hans"]
    only = tmp_path / "only"
    assert main(["--task", "pawsx", "--src", str(d), "--out", str(only), "--langs", "sw,en"]) == 0
    assert read_manifest(only / "pawsx")["counts"]["test"] == {"sw": 2}
    with pytest.raises(TaskDataError, match=r"no data for language\(s\) yo \(found: de, en, sw, zh-hans\)"):
        load_task("pawsx", d, LangChoice(frozenset({"yo"})))


def test_matis_file_names_with_any_language_code(tmp_path):
    src, expected, _ = fx.write_matis(tmp_path)
    base = src / "data" / "train_dev_test"
    (base / "test_PT-BR.tsv").write_bytes((base / "test_DE.tsv").read_bytes())
    data = load_task("matis", src)
    assert len(data.records[("test", "pt-br")]) == expected[("test", "de")]
