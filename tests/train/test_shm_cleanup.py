"""A CPU job through the deepspeed launcher leaves none of DeepSpeed's shared-memory buffers in /dev/shm (each
is 69 MB per rank; before the fix every run left them, until the machine ran out of memory)."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import deepspeed_cmd, run_cmd, tail


def test_two_ranks_leave_no_shm_buffer(tmp_path):
    proc = run_cmd(deepspeed_cmd("tests/scripts/shm_probe.py", [str(tmp_path)]), timeout=300)
    assert proc.returncode == 0, tail(proc)
    total, *names = (tmp_path / "sum.txt").read_text().split()
    assert float(total) == 3.0  # ranks 1 + 2: the process group works after the names are removed
    assert len(names) == 2 and all(n.startswith("/dev/shm/deepspeed_allreduce_buffer_") for n in names)
    assert not [n for n in names if Path(n).exists()]
