"""The console during training: the metric line every --log-every steps, the start banner, and a progress bar
that log lines do not glue onto (none at all when stderr is not a terminal)."""
from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
import time

import pytest
import torch

from tests.eval.test_grid import data, encoders  # noqa: F401 (fixtures of the grid test)
from tests.train.test_train_units import _Fp16Engine, config

# one micro-batch: two unpacked sentences of 3 and 2 real tokens
BATCH = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
         "labels": torch.tensor([[-100, 7, -100], [5, -100, -100]])}


def _loop(tmp_path, engine, max_steps=4, log_every=2, sentences_per_epoch=20):
    from ds_kd.logbook import Logbook, WandbConfig
    from ds_kd.train.loop import LoopConfig, train

    step_fn = lambda eng, b, d: (torch.tensor(1.5), {"mlm": torch.tensor(1.25), "output": torch.tensor(0.25)})
    book = Logbook(tmp_path, True, WandbConfig(mode="disabled"), {}, max_steps)
    try:
        train(engine, iter(lambda: dict(BATCH), None), step_fn, dict, book, tmp_path / "ckpt",
              LoopConfig(max_steps, log_every=log_every, save_every=0, sentences_per_epoch=sentences_per_epoch), 0,
              dict)
    finally:
        book.close()


def test_metric_line_reports_loss_ppl_lr_throughput_epoch_and_fp16_state(tmp_path, caplog):
    from ds_kd.logbook import read_metrics

    caplog.set_level(logging.INFO, logger="ds_kd")
    engine = _Fp16Engine(overflow_at=[2], accumulation=2)  # 4 sentences, 10 real tokens an attempt
    started = time.perf_counter()
    _loop(tmp_path, engine)
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["optimizer_step"] for r in rows] == [2, 4]
    # attempts 1-3 (the 2nd skipped, its sentences read all the same) by step 2, 1-5 by step 4; 20 a epoch
    assert [r["sentences_seen"] for r in rows] == [12, 20] and [r["epoch"] for r in rows] == [0.6, 1.0]
    for r in rows:
        assert r["train_ppl"] == pytest.approx(math.exp(1.25)) and r["loss_output"] == 0.25
        assert r["tokens_per_s"] / r["sentences_per_s"] == pytest.approx(2.5)  # real tokens, not padding
        # two applied steps of 10 real tokens each in the window, timed within the test's own wall time
        assert r["tokens_per_s"] * r["seconds_per_step"] * 2 == pytest.approx(20)
        assert 0 < r["seconds_per_step"] * 4 < wall
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("step ")]
    assert len(lines) == 2
    last = lines[-1]
    assert last.startswith("step 4/4 (epoch 1.000) | loss 1.5 (mlm 1.25, output 0.25) | ppl 3.49 | lr 1.00e-01 | "
                           "grad norm 1 | ")
    tokens_per_s, sentences_per_s = (float(x.replace(",", "")) for x in
                                     re.search(r"([\d,.]+) tokens/s \| ([\d,.]+) sentences/s", last).groups())
    assert tokens_per_s == pytest.approx(rows[-1]["tokens_per_s"], rel=1e-3, abs=1)
    assert sentences_per_s == pytest.approx(rows[-1]["sentences_per_s"], rel=1e-3, abs=0.1)
    assert last.endswith("eta 0:00:00 | loss scale 65536 | 1 skipped steps")


