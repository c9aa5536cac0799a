"""Fast checks of the training pieces that need no launcher: bad input, schedules, LAMB, config overrides."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ds_kd.train.engine import apply_overrides, parse_override, resolve_precision
from ds_kd.manifest import MissingStageError
from ds_kd.train.optim import Lamb, LRSchedule, lr_factor
from ds_kd.train.pretrain import PretrainConfig, run


def config(corpus, tmp_path, **kw) -> PretrainConfig:
    base = dict(deepspeed_config="ds_configs/zero2.json", data=str(corpus), out=str(tmp_path / "run"),
                model="tiny-base", max_steps=2)
    base.update(kw)
    return PretrainConfig(**base)


def test_unknown_preset_fails_before_anything_is_built(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'bert-huge'"):
        run(config(tiny_corpus, tmp_path, model="bert-huge"))
    assert not (tmp_path / "run").exists()


def test_missing_shards_name_the_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingStageError, match="manifest.json does not exist"):
        run(config(tmp_path / "empty", tmp_path))


def test_a_tokenizer_other_than_the_shards_one_is_refused(tiny_corpus, tmp_path):
    other = tmp_path / "tok"
    shutil.copytree(tiny_corpus / "tokenizer", other)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[MASK]"', '"[MASQ]"'))
    with pytest.raises(ValueError, match="not the tokenizer"):
        run(config(tiny_corpus, tmp_path, tokenizer=str(other)))


def test_budget_is_steps_or_epochs_not_both(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --max-steps and --epochs"):
        run(config(tiny_corpus, tmp_path, epochs=1.0))


def test_warmup_then_linear_and_cosine_decay():
    assert [lr_factor(s, 4, 10, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 10, "linear") == 1.0 and lr_factor(10, 4, 10, "linear") == 0.0
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown decay"):
        LRSchedule().set(0, 10, "exp", None)


def test_lamb_scales_each_update_by_the_trust_ratio():
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.full((4,), 10.0))
    small = torch.nn.Parameter(torch.full((4,), 0.1))
    opt = Lamb([big, small], lr=0.1, weight_decay=0.0)
    (big.sum() + small.sum()).backward()
    opt.step()
    # the first Adam step is ~sign(grad) for both; the trust ratio ||w||/||u|| makes the change proportional to ||w||
    assert (10.0 - big.detach()).mean() == pytest.approx(1.0, rel=1e-3)
    assert (0.1 - small.detach()).mean() == pytest.approx(0.01, rel=1e-3)


def test_lamb_minimises_a_quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8) * 3)
    opt = Lamb([w], lr=0.05, weight_decay=0.0)
    start = float((w.detach() ** 2).sum())
    for _ in range(100):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert float((w.detach() ** 2).sum()) < 0.05 * start


def test_overrides_and_precision_fallback_are_applied_to_a_copy(monkeypatch):
    from ds_kd.distill.run import resolve_teacher_dtype
    from ds_kd.train.engine import CPU_BF16_ENV

    base = {"fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    key, value = parse_override("zero_optimization.stage=2")
    changed = apply_overrides(base, {key: value})
    assert changed["zero_optimization"]["stage"] == 2 and base["zero_optimization"]["stage"] == 3
    # fp16 on a CPU: bf16 where the CPU has it natively, else fp32 (emulated bf16 is tens of times slower)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    on_cpu = resolve_precision(base, "cpu")
    assert on_cpu["bf16"]["enabled"] and not on_cpu["fp16"]["enabled"]
    assert resolve_teacher_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    emulated = resolve_precision(base, "cpu")
    assert not emulated.get("bf16", {}).get("enabled") and not emulated["fp16"]["enabled"]
    assert not resolve_precision({"bf16": {"enabled": True}}, "cpu")["bf16"]["enabled"]
    assert resolve_teacher_dtype("auto", "cpu") == resolve_teacher_dtype("bf16", "cpu") == torch.float32
    assert resolve_precision(base, "cuda") == base  # a GPU keeps fp16
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_override("stage")


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    from ds_kd.train.engine import CPU_BF16_ENV, cpu_bf16_native

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_bf16_native() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_max_len_beyond_the_position_table_fails_before_any_work(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"--max-len 300 exceeds the model's 256 position embeddings"):
        run(config(tiny_corpus, tmp_path, max_len=300))
    assert not (tmp_path / "run").exists()


def test_distillation_checks_max_len_against_teacher_and_student(tiny_corpus, tmp_path):
    from ds_kd.distill.run import DistillRunConfig
    from ds_kd.distill.run import run as distill
    from ds_kd.models.model import BertForMaskedLM, make_config
    import json

    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    teacher = tmp_path / "teacher"
    BertForMaskedLM(make_config("tiny-base", vocab_size=vocab, max_position_embeddings=64)).save_pretrained(teacher)
    for f in (tiny_corpus / "tokenizer").iterdir():
        shutil.copy2(f, teacher / f.name)
    cfg = DistillRunConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(tmp_path / "kd"),
                           teacher=str(teacher), student="tiny-leanbert", max_steps=2, max_len=100)
    with pytest.raises(ValueError, match=r"--max-len 100 exceeds the teacher's 64 position embeddings"):
        distill(cfg)
    assert not (tmp_path / "kd").exists()


def test_a_teacher_that_overflows_in_fp16_is_named_as_the_cause_with_what_to_do(tiny_corpus, tmp_path, monkeypatch):
    from ds_kd.distill import run as distill_run
    from ds_kd.distill.run import DistillRunConfig
    from ds_kd.train.loop import NonFiniteLossError
    from ds_kd.models.model import BertForMaskedLM, make_config

    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    teacher = BertForMaskedLM(make_config("tiny-base", vocab_size=vocab))
    with torch.no_grad():  # layer 1's feed-forward output sums ~0.8 x 1000 x 192: past fp16's 65504, fine in fp32
        teacher.bert.encoder.layer[0].intermediate.dense.bias.fill_(1.0)
        teacher.bert.encoder.layer[0].output.dense.weight.fill_(1000.0)
    teacher.save_pretrained(tmp_path / "teacher")
    for f in (tiny_corpus / "tokenizer").iterdir():
        shutil.copy2(f, tmp_path / "teacher" / f.name)
    monkeypatch.setattr(distill_run, "resolve_teacher_dtype", lambda *a: torch.float16)  # as on a GPU
    cfg = DistillRunConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(tmp_path / "kd"),
                           teacher=str(tmp_path / "teacher"), student="tiny-leanbert", max_steps=2, num_workers=0,
                           ds_overrides={"fp16.enabled": False})  # an fp32 engine: the student cannot overflow
    with pytest.raises(NonFiniteLossError) as raised:
        distill_run.run(cfg)
    message = str(raised.value)
    assert "teacher: it overflowed in fp16" in message and "from its layer 1 on" in message
    assert "--teacher-dtype bf16" in message and "--overwrite" in message and "lower the learning rate" not in message


def test_the_default_student_is_the_teachers_shape_with_a_third_of_its_layers(tiny_corpus, tmp_path):
    from ds_kd.distill.run import DistillRunConfig
    from ds_kd.distill.run import run as distill
    from ds_kd.models.model import BertForMaskedLM, make_config

    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    BertForMaskedLM(make_config("tiny-large", vocab_size=vocab)).save_pretrained(tmp_path / "teacher")
    for f in (tiny_corpus / "tokenizer").iterdir():
        shutil.copy2(f, tmp_path / "teacher" / f.name)
    cfg = DistillRunConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(tmp_path / "kd"),
                           teacher=str(tmp_path / "teacher"), max_steps=1, num_workers=0, max_len=64,
                           ds_overrides={"fp16.enabled": False, "train_micro_batch_size_per_gpu": 2})
    distill(cfg)
    student = json.loads((tmp_path / "kd" / "export" / "config.json").read_text())
    teacher = make_config("tiny-large")  # 12 layers of width 64, 4 heads, FFN 256
    assert (student["num_hidden_layers"], student["hidden_size"], student["num_attention_heads"],
            student["intermediate_size"]) == (4, teacher.hidden_size, teacher.num_attention_heads,
                                              teacher.intermediate_size)
    assert json.loads((tmp_path / "kd" / "manifest.json").read_text())["student"] == "from-teacher"


def test_a_tiny_preset_trains_at_its_own_default_lr_and_an_explicit_lr_wins(tiny_corpus, tmp_path):
    from ds_kd.train.ds_config import resolve_optimizer
    from ds_kd.models.model import default_lr

    cfg = PretrainConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(tmp_path / "pt"),
                         model="tiny-leanbert", max_steps=1, num_workers=0, max_len=64,
                         ds_overrides={"fp16.enabled": False, "train_micro_batch_size_per_gpu": 2})
    run(cfg)
    built = json.loads((tmp_path / "pt" / "ds_config.json").read_text())["optimizer"]["params"]["lr"]
    recorded = json.loads((tmp_path / "pt" / "manifest.json").read_text())["settings"]["lr"]
    assert built == recorded == 2e-3
    # An explicit rate wins over the preset's; the paper's presets keep 1e-4 (and record no lr, as before).
    assert resolve_optimizer({}, {"lr": 1e-3}, "f", default_lr=2e-3)[0].lr == 1e-3
    assert resolve_optimizer({"optimizer": {"type": "AdamW"}}, {}, "f", default_lr=2e-3)[0].lr == 2e-3
    assert default_lr("mbert8-base") is None and resolve_optimizer({}, {}, "f", default_lr=None)[0].lr == 1e-4


class _Fp16Engine:
    """The engine surface the loop uses; ``overflow_at`` lists the optimizer-step attempts (1-based) whose
    update DeepSpeed's loss scaler skips."""

    def __init__(self, overflow_at, accumulation=2):
        self.overflow_at, self.accumulation = set(overflow_at), accumulation
        self.attempts = self.micro = self.applied = self.skipped_steps = self.global_samples = 0
        self.optimizer = type("Opt", (), {"cur_scale": 2.0 ** 16})()

    def gradient_accumulation_steps(self): return self.accumulation
    def fp16_enabled(self): return True
    def bfloat16_enabled(self): return False
    def zero_optimization_stage(self): return 0
    def train_micro_batch_size_per_gpu(self): return 4
    def gradient_clipping(self): return 1.0
    def train_batch_size(self): return 4 * self.accumulation
    def backward(self, loss): pass
    def get_global_grad_norm(self): return 1.0
    def get_lr(self): return [0.1]
    def save_checkpoint(self, directory, tag, **kw): (Path(directory) / tag).mkdir(parents=True, exist_ok=True)

    def step(self):
        self.micro += 1
        if self.micro % self.accumulation == 0:
            self.attempts += 1
            self.global_samples += self.train_batch_size()
            self._applied = self.attempts not in self.overflow_at
            self.applied += self._applied
            self.skipped_steps += not self._applied

    def was_step_applied(self): return self._applied


