"""The shard reader: disjoint ranks and workers, epochs, exact resume, masking, padding, bad shards."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import ds_kd.reader as reader_mod
from ds_kd.manifest import MissingStageError, write_manifest
from ds_kd.masking import IGNORE_INDEX, Masker, MaskingConfig
from ds_kd.reader import ReaderConfig, ShardError, ShardReader, check_vocab, read_shards_manifest
from ds_kd.schema import SPECIAL_TOKENS
from shardgen import CLS, MASK, PAD, SEP, UNK, sample_lang_id, uid_of, unmask, write_corpus

VOCAB = 300
BERT_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}  # shardgen's ids, by token as older manifests
SPECIALS = {PAD, UNK, CLS, SEP, MASK}
MANY_SHARDS = [30, 25, 40, 10, 17, 33]  # >= 2 ranks x 2 workers: split by shard
FEW_SHARDS = [50, 41]  # < 2 ranks x 2 workers: split by sample index


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    out = {}
    for name, sizes in (("many", MANY_SHARDS), ("few", FEW_SHARDS)):
        shard_dir = tmp_path_factory.mktemp(name) / "shards"
        out[name] = (shard_dir, write_corpus(shard_dir, {"train": sizes, "val": [23]}, vocab_size=VOCAB))
    return out


def config(shard_dir, **kw) -> ReaderConfig:
    return ReaderConfig(str(shard_dir), **{"micro_batch_size": 3, "num_workers": 2, "shuffle_buffer": 7, **kw})


def take(reader: ShardReader, num: int) -> list[dict]:
    return list(islice(iter(reader), num))


@pytest.mark.parametrize("corpus", ["many", "few"])
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(corpora, corpus):
    shard_dir, samples = corpora[corpus]
    per_epoch: dict[int, Counter] = {0: Counter(), 1: Counter()}
    orders = {0: [], 1: []}
    for rank in (0, 1):
        reader = ShardReader(config(shard_dir, epochs=2), rank=rank, world_size=2)
        for batch in reader:
            for ids, lang_id in zip(unmask(batch), batch["lang_ids"].tolist()):
                uid = uid_of(ids, VOCAB)
                np.testing.assert_array_equal(ids, samples["train"][uid])  # tokens round-trip exactly
                assert lang_id == sample_lang_id(uid)
                per_epoch[reader.epoch][uid] += 1
                orders[reader.epoch].append(uid)
        # both DataLoader workers of this rank did part of the work
        assert all(n > 0 for n in reader.state_dict()["batches_per_worker"])
    for epoch, counts in per_epoch.items():
        assert sorted(counts) == list(range(len(samples["train"]))), f"epoch {epoch} misses samples"
        assert set(counts.values()) == {1}, f"epoch {epoch} repeats samples"
    assert orders[0] != orders[1], "the shuffle does not change between epochs"


@pytest.mark.parametrize("corpus,epochs,stops", [("many", None, (5, 31)), ("few", None, (9,)), ("many", 1, (6, 9, 36))])
def test_resume_continues_exactly_with_2_ranks_x_2_workers(corpora, corpus, epochs, stops):
    shard_dir, _ = corpora[corpus]
    total = 45
    for rank in (0, 1):
        cfg = config(shard_dir, epochs=epochs)
        expected = take(ShardReader(cfg, rank, 2), total)
        for stop in stops:
            first = ShardReader(cfg, rank, 2)
            head = take(first, stop)
            state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint file
            resumed = ShardReader(cfg, rank, 2)
            resumed.load_state_dict(state)
            got = head + take(resumed, total - stop)
            assert len(got) == len(expected)
            for i, (a, b) in enumerate(zip(got, expected)):
                for name in a:
                    assert torch.equal(a[name], b[name]), f"rank {rank}, stop {stop}: batch {i} differs in {name}"


def test_resume_skips_without_decoding_or_masking(corpora, monkeypatch):
    shard_dir, _ = corpora["many"]
    cfg = config(shard_dir, num_workers=0)
    calls = Counter()

    def counting(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(reader_mod, "decode_sample", counting("decode", reader_mod.decode_sample))
    monkeypatch.setattr(reader_mod, "open_shard", counting("open", reader_mod.open_shard))
    monkeypatch.setattr(Masker, "mask", counting("mask", Masker.mask))
    reader = ShardReader(cfg)
    reader.load_state_dict({**reader.state_dict(), "num_batches": 40, "batches_per_worker": [40]})
    next(iter(reader))
    # 120 samples skipped: at most the current shuffle block (7) and the next one are decoded, only the
    # shards holding them are opened, and only the batch handed out is masked.
    assert calls["decode"] <= 2 * cfg.shuffle_buffer
    assert calls["open"] <= 2
    assert calls["mask"] == cfg.micro_batch_size


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


def test_batches_pad_to_longest_and_never_label_pads_or_specials(corpora):
    shard_dir, _ = corpora["many"]
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
        for name in ("input_ids", "attention_mask", "labels", "lang_ids"):
            assert batch[name].dtype == torch.long
        saw_ragged |= int(lengths.min()) < int(lengths.max())
    assert saw_ragged


def test_long_sequences_are_cut_keeping_sep(corpora):
    shard_dir, samples = corpora["many"]
    cut = 0
    for batch in ShardReader(config(shard_dir, epochs=1, num_workers=0, max_len=8)):
        assert batch["input_ids"].shape[1] <= 8
        for ids in unmask(batch):
            full = samples["train"][uid_of(ids, VOCAB)]
            if len(full) > 8:
                cut += 1
                np.testing.assert_array_equal(ids, np.concatenate([full[:7], [SEP]]))
    assert cut > 0


def test_val_masks_do_not_depend_on_layout_or_run(corpora):
    shard_dir, samples = corpora["many"]

    def masked_by_uid(world_size, num_workers, batch_size):
        out = {}
        for rank in range(world_size):
            cfg = ReaderConfig(str(shard_dir), split="val", micro_batch_size=batch_size, num_workers=num_workers)
            for batch in ShardReader(cfg, rank, world_size):
                for row, ids in enumerate(unmask(batch)):
                    n = len(ids)
                    out[uid_of(ids, VOCAB)] = (batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist())
        return out

    single = masked_by_uid(1, 0, 4)
    assert sorted(single) == list(range(len(samples["val"])))  # one pass, every sample once
    assert masked_by_uid(2, 2, 3) == single
    assert masked_by_uid(1, 0, 4) == single


def test_val_stream_is_in_shard_order(corpora):
    shard_dir, samples = corpora["few"]
    cfg = ReaderConfig(str(shard_dir), split="val", micro_batch_size=5, num_workers=0)
    uids = [uid_of(ids, VOCAB) for batch in ShardReader(cfg) for ids in unmask(batch)]
    assert uids == list(range(len(samples["val"])))


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) * 3 // 5]))
    elif how == "garbled":
        middle = (len(data) // 2) // 512 * 512
        data[middle:middle + 1024] = b"\xff" * 1024
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"this is not a tar file" * 50)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("how", ["truncated", "garbled", "not_a_tar"])
def test_bad_shard_raises_naming_the_file(tmp_path, num_workers, how):
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [20, 20, 20]}, vocab_size=VOCAB)
    bad = shard_dir / "train" / "shard-000001.tar"
    corrupt(bad, how)
    cfg = config(shard_dir, epochs=1, num_workers=num_workers)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        for _ in ShardReader(cfg):
            pass


def test_missing_manifest_and_missing_shard(tmp_path):
    with pytest.raises(MissingStageError, match=str(tmp_path / "manifest.json")):
        read_shards_manifest(tmp_path)
    with pytest.raises(MissingStageError):
        ShardReader(config(tmp_path))
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [5, 5]}, vocab_size=VOCAB)
    (shard_dir / "train" / "shard-000000.tar").unlink()
    with pytest.raises(ShardError, match="shard-000000.tar"):
        ShardReader(config(shard_dir))


def test_vocab_mismatch_names_the_manifest(corpora):
    shard_dir, _ = corpora["many"]
    check_vocab(shard_dir, VOCAB)
    with pytest.raises(ValueError, match=str(shard_dir / "manifest.json")):
        check_vocab(shard_dir, VOCAB + 1, what="tokenizer")


def test_token_ids_outside_the_vocabulary_are_reported(tmp_path):
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [6]}, vocab_size=VOCAB)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (shard_dir / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 100}))
    with pytest.raises(ShardError, match="shard-000000.tar.*outside the manifest's vocabulary of 100"):
        next(iter(ShardReader(config(shard_dir, num_workers=0))))


def test_resume_refuses_a_different_stream(corpora):
    shard_dir, _ = corpora["many"]
    reader = ShardReader(config(shard_dir, num_workers=0))
    take(reader, 2)
    other = ShardReader(config(shard_dir, num_workers=0, micro_batch_size=4))
    with pytest.raises(ValueError, match="micro_batch_size"):
        other.load_state_dict(reader.state_dict())


def test_sparse_manifest_is_completed_from_the_tars(tmp_path):
    shard_dir = tmp_path / "shards"
    samples = write_corpus(shard_dir, {"train": [7, 9]}, vocab_size=VOCAB, write_manifest_file=False)
    # only the vocabulary size and special ids: shard list and counts come from the files on disk
    write_manifest(shard_dir, "corpus.shards", vocab_size=VOCAB, special_token_ids=BERT_IDS)
    reader = ShardReader(config(shard_dir, num_workers=0, epochs=1))
    assert reader.num_samples == 16 and reader.vocab_size == VOCAB
    uids = sorted(uid_of(ids, VOCAB) for batch in reader for ids in unmask(batch))
    assert uids == list(range(len(samples["train"])))


def test_reads_the_corpus_writers_shards(tmp_path):
    """The contract with ``data_prep.shard``: its tar members, file names and manifest fields."""
    from data_prep.shard import sample_key, write_shard

    shard_dir = tmp_path / "shards"
    (shard_dir / "train").mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = [[CLS, *rng.integers(5, VOCAB, int(rng.integers(1, 12))).tolist(), SEP] for _ in range(11)]
    write_shard(shard_dir / "train" / "shard-000000.tar",
                iter([(sample_key("hi", i), "hi", ids) for i, ids in enumerate(written)]))
    write_manifest(shard_dir, "corpus.shards", vocab_size=VOCAB,
                   special_token_ids={"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK},
                   splits={"train": {"num_samples": 11, "shards": [{"file": "shard-000000.tar", "num_samples": 11}]}})
    cfg = config(shard_dir, num_workers=0, epochs=1, shuffle=False)
    batches = list(ShardReader(cfg))
    assert [ids.tolist() for b in batches for ids in unmask(b)] == written
    assert all((b["lang_ids"] == 4).all() for b in batches)  # "hi" is LANGS[4]


def test_sample_that_is_not_a_1d_id_array_is_reported(tmp_path):
    import webdataset as wds

    shard_dir = tmp_path / "shards"
    (shard_dir / "train").mkdir(parents=True)
    with wds.TarWriter(str(shard_dir / "train" / "shard-000000.tar")) as sink:
        sink.write({"__key__": "en-0000000000", "ids.npy": np.zeros((2, 3), np.int32), "lang.txt": "en"})
    write_manifest(shard_dir, "corpus.shards", vocab_size=VOCAB, special_token_ids=BERT_IDS)
    with pytest.raises(ShardError, match=r"shard-000000.tar: sample 'en-0000000000'.*1-D integer array"):
        next(iter(ShardReader(config(shard_dir, num_workers=0))))
