"""A resume on another number of ranks: rank 0 converts the checkpoint while the others wait, not in a
collective (which fails after the process group's timeout, shorter than a large checkpoint's conversion)."""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from ds_kd.train import checkpoint
from ds_kd.train import engine as dist


def universal_plan(tmp_path: Path) -> checkpoint.ResumePlan:
    saved = tmp_path / "checkpoints" / "step00000004"
    saved.mkdir(parents=True)
    (saved / checkpoint.RUN_STATE).write_text(json.dumps({"step": 4}))
    return checkpoint.ResumePlan(tmp_path / "checkpoints", "step00000004", {"step": 4}, universal=True)


def no_collective(*args, **kwargs):
    raise AssertionError("a rank sat in a collective while rank 0 converts")


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(number: int) -> None:
        monkeypatch.setattr(dist, "rank", lambda: number)
        monkeypatch.setattr(dist, "is_main", lambda: number == 0)
        for collective in ("barrier", "all_reduce", "broadcast_object"):
            monkeypatch.setattr(dist, collective, no_collective)
    return set_rank


def test_other_ranks_wait_for_the_conversion_on_the_file_not_in_a_collective(tmp_path, as_rank):
    as_rank(1)
    plan = universal_plan(tmp_path)
    target = plan.ckpt_dir / checkpoint.UNIVERSAL / plan.tag

    def rank_0_converts():  # slower than the waiting rank's first looks
        time.sleep(1.5)
        target.mkdir(parents=True)
        (target / checkpoint.RUN_STATE).write_text("{}")

    converter = threading.Thread(target=rank_0_converts)
    start = time.monotonic()
    converter.start()
    config = checkpoint.prepare(plan, {"train_micro_batch_size_per_gpu": 2}, wait_minutes=1)
    converter.join()
    assert time.monotonic() - start >= 1.5  # it returned only once the conversion was complete
    assert config["checkpoint"]["load_universal"] is True


def test_a_conversion_that_never_ends_stops_the_waiting_ranks_naming_the_flag(tmp_path, as_rank):
    as_rank(1)
    plan = universal_plan(tmp_path)
    with pytest.raises(TimeoutError, match=r"rank 1: .*universal/step00000004/run_state.json did not appear within "
                                           r"--convert-timeout-minutes 0.01"):
        checkpoint.prepare(plan, {}, wait_minutes=0.01)


def test_rank_0_converts_logging_progress_and_marks_the_result_complete(tmp_path, as_rank, monkeypatch, caplog):
    as_rank(0)
    plan = universal_plan(tmp_path)
    slow_converter = "import pathlib, sys, time; time.sleep(1.2); pathlib.Path(sys.argv[1]).mkdir(); print('done')"
    monkeypatch.setattr(checkpoint, "universal_command",
                        lambda ckpt_dir, tag, output: [sys.executable, "-c", slow_converter, str(output)])
    monkeypatch.setattr(checkpoint, "PROGRESS_SECONDS", 0.3)
    with caplog.at_level("INFO", logger="ds_kd"):
        checkpoint.prepare(plan, {}, wait_minutes=1)
    target = plan.ckpt_dir / checkpoint.UNIVERSAL / plan.tag
    assert (target / checkpoint.RUN_STATE).is_file() and "done" in target.with_name(target.name + ".log").read_text()
    assert "still converting" in caplog.text

    shutil.rmtree(target)
    monkeypatch.setattr(checkpoint, "universal_command",
                        lambda ckpt_dir, tag, output: [sys.executable, "-c", "print('no space left'); exit(3)"])
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\):\nno space left"):
        checkpoint.prepare(plan, {}, wait_minutes=1)
    assert not target.exists()