def _fp16_loop(engine, tmp_path, max_steps):
    from ds_kd.logbook import Logbook, WandbConfig
    from ds_kd.train.loop import LoopConfig, train

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 7, -100], [5, -100, -100]])}
    step_fn = lambda eng, b, d: (torch.tensor(1.0), {"mlm": torch.tensor(1.0)})
    book = Logbook(tmp_path, True, WandbConfig(mode="disabled"), {}, max_steps)
    try:
        return train(engine, iter(lambda: batch, None), step_fn, dict, book, tmp_path / "ckpt",
                     LoopConfig(max_steps, log_every=1), 0, dict)
    finally:
        book.close()


def test_fp16_overflow_skipped_steps_do_not_count_toward_the_budget(tmp_path):
    from ds_kd.logbook import read_metrics

    engine = _Fp16Engine(overflow_at=[2, 3])
    result = _fp16_loop(engine, tmp_path, max_steps=5)
    assert result.steps == 5 and engine.applied == 5 and engine.attempts == 7  # 5 updates, 2 skipped on top
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["optimizer_step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["samples_seen"] == 7 * 8


def test_fp16_overflow_that_never_recovers_stops_the_run(tmp_path):
    from ds_kd.train.loop import MAX_CONSECUTIVE_SKIPS, NonFiniteLossError

    engine = _Fp16Engine(overflow_at=range(2, 2 + MAX_CONSECUTIVE_SKIPS))
    with pytest.raises(NonFiniteLossError, match="in a row overflowed"):
        _fp16_loop(engine, tmp_path, max_steps=5)
    assert engine.applied == 1


def _json_config(tmp_path, **changes) -> str:
    import json

    config = json.loads(Path("ds_configs/zero2.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("changes, overrides, message", [
    ({"zero_optimisation": {"stage": 3}}, {}, r"unknown DeepSpeed config key 'zero_optimisation' \(did you mean "
                                              r"'zero_optimization'\?\)"),
    ({}, {"zero_optimisation.stage": 3}, r"--ds-override: unknown DeepSpeed config key 'zero_optimisation'"),
    ({"train_micro_batch_size_per_gpu": None}, {}, r"ds.json: DeepSpeed rejects the config: .*train_batch_size"),
    ({}, {"train_micro_batch_size_per_gpu": -4}, r"ds.json: DeepSpeed rejects the config: .*-4"),
    ({"optimizer": {"type": "OneBitAdam", "params": {}}}, {}, r"optimizer type 'OneBitAdam' is not supported"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "max_coeff": 3}}}, {}, r"\['max_coeff'\] not supported"),
    ({"scheduler": {"type": "WarmupLinear", "params": {}}}, {}, r"scheduler type 'WarmupLinear' unknown"),
])
def test_bad_deepspeed_json_fails_in_one_line_before_anything_is_created(tiny_corpus, tmp_path, changes, overrides,
                                                                        message):
    cfg = config(tiny_corpus, tmp_path, deepspeed_config=_json_config(tmp_path, **changes), ds_overrides=overrides)
    with pytest.raises(ValueError, match=message) as err:
        run(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    ({"max_steps": 0}, "--max-steps must be positive, got 0"),
    ({"max_steps": None, "epochs": 0.0}, "--epochs must be positive, got 0.0"),
    ({"save_every": -1}, "--save-every must not be negative"),
    ({"lr": -1e-4}, "--lr must not be negative"),
    ({"warmup_ratio": 1.5}, r"--warmup-ratio must lie in \[0, 1\)"),
])
def test_bad_flag_values_name_the_flag_before_anything_is_created(tiny_corpus, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(config(tiny_corpus, tmp_path, **flags))
    assert not (tmp_path / "run").exists()


def test_flags_that_contradict_the_json_blocks_are_refused(tiny_corpus, tmp_path):
    optimizer = {"type": "AdamW", "params": {"lr": 3e-4}}
    with pytest.raises(ValueError, match=r"optimizer block sets the optimizer; --lr would contradict it"):
        run(config(tiny_corpus, tmp_path, deepspeed_config=_json_config(tmp_path, optimizer=optimizer), lr=1e-3))
    scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
    with pytest.raises(ValueError, match=r"scheduler block sets .* --decay would contradict it"):
        run(config(tiny_corpus, tmp_path, deepspeed_config=_json_config(tmp_path, scheduler=scheduler),
                   decay="cosine"))
    assert not (tmp_path / "run").exists()


def test_lamb_under_zero_partitions_is_refused_before_any_work(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="LAMB needs whole tensors .* ZeRO stage 2"):
        run(config(tiny_corpus, tmp_path, optimizer="lamb"))
    assert not (tmp_path / "run").exists()


def test_json_optimizer_and_scheduler_blocks_are_honoured_and_the_effective_config_written(tiny_corpus, tmp_path):
    import json

    from ds_kd.logbook import read_metrics

    optimizer = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.8, 0.99], "weight_decay": 0.0}}
    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 4,
                                                "warmup_type": "linear"}}
    cfg = config(tiny_corpus, tmp_path, deepspeed_config=_json_config(tmp_path, optimizer=optimizer,
                                                                      scheduler=scheduler),
                 ds_overrides={"train_micro_batch_size_per_gpu": 4}, max_steps=3, log_every=1, num_workers=0)
    run(cfg)
    effective = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert effective["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.8, 0.99], "eps": 1e-6,
                                                                  "weight_decay": 0.0}}
    assert effective["scheduler"] == scheduler
    from ds_kd.train.engine import cpu_bf16_native

    assert effective["train_micro_batch_size_per_gpu"] == 4  # the override
    # the JSON's fp16, fallen back on this CPU: bf16 where native, else fp32
    assert not effective["fp16"]["enabled"] and effective.get("bf16", {}).get("enabled", False) == cpu_bf16_native()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    from deepspeed.runtime.lr_schedules import WarmupLR

    reference = WarmupLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **scheduler["params"])
    want = []
    for _ in range(3):  # DeepSpeed's own schedule: each optimizer step applies the rate set before it
        want.append(reference.optimizer.param_groups[0]["lr"])
        reference.step()
    assert lrs == pytest.approx(want, rel=1e-6) and want[-1] > want[0]


