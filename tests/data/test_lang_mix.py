"""The language-balanced order (BiStil's 50/50 mix): equal counts per epoch, monolingual global batches, a pure
function of the position, exact on resume on another topology."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from ds_kd.data.lang_mix import BalancedOrder
from ds_kd.data.reader import ReaderConfig, ShardReader
from ds_kd.errors import UsageError
from tests.helpers.shardgen import sample_lang_id, write_corpus

CODES = ("en", "de")


def uneven_langs() -> np.ndarray:
    """100 English and 37 German sentences, interleaved irregularly."""
    langs = np.zeros(137, dtype=np.uint8)
    langs[np.random.default_rng(0).choice(137, 37, replace=False)] = 1
    return langs


def test_each_epoch_takes_equal_counts_in_alternating_monolingual_runs():
    langs = uneven_langs()
    order = BalancedOrder(langs, seed=3, run=8, lang_codes=CODES)
    assert order.per_lang == 32 and order.num_sentences == 64  # 37 German -> 4 runs of 8 per language
    epochs, ids = order.lookup(np.arange(3 * 64))
    assert epochs.tolist() == [e for e in range(3) for _ in range(64)]
    runs = langs[ids].reshape(-1, 8)
    assert (runs == runs[:, :1]).all()  # every run of 8 positions (a global batch) is one language
    assert runs[:, 0].tolist() == [0, 1] * 12  # the languages take turns
    for epoch in range(3):
        in_epoch = ids[epochs == epoch]
        assert Counter(langs[in_epoch].tolist()) == {0: 32, 1: 32}
        assert len(set(in_epoch.tolist())) == 64  # no sentence twice within an epoch
    english = [set(ids[(epochs == e) & (langs[ids] == 0)].tolist()) for e in range(3)]
    assert english[0] != english[1]  # the larger language gives another subset each epoch
    again = BalancedOrder(langs, seed=3, run=8, lang_codes=CODES).lookup(np.arange(100, 150))[1]
    assert again.tolist() == ids[100:150].tolist()  # deterministic, and any position can be asked first
    assert BalancedOrder(langs, seed=4, run=8, lang_codes=CODES).lookup(np.arange(64))[1].tolist() != \
        ids[:64].tolist()
    for consumed in range(0, 3 * 64 + 1, 5):
        seen = Counter(langs[ids[:consumed]].tolist())
        assert order.counts(consumed) == {"en": seen[0], "de": seen[1]}


def test_one_language_or_a_language_smaller_than_a_batch_is_refused():
    with pytest.raises(UsageError, match="one language \\(en\\)"):
        BalancedOrder(np.zeros(50, dtype=np.uint8), seed=0, run=4, lang_codes=CODES)
    with pytest.raises(UsageError, match="de has 37 training sentences, fewer than one global batch \\(40\\)"):
        BalancedOrder(uneven_langs(), seed=0, run=40, lang_codes=CODES)


@pytest.fixture(scope="module")
def pair_corpus(tmp_path_factory):
    shard_dir = tmp_path_factory.mktemp("pair") / "shards"
    write_corpus(shard_dir, {"train": [30, 25, 41], "val": [10]}, vocab_size=300, lang_codes=CODES)
    return shard_dir


def read(shard_dir, rank: int, world_size: int, micro: int, steps: int, state: dict | None = None,
         workers: int = 1) -> tuple[list[dict], ShardReader]:
    reader = ShardReader(ReaderConfig(str(shard_dir), micro_batch_size=micro, num_workers=workers, lang_run=6),
                         rank, world_size)
    if state is not None:
        reader.load_state_dict(state)
    return list(islice(iter(reader), steps)), reader


def test_reader_batches_are_monolingual_and_resume_exactly_on_another_topology(pair_corpus):
    # global batch 6: 2 ranks x micro 3, or 1 rank x micro 6 (what --lang-mix balanced passes as the run)
    ranks = [read(pair_corpus, r, 2, 3, 20)[0] for r in (0, 1)]
    two_ranks = [torch.cat([ranks[0][s]["sentence_ids"], ranks[1][s]["sentence_ids"]]) for s in range(20)]
    langs = [{sample_lang_id(i, CODES) for i in ids.tolist()} for ids in two_ranks]
    assert all(len(l) == 1 for l in langs)  # each global batch is one language
    assert [l.pop() for l in langs] == [0, 1] * 10
    one_rank, reader = read(pair_corpus, 0, 1, 6, 9)
    assert [b["sentence_ids"].tolist() for b in one_rank] == [ids.tolist() for ids in two_ranks[:9]]
    state = json.loads(json.dumps(reader.state_dict()))
    assert state["sentences_per_lang"] == {"en": 30, "de": 24} and state["lang_run"] == 6
    resumed, _ = read(pair_corpus, 1, 2, 3, 11, state)  # killed after 9 global batches, resumed on 2 ranks
    assert [b["sentence_ids"].tolist() for b in resumed] == [ids[3:].tolist() for ids in two_ranks[9:]]
    for got, want in zip(resumed, ranks[1][9:]):
        assert torch.equal(got["input_ids"], want["input_ids"])  # the same masks too
    with pytest.raises(UsageError, match="--packing off"):
        ShardReader(ReaderConfig(str(pair_corpus), micro_batch_size=3, lang_run=6, packing=True))
    plain = ShardReader(ReaderConfig(str(pair_corpus), micro_batch_size=6, num_workers=0))
    with pytest.raises(UsageError, match="lang_run"):
        plain.load_state_dict(state)  # a balanced position is not a position of the corpus's mix
