"""Resume on another number of ranks and workers, through the real ``deepspeed`` launcher on CPU (gloo).

Train on 2 ranks x 2 DataLoader workers, ``kill -9`` at a checkpoint, resume on 1 rank x 1 worker (twice the
accumulation: the same global batch), ``kill -9`` again, resume on 2 ranks x 0 workers. Every rank logs the
(stream position, sentence id) of each sentence it hands out (``DS_KD_SENTENCE_LOG``); the optimizer step of a
position is ``position // global batch + 1``. Runs pack sentences into rows (the default), so a position is a
row of the stream and the global batch counts rows; one test runs unpacked (``--packing off``).
The pieces kept by the checkpoints must give exactly the
uninterrupted run's sequence of (step, sentence id): no sentence twice, none dropped.

Loss tolerance. The resumed runs compute the same micro-batches (same sentences, masks and dropout, which
follow the data position) on the same weights, and with one thread per rank a run on 1 rank with twice the
accumulation gives bitwise the losses of one on 2 ranks (checked in fp32 under ZeRO-3 and in bf16 under
ZeRO-2 on a CPU with native bf16: all 12 steps equal, and so are the resumed runs'; a CPU without it trains the
ZeRO-2 runs in fp32). What may differ is the order of the sum in the
global gradient norm (seen at 1e-15 relative), which feeds clipping: the tests allow 1e-6 relative. Without
the repair of DeepSpeed's ZeRO-3 universal loader (ds_kd.train.checkpoint) the losses drift by 3e-4 within three
steps of the resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import deepspeed_cmd, run_cmd, run_until_checkpoint, tail
from ds_kd.logbook import read_metrics
from ds_kd.data.reader import SENTENCE_LOG_ENV
from ds_kd.train.engine import CPU_BF16_ENV
from tests.distill.test_distill_launch import make_teacher

STEPS, MICRO, GLOBAL = 12, 8, 16
FP32 = ["--ds-override", "fp16.enabled=false"]  # the JSONs ask for fp16; on CPU that would fall back to bf16


def pretrain_args(corpus: Path, out: Path, config: str, ranks: int, workers: int, *extra: str) -> list[str]:
    return ["launch/pretrain.py", "--deepspeed_config", f"ds_configs/{config}.json", "--model", "tiny-base",
            "--data", str(corpus), "--out", str(out), "--max-steps", str(STEPS),
            "--ds-override", f"train_micro_batch_size_per_gpu={MICRO}",
            "--ds-override", f"gradient_accumulation_steps={GLOBAL // (MICRO * ranks)}",
            "--num-workers", str(workers), "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "2",
            "--max-len", "64", "--save-every", "3", "--seed", "7", *extra]


def launch(args: list[str], ranks: int) -> list[str]:
    return deepspeed_cmd(args[0], args[1:], num_ranks=ranks)


def env_logging_to(directory: Path) -> dict:
    return {**os.environ, SENTENCE_LOG_ENV: str(directory), "OMP_NUM_THREADS": "1"}


def sentence_log(directory: Path) -> dict[tuple[int, int], int]:
    """(stream position, k) -> sentence id over every rank's training log: the k-th sentence of a position. With
    packing (the default) a position is a row of the stream holding several sentences; unpacked, one sentence.
    A position handed out by two ranks, or twice, is an error."""
    out: dict[tuple[int, int], int] = {}
    for path in sorted(directory.glob("train-rank*.tsv")):
        seen: dict[int, int] = {}
        for line in path.read_text().splitlines():
            position, sid = map(int, line.split("\t"))
            k = seen[position] = seen.get(position, -1) + 1
            assert (position, k) not in out, f"{path}: position {position} handed out twice"
            out[(position, k)] = sid
    return out


def steps_and_sentences(positions: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    return [(p // GLOBAL + 1, positions[(p, k)]) for p, k in sorted(positions)]


def step_metrics(run_dir: Path) -> dict[int, dict]:
    return {r["optimizer_step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def check_pieces(pieces: list[tuple[Path, int, int]], reference: dict[int, int]) -> None:
    """Each (log dir, first step, last step) piece hands out exactly the positions of its steps (when it was
    killed: those up to its checkpoint are kept), and together they are the uninterrupted run's sequence."""
    kept: dict[int, int] = {}
    for directory, first, last in pieces:
        log = sentence_log(directory)
        assert min(log)[0] == first * GLOBAL, f"{directory}: resumed at position {min(log)}, saved at {first * GLOBAL}"
        kept.update({p: s for p, s in log.items() if p[0] < last * GLOBAL})
    assert sorted({p for p, _ in reference}) == list(range(STEPS * GLOBAL))
    assert steps_and_sentences(kept) == steps_and_sentences(reference)  # 0 duplicated, 0 dropped


