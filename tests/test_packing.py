"""Packed rows are the same model function as one sentence per row (block-diagonal attention, positions
restarting per sentence), and every loss counts exactly what it counts unpacked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.loop import loss_denominators
from ds_kd.masking import Masker, MaskingConfig, pad_batch
from ds_kd.model import BertForMaskedLM, make_config, masked_lm_loss
from ds_kd.packing import best_fit, packed_batch, packing_efficiency

VOCAB, MAX_LEN = 90, 64


def _model(preset: str, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(make_config(preset, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)).eval()


def _sentences(num=14, seed=0):
    rng = np.random.default_rng(seed)
    masker = Masker(MaskingConfig(), VOCAB, range(5), 4)
    inputs, labels, langs = [], [], []
    for i in range(num):
        n = int(rng.integers(3, 41))
        ids = np.concatenate([[2], rng.integers(5, VOCAB, n - 2), [3]])
        x, y = masker.mask(ids, np.random.default_rng([seed, i]))
        inputs.append(x)
        labels.append(y)
        langs.append(i % 3)
    return inputs, labels, langs


def _layouts():
    inputs, labels, langs = _sentences()
    rows = best_fit([len(x) for x in inputs], MAX_LEN)
    packed = packed_batch(inputs, labels, langs, rows, pad_id=0)
    unpacked = pad_batch(inputs, labels, langs, pad_id=0)
    # where sentence i sits in the packed batch: (row, start, end)
    where = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            where[i] = (r, start, start + len(inputs[i]))
            start += len(inputs[i])
    return packed, unpacked, where, [len(x) for x in inputs]


def test_best_fit_fills_rows_with_whole_sentences():
    lengths = [30, 60, 5, 34, 64, 12, 20, 3]
    rows = best_fit(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 4  # 228 tokens: 4 rows of 64 is the minimum
    assert best_fit(lengths, 64) == rows  # deterministic
    with pytest.raises(ValueError, match="outside 1..64"):
        best_fit([65], 64)


def test_packed_batch_layout():
    packed, unpacked, where, lengths = _layouts()
    assert packed["input_ids"].shape[1] <= MAX_LEN
    assert int(packed["attention_mask"].sum()) == sum(lengths) == int(unpacked["attention_mask"].sum())
    for i, (r, start, end) in where.items():
        assert packed["position_ids"][r, start:end].tolist() == list(range(end - start))
        assert packed["input_ids"][r, start] == 2 and packed["input_ids"][r, end - 1] == 3  # own [CLS] ... [SEP]
        assert packed["lang_ids"][r, start:end].eq(i % 3).all()
        assert torch.equal(packed["labels"][r, start:end], unpacked["labels"][i, :end - start])
    num_rows = packed["input_ids"].shape[0]
    assert num_rows == -(-sum(lengths) // MAX_LEN)  # as few rows as the tokens need
    assert packing_efficiency(packed) > 1.5 * packing_efficiency(unpacked)


def test_every_sentence_gets_the_outputs_it_gets_alone():
    packed, unpacked, where, _ = _layouts()
    model = _model("tiny-base", 0)
    with torch.no_grad():
        p = model.bert(packed["input_ids"], packed["attention_mask"], output_hidden_states=True,
                       output_attention_scores=True, position_ids=packed["position_ids"],
                       sequence_ids=packed["sequence_ids"])
        u = model.bert(unpacked["input_ids"], unpacked["attention_mask"], output_hidden_states=True,
                       output_attention_scores=True)
        # the default SDPA path (no scores asked) too
        p_fast = model.bert(packed["input_ids"], packed["attention_mask"], position_ids=packed["position_ids"],
                            sequence_ids=packed["sequence_ids"]).last_hidden_state
        logits_p = model.cls.predictions(p.last_hidden_state)
        logits_u = model.cls.predictions(u.last_hidden_state)
    worst = 0.0
    for i, (r, start, end) in where.items():
        n = end - start
        masked = unpacked["labels"][i, :n].ne(-100)
        pairs = [(logits_p[r, start:end][masked], logits_u[i, :n][masked]),
                 (p_fast[r, start:end], u.last_hidden_state[i, :n])]
        pairs += [(hp[r, start:end], hu[i, :n]) for hp, hu in zip(p.hidden_states, u.hidden_states)]
        pairs += [(sp[r, :, start:end, start:end], su[i, :, :n, :n])
                  for sp, su in zip(p.attention_scores, u.attention_scores)]
        worst = max(worst, *((a - b).abs().max().item() for a, b in pairs))
    assert worst <= 1e-5


def test_mlm_loss_and_every_distillation_term_count_what_they_count_unpacked():
    packed, unpacked, _, _ = _layouts()
    model = _model("tiny-base", 0)
    with torch.no_grad():
        losses = []
        for b in (packed, unpacked):
            masked = b["labels"].ne(-100)
            out = model(b["input_ids"], b["attention_mask"], predicted=masked, position_ids=b.get("position_ids"),
                        sequence_ids=b.get("sequence_ids"))
            losses.append(masked_lm_loss(out.logits, b["labels"][masked]).item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
        denominators = [loss_denominators(b) for b in (packed, unpacked)]
        for name in ("masked", "tokens", "pairs"):
            assert denominators[0][name].item() == denominators[1][name].item(), name
        distiller = Distiller(_model("tiny-large", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
        terms = [distiller(b).terms for b in (packed, unpacked)]
    for name in ("mlm", "output", "embedding", "hidden", "attention"):
        assert terms[0][name].item() == pytest.approx(terms[1][name].item(), rel=1e-6, abs=1e-6), name