def test_the_logged_learning_rate_is_the_one_each_step_applied_down_to_the_last(tiny_corpus, tmp_path, monkeypatch):
    from ds_kd.logbook import read_metrics

    from deepspeed.runtime.engine import DeepSpeedEngine

    applied = []
    take_step = DeepSpeedEngine._take_model_step

    def spy(self, *args, **kwargs):  # the rate the optimizer's update uses, read as the engine updates
        applied.append(self.optimizer.param_groups[0]["lr"])
        return take_step(self, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "_take_model_step", spy)
    run(config(tiny_corpus, tmp_path, max_steps=4, log_every=1, warmup_steps=1, decay="linear", lr=1e-3,
               num_workers=0))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    # warm-up of one step, then linear decay to 0 at the end of step 4: the last step still applies a third
    assert lrs == pytest.approx(applied)
    assert applied == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


def test_logged_training_metrics_are_window_means_with_wall_clock(tmp_path):
    from ds_kd.logbook import Logbook, WandbConfig, read_metrics
    from ds_kd.train.loop import LoopConfig, train

    engine = _Fp16Engine(overflow_at=[])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 7, -100], [5, -100, -100]])}
    calls = iter(range(100))
    step_fn = lambda eng, b, d: (lambda v: (v, {"mlm": v}))(torch.tensor(float(next(calls) // 2)))  # step s: s-1
    book = Logbook(tmp_path, True, WandbConfig(mode="disabled"), {}, 6, elapsed_before=100.0)
    try:
        train(engine, iter(lambda: batch, None), step_fn, dict, book, tmp_path / "ckpt",
              LoopConfig(6, log_every=3, save_every=0, save_every_minutes=1e-9), 0, dict)
    finally:
        book.close()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["optimizer_step"] for r in rows] == [3, 6]
    assert [r["loss"] for r in rows] == [1.0, 4.0]  # means of steps 1-3 (0, 1, 2) and 4-6 (3, 4, 5)
    assert all(r["elapsed_s"] >= 100.0 and r["time"] > 1.7e9 for r in rows)
    # the minutes-based checkpoint fired after every step (keep_last 2 leaves the newest two)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step*")) == ["step00000005", "step00000006"]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``: a 7-byte header, then LevelDB-log blocks of
    32 KiB whose chunks carry protobuf ``wandb_internal.Record`` s)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, records, pos, chunk = path.read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def closed_wandb_records(path: Path, timeout_s: float = 120.0) -> list:
    """:func:`wandb_records` once the file holds the run's ``exit`` record: W&B's service process writes the file
    on its own and may still be writing it when ``finish()`` has returned (seen on a loaded machine)."""
    import struct
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = wandb_records(path)
        except (DecodeError, struct.error):  # a record still being written
            records = []
        if any(r.HasField("exit") for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    from ds_kd.logbook import WANDB_ID_FILE, Logbook, WandbConfig, wandb_key

    ids = []
    for first, last in ((1, 3), (2, 4)):  # the second process resumes from a checkpoint of step 1
        book = Logbook(tmp_path, True, WandbConfig(mode="offline"), {"a": 1}, 4, initial_step=first - 1)
        for step in range(first, last + 1):
            book.log(step, {"loss": 1.0 / step})
        book.log(last, {"val_ppl": 3.0})
        ids.append(book.wandb_run.id)
        book.close()
    assert ids[0] == ids[1] == (tmp_path / WANDB_ID_FILE).read_text().strip()
    fragments = [closed_wandb_records(f) for f in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))]
    assert len(fragments) == 2  # W&B writes one file per process; `wandb sync` joins those of a resumed run
    for records, steps in zip(fragments, ([1, 2, 3], [2, 3, 4])):
        run = next(r.run for r in records if r.HasField("run"))
        assert run.run_id == ids[0] and run.resume  # marked as a resume of the one run, for `wandb sync`
        history = [r.history for r in records if r.HasField("history")]
        # the history continues at the resumed step (it restarted at 0), train and val rows of a step joined
        assert [h.step.num for h in history] == steps
        assert [json.loads(next(i.value_json for i in h.item if i.key == "optimizer_step" or
                                i.nested_key == ["optimizer_step"])) for h in history] == steps
    assert (wandb_key("loss"), wandb_key("val_ppl_fr"), wandb_key("elapsed_s")) == (
        "train/loss", "val/ppl_fr", "time/elapsed_s")
