"""Online distillation through the real ``deepspeed`` launcher on CPU: frozen teacher and student in one engine."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import deepspeed_cmd, run_cmd, run_until_checkpoint, tail
from ds_kd.logbook import read_metrics
from ds_kd.models.model import BertForMaskedLM, count_parameters, make_config

STEPS = 10


def make_teacher(corpus: Path, directory: Path, preset: str = "tiny-large", bare: bool = False,
                 seed: int = 11) -> Path:
    """A randomly initialised teacher with the corpus's tokenizer (its quality does not matter here)."""
    vocab = json.loads((corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    torch.manual_seed(seed)
    model = BertForMaskedLM(make_config(preset, vocab_size=vocab))
    if bare:  # a BertModel checkpoint: encoder weights only, no MLM head
        import transformers

        model.save_pretrained(directory / "tmp")
        hf = transformers.BertForMaskedLM.from_pretrained(directory / "tmp").bert
        hf.save_pretrained(directory)
        shutil.rmtree(directory / "tmp")
    else:
        model.save_pretrained(directory)
    for f in (corpus / "tokenizer").iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, directory / f.name)
    return directory


def distill_args(corpus: Path, teacher: Path, out: Path, config: str = "zero3", *extra: str) -> list[str]:
    return ["--deepspeed_config", f"ds_configs/{config}.json", "--teacher", str(teacher), "--student",
            "tiny-leanbert", "--data", str(corpus), "--out", str(out), "--max-steps", str(STEPS),
            "--ds-override", "train_micro_batch_size_per_gpu=8", "--num-workers", "1", "--log-every", "1",
            "--lr", "3e-3", "--warmup-steps", "1", "--max-len", "64", "--seed", "3", *extra]


def step_metrics(run_dir: Path) -> dict[int, dict]:
    return {r["optimizer_step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def teacher(tiny_corpus, tmp_path_factory) -> Path:
    return make_teacher(tiny_corpus, tmp_path_factory.mktemp("teacher") / "tiny-large")


@pytest.fixture(scope="module")
def zero3_distill(tiny_corpus, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kd") / "zero3"
    proc = run_cmd(deepspeed_cmd("launch/distill.py", distill_args(tiny_corpus, teacher, out, "zero3",
                                                                  "--save-every", "5")))
    assert proc.returncode == 0, tail(proc)
    return out


def test_teacher_frozen_and_student_learns_on_two_ranks(zero3_distill):
    manifest = json.loads((zero3_distill / "manifest.json").read_text())
    assert manifest["config"]["engine"]["world_size"] == 2 and manifest["config"]["engine"]["zero_stage"] == 3
    # the teacher's weights inside the engine are bit-identical before and after training
    assert manifest["teacher_digest"] == manifest["teacher_digest_after"]
    summary = manifest["distillation"]
    assert summary["layer_map"] == [6, 12]  # 12 -> 2 layers: every 6th, as 24 -> 4
    from ds_kd.train.engine import cpu_bf16_native

    # fp16 asked (auto): on CPU bf16 where native, else fp32
    assert summary["teacher_dtype"] == ("bfloat16" if cpu_bf16_native() else "float32")
    assert "head-averaged" in summary["heads"]
    steps = step_metrics(zero3_distill)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for term in ("mlm", "output", "embedding", "hidden", "attention"):
        assert f"loss_{term}" in steps[1]
    first = sum(steps[s]["loss"] for s in (1, 2, 3))
    last = sum(steps[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS))
    assert last < first


def test_teacher_is_absent_from_the_optimizer_state(zero3_distill, tiny_corpus, teacher):
    """The fp32 master partitions in the checkpoint cover the student and projections only."""
    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    student = count_parameters(BertForMaskedLM(make_config("tiny-leanbert", vocab_size=vocab)))
    teacher_params = count_parameters(BertForMaskedLM.from_pretrained(teacher))
    ckpt = zero3_distill / "checkpoints" / "step00000010"
    total = 0
    for f in sorted(ckpt.glob("*optim_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        total += sum(t.numel() for t in state["fp32_flat_groups"])
    projections = 64 * 48 + 64 + 2 * (64 * 48 + 64)  # embeddings and two mapped layers, 48 -> 64 wide
    assert student + projections <= total < student + projections + 64 * 2  # only alignment padding on top
    assert total < teacher_params
    model_files = list(ckpt.glob("*model_states.pt"))
    assert model_files
    for f in model_files:  # no teacher weight is written (ZeRO-3 module entries are empty placeholders)
        states = torch.load(f, map_location="cpu", weights_only=False)
        assert sum(t.numel() for k, t in states["module"].items() if k.startswith("teacher.")) == 0
        assert not states["frozen_param_fragments"] and not states["frozen_param_shapes"]


def test_export_is_the_student_alone(zero3_distill):
    import transformers

    export = zero3_distill / "export"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert hf.config.num_hidden_layers == 2 and hf.config.hidden_size == 48
    from safetensors.torch import load_file

    names = load_file(str(export / "model.safetensors")).keys()
    assert not any(n.startswith(("teacher.", "projections.")) for n in names)
    assert (export / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def zero2_distill(tiny_corpus, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kd") / "zero2"
    proc = run_cmd(deepspeed_cmd("launch/distill.py", distill_args(tiny_corpus, teacher, out, "zero2")))
    assert proc.returncode == 0, tail(proc)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoints_hold_no_teacher_tensor(stage, zero2_distill, zero3_distill):
    """Under ZeRO-2 the teacher's decoder, tied to its embeddings, used to slip past exclude_frozen_parameters."""
    ckpt = (zero2_distill if stage == 2 else zero3_distill) / "checkpoints" / "step00000010"
    files = list(ckpt.glob("*.pt"))
    assert files
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        teacher_keys = [k for k in state.get("module") or {} if k.startswith("teacher.")]
        assert not teacher_keys, (f.name, teacher_keys[:3])
        for key in ("shared_params", "frozen_param_shapes", "frozen_param_fragments", "param_shapes"):
            names = [n for group in ([state[key]] if isinstance(state.get(key), dict) else state.get(key) or [])
                     for n in group]
            assert not [n for n in names if str(n).startswith("teacher.")], (f.name, key)
    assert sum(f.stat().st_size for f in files) < 4_000_000  # the tiny-large teacher alone is ~9 MB in fp32


def test_resuming_with_another_teacher_is_refused_before_the_first_step(zero2_distill, tiny_corpus, teacher,
                                                                       tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(zero2_distill, out)
    (out / "manifest.json").unlink()  # an interrupted run, checkpointed at step 10
    rows = len((out / "metrics.jsonl").read_text().splitlines())
    args = distill_args(tiny_corpus, teacher, out, "zero2", "--resume")
    args[args.index("--max-steps") + 1] = "12"
    # Another teacher directory is another setting (the re-run rule names it) ...
    other = make_teacher(tiny_corpus, tmp_path / "other", seed=12)  # same shape, other weights
    proc = run_cmd(deepspeed_cmd("launch/distill.py", [other if a == str(teacher) else a for a in map(str, args)]))
    assert proc.returncode == 2, tail(proc)
    assert "teacher:" in proc.stdout + proc.stderr
    # ... and the same directory with other weights is caught by the digest the checkpoint recorded
    shutil.copytree(other, teacher, dirs_exist_ok=True)
    try:
        proc = run_cmd(deepspeed_cmd("launch/distill.py", args))
    finally:
        make_teacher(tiny_corpus, teacher)  # the module's teacher, as the other tests expect it
    assert proc.returncode == 2, tail(proc)
    assert "written under other inputs (teacher_digest" in proc.stdout + proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == rows  # no step was taken


def test_zero2_and_zero3_give_the_same_losses(zero2_distill, zero3_distill):
    z2, z3 = step_metrics(zero2_distill), step_metrics(zero3_distill)
    for step in range(1, STEPS + 1):  # bf16 forward passes round differently per stage: 2% tolerance
        assert z2[step]["loss"] == pytest.approx(z3[step]["loss"], rel=0.02), step


def test_teacher_without_mlm_head_runs_with_the_output_loss_off(tiny_corpus, tmp_path):
    bare = make_teacher(tiny_corpus, tmp_path / "bare", "tiny-base", bare=True)
    out = tmp_path / "bare_run"
    args = distill_args(tiny_corpus, bare, out, "zero2", "--mlm-weight", "0")
    args[args.index("--max-steps") + 1] = "2"
    proc = run_cmd([sys.executable, "launch/distill.py", *args])
    assert proc.returncode == 0, tail(proc)
    assert "no MLM head" in proc.stderr
    steps = step_metrics(out)
    assert "loss_output" not in steps[1] and "loss_hidden" in steps[1] and "loss_mlm" not in steps[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distillation"]["output_loss"] is False
    # No loss trains the student's MLM head: no perplexity of an untrained head in the manifest (or Table 2).
    assert manifest["val"] == {} and manifest["perplexity_measured"] is False
    assert "no validation perplexity" in proc.stderr


def test_teacher_with_another_vocabulary_is_refused_before_training(tiny_corpus, tmp_path):
    other = tmp_path / "other"
    BertForMaskedLM(make_config("tiny-base", vocab_size=77)).save_pretrained(other)
    proc = run_cmd([sys.executable, "launch/distill.py", *distill_args(tiny_corpus, other, tmp_path / "x")])
    assert proc.returncode == 2
    assert "teacher vocabulary of 77 tokens" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_kill_9_then_resume_matches_the_uninterrupted_run(zero3_distill, tiny_corpus, teacher, tmp_path):
    """Student and projections come back from the checkpoint, the teacher from its directory."""
    out = tmp_path / "killed"
    args = distill_args(tiny_corpus, teacher, out, "zero3", "--save-every", "5")
    saved = run_until_checkpoint(deepspeed_cmd("launch/distill.py", args), out, 5)
    assert saved < STEPS
    resumed = run_cmd(deepspeed_cmd("launch/distill.py", [*args, "--resume"]))
    assert resumed.returncode == 0, tail(resumed)
    want, got = step_metrics(zero3_distill), step_metrics(out)
    for step in range(saved + 1, STEPS + 1):
        for term in ("loss", "loss_output", "loss_hidden", "loss_attention"):
            assert got[step][term] == pytest.approx(want[step][term], rel=1e-5, abs=1e-6), (step, term)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher_digest"] == manifest["teacher_digest_after"]


def test_teacher_without_its_tokenizer_is_refused_before_training(tiny_corpus, tmp_path):
    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    bare = tmp_path / "bare"  # the right number of embedding rows, but no tokenizer files
    BertForMaskedLM(make_config("tiny-base", vocab_size=vocab)).save_pretrained(bare)
    proc = run_cmd([sys.executable, "launch/distill.py", *distill_args(tiny_corpus, bare, tmp_path / "x")])
    assert proc.returncode == 2
    assert f"{bare}: no tokenizer files" in proc.stderr and "distillation (--teacher)" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_rerun_with_another_teacher_or_weight_is_refused_and_the_same_is_skipped(tiny_corpus, teacher, tmp_path):
    out = tmp_path / "rerun"
    args = distill_args(tiny_corpus, teacher, out, "zero2")
    args[args.index("--max-steps") + 1] = "1"
    assert run_cmd([sys.executable, "launch/distill.py", *args]).returncode == 0
    same = run_cmd([sys.executable, "launch/distill.py", *args])
    assert same.returncode == 0 and "same settings: skipping" in same.stderr
    other_teacher = tmp_path / "teacher-copy"
    shutil.copytree(teacher, other_teacher)
    moved = run_cmd([sys.executable, "launch/distill.py", *args[:args.index("--teacher") + 1], str(other_teacher),
                     *args[args.index("--teacher") + 2:], "--hidden-weight", "0.5"])
    assert moved.returncode == 2
    assert "teacher: " in moved.stderr and "losses.hidden_weight: 1.0 -> 0.5" in moved.stderr