class _Console(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _console_run(tmp_path, monkeypatch, tty: bool) -> str:
    """What a rank-0 process writes to stderr (set up as ds_kd.cli.setup_logging does) during a short loop."""
    console = _Console(tty)
    monkeypatch.setattr(sys, "stderr", console)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        _loop(tmp_path, _Fp16Engine(overflow_at=[], accumulation=1), max_steps=6, log_every=2)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return console.getvalue()


def test_without_a_terminal_there_is_no_progress_bar_only_whole_log_lines(tmp_path, monkeypatch):
    out = _console_run(tmp_path, monkeypatch, tty=False)
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert all(line.startswith("LOG ") for line in lines), lines
    assert [line.split(" | ")[0] for line in lines if " | " in line] == [
        "LOG INFO step 2/6 (epoch 0.200)", "LOG INFO step 4/6 (epoch 0.400)", "LOG INFO step 6/6 (epoch 0.600)"]


def test_on_a_terminal_log_lines_start_a_line_of_their_own_beside_the_bar(tmp_path, monkeypatch):
    out = _console_run(tmp_path, monkeypatch, tty=True)
    assert "\r" in out and "6/6" in out  # the bar is drawn
    starts = [m.start() for m in re.finditer("LOG ", out)]
    assert all(i == 0 or out[i - 1] in "\r\n" for i in starts), [out[max(0, i - 30):i + 20] for i in starts]
    assert len(starts) == 4  # three metric lines and the checkpoint's
    # the bar is redrawn below each line, never left broken: every log line ends with a newline
    assert all(out.index("\n", i) < out.find("\r", i) or out.find("\r", i) == -1 for i in starts)


def test_tiny_run_banner_and_metric_lines_count_sentences_epochs_and_perplexity(tiny_corpus, tmp_path, caplog,
                                                                                monkeypatch):
    from ds_kd.logbook import read_metrics
    from ds_kd.train.pretrain import run
    from ds_kd.data.reader import ReaderConfig, ShardReader

    monkeypatch.setenv("DS_KD_SENTENCE_LOG", str(tmp_path / "sentences"))
    caplog.set_level(logging.INFO, logger="ds_kd")
    run(config(tiny_corpus, tmp_path, max_steps=4, log_every=2, num_workers=0,
               ds_overrides={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}))
    num_train = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    packed = ShardReader(ReaderConfig(shard_dir=str(tiny_corpus / "shards"), split="train", micro_batch_size=8,
                                      seed=1234, max_len=128, packing=True, num_workers=0))
    messages = [r.getMessage() for r in caplog.records]
    banner = next(m for m in messages if m.startswith("training on "))
    assert banner == (f"training on {num_train:,} sentences (train split) for {4 / packed.steps_per_epoch(16):.3g} "
                      f"epochs = 4 optimizer steps; global batch 16 rows (micro batch 8 x accumulation 2 x 1 ranks), "
                      f"up to 2,048 tokens per optimizer step (16 rows x --max-len 128)")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # the sentences the reader handed out, packed several to a row
    read = sum(1 for _ in (tmp_path / "sentences" / "train-rank0.tsv").open())
    assert read > 4 * 16 and rows[-1]["sentences_seen"] == read and 0 < rows[0]["sentences_seen"] < read
    assert [r["epoch"] for r in rows] == pytest.approx([r["sentences_seen"] / num_train for r in rows])
    for r in rows:
        assert r["train_ppl"] == pytest.approx(math.exp(r["loss_mlm"]))
        assert r["grad_norm"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > r["sentences_per_s"] > 0
    lines = [m for m in messages if m.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"step {r['optimizer_step']}/4 (epoch {r['epoch']:.3f})"
                                                        for r in rows] and len(rows) == 2
    assert f"ppl {rows[-1]['train_ppl']:.4g} | lr {rows[-1]['lr']:.2e} | grad norm {rows[-1]['grad_norm']:.3g}" \
        in lines[-1] and "loss scale" not in lines[-1]  # the fp16 JSON falls back to bf16 or fp32 on a CPU


def test_a_grid_off_a_terminal_prints_plain_progress_lines_and_job_logs_hold_no_bars(encoders, data, tmp_path):
    import subprocess

    from tests.eval.test_grid import ROOT, grid_command

    out = tmp_path / "grid"
    run = subprocess.run(grid_command(encoders, data, out, "--tasks", "pawsx", "--seeds", "1", "--workers", "1"),
                         cwd=ROOT, capture_output=True, timeout=300)  # pipes, as under a launcher; bytes: text
    output = (run.stdout + run.stderr).decode()                    # mode would turn carriage returns into newlines
    assert run.returncode == 0, output
    assert "\r" not in output and "\x1b" not in output and "grid:" not in output  # no bar
    assert "[grid] 0/2 jobs done, 0 failed, 1 running, 2 remaining" in output
    assert "[grid] 2/2 jobs done, 0 failed, 0 running, 0 remaining" in output
    logs = [p.read_bytes().decode() for p in (out / "jobs").rglob("log.txt")]
    assert len(logs) == 2 and not any("\r" in log for log in logs)  # the fine-tuning loop drew no bars there
