"""The training step does not make the host wait for the device, and no loss count passes through a half cast.

A GPU runs asynchronously: every device-to-host read (``.item()``, a boolean-mask gather, ``nonzero``, a copy
back of the ids) drains the queue before the host can issue more work. On CPU nothing is queued, but the same
operations can be counted: :func:`count_host_syncs` counts the aten operations that force a sync on CUDA, and
host copies of tensors (``.cpu()``, ``.numpy()``, ``.tolist()``), while the training loop runs with a stand-in
engine around the real models.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.models.model import BertForMaskedLM, make_config
from ds_kd.data.packing import best_fit, packed_batch

VOCAB = 101
aten = torch.ops.aten
# Operations whose output size or value the host needs from the device: each one waits for the CUDA queue.
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.bincount.default, aten.equal.default, aten.is_nonzero.default, aten._unique2.default,
           aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in args[1] if i is not None)
        if func in SYNCING or bool_index:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Yields the list of device-to-host syncs seen inside the block (operation names)."""
    counter = _SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist")}

    def counted(name):
        def call(self, *args, **kwargs):
            counter.calls.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        with counter:
            yield counter.calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _model(preset: str, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(make_config(preset, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))


def _packed_batches(count: int, seed: int = 0) -> list[dict]:
    """Packed micro-batches of random sentences (rows of 32 tokens), as the packed reader collates them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(3, 20, size=6)
        inputs = [rng.integers(5, VOCAB, size=n) for n in lengths]
        labels = [np.where(rng.random(n) < 0.3, x, -100) for n, x in zip(lengths, inputs)]
        for y, x in zip(labels, inputs):
            y[1] = x[1]  # something to predict in every sentence
        out.append(packed_batch(inputs, labels, [0] * len(inputs), best_fit(lengths.tolist(), 32), pad_id=0))
    return out


class _Engine:
    """The engine surface ``ds_kd.train.loop.train`` uses, around a plain module (the update is left out: DeepSpeed's
    own syncs are not this project's)."""

    def __init__(self, module: torch.nn.Module, accumulation: int):
        self.module, self.accumulation = module, accumulation
        self.optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0)
        self.global_samples = self.skipped_steps = 0

    def __call__(self, *args, **kwargs): return self.module(*args, **kwargs)
    def backward(self, loss): loss.backward()
    def step(self): pass
    def was_step_applied(self): return True
    def gradient_accumulation_steps(self): return self.accumulation
    def fp16_enabled(self): return False
    def bfloat16_enabled(self): return False
    def zero_optimization_stage(self): return 0
    def train_micro_batch_size_per_gpu(self): return 2
    def train_batch_size(self): return 2 * self.accumulation
    def gradient_clipping(self): return 0.0
    def get_global_grad_norm(self): return None
    def get_lr(self): return [0.0]
    def save_checkpoint(self, directory, tag, **kw): (Path(directory) / tag).mkdir(parents=True, exist_ok=True)


def _distill_step(engine, batch, denominators):
    out = engine(batch, denominators)
    return out.loss, {k: v for k, v in out.terms.items() if k != "total"}


@pytest.mark.parametrize("mode", ["mlm", "distill"])
def test_training_step_waits_for_the_device_twice_per_optimizer_step_not_per_micro_batch(mode, tmp_path):
    """Two optimizer steps of 4 packed micro-batches through ``ds_kd.train.loop.train``, the batches prepared by the
    DataLoader workers' ``host_layout``: at most 2 device-to-host syncs per optimizer step (the global loss counts,
    then the step's metrics with the finite-loss flag), none per micro-batch. The code before counted 102 (MLM) and
    118 (distillation) here: per micro-batch the finite check, the max sentence id, the boolean gathers of the
    counts and of the MLM heads (forward and backward), the layout's copy of the ids; per step the metrics."""
    from ds_kd.logbook import Logbook, WandbConfig
    from ds_kd.train.loop import LoopConfig, host_layout, train
    from ds_kd.train.pretrain import mlm_step

    steps, accumulation = 2, 4
    if mode == "mlm":
        model, step_fn = _model("tiny-base", 0), mlm_step
    else:
        model, step_fn = Distiller(_model("tiny-base", 0), _model("tiny-leanbert", 1), DistillConfig()), _distill_step
    batches = [host_layout(b) for b in _packed_batches(steps * accumulation)]  # what the workers hand over
    book = Logbook(tmp_path, True, WandbConfig(mode="disabled"), {}, steps)
    try:
        with count_host_syncs() as syncs:
            result = train(_Engine(model, accumulation), iter(batches), step_fn, dict, book, tmp_path / "ckpt",
                           LoopConfig(steps, log_every=100), 0, dict)
    finally:
        book.close()
    assert result.steps == steps and all(np.isfinite(result.losses))
    assert len(syncs) <= 2 * steps, syncs


def test_host_layout_gives_the_step_the_results_of_the_device_path():
    """The host-built masked positions and layout change nothing: the same MLM loss and distillation terms as a
    batch without them (where the models gather with boolean masks and build the layout themselves)."""
    from ds_kd.train.loop import global_denominators, host_layout
    from ds_kd.train.pretrain import mlm_step

    model = _model("tiny-base", 0)
    distiller = Distiller(_model("tiny-large", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
    plain = _packed_batches(1, seed=3)[0]
    prepared = host_layout(dict(plain))
    assert set(prepared) - set(plain) == {"counts", "masked_positions", "sentence_buckets"}
    denominators = global_denominators([plain])
    with torch.no_grad():
        losses = [mlm_step(model, b, denominators)[0].item() for b in (plain, prepared)]
        terms = [distiller(b, denominators).terms for b in (plain, prepared)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, value in terms[0].items():
        assert terms[1][name].item() == pytest.approx(value.item(), rel=1e-6), name


def _deepspeed_fp16_cast(inputs: tuple) -> tuple:
    """What ``DeepSpeedEngine.forward`` does to its positional inputs under ``fp16.auto_cast: true``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _Caster:
        def _cast_inputs_half(self, x):
            return DeepSpeedEngine._cast_inputs_half(self, x)

    return _Caster()._cast_inputs_half(inputs)


def test_loss_counts_survive_deepspeeds_fp16_input_cast():
    """The loop's counts for a global batch of 128 x 512 tokens (65,536 tokens and 33.5M attention pairs, both past
    fp16's 65,504) go through ``engine(batch, denominators)`` and DeepSpeed's fp16 auto_cast of its inputs: every
    distillation term equals the uncast one. They were float32 tensors: cast to fp16 they became inf, and the
    embedding, hidden and attention terms silently 0."""
    from ds_kd.train.loop import global_denominators

    big = {"input_ids": torch.zeros(128, 512, dtype=torch.long), "attention_mask": torch.ones(128, 512, dtype=torch.long),
           "labels": torch.full((128, 512), -100).index_fill_(1, torch.tensor([3, 77, 300]), 5)}
    denominators = global_denominators([big])
    assert denominators["tokens"] == 65536 and denominators["pairs"] == 128 * 512 ** 2
    batch = _packed_batches(1, seed=5)[0]
    distiller = Distiller(_model("tiny-base", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
    with torch.no_grad():
        want = distiller(batch, denominators).terms
        got = distiller(*_deepspeed_fp16_cast((batch, denominators))).terms
    for name, value in want.items():
        assert value.item() > 0 and got[name].item() == pytest.approx(value.item(), rel=1e-6), name
