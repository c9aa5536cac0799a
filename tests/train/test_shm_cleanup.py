"""A CPU job through the deepspeed launcher trains on gloo's collectives alone: DeepSpeed's shared-memory op
(used only for tensor-parallel inference) is neither compiled (a minute per fresh environment) nor mapped (a
69 MB file per rank in /dev/shm that DeepSpeed never removes)."""
from __future__ import annotations

from tests.conftest import deepspeed_cmd, run_cmd, tail


def test_two_ranks_sum_over_gloo_without_deepspeeds_shared_memory_op(tmp_path):
    proc = run_cmd(deepspeed_cmd("tests/scripts/shm_probe.py", [str(tmp_path)]), timeout=300)
    assert proc.returncode == 0, tail(proc)
    total, built, *buffers = (tmp_path / "probe.txt").read_text().split("\n")
    assert float(total) == 3.0  # ranks 1 + 2
    assert built == "False" and buffers == [""]
    assert "compiles its CPU op" not in proc.stdout + proc.stderr and "built successfully" not in proc.stdout
