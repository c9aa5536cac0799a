"""Loss counts never pass through a half-precision cast of the engine's inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.model import BertForMaskedLM, make_config
from ds_kd.packing import best_fit, packed_batch

VOCAB = 101


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
    from ds_kd.loop import global_denominators

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
