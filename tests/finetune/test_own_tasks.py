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
    assert tasks_main(["--task", "own", "--name", "mood", "--src", str(src), "--out", str(tmp_path / "o")]) == 1
    assert f"{src / 'train.en.tsv'}:2: expected text<TAB>label" in capsys.readouterr().err
    (src / "train.en.tsv").write_text("a good film\tpos\nanother\tfilm\tneg\n", encoding="utf-8")
    assert tasks_main(["--task", "own", "--name", "mood", "--src", str(src), "--out", str(tmp_path / "o")]) == 1
    assert f"{src / 'train.en.tsv'}:2: one text here but two" in capsys.readouterr().err
    assert tasks_main(["--task", "own", "--name", "xnli", "--src", str(src), "--out", str(tmp_path / "o")]) == 1
    assert "not a benchmark's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tasks_main(["--task", "own", "--src", str(src), "--out", str(tmp_path / "o")])
    assert "--task own needs it" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"unknown task 'mood': not one of .* nor a task of one's own under "
                                         f"{tmp_path / 'o'}"):
        get_task("mood", tmp_path / "o")
