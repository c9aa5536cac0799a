"""The grid end to end (2 models x 2 tasks x 2 seeds, killed midway and resumed), an ft-distill row through the
grid, and the ft-distill loss: the first stage's own functions, a student that moves towards its teacher."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ds_kd.distill import losses
from ds_kd.distill.module import DistillConfig, build_projections, intermediate_terms
from ds_kd.finetune import TaskModel, build_labels, collate, encode_records, freeze_embeddings
from ds_kd.finetune import distill as ft_distill
from ds_kd.eval.grid import build_rows, plan, run_grid, GridConfig
from ds_kd.manifest import write_manifest
from ds_kd.models.model import BertForMaskedLM
from ds_kd.eval.report import write_report
from tests.helpers.finetune_fixtures import RECORDS, broken_model_dirs, make_model_dir, write_task_data

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--batch-size", "8", "--eval-batch-size", "16", "--max-len", "32"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"base": make_model_dir(root / "base", "tiny-base", seed=0),
            "lean": make_model_dir(root / "lean", "tiny-leanbert", seed=1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task_data(root, "pawsx", "pair", ["en", "fr", "de"], num_train=8, num_eval=4)
    write_task_data(root, "wikiann", "tagging", ["en", "fr"], num_train=8, num_eval=4)
    return root


def grid_command(encoders, data, out, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "grid.py"), "--models", f"mBERT8={encoders['base']}",
            f"mLeanBERT={encoders['lean']}", "--data", str(data), "--out", str(out), *TINY, *extra]


def results(out: Path) -> dict[Path, tuple[float, str]]:
    return {p: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "jobs").rglob("result.json")}


def test_grid_runs_every_job_once_and_resumes_after_a_kill(encoders, data, tmp_path):
    out = tmp_path / "grid"
    cmd = grid_command(encoders, data, out, "--tasks", "pawsx", "wikiann", "--seeds", "1", "2", "--workers", "1")
    # The grid and its job processes share one process group: SIGKILL to the group is a crash of the machine's
    # view of the grid (no cleanup runs), taken as soon as the first job has finished.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not results(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = results(out)
    assert 1 <= len(before) < 8, f"kill came too late or too early: {len(before)} results"

    second = subprocess.run(cmd[:-2] + ["--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"8 jobs: {len(before)} were done before, {8 - len(before)} finished now, 0 failed" in second.stdout
    after = results(out)
    assert len(after) == 8
    for path, stamp in before.items():
        assert after[path] == stamp, f"{path} was run again"
    seen = {(r["model"], r["task"], r["seed"]) for r in map(lambda p: json.loads(p.read_text()), after)}
    assert seen == {(m, t, s) for m in ("mBERT8", "mLeanBERT") for t in ("pawsx", "wikiann") for s in (1, 2)}

    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "8 were done before, 0 finished now" in third.stdout
    assert results(out) == after
    plan_json = json.loads((out / "grid.json").read_text())  # plain model directories: no run says who teaches
    assert {r["name"]: r["role"] for r in plan_json["rows"]} == {"mBERT8": "baseline", "mLeanBERT": "baseline"}

    # The report of this grid: Table 5's cells are the mean and sample std of the jobs' zero-shot averages.
    write_report(out)
    with open(out / "report" / "table5_zero_shot.csv", newline="") as f:
        cells = {(r["model"], r["column"]): r for r in csv.DictReader(f)}
    for model in ("mBERT8", "mLeanBERT"):
        for task, column in (("pawsx", "PAWS-X"), ("wikiann", "WikiANN")):
            values = [100 * json.loads(p.read_text())["zero_shot_avg"]
                      for p in (out / "jobs" / model / task).glob("seed*/result.json")]
            assert float(cells[model, column]["mean"]) == pytest.approx(statistics.mean(values))
            assert float(cells[model, column]["std"]) == pytest.approx(statistics.stdev(values))


def test_ft_distill_row_runs_after_its_teacher_and_failures_exit_nonzero(encoders, data, tmp_path):
    out = tmp_path / "grid"
    run = subprocess.run(grid_command(encoders, data, out, "--tasks", "pawsx", "--seeds", "3", "--workers", "2",
                                      "--ft-distill", "mLeanBERT=mBERT8", "--kd-temperature", "2"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    job = out / "jobs" / "mLeanBERT_ft-distill" / "pawsx" / "seed3"
    teacher = out / "jobs" / "mBERT8" / "pawsx" / "seed3"
    result = json.loads((job / "result.json").read_text())
    assert result["model"] == "mLeanBERT (ft-distill)" and result["task"] == "pawsx"
    info = json.loads((job / "distill.json").read_text())
    assert info["teacher"] == str(teacher / "model") and info["config"]["temperature"] == 2.0
    assert info["layer_map"] == [3, 6]  # tiny-base 6 layers -> tiny-leanbert 2 layers
    # The teacher's model was saved (and before the student started: the student read it).
    assert (teacher / "model" / "task_model.json").is_file()
    assert (teacher / "result.json").stat().st_mtime < (job / "result.json").stat().st_mtime

    # A job that fails (a task whose folder has a manifest but no train file) is reported with its log, and the
    # grid exits non-zero.
    bad_data = shutil.copytree(data, tmp_path / "bad-data")
    write_manifest(bad_data / "xnli", "tasks", task="xnli")
    bad = subprocess.run(grid_command(encoders, bad_data, tmp_path / "bad", "--tasks", "xnli", "--seeds", "1",
                                      "--workers", "2", "--ft-distill", "mLeanBERT=mBERT8"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "3 failed" in bad.stdout and "log.txt" in bad.stdout and "its teacher job" in bad.stdout
    log = (tmp_path / "bad" / "jobs" / "mBERT8" / "xnli" / "seed1" / "log.txt").read_text()
    assert "no train data for xnli/en" in log and "(forked) ds_kd.eval.grid --job" in log  # the fork server's job
    # --no-fork-server: a fresh interpreter per job, the same failure in the same log
    fresh = subprocess.run(grid_command(encoders, bad_data, tmp_path / "fresh", "--tasks", "xnli", "--seeds", "1",
                                       "--workers", "1", "--no-fork-server"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 1 and "1 failed" in fresh.stdout
    log = (tmp_path / "fresh" / "jobs" / "mBERT8" / "xnli" / "seed1" / "log.txt").read_text()
    assert "no train data for xnli/en" in log and f"{sys.executable} -m ds_kd.eval.grid --job" in log


def test_grid_reruns_the_jobs_whose_settings_changed_and_keeps_the_others(encoders, data, tmp_path):
    out = tmp_path / "grid"
    first = subprocess.run(grid_command(encoders, data, out, "--tasks", "pawsx", "wikiann", "--seeds", "1",
                                        "--workers", "2"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    before = results(out)
    assert len(before) == 4
    # --epochs 2 for PAWS-X only: its two jobs (one per model) were made with --epochs 1, so they run again;
    # the WikiANN jobs are not touched.
    second = subprocess.run(grid_command(encoders, data, out, "--tasks", "pawsx", "--seeds", "1", "--workers", "2",
                                         "--epochs", "2"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 jobs: 0 were done before, 2 finished now, 0 failed" in second.stdout
    assert second.stdout.count("settings changed since its last run (finetune.epochs: 1 -> 2)") == 2
    after = results(out)
    for path, stamp in before.items():
        result = json.loads(after[path][1])
        if "/pawsx/" in str(path):
            assert after[path] != stamp and len(result["dev_history"]) == 2 and result["config"]["epochs"] == 2
        else:
            assert after[path] == stamp, f"{path} was run again"
    # The same command again: nothing to do.
    third = subprocess.run(grid_command(encoders, data, out, "--tasks", "pawsx", "--seeds", "1", "--workers", "2",
                                        "--epochs", "2"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "2 were done before, 0 finished now" in third.stdout and results(out) == after


def test_in_process_grid_leaves_no_fork_server_and_counts_its_jobs_cpu(encoders, data, tmp_path):
    """run_grid forks its jobs from a fork server and stops it at the end: no server outlives the grid, and the
    jobs' CPU time reaches this process's children (what the demo's per-stage CPU seconds read)."""
    import resource
    from multiprocessing import forkserver

    rows = build_rows([("mLeanBERT", str(encoders["lean"]))])
    cfg = GridConfig(rows, ["pawsx"], str(data), [1], str(tmp_path / "grid"), workers=1, threads=1,
                     finetune={"epochs": 1, "batch_size": 8, "max_len": 32})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_grid(cfg, poll_seconds=0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.num_done == 1 and not result.failed
    assert forkserver._forkserver._forkserver_pid is None
    job_seconds = json.loads(next((tmp_path / "grid" / "jobs").rglob("result.json")).read_text())["seconds"]
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) >= job_seconds / 2


def test_grid_refuses_a_model_directory_without_its_tokenizer(encoders, data, tmp_path):
    for name, broken in broken_model_dirs(tmp_path).items():
        out = tmp_path / f"grid-{name}"
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), "--models",
                               f"mBERT8={encoders['base']}", f"Broken={broken}", "--data", str(data), "--out",
                               str(out), "--tasks", "pawsx", "--seeds", "1", *TINY],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert str(broken) in proc.stderr and "--models Broken" in proc.stderr
        assert not (out / "jobs").exists()  # refused before any job started


