"""The shard reader: one global order whatever the topology, exact resume on another topology, masking,
padding, bad shards."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import ds_kd.data.reader as reader_mod
from ds_kd.manifest import MissingStageError, write_manifest
from ds_kd.data.masking import IGNORE_INDEX, Masker, MaskingConfig
from ds_kd.data.reader import ReaderConfig, ShardReader
from ds_kd.data.shards import BlockTable, ShardError, check_vocab, read_shards_manifest, verify_shards
from ds_kd.schema import SPECIAL_TOKENS
from tests.helpers.shardgen import CLS, MASK, PAD, SEP, UNK, sample_lang_id, uid_of, unmask, write_corpus

VOCAB = 300
BERT_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}  # shardgen's ids, by token as older manifests
SPECIALS = {PAD, UNK, CLS, SEP, MASK}
TRAIN = [30, 25, 40, 10, 17, 33]  # 155 sentences in 6 shards of blocks of 7
NUM_TRAIN = sum(TRAIN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    shard_dir = tmp_path_factory.mktemp("corpus") / "shards"
    return shard_dir, write_corpus(shard_dir, {"train": TRAIN, "val": [23, 9]}, vocab_size=VOCAB)


def config(shard_dir, **kw) -> ReaderConfig:
    return ReaderConfig(str(shard_dir), **{"micro_batch_size": 3, "num_workers": 2, "shuffle_window": 2, **kw})


def take(reader: ShardReader, num: int) -> list[dict]:
    return list(islice(iter(reader), num))


def by_position(shard_dir, world_size: int, num_workers: int, micro: int, num_steps: int, **kw) -> dict[int, tuple]:
    """Stream position -> (sentence id, input ids, labels) over ``num_steps`` micro-steps of every rank."""
    out = {}
    for rank in range(world_size):
        reader = ShardReader(config(shard_dir, micro_batch_size=micro, num_workers=num_workers, **kw), rank,
                             world_size)
        for step, batch in enumerate(take(reader, num_steps)):
            first = step * world_size * micro + rank * micro
            for row, sid in enumerate(batch["sentence_ids"].tolist()):
                n = int(batch["attention_mask"][row].sum())
                out[first + row] = (sid, batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist())
    return out


def test_every_sentence_once_per_epoch_across_2_ranks_x_2_workers(corpus):
    shard_dir, samples = corpus
    per_epoch: dict[int, Counter] = {0: Counter(), 1: Counter()}
    orders = {0: [], 1: []}
    for rank in (0, 1):
        reader = ShardReader(config(shard_dir, epochs=2), rank=rank, world_size=2)
        for step, batch in enumerate(reader):
            epoch = (step * 6 + rank * 3) // NUM_TRAIN  # the epoch of the batch's first position
            for ids, lang_id, sid in zip(unmask(batch), batch["lang_ids"].tolist(), batch["sentence_ids"].tolist()):
                uid = uid_of(ids, VOCAB)
                assert uid == sid
                np.testing.assert_array_equal(ids, samples["train"][uid])  # tokens round-trip exactly
                assert lang_id == sample_lang_id(uid)
                per_epoch[epoch][uid] += 1
                orders[epoch].append(uid)
    counts = per_epoch[0] + per_epoch[1]
    assert sorted(counts) == list(range(NUM_TRAIN)) and set(counts.values()) == {2}, "a sentence missed or repeated"
    assert orders[0][:20] != orders[1][:20], "the shuffle does not change between epochs"


def test_the_order_does_not_depend_on_ranks_workers_or_micro_batch(corpus):
    shard_dir, _ = corpus
    reference = by_position(shard_dir, 1, 0, 12, 30)  # 360 positions: over two epochs
    assert len(reference) == 360
    for world_size, num_workers, micro in ((2, 2, 6), (3, 1, 4), (4, 2, 3), (1, 2, 5)):
        got = by_position(shard_dir, world_size, num_workers, micro, 360 // (world_size * micro))
        common = sorted(set(got) & set(reference))
        assert len(common) >= 300
        assert [got[p] for p in common] == [reference[p] for p in common], (world_size, num_workers, micro)
    # the first epoch is a permutation, not the shard order
    assert [reference[p][0] for p in range(NUM_TRAIN)] != list(range(NUM_TRAIN))


def test_resume_on_another_topology_continues_exactly(corpus):
    shard_dir, _ = corpus
    first = ShardReader(config(shard_dir, micro_batch_size=4, num_workers=2), 1, 2)  # rank 1 of 2
    take(first, 7)  # 7 micro-steps of 2 ranks x 4: 56 sentences
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint file
    assert state["sentences_consumed"] == 56
    resumed = ShardReader(config(shard_dir, micro_batch_size=4, num_workers=1), 0, 1)
    resumed.load_state_dict(state)
    fresh = ShardReader(config(shard_dir, micro_batch_size=4, num_workers=0), 0, 1)
    expected = take(fresh, 14 + 40)[14:]  # one rank: 14 micro-steps of 4 are the same 56 sentences
    got = take(resumed, 40)
    for i, (a, b) in enumerate(zip(got, expected)):
        for name in a:
            if torch.is_tensor(a[name]):
                assert torch.equal(a[name], b[name]), f"batch {i} differs in {name}"
            else:
                assert a[name] == b[name], f"batch {i} differs in {name}"
    assert resumed.state_dict()["sentences_consumed"] == 56 + 160


@pytest.mark.parametrize("world_size", [1, 2, 64])
def test_state_is_a_few_integers_of_the_same_size_on_every_topology(corpus, world_size):
    shard_dir, _ = corpus
    reader = ShardReader(config(shard_dir), world_size - 1, world_size)
    take(reader, 3)
    state = reader.state_dict()
    text = json.dumps(state)
    assert len(text) < 1024
    assert state["sentences_consumed"] == 3 * 3 * world_size
    assert set(state) == {"version", "split", "seed", "epoch", "sentences_consumed", "corpus", "shuffle",
                          "shuffle_window", "max_len", "masking", "packing", "lang_run"}


def test_resume_reads_only_the_window_of_the_position(corpus, monkeypatch):
    shard_dir, _ = corpus
    reads = Counter()
    masks = Counter()
    real_read, real_mask = BlockTable.read, Masker.mask
    monkeypatch.setattr(BlockTable, "read", lambda self, b: reads.update([b]) or real_read(self, b))
    monkeypatch.setattr(Masker, "mask", lambda self, *a: masks.update(["mask"]) or real_mask(self, *a))
    reader = ShardReader(config(shard_dir, num_workers=0))
    reader.load_state_dict({**reader.state_dict(), "sentences_consumed": 3 * 10**6})  # epoch 19354
    batch = next(iter(reader))
    assert len(batch["sentence_ids"]) == 3
    assert sum(reads.values()) <= 2 * 2  # at most the blocks of two windows of 2 blocks, of 23 blocks
    assert masks["mask"] == 3  # only the sentences handed out are masked


def test_masking_statistics():
    cfg = MaskingConfig()
    masker = Masker(cfg, VOCAB, SPECIALS, MASK)
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[CLS], rng.integers(5, VOCAB, 60), [UNK, SEP]]) for _ in range(2000)]
    selected = masked = randomised = kept = candidates = 0
    for i, ids in enumerate(seqs):
        inputs, labels = masker.mask(ids, np.random.default_rng(i))
        chosen = labels != IGNORE_INDEX
        assert not np.isin(ids[chosen], list(SPECIALS)).any(), "a special token was selected"
        np.testing.assert_array_equal(labels[chosen], ids[chosen])
        np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
        changed = chosen & (inputs != MASK) & (inputs != ids)
        assert not np.isin(inputs[changed], list(SPECIALS)).any(), "a random replacement is a special token"
        candidates += int((~np.isin(ids, list(SPECIALS))).sum())
        selected += int(chosen.sum())
        masked += int((inputs[chosen] == MASK).sum())
        randomised += int(changed.sum())
        kept += int((chosen & (inputs == ids)).sum())
    assert abs(selected / candidates - 0.15) < 0.005
    assert abs(masked / selected - 0.8) < 0.015
    assert abs(randomised / selected - 0.1) < 0.012
    assert abs(kept / selected - 0.1) < 0.012


def test_batches_pad_to_longest_and_never_label_pads_or_specials(corpus):
    shard_dir, _ = corpus
    saw_ragged = False
    for batch in ShardReader(config(shard_dir, epochs=1, micro_batch_size=8)):
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())
        for row, n in enumerate(lengths.tolist()):
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["input_ids"][row, n:] == PAD).all()
        labels = batch["labels"]
        assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all(), "a pad position is labelled"
        original = torch.where(labels != IGNORE_INDEX, labels, batch["input_ids"])
        specials = torch.isin(original, torch.tensor(sorted(SPECIALS)))
        assert (labels[specials] == IGNORE_INDEX).all(), "a special token is labelled"
        assert ((labels != IGNORE_INDEX).sum(1) >= 1).all(), "a row has nothing to predict"
        for name in ("input_ids", "attention_mask", "labels", "lang_ids", "sentence_ids"):
            assert batch[name].dtype == torch.long
        saw_ragged |= int(lengths.min()) < int(lengths.max())
    assert saw_ragged


def test_long_sentences_are_cut_keeping_sep(corpus):
    shard_dir, samples = corpus
    cut = 0
    for batch in ShardReader(config(shard_dir, epochs=1, num_workers=0, max_len=8)):
        assert batch["input_ids"].shape[1] <= 8
        for ids in unmask(batch):
            full = samples["train"][uid_of(ids, VOCAB)]
            if len(full) > 8:
                cut += 1
                np.testing.assert_array_equal(ids, np.concatenate([full[:7], [SEP]]))
    assert cut > 0


def test_val_is_read_once_in_shard_order_with_fixed_masks_on_any_topology(corpus):
    shard_dir, samples = corpus

    def val(world_size, num_workers, batch_size):
        out = {}
        for rank in range(world_size):
            cfg = ReaderConfig(str(shard_dir), split="val", micro_batch_size=batch_size, num_workers=num_workers)
            for step, batch in enumerate(ShardReader(cfg, rank, world_size)):
                first = step * world_size * batch_size + rank * batch_size
                for row, ids in enumerate(unmask(batch)):
                    n = len(ids)
                    assert first + row not in out
                    out[first + row] = (uid_of(ids, VOCAB), batch["input_ids"][row, :n].tolist(),
                                        batch["labels"][row, :n].tolist())
        return out

    single = val(1, 0, 4)
    num_val = len(samples["val"])
    assert sorted(single) == list(range(num_val))
    assert [single[p][0] for p in range(num_val)] == list(range(num_val))  # shard order, every sentence once
    assert val(2, 2, 3) == single
    assert val(3, 1, 5) == single


def test_sentence_log_records_positions_and_ids(corpus, tmp_path, monkeypatch):
    shard_dir, _ = corpus
    monkeypatch.setenv(reader_mod.SENTENCE_LOG_ENV, str(tmp_path / "log"))
    ids = {}
    for rank in (0, 1):
        for step, batch in enumerate(take(ShardReader(config(shard_dir), rank, 2), 4)):
            for row, sid in enumerate(batch["sentence_ids"].tolist()):
                ids[step * 6 + rank * 3 + row] = sid
    logged = {}
    for rank in (0, 1):
        for line in (tmp_path / "log" / f"train-rank{rank}.tsv").read_text().splitlines():
            position, sid = map(int, line.split("\t"))
            logged[position] = sid
    assert logged == ids and sorted(logged) == list(range(24))


def test_dropout_seeds_follow_positions_not_topology(corpus):
    shard_dir, _ = corpus
    two = [b["dropout_seed"] for rank in (0, 1) for b in take(ShardReader(config(shard_dir), rank, 2), 3)]
    one = [b["dropout_seed"] for b in take(ShardReader(config(shard_dir, num_workers=0), 0, 1), 6)]
    # rank r's micro-step j covers the positions of one-rank micro-step 2j + r
    assert sorted(two) == sorted(one) and len(set(one)) == 6


def test_resume_refuses_a_different_stream_or_position(corpus, tmp_path):
    shard_dir, _ = corpus
    reader = ShardReader(config(shard_dir, num_workers=0))
    take(reader, 2)
    state = reader.state_dict()
    with pytest.raises(ValueError, match="max_len: saved 512, now 64"):
        ShardReader(config(shard_dir, num_workers=0, max_len=64)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardReader(config(shard_dir, num_workers=0, seed=5)).load_state_dict(state)
    with pytest.raises(ValueError, match="keep the global batch"):
        ShardReader(config(shard_dir, num_workers=0, micro_batch_size=4)).load_state_dict(state)  # 6 % 4
    other = tmp_path / "other"
    write_corpus(other, {"train": TRAIN}, vocab_size=VOCAB, seed=9)
    with pytest.raises(ValueError, match="corpus"):
        ShardReader(config(other, num_workers=0)).load_state_dict(state)


# ---- bad input ---------------------------------------------------------------------------------------

def bad_corpus(tmp_path) -> Path:
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [20, 20, 20]}, vocab_size=VOCAB)
    return shard_dir


def read_all(shard_dir, num_workers: int) -> None:
    for _ in ShardReader(config(shard_dir, epochs=1, num_workers=num_workers)):
        pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_garbled_block_is_named_with_its_shard(tmp_path, num_workers):
    shard_dir = bad_corpus(tmp_path)
    entry = read_shards_manifest(shard_dir)["splits"]["train"]["shards"][1]
    path = shard_dir / "train" / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    at = entry["blocks"]["offset"][2] + 512 + 128 + 4  # inside block 2's token ids: same size, other bytes
    data[at:at + 4] = b"\x07\x00\x07\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001.tar: block 2 \(block-000000005\).*crc32"):
        read_all(shard_dir, num_workers)
    with pytest.raises(ShardError, match="shard-000001.tar: sha256 .* differs"):
        verify_shards(shard_dir)


def test_verify_shards_checks_every_byte(tmp_path, capsys):
    shard_dir = bad_corpus(tmp_path)
    assert verify_shards(shard_dir) == sum((shard_dir / "train" / f"shard-00000{i}.tar").stat().st_size
                                           for i in range(3))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][2]["sha256"] = "0" * 64
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-000002.tar: sha256"):
        verify_shards(shard_dir)
    from data_prep.verify import main

    assert main(["--shards", str(shard_dir)]) == 2
    assert "shard-000002.tar: sha256" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_truncated_shard_is_named_with_its_first_missing_block(tmp_path):
    shard_dir = bad_corpus(tmp_path)
    entry = read_shards_manifest(shard_dir)["splits"]["train"]["shards"][1]
    path = shard_dir / "train" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[: entry["blocks"]["offset"][1] + 700])  # inside block 1
    with pytest.raises(ShardError, match=r"shard-000001.tar: holds \d+ bytes .*truncated from block 1 on"):
        read_all(shard_dir, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_offsets_that_disagree_with_the_tokens_are_named(tmp_path, monkeypatch, num_workers):
    import data_prep.shard as shard_mod

    real = shard_mod.npy_bytes

    def shifted(array):  # the writer's offsets of block 4 point one token too far
        if array.dtype == np.dtype("<u4") and len(array) == 8 and shifted.calls == 3 * 4 + 1:
            array = array.copy()
            array[1:-1] += 1
        shifted.calls += 1
        return real(array)

    shifted.calls = 0
    monkeypatch.setattr(shard_mod, "npy_bytes", shifted)
    shard_dir = bad_corpus(tmp_path)  # a consistent manifest (crc32 of what was written), wrong offsets
    with pytest.raises(ShardError, match=r"shard-000001.tar: block 1 \(block-000000004\): offsets disagree"):
        read_all(shard_dir, num_workers)


def test_missing_manifest_and_missing_shard(tmp_path):
    with pytest.raises(MissingStageError, match=str(tmp_path / "manifest.json")):
        read_shards_manifest(tmp_path)
    with pytest.raises(MissingStageError):
        ShardReader(config(tmp_path))
    shard_dir = bad_corpus(tmp_path)
    (shard_dir / "train" / "shard-000002.tar").unlink()
    with pytest.raises(ShardError, match="shard-000002.tar: shard listed in .*manifest.json does not exist"):
        ShardReader(config(shard_dir))


def test_old_schema_is_refused_naming_the_command_that_rewrites_it(tmp_path):
    shard_dir = tmp_path / "shards"
    write_manifest(shard_dir, "corpus.shards", vocab_size=VOCAB,
                   splits={"train": {"num_samples": 1, "shards": [{"file": "shard-000000.tar", "num_samples": 1}]}})
    with pytest.raises(ValueError, match=r"schema version 1 .*python -m data_prep corpus"):
        ShardReader(config(shard_dir))


def test_vocab_mismatch_names_the_manifest(corpus):
    shard_dir, _ = corpus
    check_vocab(shard_dir, VOCAB)
    with pytest.raises(ValueError, match=str(shard_dir / "manifest.json")):
        check_vocab(shard_dir, VOCAB + 1, what="tokenizer")


def test_token_ids_outside_the_vocabulary_are_reported(tmp_path):
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [6]}, vocab_size=VOCAB)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (shard_dir / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 100}))
    with pytest.raises(ShardError, match=r"shard-000000.tar: block 0 .*outside the manifest's vocabulary of 100"):
        next(iter(ShardReader(config(shard_dir, num_workers=0))))
