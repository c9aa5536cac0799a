"""W&B beyond training curves: when asked for, the grid's and a job's fine-tuning results and the report's tables
reach an (offline) W&B run as tables whose cells equal the result.json files; when not asked for, nothing does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.test_report import ROWS, grid, mean_std  # noqa: F401  (the report tests' fixture grid)

from ds_kd.logbook import WANDB_ID_FILE, WandbConfig, log_results
from ds_kd.eval.report import job_tables

ROOT = Path(__file__).resolve().parents[2]


def table_of(run_dir: Path, key: str) -> list[dict]:
    files = list(run_dir.glob(f"wandb/offline-run-*/files/media/table/{key}_*.table.json"))
    assert len(files) == 1, (key, files)
    table = json.loads(files[0].read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_job_tables_hold_every_job_language_and_epoch(grid):
    root, results = grid
    tables = job_tables(root)
    jobs = {(r[0], r[1], r[2]): dict(zip(tables["finetune/jobs"].columns, r)) for r in tables["finetune/jobs"].rows}
    assert len(jobs) == len(results)
    for r in results:
        row = jobs[r["model"], r["task"], r["seed"]]
        assert row["en"] == r["en"] and row["zero_shot_avg"] == r["zero_shot_avg"] and row["metric"] == r["metric"]
    scores = tables["finetune/scores"]
    assert len(scores.rows) == sum(len(m) for r in results for m in r["scores"].values())
    r = results[0]
    assert [r["model"], r["task"], r["seed"], "ja", r["metric"], r["scores"]["ja"][r["metric"]]] in scores.rows


def test_results_reach_wandb_only_when_asked(grid, tmp_path, monkeypatch):
    root, results = grid
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the conftest's "disabled" would hide the default
    assert not log_results(root, WandbConfig(), "finetune", {}, job_tables(root))
    assert not (root / "wandb").exists() and not (root / WANDB_ID_FILE).exists()

    assert log_results(root, WandbConfig(mode="offline"), "finetune", {}, job_tables(root))
    rows = table_of(root, "finetune/jobs")
    assert {(r["model"], r["task"], r["seed"], r["en"]) for r in rows} == \
        {(r["model"], r["task"], r["seed"], r["en"]) for r in results}
    run_id = (root / WANDB_ID_FILE).read_text().strip()
    assert len(list((root / "wandb").glob(f"offline-run-*-{run_id}"))) == 1


def test_report_command_logs_its_tables_and_charts(grid, tmp_path):
    root, results = grid
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), str(root), "--out", str(out),
                           "--wandb-mode", "offline"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r["model"]: r for r in table_of(out, "report/table5_zero_shot")}
    assert set(rows) == {name for name, _ in ROWS}
    for name, role in ROWS:
        values = [100 * r["zero_shot_avg"] for r in results if r["model"] == name and r["task"] == "xnli"]
        mean, std = mean_std(values)
        assert rows[name]["role"] == role
        assert rows[name]["XNLI"] == pytest.approx(mean) and rows[name]["XNLI seeds"] == len(values)
        assert rows[name]["XNLI std"] == (None if std is None else pytest.approx(std))
    assert float(rows["mLeanBERT"]["XNLI (paper)"]) == 66.09
    images = list(out.glob("wandb/offline-run-*/files/media/images/report/zero_shot_xnli_*.png"))
    assert len(images) == 1


def test_grid_and_finetune_commands_take_the_wandb_flags():
    sys.path.insert(0, str(ROOT / "launch"))
    import finetune
    import grid as grid_cli

    cfg = grid_cli.parse_args(["--models", "a=b", "--data", "d", "--tasks", "xnli", "--out", "o", "--wandb-mode", "offline",
                               "--wandb-group", "exp1"])
    assert cfg.wandb == WandbConfig(None, None, "exp1", "offline")
    job, wandb = finetune.parse_all(["--model", "m", "--task", "xnli", "--data", "d", "--out", "o",
                                     "--wandb-mode", "online"])
    assert wandb.mode == "online" and job.task == "xnli"


def test_job_tables_take_a_task_distillation_history_of_sub_stages(grid, tmp_path):
    """launch/task_distill.py's result.json records sub-stages, not epochs, in dev_history; a grid folder holding
    one (the demo's XtremeDistil jobs) must still give its W&B tables (it stopped the demo's grid stage)."""
    import shutil

    root, _ = grid
    copy = tmp_path / "with_task_distillation"
    shutil.copytree(root, copy)
    path = next(copy.rglob("result.json"))
    r = json.loads(path.read_text())
    r["dev_history"] = [{"sub_stage": "represent:layer_2+layer_1", "trainable": ["layer_2"], "steps": 100,
                         "mean_loss": 0.12, "best_dev": None, "stopped_early": False},
                        {"sub_stage": "logits:head", "steps": 80, "mean_loss": 1.4, "best_dev": 0.25}]
    path.write_text(json.dumps(r))
    rows = [row for row in job_tables(copy)["finetune/dev_history"].rows if row[:3] == [r["model"], r["task"], r["seed"]]]
    assert sorted(rows) == sorted([[r["model"], r["task"], r["seed"], 1, "steps", 100],
                                   [r["model"], r["task"], r["seed"], 1, "mean_loss", 0.12],
                                   [r["model"], r["task"], r["seed"], 2, "steps", 80],
                                   [r["model"], r["task"], r["seed"], 2, "mean_loss", 1.4],
                                   [r["model"], r["task"], r["seed"], 2, "best_dev", 0.25]])