def test_plan_counts_and_orders_teachers_first(encoders, tmp_path):
    rows = build_rows([("mBERT8", "a"), ("Vanilla mLeanBERT", "b"), ("mBERT", "c")],
                      [("Vanilla mLeanBERT", "mBERT8")])
    # No run manifest behind these directories: only the ft-distill pair gives roles.
    assert [(r.name, r.role) for r in rows] == [("mBERT8", "teacher"), ("Vanilla mLeanBERT", "baseline"),
                                                ("mBERT", "baseline"), ("Vanilla mLeanBERT (ft-distill)", "student")]
    jobs = plan(GridConfig(rows, ["xnli", "mtop"], "d", [1, 2, 3], str(tmp_path)))
    assert len(jobs) == 4 * 2 * 3
    assert all(j.save_model for j in jobs[:6]) and {j.row.name for j in jobs[:6]} == {"mBERT8"}
    distilled = [j for j in jobs if j.teacher is not None]
    assert len(distilled) == 6 and all(j.teacher.row.name == "mBERT8" and j.teacher.seed == j.seed
                                       and j.teacher.task == j.task for j in distilled)
    with pytest.raises(ValueError, match="not one of --models"):
        build_rows([("mLeanBERT", "a")], [("mLeanBERT", "mBERT8")])