def check_losses(got: dict[int, dict], want: dict[int, dict], rel: float, terms=("loss",)) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        for term in terms:
            assert got[step][term] == pytest.approx(want[step][term], rel=rel), (step, term)


@pytest.fixture(scope="module")
def uninterrupted_zero3(tiny_corpus, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("whole3")
    proc = run_cmd(launch(pretrain_args(tiny_corpus, root / "run", "zero3", 2, 2, *FP32), 2),
                   env=env_logging_to(root / "log"), timeout=600)
    assert proc.returncode == 0, tail(proc)
    return root / "run", root / "log"


def test_pretraining_resumes_on_1_rank_then_2_ranks_0_workers_exactly_once(uninterrupted_zero3, tiny_corpus,
                                                                           tmp_path):
    whole, whole_log = uninterrupted_zero3
    out = tmp_path / "run"
    saved1 = run_until_checkpoint(launch(pretrain_args(tiny_corpus, out, "zero3", 2, 2, *FP32), 2), out, 3,
                                  timeout=400, env=env_logging_to(tmp_path / "log1"))
    saved2 = run_until_checkpoint(launch(pretrain_args(tiny_corpus, out, "zero3", 1, 1, *FP32, "--resume"), 1),
                                  out, saved1 + 3, timeout=400, env=env_logging_to(tmp_path / "log2"))
    assert saved1 < saved2 < STEPS
    last = run_cmd(launch(pretrain_args(tiny_corpus, out, "zero3", 2, 0, *FP32, "--resume"), 2),
                   env=env_logging_to(tmp_path / "log3"), timeout=600)
    assert last.returncode == 0, tail(last)
    assert "as a universal checkpoint" in last.stderr  # 1 rank -> 2 ranks
    check_pieces([(tmp_path / "log1", 0, saved1), (tmp_path / "log2", saved1, saved2),
                  (tmp_path / "log3", saved2, STEPS)], sentence_log(whole_log))
    check_losses(step_metrics(out), step_metrics(whole), rel=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val"]["val_ppl"] == pytest.approx(
        json.loads((whole / "manifest.json").read_text())["val"]["val_ppl"], rel=1e-6)


def test_zero2_unpacked_resumes_on_1_rank_exactly_once(tiny_corpus, tmp_path):
    """bf16 (fp32 on a CPU without native bf16): the 1-rank resume sums each step's two micro-batch gradients where the 2-rank run all-reduces them,
    and the global norm (which feeds clipping) in another order: seen at 1e-5 relative by step 11, so 1e-4."""
    off = ("--packing", "off")
    whole = tmp_path / "whole"
    proc = run_cmd(launch(pretrain_args(tiny_corpus, whole, "zero2", 2, 2, *off), 2),
                   env=env_logging_to(tmp_path / "whole_log"), timeout=600)
    assert proc.returncode == 0, tail(proc)
    out = tmp_path / "run"
    saved = run_until_checkpoint(launch(pretrain_args(tiny_corpus, out, "zero2", 2, 2, *off), 2), out, 3,
                                 timeout=400, env=env_logging_to(tmp_path / "log1"))
    assert saved < STEPS
    resumed = run_cmd(launch(pretrain_args(tiny_corpus, out, "zero2", 1, 1, *off, "--resume"), 1),
                      env=env_logging_to(tmp_path / "log2"), timeout=600)
    assert resumed.returncode == 0, tail(resumed)
    assert "as a universal checkpoint" in resumed.stderr
    check_pieces([(tmp_path / "log1", 0, saved), (tmp_path / "log2", saved, STEPS)],
                 sentence_log(tmp_path / "whole_log"))
    check_losses(step_metrics(out), step_metrics(whole), rel=1e-4)


def test_impossible_resumes_are_refused_before_the_engine_is_built(uninterrupted_zero3, tiny_corpus, tmp_path):
    whole, _ = uninterrupted_zero3
    out = tmp_path / "run"
    shutil.copytree(whole / "checkpoints", out / "checkpoints")  # a run killed at its last checkpoint
    # Each is refused before the engine is built, by the resume check (which says how to keep the setting) or,
    # where the setting is one the run recorded, by the re-run rule (which names it); either names the setting.
    cases = {  # run as one process: 1 rank
        "global batch": (pretrain_args(tiny_corpus, out, "zero3", 2, 1, *FP32, "--resume"),  # 2-rank accumulation
                         "global batch of 2 ranks x micro batch 8 x accumulation 1 = 16 sequences .*, this run's is "
                         "1 ranks x micro batch 8 x accumulation 1 = 8.*gradient_accumulation_steps=2"
                         "|global_batch: 16 -> 8"),
        "zero stage": (pretrain_args(tiny_corpus, out, "zero2", 1, 1, *FP32, "--resume"),
                       "ZeRO stage 3, this run uses stage 2.*zero_optimization.stage=3"
                       "|zero_optimization.stage: 3 -> 2"),
        "precision": (pretrain_args(tiny_corpus, out, "zero3", 1, 1, "--resume"),
                      "written in fp32, this run trains in bf16|fp16.enabled: false -> true"),
        "max len": (pretrain_args(tiny_corpus, out, "zero3", 1, 1, *FP32, "--resume", "--max-len", "32"),
                    "max_len: saved 64, now 32|max_len: 64 -> 32"),
    }
    for name, (args, message) in cases.items():
        start = time.time()
        # bf16 as on a CPU that has it natively: without it the JSON's fp16 falls back to fp32, the checkpoint's
        # own precision, and the precision case would be no change at all
        proc = run_cmd([sys.executable, *args], timeout=300, env={**os.environ, CPU_BF16_ENV: "1"})
        assert proc.returncode == 2, (name, tail(proc))
        assert re.search(message, proc.stderr), (name, tail(proc))
        assert "engine: {" not in proc.stderr, name  # refused before the engine was built
        assert time.time() - start < 120, name


@pytest.fixture(scope="module")
def teacher(tiny_corpus, tmp_path_factory) -> Path:
    return make_teacher(tiny_corpus, tmp_path_factory.mktemp("teacher") / "tiny-large")


def distill_args(corpus: Path, teacher: Path, out: Path, ranks: int, workers: int, *extra: str) -> list[str]:
    args = pretrain_args(corpus, out, "zero3", ranks, workers, *FP32, "--teacher-dtype", "fp32", *extra)
    model = args.index("--model")
    return ["launch/distill.py", *args[1:model], "--teacher", str(teacher), "--student", "tiny-leanbert",
            *args[model + 2:]]


def test_distillation_resumes_on_1_rank_exactly_once(tiny_corpus, teacher, tmp_path):
    whole = tmp_path / "whole"
    proc = run_cmd(launch(distill_args(tiny_corpus, teacher, whole, 2, 2), 2),
                   env=env_logging_to(tmp_path / "whole_log"), timeout=600)
    assert proc.returncode == 0, tail(proc)
    out = tmp_path / "run"
    saved = run_until_checkpoint(launch(distill_args(tiny_corpus, teacher, out, 2, 2), 2), out, 3, timeout=400,
                                 env=env_logging_to(tmp_path / "log1"))
    assert saved < STEPS
    resumed = run_cmd(launch(distill_args(tiny_corpus, teacher, out, 1, 1, "--resume"), 1),
                      env=env_logging_to(tmp_path / "log2"), timeout=600)
    assert resumed.returncode == 0, tail(resumed)
    assert "as a universal checkpoint" in resumed.stderr
    check_pieces([(tmp_path / "log1", 0, saved), (tmp_path / "log2", saved, STEPS)],
                 sentence_log(tmp_path / "whole_log"))
    check_losses(step_metrics(out), step_metrics(whole), rel=1e-6,
                 terms=("loss", "loss_mlm", "loss_output", "loss_hidden", "loss_attention"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher_digest"] == manifest["teacher_digest_after"]


def test_a_checkpoint_without_run_state_is_refused_naming_it(tmp_path):
    from ds_kd.train import checkpoint

    assert checkpoint.plan_resume(tmp_path, {}, "AdamW") is None  # nothing to resume: a fresh start
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "rank00000.pt").write_bytes(b"")  # the per-rank files of older versions
    (tmp_path / "latest").write_text("step00000004\n")
    with pytest.raises(ValueError, match=r"step00000004/run_state.json is missing.*older version"):
        checkpoint.plan_resume(tmp_path, {}, "AdamW")
