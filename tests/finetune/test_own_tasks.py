"""Tasks of one's own in plain files (TSV and JSONL classification, CoNLL tagging): written by ``python -m
data_prep tasks --task own``, fine-tuned by ``launch/finetune.py``, run by ``launch/grid.py`` beside a benchmark
and reported."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script
from data_prep.tasks.cli import main as tasks_main
from ds_kd.errors import UsageError
from ds_kd.eval.report import ZERO_SHOT, write_report
from ds_kd.data.tasks import get_task, load_split
from tests.helpers.finetune_fixtures import make_model_dir, pair_records, tagging_records, write_task_data

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--batch-size", "8", "--eval-batch-size", "16", "--max-len", "32", "--threads", "1"]


def write_own_sources(root: Path) -> dict[str, Path]:
    """Three tasks in en (train, dev, test) and fr (test): one-sentence TSV, sentence-pair JSONL, CoNLL."""
    sources = {name: root / name for name in ("mood", "stance", "ner")}
    for folder in sources.values():
        folder.mkdir(parents=True)
    for split, lang, num, seed in (("train", "en", 12, 1), ("dev", "en", 4, 2), ("test", "en", 4, 3),
                                   ("test", "fr", 5, 4)):
        pairs = pair_records(num, seed)
        (sources["mood"] / f"{split}.{lang}.tsv").write_text(
            "".join(f"{r['text_b']}\t{'pos' if r['label'] == '1' else 'neg'}\n" for r in pairs), encoding="utf-8")
        (sources["stance"] / f"{split}.{lang}.jsonl").write_text(
            "".join(json.dumps({"text_a": r["text_a"], "text_b": r["text_b"], "label": r["label"]}) + "\n"
                    for r in pairs), encoding="utf-8")
        (sources["ner"] / f"{split}.{lang}.conll").write_text(
            "-DOCSTART- O\n\n" + "".join("".join(f"{t} {g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n"
                                         for r in tagging_records(num, seed)), encoding="utf-8")
    return sources


def test_own_tasks_are_written_fine_tuned_run_by_the_grid_and_reported(tmp_path):
    sources = write_own_sources(tmp_path / "src")
    data = tmp_path / "data"
    write_task_data(data, "pawsx", "pair", ["en", "fr"], num_train=8, num_eval=4)  # a benchmark beside them
    for name, src in sources.items():
        assert tasks_main(["--task", "own", "--name", name, "--src", str(src), "--out", str(data)]) == 0
    mood = load_split(data, "mood", "test", "fr")
    assert len(mood) == 5 and set(mood[0]) == {"id", "text_a", "label"} and mood[0]["label"] in ("pos", "neg")
    assert set(load_split(data, "stance", "train", "en")[0]) == {"id", "text_a", "text_b", "label"}
    ner = load_split(data, "ner", "dev", "en")
    assert ner[0]["tokens"] == tagging_records(4, 2)[0]["tokens"] and ner[0]["tags"] == tagging_records(4, 2)[0]["tags"]
    assert [(get_task(n, data).kind, get_task(n, data).metric) for n in sources] == \
        [("pair", "accuracy"), ("pair", "accuracy"), ("tagging", "f1")]

    model = make_model_dir(tmp_path / "model", "tiny-leanbert", seed=1)
    out = tmp_path / "job"
    assert load_script("finetune").main(["--model", str(model), "--task", "mood", "--data", str(data),
                                         "--out", str(out), "--device", "cpu", *TINY]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["metric"] == "accuracy" and sorted(result["scores"]) == ["en", "fr"]
    assert result["zero_shot_langs"] == ["fr"] and result["zero_shot_avg"] == result["scores"]["fr"]["accuracy"]
    assert result["num_train"] == 12 and result["labels"] == {"classes": ["neg", "pos"], "tags": [], "ontology": []}

    grid_script = load_script("grid")
    assert grid_script.parse_args(["--models", f"lean={model}", "--data", str(data), "--out", "g"]).tasks == \
        ["pawsx", "mood", "ner", "stance"]  # by default every task under --data: the benchmarks, then one's own
    grid = tmp_path / "grid"
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), "--models", f"lean={model}",
                          "--data", str(data), "--out", str(grid), "--tasks", "mood,ner", "--seeds", "1",
                          "--workers", "2", *TINY[:-2]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    done = {json.loads(p.read_text())["task"] for p in (grid / "jobs").rglob("result.json")}
    assert done == {"mood", "ner"}
    write_report(grid)
    report = (grid / "report" / "report.md").read_text()
    assert "### ner (span F1) per language" in report and "### mood (accuracy) per language" in report
    with open(grid / "report" / "task_ner.csv", newline="") as f:
        cells = {row["column"]: row for row in csv.DictReader(f)}
    ner = json.loads(next((grid / "jobs").rglob("ner/seed1/result.json")).read_text())
    assert float(cells["fr"]["mean"]) == pytest.approx(100 * ner["scores"]["fr"]["f1"])
    assert float(cells[ZERO_SHOT]["mean"]) == pytest.approx(100 * ner["zero_shot_avg"])


def test_own_task_files_that_do_not_fit_their_format_are_named(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.en.tsv").write_text("a good film\tpos\nbad\n", encoding="utf-8")
    assert tasks_main(["--task", "own", "--name", "mood", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert f"{src / 'train.en.tsv'}:2: expected text<TAB>label" in capsys.readouterr().err
    (src / "train.en.tsv").write_text("a good film\tpos\nanother\tfilm\tneg\n", encoding="utf-8")
    assert tasks_main(["--task", "own", "--name", "mood", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert f"{src / 'train.en.tsv'}:2: one text here but two" in capsys.readouterr().err
    assert tasks_main(["--task", "own", "--name", "xnli", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "not a benchmark's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tasks_main(["--task", "own", "--src", str(src), "--out", str(tmp_path / "o")])
    assert "--task own needs it" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"unknown task 'mood': not one of .* nor a task of one's own under "
                                         f"{tmp_path / 'o'}"):
        get_task("mood", tmp_path / "o")


def build(src: Path, out: Path, *extra: str) -> int:
    return tasks_main(["--task", "own", "--name", "mood", "--src", str(src), "--out", str(out), *extra])


def write_files(src: Path, files: dict[str, str]) -> Path:
    src.mkdir(exist_ok=True)
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    return src


MOOD = {"train.en.tsv": "a good film\tpos\na bad film\tneg\n", "dev.en.tsv": "fine\tpos\n",
        "test.fr.tsv": "bon\tpos\nmauvais\tneg\n"}


def test_an_own_task_without_english_train_rows_or_dev_is_refused_when_built(tmp_path, capsys):
    src = write_files(tmp_path / "src", {**MOOD, "train.en.tsv": ""})
    assert build(src, tmp_path / "o") == 2
    assert f"{src / 'train.en.tsv'}: no rows: an empty train split" in capsys.readouterr().err
    (src / "train.en.tsv").write_text(MOOD["train.en.tsv"], encoding="utf-8")
    (src / "test.fr.tsv").write_text("\n\n", encoding="utf-8")
    assert build(src, tmp_path / "o") == 2
    assert f"{src / 'test.fr.tsv'}: no rows: an empty test split" in capsys.readouterr().err
    (src / "test.fr.tsv").write_text(MOOD["test.fr.tsv"], encoding="utf-8")
    (src / "dev.en.tsv").rename(src / "dev.de.tsv")
    assert build(src, tmp_path / "o") == 2
    assert f"{src}: no English dev split (dev.en.tsv): model selection" in capsys.readouterr().err
    (src / "dev.de.tsv").rename(src / "dev.en.tsv")
    assert build(src, tmp_path / "o", "--langs", "fr") == 2
    assert "no English dev split (dev.en.tsv) (--langs leaves it out)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "mood" / "manifest.json").exists()
    assert build(src, tmp_path / "o") == 0


@pytest.mark.parametrize("name,text,line,what", [
    ("test.fr.tsv", "bon\tpos\nneutre\tmeh\n", 2, "label 'meh' is not among English train's (neg, pos)"),
    ("dev.en.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "so so", "label": "mixed"}\n', 2,
     "label 'mixed' is not among English train's"),
])
def test_an_own_task_refuses_dev_and_test_labels_train_never_has(tmp_path, capsys, name, text, line, what):
    ext = name.rsplit(".", 1)[1]
    files = {"tsv": MOOD, "jsonl": {
        "train.en.jsonl": '{"text": "a good film", "label": "pos"}\n{"text": "a bad film", "label": "neg"}\n',
        "dev.en.jsonl": '{"text": "fine", "label": "pos"}\n'}}[ext]
    src = write_files(tmp_path / "src", {**files, name: text})
    assert build(src, tmp_path / "o") == 2
    assert f"{src / name}:{line}: {what}" in capsys.readouterr().err


NER = {"train.en.conll": "John B-PER\nSmith I-PER\nwent O\n\nParis B-LOC\n", "dev.en.conll": "Mary B-PER\n",
       "test.de.conll": "Anna B-PER\nin O\nBerlin B-LOC\n"}


@pytest.mark.parametrize("name,text,line,what", [
    ("test.de.conll", "Anna B-PER\nin O\nBerlin X-LOC\n", 3, "tag 'X-LOC' is not BIO"),
    ("train.en.conll", "John B-PER\nSmith I-PER\n\nParis B-LOC\nrocks o\n", 5, "tag 'o' is not BIO"),
    ("dev.en.conll", "-DOCSTART- O\n\nMary B-PER\nat O\nAcme I-ORG\n", 5,
     "tag 'I-ORG': English train has no ORG entity (as B- or I-; its types: LOC, PER)"),
    ("test.de.conll", "Siemens B-ORG\n", 1, "tag 'B-ORG': English train has no ORG entity"),
])
def test_an_own_tagging_task_refuses_tags_that_are_not_bio_or_of_a_type_train_never_has(tmp_path, capsys, name,
                                                                                          text, line, what):
    src = write_files(tmp_path / "src", {**NER, name: text})
    assert build(src, tmp_path / "o") == 2
    assert f"{src / name}:{line}: {what}" in capsys.readouterr().err
    (src / name).write_text(NER[name], encoding="utf-8")
    assert build(src, tmp_path / "o") == 0
    assert load_split(tmp_path / "o", "mood", "test", "de")[0]["tags"] == ["B-PER", "O", "B-LOC"]


@pytest.mark.parametrize("stray", ["trian.en.tsv", "dev_de.tsv", "Test.fr.tsv", "train.en.txt", "test.tsv"])
def test_an_own_task_refuses_task_files_not_named_split_lang_ext(tmp_path, capsys, stray):
    src = write_files(tmp_path / "src", {**MOOD, stray: "un film\tpos\n", "README.md": "my task\n",
                                         ".hidden.tsv": "x\tpos\n"})
    assert build(src, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{src}: {stray}: not named <split>.<lang>.<ext> (split: train, dev, test; ext: tsv, jsonl, conll)" in err
    assert "README" not in err
    (src / stray).unlink()
    assert build(src, tmp_path / "o") == 0  # a README and hidden files are passed over