def test_tasks_default_to_those_with_data_and_a_task_without_data_is_refused_before_any_job(encoders, data,
                                                                                           tmp_path):
    spec = importlib.util.spec_from_file_location("launch_grid", ROOT / "launch" / "grid.py")
    launch_grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_grid)
    cfg = launch_grid.parse_args(["--models", f"m={encoders['base']}", "--data", str(data), "--out", str(tmp_path)])
    assert cfg.tasks == ["pawsx", "wikiann"]  # not all five: xnli, matis and mtop have no data here
    cfg.tasks = ["pawsx", "matis"]
    with pytest.raises(ValueError, match=r"no task data for matis .*matis/manifest.json is missing.*"
                                         r"python -m data_prep tasks --task matis"):
        run_grid(cfg)
    assert not (tmp_path / "jobs").exists()


def fake_run(run: Path, **manifest) -> str:
    """``<run>/export`` of a finished run whose manifest holds ``manifest`` (stage, teacher)."""
    (run / "export").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return str(run / "export")


def test_roles_come_from_the_runs_manifests_not_from_the_names(tmp_path):
    # Names that the old rule read the other way round: "mBERT8" here is a Vanilla pretraining, "Vanilla
    # LeanBERT" the distilled student, "mLeanBERT" the pretrained model that taught it.
    teacher = fake_run(tmp_path / "t", stage="pretrain")
    models = [("mBERT8", fake_run(tmp_path / "v", stage="pretrain")),
              ("Vanilla LeanBERT", fake_run(tmp_path / "kd", stage="distill", teacher=str(Path(teacher).resolve()))),
              ("mLeanBERT", teacher), ("public", str(tmp_path / "hf"))]
    roles = {r.name: r.role for r in build_rows(models)}
    assert roles == {"mBERT8": "baseline", "Vanilla LeanBERT": "student", "mLeanBERT": "teacher",
                     "public": "baseline"}
    # Explicit roles still win.
    assert build_rows(models, roles={"mBERT8": "student"})[0].role == "student"


