"""Pretraining through the real ``deepspeed`` launcher on CPU (gloo), with a tiny model and corpus."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import DEEPSPEED, ROOT, deepspeed_cmd, free_port, run_cmd, run_until_checkpoint, tail
from ds_kd.logbook import read_metrics
from ds_kd.train.engine import CPU_BF16_ENV, cpu_bf16_native
from ds_kd.models.model import BertForMaskedLM

STEPS = 12


def pretrain_args(corpus: Path, out: Path, config: str = "zero3", *extra: str) -> list[str]:
    return ["--deepspeed_config", f"ds_configs/{config}.json", "--model", "tiny-base", "--data", str(corpus),
            "--out", str(out), "--max-steps", str(STEPS), "--ds-override", "train_micro_batch_size_per_gpu=8",
            "--num-workers", "1", "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "2", "--max-len", "64",
            "--save-every", "4", "--seed", "7", *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["optimizer_step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def zero3_run(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "zero3"
    proc = run_cmd(deepspeed_cmd("launch/pretrain.py", pretrain_args(tiny_corpus, out)))
    assert proc.returncode == 0, tail(proc)
    return out


def test_two_ranks_zero3_train_validate_and_export(zero3_run):
    manifest = json.loads((zero3_run / "manifest.json").read_text())
    assert manifest["config"]["engine"]["world_size"] == 2 and manifest["config"]["engine"]["zero_stage"] == 3
    # fp16 in the JSON: a logged fallback on CPU, to bf16 where the CPU has it natively, else fp32
    assert manifest["config"]["engine"]["precision"] == ("bf16" if cpu_bf16_native() else "fp32")
    losses = step_losses(zero3_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])  # it learns
    val = manifest["val"]
    assert {"val_ppl", "val_ppl_en", "val_ppl_fr", "val_ppl_hi"} <= set(val)
    assert 1.0 < val["val_ppl"] < 300  # below the uniform guess over the 300-token vocabulary
    assert len(set(manifest["replica_digests"])) == 1 and len(manifest["replica_digests"]) == 2
    assert (zero3_run / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (zero3_run / "checkpoints").glob("step*")) == ["step00000008", "step00000012"]


def test_export_loads_in_transformers_with_the_consolidated_checkpoint_weights(zero3_run):
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    export = zero3_run / "export"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
    ours = BertForMaskedLM.from_pretrained(export).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export)
    enc = tok(["an example", "another one here"], return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    ref = hf(**enc).logits[enc["attention_mask"].bool()]
    got = ours(enc["input_ids"], enc["attention_mask"], predicted=enc["attention_mask"].bool()).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the export holds the optimizer's fp32 master weights, the same DeepSpeed's own consolidation gives
    master = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "checkpoints"), tag="step00000012")
    exported = ours.state_dict()
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(exported[name], master[name].float(), rtol=0, atol=0)


def test_zero2_gives_the_same_losses_as_zero3(zero3_run, tiny_corpus, tmp_path):
    out = tmp_path / "zero2"
    proc = run_cmd(deepspeed_cmd("launch/pretrain.py", pretrain_args(tiny_corpus, out, "zero2")))
    assert proc.returncode == 0, tail(proc)
    z2, z3 = step_losses(out), step_losses(zero3_run)
    assert z2.keys() == z3.keys()
    for step in z2:  # bf16 forward: the two stages round differently, so compare within 2%
        assert abs(z2[step] - z3[step]) <= 0.02 * z3[step], (step, z2[step], z3[step])


def test_kill_9_then_resume_matches_the_uninterrupted_run(zero3_run, tiny_corpus, tmp_path):
    out = tmp_path / "killed"
    saved = run_until_checkpoint(deepspeed_cmd("launch/pretrain.py", pretrain_args(tiny_corpus, out)), out, 4)
    resumed = run_cmd(deepspeed_cmd("launch/pretrain.py", pretrain_args(tiny_corpus, out, "zero3", "--resume")))
    assert resumed.returncode == 0, tail(resumed)
    assert f"resumed from step{saved:08d}" in resumed.stderr + resumed.stdout
    want, got = step_losses(zero3_run), step_losses(out)
    assert saved < STEPS
    for step in range(saved + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_two_nodes_from_a_hostfile_train_one_model(tiny_corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "multinode"
    port = str(free_port())
    args = pretrain_args(tiny_corpus, out, "zero2")
    nodes = [subprocess.Popen([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", port, "launch/pretrain.py", *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "DS_KD_ONE_MACHINE": "1"})  # both "nodes" are this machine
             for r in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["engine"]["world_size"] == 2
    digests = manifest["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_a_dead_rank_fails_the_whole_job_quickly(tiny_corpus, tmp_path):
    out = tmp_path / "dies"
    args = pretrain_args(tiny_corpus, out, "zero2", "--dist-timeout-minutes", "1")
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen(deepspeed_cmd("launch/pretrain.py", args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "launch/pretrain.py" in " ".join(p.cmdline()) and "--local_rank=1" in " ".join(p.cmdline())]
        assert ranks, "rank 1 not found"
        ranks[0].kill()
        killed_at = time.time()
        code = proc.wait(timeout=120)
        assert code != 0
        assert time.time() - killed_at < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_corpus, tmp_path):
    out = tmp_path / "nan"
    args = pretrain_args(tiny_corpus, out, "zero2", "--ds-override", "gradient_clipping=0")
    args[args.index("--lr") + 1] = "1e30"  # weights of 1e30 overflow the next forward pass
    args[args.index("--save-every") + 1] = "1"
    args[args.index("--warmup-steps") + 1] = "1"
    proc = run_cmd([sys.executable, "launch/pretrain.py", *args])  # one process, no launcher
    assert proc.returncode == 2, tail(proc)
    message = tail(proc)
    assert "non-finite loss" in message and "at optimizer step" in message
    bad_step = int(message.split("at optimizer step ")[1].split(";")[0])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{bad_step - 1:08d}"
    assert not (out / "manifest.json").exists()


def test_rerun_skips_same_settings_refuses_others_extends_and_overwrites(tiny_corpus, tmp_path):
    """One process, no launcher: the rule of ds_kd.manifest.rerun_action on a real run directory."""
    out = tmp_path / "rerun"

    def launch(*extra: str, steps: str = "2") -> subprocess.CompletedProcess:
        args = pretrain_args(tiny_corpus, out, "zero2", *extra)
        args[args.index("--max-steps") + 1] = steps
        return run_cmd([sys.executable, "launch/pretrain.py", *args])

    assert launch().returncode == 0
    manifest = (out / "manifest.json").read_text()
    # The same settings (logging flags aside): skipped, the run untouched.
    same = launch("--log-every", "5", "--wandb-mode", "disabled")
    assert same.returncode == 0 and "already finished with the same settings: skipping" in tail(same)
    assert (out / "manifest.json").read_text() == manifest
    # Other settings: refused, naming each, with exit status 2 and nothing changed.
    other = launch("--lr", "1e-3", "--ds-override", "zero_optimization.stage=3")
    assert other.returncode == 2
    assert "lr: 0.003 -> 0.001" in tail(other) and "deepspeed_config.zero_optimization.stage: 2 -> 3" in tail(other)
    missing = run_cmd([sys.executable, "launch/pretrain.py", *[a if a != str(tiny_corpus) else str(tmp_path / "nope")
                                                                 for a in pretrain_args(tiny_corpus, out, "zero2")]])
    assert missing.returncode == 2 and "data: " in tail(missing)  # a data directory that is not there either
    longer = launch(steps="4")
    assert longer.returncode == 2 and "max_steps: 2 -> 4" in tail(longer) and "--resume to extend" in tail(longer)
    assert (out / "manifest.json").read_text() == manifest
    # --resume with a budget that is not larger: refused, the finished run intact.
    shorter = launch("--resume", steps="1")
    assert shorter.returncode == 2 and "2 optimizer steps are already done" in tail(shorter)
    assert (out / "manifest.json").read_text() == manifest
    # --resume with a larger budget extends the finished run from its last checkpoint.
    extended = launch("--resume", steps="4")
    assert extended.returncode == 0, tail(extended)
    assert "resumed from step00000002" in tail(extended)
    assert json.loads((out / "manifest.json").read_text())["steps"] == 4
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    # --overwrite starts over with the new settings.
    again = launch("--lr", "1e-3", "--overwrite")
    assert again.returncode == 0, tail(again)
    fresh = json.loads((out / "manifest.json").read_text())
    assert fresh["steps"] == 2 and fresh["settings"]["lr"] == 1e-3 and sorted(step_losses(out)) == [1, 2]


def test_lamb_trains_on_two_ranks_at_zero_stage_0_in_fp32(tiny_corpus, tmp_path):
    """LAMB's layer-wise trust ratio needs whole tensors: ZeRO stage 0, fp32 (half precision flattens too)."""
    def args(out: Path, *precision: str) -> list[str]:
        return ["--deepspeed_config", "ds_configs/zero2.json", "--model", "tiny-base", "--data", str(tiny_corpus),
                "--out", str(out), "--max-steps", "6", "--optimizer", "lamb", "--lr", "1e-2", "--warmup-steps", "1",
                "--ds-override", "zero_optimization.stage=0", "--ds-override", "fp16.enabled=false", *precision,
                "--ds-override", "train_micro_batch_size_per_gpu=8", "--num-workers", "0", "--log-every", "1",
                "--max-len", "64"]

    out = tmp_path / "lamb"
    proc = run_cmd(deepspeed_cmd("launch/pretrain.py", args(out)))
    assert proc.returncode == 0, tail(proc)
    effective = json.loads((out / "ds_config.json").read_text())
    assert effective["optimizer"]["type"] == "Lamb" and effective["zero_optimization"]["stage"] == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    refused = run_cmd([sys.executable, "launch/pretrain.py",  # bf16 as on a CPU with it natively
                       *args(tmp_path / "bf16", "--ds-override", "bf16.enabled=true")],
                      env={**os.environ, CPU_BF16_ENV: "1"})
    assert refused.returncode == 2 and "bf16 (DeepSpeed's bf16 optimizer)" in refused.stderr
    assert not (tmp_path / "bf16").exists()


@pytest.mark.parametrize("script, extra", [("pretrain", ["--model", "tiny-leanbert"]),
                                           ("distill", ["--teacher", "teacher-dir"])])
def test_resume_without_a_checkpoint_is_refused_in_one_line(script, extra, tmp_path):
    out = tmp_path / "run"
    proc = run_cmd([sys.executable, f"launch/{script}.py", *extra, "--deepspeed_config", "ds_configs/zero2.json",
                    "--data", str(tmp_path / "corpus"), "--out", str(out), "--max-steps", "2", "--resume"])
    what = {"pretrain": "pretraining", "distill": "distillation"}[script]
    assert proc.returncode == 2
    assert (f"--resume: {out} holds no checkpoint of a {what} to resume: drop --resume to start one there, or "
            f"check --out") in proc.stderr
    assert not out.exists()
