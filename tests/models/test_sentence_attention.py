"""Packed rows attend per sentence (ds_kd.models.sentence_attention): the same function, values and gradients, as the
masked T x T product, with about as many scores per token as its sentence has tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_kd.models.model import BertForMaskedLM, make_config
from ds_kd.models.sentence_attention import MIN_WIDTH, SentenceBuckets


def _rows(lengths_per_row: list[list[int]], width: int) -> torch.Tensor:
    """sequence_ids [B, T] of rows holding sentences of the given lengths, in order, padding after them."""
    ids = torch.zeros(len(lengths_per_row), width, dtype=torch.long)
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for k, n in enumerate(lengths, start=1):
            ids[r, start:start + n] = k
            start += n
    return ids


# Sentences of 1 token, exactly a bucket width (16, 32), one past it (17, 33), a row-long sentence, padding.
ROWS = [[1, 16, 17, 9], [64], [33, 3, 2, 15], [32, 5]]


def _positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(sequence_ids)
    for r in range(sequence_ids.shape[0]):
        for k in sequence_ids[r].unique().tolist():
            where = sequence_ids[r] == k
            pos[r, where] = torch.arange(int(where.sum()))
    return pos


@pytest.mark.parametrize("shuffle_ids", [False, True])
def test_per_sentence_attention_gives_the_masked_products_values_and_gradients(shuffle_ids):
    torch.manual_seed(0)
    seq = _rows(ROWS, 64)
    if shuffle_ids:  # ids need not increase along a row, nor sentences be contiguous
        seq = torch.where(seq > 0, (seq * 7) % 5 + 1, seq)
    real = seq > 0
    input_ids = torch.randint(5, 90, seq.shape) * real
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=90, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0))
    results = {}
    for way in ("sentences", "masked"):
        model.zero_grad()
        model.bert.packed_attention = way
        out = model.bert(input_ids, real.long(), output_hidden_states=True, position_ids=_positions(seq),
                         sequence_ids=seq)
        # a loss that reaches every real token of every layer
        loss = sum((h[real] * torch.linspace(-1, 1, h.shape[-1])).sum() for h in out.hidden_states)
        loss.backward()
        results[way] = ([h[real].detach() for h in out.hidden_states],
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (hs, grads), (hm, gradm) = results["sentences"], results["masked"]
    assert max((a - b).abs().max().item() for a, b in zip(hs, hm)) <= 1e-5
    assert grads.keys() == gradm.keys() and len(grads) > 10
    # relative to each gradient's scale (the key biases' gradients are 0 up to rounding: softmax ignores them)
    assert max(((grads[n] - gradm[n]).abs().max() / gradm[n].abs().max().clamp_min(1.0)).item()
               for n in grads) <= 1e-5


def test_each_sentence_sits_in_a_bucket_at_most_twice_its_length():
    seq = _rows(ROWS, 64)
    buckets = SentenceBuckets.build(seq)
    flat = seq.reshape(-1)
    real = torch.nonzero(flat > 0).squeeze(1)
    assert torch.equal(buckets.gather[buckets.scatter[real]], real)  # every real token has its own slot
    # sentence by sentence: its bucket's width is at most max(16, 2 x its length), and its slots hold only it
    start = 0
    for (n, w), mask in zip(buckets.shapes, buckets.key_masks):
        keep = torch.ones(n, w, dtype=torch.bool) if mask is None else mask.view(n, w)
        tokens = buckets.gather[start:start + n * w].view(n, w)
        for s in range(n):
            mine = tokens[s][keep[s]]
            rows, ids = mine // 64, flat[mine]
            assert rows.unique().numel() == 1 and ids.unique().numel() == 1  # one sentence of one row
            assert int((seq[rows[0]] == ids[0]).sum()) == mine.numel()  # all of it
            assert w <= max(MIN_WIDTH, 2 * mine.numel())
        start += n * w


def test_a_realistic_packed_batch_computes_a_fraction_of_the_masked_products_scores():
    # sentences of the default corpus's shape (mean about 17 tokens) packed into 8 rows of 128
    rng = np.random.default_rng(0)
    rows, width = [], 128
    for _ in range(8):
        row, left = [], width
        while True:
            n = int(np.clip(rng.geometric(1 / 17), 3, 60))
            if n > left:
                break
            row.append(n)
            left -= n
        rows.append(row)
    buckets = SentenceBuckets.build(_rows(rows, width))
    scores = sum(n * w * w for n, w in buckets.shapes)
    block_diagonal = sum(n * n for row in rows for n in row)  # the pairs attention needs
    assert scores <= 2 * block_diagonal
    assert scores <= 0.35 * 8 * width * width


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="without any real token"):
        SentenceBuckets.build(torch.zeros(2, 8, dtype=torch.long))
    model = BertForMaskedLM(make_config("tiny-leanbert", vocab_size=90))
    model.bert.packed_attention = "flash"
    with pytest.raises(ValueError, match="packed_attention 'flash'"):
        model.bert(torch.ones(1, 4, dtype=torch.long))


def test_distillation_with_the_attention_loss_trains_the_same_per_sentence_as_with_the_masked_product():
    from tests.data.test_packing import _layouts, _model

    from ds_kd.distill import DistillConfig, Distiller
    from ds_kd.distill.losses import attention_mse

    packed = _layouts()[0]
    distiller = Distiller(_model("tiny-large", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
    results = {}
    for way in ("sentences", "masked"):
        for encoder in (distiller.teacher.bert, distiller.student.bert):
            encoder.packed_attention = way
        distiller.zero_grad()
        out = distiller(packed)
        out.loss.backward()
        results[way] = ({k: v.item() for k, v in out.terms.items()},
                        {n: p.grad.clone() for n, p in distiller.student.named_parameters() if p.grad is not None})
    (terms_s, grads_s), (terms_m, grads_m) = results["sentences"], results["masked"]
    assert terms_s["attention"] > 0
    for name in terms_m:
        assert terms_s[name] == pytest.approx(terms_m[name], rel=1e-6, abs=1e-6), name
    assert max(((grads_s[n] - grads_m[n]).abs().max() / grads_m[n].abs().max().clamp_min(1.0)).item()
               for n in grads_m) <= 1e-5
    # both sides must come in one per-sentence layout
    distiller.student.bert.packed_attention = "sentences"
    seq = packed["sequence_ids"]
    one = distiller.student.bert(packed["input_ids"], output_attention_scores=True, sequence_ids=seq,
                                 position_ids=packed["position_ids"]).attention_scores[0]
    other = distiller.student.bert(packed["input_ids"][:1], output_attention_scores=True, sequence_ids=seq[:1],
                                   position_ids=packed["position_ids"][:1]).attention_scores[0]
    with pytest.raises(ValueError, match="one per-sentence layout"):
        attention_mse(one, other, seq)


def _packed_inputs():
    torch.manual_seed(0)
    seq = _rows(ROWS, 64)
    return torch.randint(5, 90, seq.shape) * (seq > 0), seq, _positions(seq)


def test_in_bf16_both_paths_agree_within_its_precision():
    input_ids, seq, pos = _packed_inputs()
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=90)).eval().to(torch.bfloat16)
    outs = {}
    for way in ("sentences", "masked"):
        model.bert.packed_attention = way
        with torch.no_grad():
            outs[way] = model.bert(input_ids, sequence_ids=seq, position_ids=pos).last_hidden_state[seq > 0].float()
    scale = outs["masked"].abs().max()
    assert torch.isfinite(outs["sentences"]).all()
    assert (outs["sentences"] - outs["masked"]).abs().max() <= 0.05 * scale  # bf16 keeps 8 bits of mantissa


def test_with_attention_dropout_both_paths_give_the_same_distribution():
    input_ids, seq, pos = _packed_inputs()
    torch.manual_seed(1)
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=90, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.3)).train()
    samples = {}
    with torch.no_grad():
        for way in ("sentences", "masked"):
            model.bert.packed_attention = way
            samples[way] = torch.stack([model.bert(input_ids, sequence_ids=seq, position_ids=pos)
                                        .last_hidden_state[seq > 0] for _ in range(300)])
    s, m = samples["sentences"], samples["masked"]
    assert (s[0] - s[1]).abs().max() > 1e-3  # the dropout is applied
    # the means of the two paths' outputs differ by no more than sampling error (z-score over every element)
    stderr = ((s.var(0) + m.var(0)) / s.shape[0]).sqrt().clamp_min(1e-6)
    assert ((s.mean(0) - m.mean(0)).abs() / stderr).max() <= 6.0
    # and dropout shifts the outputs away from the eval ones: the test could see a path that ignored it
    model.eval()
    with torch.no_grad():
        eval_out = model.bert(input_ids, sequence_ids=seq, position_ids=pos).last_hidden_state[seq > 0]
    assert s.std(0).mean() > 1e-3 and (eval_out - s[0]).abs().max() > 1e-3


def test_distillation_builds_one_layout_per_batch_for_teacher_and_student(monkeypatch):
    from tests.data.test_packing import _layouts, _model

    from ds_kd.distill import DistillConfig, Distiller

    packed = _layouts()[0]
    distiller = Distiller(_model("tiny-large", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
    built = []
    original = SentenceBuckets.build.__func__
    monkeypatch.setattr(SentenceBuckets, "build", classmethod(lambda cls, ids: built.append(1) or original(cls, ids)))
    with torch.no_grad():
        assert torch.isfinite(distiller(packed).loss)
    assert len(built) == 1