# ---- the ft-distill loss -----------------------------------------------------------------------------------


def task_models(encoders, kind: str, records: list[dict]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoders["lean"]))
    labels = build_labels(kind, records)
    batch = collate(encode_records(tokenizer, kind, records, labels, max_len=32), kind)
    torch.manual_seed(0)
    teacher = TaskModel(BertForMaskedLM.from_pretrained(encoders["base"]).bert, kind, labels).eval()
    teacher.requires_grad_(False)
    student = TaskModel(BertForMaskedLM.from_pretrained(encoders["lean"]).bert, kind, labels)
    freeze_embeddings(student)
    return teacher, student, batch


def test_ft_distill_loss_is_the_first_stages_functions(encoders):
    # The module uses the shared objects themselves, not copies.
    assert ft_distill.soft_cross_entropy is losses.soft_cross_entropy
    assert ft_distill.intermediate_terms is intermediate_terms and ft_distill.layer_map is losses.layer_map
    records = RECORDS["intent_slot"](6, seed=5)
    teacher, student, batch = task_models(encoders, "intent_slot", records)
    student.eval()  # no dropout: the reference below sees the same logits
    cfg = DistillConfig(temperature=2.0)
    mapped = losses.layer_map(6, 2)
    projections = build_projections(48, 48, 2, cfg)
    loss, logs = ft_distill.ft_distill_loss(student, batch, teacher, cfg, mapped, projections)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True, output_attention_scores=True)
        t = teacher(**batch, output_hidden_states=True, output_attention_scores=True)
        output = sum(losses.soft_cross_entropy(s.logits[k][s.masks[k]], t.logits[k][s.masks[k]], 2.0)
                     for k in ("intents", "tags"))
        inter = intermediate_terms(s.encoder, t.encoder, batch["attention_mask"], mapped, projections, cfg)
    assert logs["task"] == pytest.approx(float(s.loss), rel=1e-5)
    assert logs["output"] == pytest.approx(float(output), rel=1e-5)
    for name in ("embedding", "hidden", "attention"):
        assert logs[name] == pytest.approx(float(inter[name]), rel=1e-5)
    terms = ("task", "output", "embedding", "hidden", "attention")
    assert float(loss.detach()) == pytest.approx(sum(logs[k] for k in terms), rel=1e-5)
    assert loss.requires_grad


