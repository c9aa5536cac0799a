"""Packed rows are the same model function as one sentence per row (block-diagonal attention, positions
restarting per sentence), and every loss counts exactly what it counts unpacked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.train.loop import loss_denominators
from ds_kd.data.masking import Masker, MaskingConfig, pad_batch
from ds_kd.models.model import BertForMaskedLM, make_config, masked_lm_loss
from ds_kd.data.packing import best_fit, packed_batch, packing_efficiency

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
        # the scores come per sentence (SentenceScores); the masked T x T product gives them dense
        rows, width = packed["input_ids"].shape
        dense = [sp.to_dense(rows, width) for sp in p.attention_scores]
        model.bert.packed_attention = "masked"
        product = model.bert(packed["input_ids"], packed["attention_mask"], output_attention_scores=True,
                            position_ids=packed["position_ids"], sequence_ids=packed["sequence_ids"])
    worst = 0.0
    for i, (r, start, end) in where.items():
        n = end - start
        masked = unpacked["labels"][i, :n].ne(-100)
        pairs = [(logits_p[r, start:end][masked], logits_u[i, :n][masked]),
                 (p_fast[r, start:end], u.last_hidden_state[i, :n])]
        pairs += [(hp[r, start:end], hu[i, :n]) for hp, hu in zip(p.hidden_states, u.hidden_states)]
        pairs += [(sp[r, :, start:end, start:end], su[i, :, :n, :n]) for sp, su in zip(dense, u.attention_scores)]
        pairs += [(sm[r, :, start:end, start:end], su[i, :, :n, :n])
                  for sm, su in zip(product.attention_scores, u.attention_scores)]
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
            assert denominators[0][name] == denominators[1][name], name
        distiller = Distiller(_model("tiny-large", 1), _model("tiny-leanbert", 2), DistillConfig()).eval()
        terms = [distiller(b).terms for b in (packed, unpacked)]
    for name in ("mlm", "output", "embedding", "hidden", "attention"):
        assert terms[0][name].item() == pytest.approx(terms[1][name].item(), rel=1e-6, abs=1e-6), name


# ---- the packed reader ------------------------------------------------------------------------------------

from collections import Counter  # noqa: E402
from itertools import islice  # noqa: E402

from ds_kd.data.reader import ReaderConfig, ShardReader  # noqa: E402
from tests.helpers.shardgen import uid_of, write_corpus  # noqa: E402

SHARD_VOCAB, ROW_LEN = 300, 48
TRAIN = [30, 25, 40, 10, 17, 33]
NUM_TRAIN = sum(TRAIN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    shard_dir = tmp_path_factory.mktemp("packed") / "shards"
    return shard_dir, write_corpus(shard_dir, {"train": TRAIN, "val": [23, 9]}, vocab_size=SHARD_VOCAB, max_len=30)


def packed_config(shard_dir, **kw) -> ReaderConfig:
    return ReaderConfig(str(shard_dir), **{"micro_batch_size": 2, "num_workers": 2, "shuffle_window": 2,
                                           "max_len": ROW_LEN, "packing": True, **kw})


def sentences_of(batch: dict) -> list[tuple[int, list[int]]]:
    """(sentence id, original token ids) of every packed sentence, in row order."""
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    original = np.where(labels != -100, labels, inputs)
    out, k = [], 0
    for row in range(original.shape[0]):
        seq = batch["sequence_ids"][row].numpy()
        for s in range(1, int(seq.max()) + 1):
            out.append((int(batch["sentence_ids"][k]), original[row][seq == s].tolist()))
            k += 1
    return out


def packed_stream(shard_dir, world_size, num_workers, num_steps, state=None, micro=2):
    """Micro-step -> rank -> [(sentence id, tokens)] for ``num_steps`` micro-steps, optionally after ``state``."""
    out: dict[int, dict[int, list]] = {}
    for rank in range(world_size):
        reader = ShardReader(packed_config(shard_dir, num_workers=num_workers, micro_batch_size=micro), rank,
                             world_size)
        if state is not None:
            reader.load_state_dict(state)
        for step, batch in enumerate(islice(iter(reader), num_steps)):
            out.setdefault(step, {})[rank] = sentences_of(batch)
    return out


def test_packed_epochs_hold_every_sentence_once_in_full_rows(corpus):
    shard_dir, samples = corpus
    reader = ShardReader(packed_config(shard_dir, epochs=2, num_workers=0), 0, 1)
    counts, real, total = Counter(), 0, 0
    for batch in reader:
        assert batch["input_ids"].shape[1] <= ROW_LEN
        assert batch["position_ids"][batch["attention_mask"].bool()].min() == 0
        for sid, tokens in sentences_of(batch):
            assert uid_of(tokens, SHARD_VOCAB) == sid
            np.testing.assert_array_equal(tokens, samples["train"][sid][:ROW_LEN] if len(samples["train"][sid])
                                          <= ROW_LEN else np.r_[samples["train"][sid][:ROW_LEN - 1], 3])
            counts[sid] += 1
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].shape[0] * ROW_LEN
    assert sorted(counts) == list(range(NUM_TRAIN)) and set(counts.values()) == {2}
    assert real / total > 0.85  # best-fit rows of 48 from sentences of 4-33 tokens, windows of 14


def test_packed_reader_workers_prepare_the_step_layout(corpus):
    """With ``prepare=host_layout`` (what training passes) the DataLoader workers hand over each batch's loss
    counts, masked positions and per-sentence layout, equal to those built from the batch afterwards."""
    from ds_kd.train.loop import host_layout

    shard_dir, _ = corpus
    reader = ShardReader(packed_config(shard_dir, num_workers=2), 0, 1, prepare=host_layout)
    for batch in islice(iter(reader), 3):
        again = host_layout({k: batch[k] for k in ("labels", "attention_mask", "sequence_ids")})
        assert batch["counts"] == again["counts"]
        assert torch.equal(batch["masked_positions"], again["masked_positions"])
        got, want = batch["sentence_buckets"], again["sentence_buckets"]
        assert got.shapes == want.shapes and torch.equal(got.gather, want.gather)
        assert torch.equal(got.scatter, want.scatter)


def test_packed_order_does_not_depend_on_ranks_or_workers(corpus):
    shard_dir, _ = corpus
    one = packed_stream(shard_dir, 1, 0, 6, micro=4)  # micro 4 on 1 rank = 2 ranks x micro 2 per micro-step
    two = packed_stream(shard_dir, 2, 2, 6, micro=2)
    for step in range(6):
        assert one[step][0] == two[step][0] + two[step][1], step


def test_packed_resume_on_another_topology_sees_each_sentence_once(corpus):
    shard_dir, _ = corpus
    whole = packed_stream(shard_dir, 1, 0, 40, micro=4)
    reader = ShardReader(packed_config(shard_dir, micro_batch_size=2, num_workers=2), 0, 2)
    list(islice(iter(reader), 13))  # rank 0 of 2, 13 micro-steps: 52 rows of the job
    state = reader.state_dict()
    assert state["rows_consumed"] == 52 and len(json_bytes(state)) < 1024
    resumed = packed_stream(shard_dir, 1, 1, 27, state=state, micro=4)
    assert [resumed[s][0] for s in range(27)] == [whole[13 + s][0] for s in range(27)]
    with pytest.raises(ValueError, match="whole number of micro-steps of 1 ranks x 5 rows"):
        ShardReader(packed_config(shard_dir, micro_batch_size=5), 0, 1).load_state_dict(state)


def json_bytes(obj) -> bytes:
    import json

    return json.dumps(obj).encode()


def test_validation_perplexity_is_the_same_packed_and_unpacked(corpus):
    from ds_kd.train.loop import mlm_perplexity

    shard_dir, _ = corpus
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=SHARD_VOCAB, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0))
    results = [mlm_perplexity(model, ShardReader(ReaderConfig(str(shard_dir), split="val", micro_batch_size=4,
                                                              num_workers=0, max_len=ROW_LEN, packing=packing)))
               for packing in (True, False)]
    assert results[0]["val_tokens"] == results[1]["val_tokens"] > 0
    for key in results[1]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5), key
