"""benchmarks/gpu_check.py (make gpu-check): its tiny CPU twin runs every check, its comparisons catch wrong and
non-finite results, and without a GPU it says so and exits 0. No test here needs a GPU."""
from __future__ import annotations

import itertools
import json
import math
import os
import sys

import pytest
import torch

from benchmarks import gpu_attention, gpu_check
from tests.conftest import run_cmd
from ds_kd.models.sentence_attention import SentenceBuckets

SCRIPT = "benchmarks/gpu_check.py"


def test_cpu_twin_runs_every_check_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_cmd([sys.executable, SCRIPT, "--device", "cpu", "--out", str(out), "--peak-tflops", "0.5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())

    cases = {(c["path"], c["dtype"], c["backend"]): c for c in result["attention"]}
    assert set(cases) == set(itertools.product(("sentences", "masked"), ("fp16", "bf16"), gpu_attention.BACKENDS))
    for key, c in cases.items():
        if key[2] in ("math", "flash"):  # both exist on CPU: compared, finite and close to fp32
            assert c["ok"] and c["finite"], c
            assert all(0 < c[f"{x}_rel_err"] <= c["tolerance"] for x in ("output", "attention", "grad")), c
            assert c["ms"] > 0
        else:  # efficient and cuDNN are CUDA kernels: reported unavailable with torch's reason, not a crash
            assert c["ok"] is None and "RuntimeError" in c["unavailable"], c

    flex = {(c["attention"], c["dtype"]): c for c in result["flex"]}
    assert set(flex) == set(itertools.product(("flex document mask", "sdpa block-diagonal mask"), ("fp16", "bf16")))
    for (name, _), c in flex.items():
        assert c["ok"] and 0 < c["output_rel_err"] <= c["tolerance"], c
        if name.startswith("flex"):  # no FlexAttention backward on CPU: the forward alone is compared
            assert c["grad_rel_err"] is None and "backward on CPU" in c["backward_unavailable"]

    d = result["distillation"]
    assert d["ok"] and d["teacher_dtype"] == "bfloat16"  # fp16 on GPU; the CPU fallback is bf16
    assert set(d["terms"]) == {"mlm", "output", "embedding", "hidden", "attention", "total"}
    assert all(math.isfinite(x) for xs in d["terms"].values() for x in xs)
    assert d["host_syncs_per_step"]["count"] is None and "CUDA" in d["host_syncs_per_step"]["unavailable"]

    p = result["pretraining"]
    assert p["ok"] and 0 < p["real_tokens_per_step"] <= p["rows"] * p["max_len"]
    assert p["tokens_per_s"] == pytest.approx(p["real_tokens_per_step"] / p["seconds_per_step"])
    assert p["mfu"] == pytest.approx(p["flops_per_step"] / p["seconds_per_step"] / 0.5e12)
    assert "real tokens/s" in proc.stdout and "MFU" in proc.stdout


def test_compare_fails_wrong_and_non_finite_results():
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    refs = {"output": ref, "grad": ref}
    close = gpu_attention.compare({"output": ref * (1 + 1e-3), "grad": ref * (1 - 1e-3)}, refs, 2e-2)
    assert close["ok"] and close["output_rel_err"] == pytest.approx(1e-3, rel=1e-3)
    wrong = gpu_attention.compare({"output": ref, "grad": ref * 1.1}, refs, 2e-2)
    assert not wrong["ok"] and wrong["grad_rel_err"] == pytest.approx(0.1, rel=1e-3)
    nan = ref.clone()
    nan[3] = float("nan")
    bad = gpu_attention.compare({"output": nan, "grad": None}, refs, 2e-2)
    assert not bad["ok"] and not bad["finite"] and bad["output_rel_err"] is None and bad["grad_rel_err"] is None


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attention_check_fails_a_wrong_attention_path(monkeypatch, one_thread):
    """A per-sentence attention that silently returns wrong values fails the check (and makes the script exit 1);
    the masked path, untouched, passes."""
    attend = SentenceBuckets.attend

    def off_by_half(self, *args, **kwargs):
        context, scores = attend(self, *args, **kwargs)
        return context * 1.5, scores
    monkeypatch.setattr(SentenceBuckets, "attend", off_by_half)
    cases = gpu_attention.attention_checks("tiny-leanbert", 2, 32, 1, torch.device("cpu"))
    ran = [c for c in cases if c["ok"] is not None]
    assert {c["path"] for c in ran if not c["ok"]} == {"sentences"}
    assert all(c["ok"] for c in ran if c["path"] == "masked")
    result = {"attention": cases, "flex": [], "distillation": {"ok": True}, "pretraining": {"ok": True}}
    assert len(gpu_check.failures(result)) == sum(c["path"] == "sentences" for c in ran)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                        ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                        ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", None)])
def test_peak_flops_by_device_name(name, peak):
    assert gpu_check.peak_tflops(name, None) == peak
    assert gpu_check.peak_tflops(name, 123.0) == 123.0  # --peak-tflops wins


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_cmd([sys.executable, SCRIPT, "--out", str(out)], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU found" in proc.stdout and not out.exists()