@pytest.mark.parametrize("kind", ["pair", "parse"])
def test_student_moves_towards_the_teacher(encoders, kind):
    """With only the output term, a few steps lower the student's soft cross-entropy to the teacher's task
    logits (for mTOP: the decoder's distribution over ontology tokens and pointers at every target step)."""
    teacher, student, batch = task_models(encoders, kind, RECORDS[kind](8, seed=9))
    with torch.no_grad():  # a confident teacher: its freshly initialised head would give near-uniform targets
        for name, p in teacher.named_parameters():
            if not name.startswith("encoder.") and p.ndim == 2:
                p.mul_(25)
    cfg = DistillConfig(mlm_weight=0, output_weight=1, embedding_weight=0, hidden_weight=0, attention_weight=0)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    key = "classes" if kind == "pair" else "parse"

    def kl_to_teacher() -> float:
        """Soft cross-entropy to the teacher minus the teacher's own entropy (its floor)."""
        student.eval()
        with torch.no_grad():
            ce = ft_distill.ft_distill_loss(student, batch, teacher, cfg, [3, 6], nn.ModuleDict())[1]["output"]
            t = teacher(**batch)
            t_logits = t.logits[key][t.masks[key]]
        return ce - float(losses.soft_cross_entropy(t_logits, t_logits))

    start = kl_to_teacher()
    assert start > 0.05
    student.train()
    for _ in range(25):
        loss, logs = ft_distill.ft_distill_loss(student, batch, teacher, cfg, [3, 6], nn.ModuleDict())
        assert set(logs) == {"output", "loss"}  # zero weights: nothing else computed
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl_to_teacher() < 0.5 * start


def test_ft_distill_accepts_a_teacher_with_padded_vocabulary_rows_and_refuses_fewer(encoders, tmp_path):
    """As in the first stage: more embedding rows than the tokenizer (padding) are fine, fewer are not."""
    from dataclasses import replace
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ds_kd.finetune.heads import save_task_model
    from ds_kd.models.model import BertModel

    labels = build_labels("pair", RECORDS["pair"](4, seed=1))
    tokenizer = AutoTokenizer.from_pretrained(str(encoders["lean"]))
    student = TaskModel(BertForMaskedLM.from_pretrained(encoders["lean"]).bert, "pair", labels)
    vocab = student.encoder.config.vocab_size
    job = SimpleNamespace(spec=SimpleNamespace(name="pawsx"), data=SimpleNamespace(labels=labels), model=student,
                          tokenizer=tokenizer, device="cpu")
    for rows in (vocab + 5, vocab - 1):
        save_task_model(TaskModel(BertModel(replace(student.encoder.config, vocab_size=rows)), "pair", labels),
                        tmp_path / str(rows), tokenizer, task="pawsx")
    assert ft_distill.load_teacher(tmp_path / str(vocab + 5), job).encoder.config.vocab_size == vocab + 5
    with pytest.raises(ValueError, match=f"{tmp_path / str(vocab - 1)}: cannot distil .* fewer than the student's"):
        ft_distill.load_teacher(tmp_path / str(vocab - 1), job)


@pytest.mark.parametrize("visible, workers, expected", [
    ("2,3", None, ["2", "3"]),  # SLURM gave this job GPUs 2 and 3 of the node
    ("2,3", 4, ["2", "3", "2", "3"]),
    ("GPU-8f1c2e4a, MIG-5d2b9e01", None, ["GPU-8f1c2e4a", "MIG-5d2b9e01"]),
    (None, None, ["0", "1"]),
])
def test_grid_jobs_run_on_the_gpus_the_grid_was_given(visible, workers, expected, monkeypatch, tmp_path):
    from ds_kd.eval import grid

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(grid, "count_gpus", lambda finetune: 2)  # torch counts the visible GPUs only
    cfg = GridConfig(rows=[], tasks=[], data="", seeds=[], out=str(tmp_path), workers=workers)
    assert grid.worker_layout(cfg)[2] == expected


def test_a_grid_with_no_task_data_or_an_unknown_task_exits_2_naming_what_to_do(tmp_path, capsys):
    from tests.conftest import load_script

    grid = load_script("grid")
    for tasks, said in (([], "no task data under --data"), (["--tasks", "xnlii"], "--tasks: unknown task(s) ['xnlii']")):
        with pytest.raises(SystemExit) as stop:
            grid.parse_args(["--models", f"a={tmp_path}", "--data", str(tmp_path), "--out", str(tmp_path / "g"),
                             *tasks])
        assert stop.value.code == 2 and said in capsys.readouterr().err
