"""Any language codes, not only the paper's eight: a corpus in sw, fi and zh-hans built from generated text, its
shards and their manifest, reader batches, per-language validation perplexity (in-process and through the
pretraining script), refused codes, and the one-byte limit of 256 languages."""
from __future__ import annotations

import itertools
import json
import math
import re
import string
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from tests.conftest import ROOT, run_cmd, tail
from data_prep import corpus as corpus_mod
from data_prep.corpus import CorpusConfig
from data_prep.sample import allocate, mix_probabilities
from data_prep.textgen import write_raw
from ds_kd.train.loop import mlm_perplexity
from ds_kd.manifest import read_manifest, write_manifest
from ds_kd.models.model import BertForMaskedLM, make_config
from ds_kd.data.reader import ReaderConfig, ShardReader
from ds_kd.schema import MAX_LANGS, check_langs
from ds_kd.data.shards import BlockTable, ShardError
from tests.helpers.shardgen import sample_lang, uid_of, unmask, write_corpus

CODES = ("sw", "fi", "zh-hans")
SIZES = {"sw": 300, "fi": 150, "zh-hans": 40}  # paragraph lines; zh-hans is the low-resource one
TOTAL = 1500


def corpus_flags(raw: Path, out: Path, *langs: str) -> list[str]:
    return ["--raw", str(raw), "--out", str(out), "--langs", *langs, "--total", str(TOTAL), "--seed", "1",
            "--val-per-lang", "12", "--shuffle-bucket-mb", "1", "--vocab-size", "300", "--block-size", "100",
            "--shard-mb", "0.02", "--num-workers", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The corpus command, as a user types it, on generated text in three non-paper languages."""
    root = tmp_path_factory.mktemp("langs")
    write_raw(root / "raw", SIZES, seed=2)
    assert corpus_mod.main(corpus_flags(root / "raw", root / "corpus", "sw,fi", "zh-hans")) == 0
    return root / "corpus"


def mix_langs(corpus: Path, name: str) -> list[str]:
    lines = (corpus / "sample" / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[0] for line in lines]


def shard_langs(shard_dir: Path, split: str) -> list[str]:
    """Each sentence's language, in order, through plain webdataset and the manifest's lang_codes."""
    codes = json.loads((shard_dir / "manifest.json").read_text())["lang_codes"]
    files = sorted(str(p) for p in (shard_dir / split).glob("*.tar"))
    return [codes[i] for block in wds.WebDataset(files, shardshuffle=False, empty_check=False).decode()
            for i in block["langs.npy"]]


def test_corpus_in_any_languages_lists_them_and_upsamples_the_small_one(corpus):
    shards = read_manifest(corpus / "shards")
    assert shards["lang_codes"] == list(CODES) and shards["languages"] == list(CODES)
    plan = read_manifest(corpus / "sample")["languages"]
    q = mix_probabilities({lang: plan[lang]["num_read"] for lang in CODES}, 0.5)
    assert {lang: plan[lang]["num_sampled"] for lang in CODES} == allocate(TOTAL, q)
    assert plan["zh-hans"]["num_sampled"] > plan["zh-hans"]["num_train_available"]  # repeated: upsampled
    for split, name in (("train", "train.tsv"), ("val", "val.tsv")):
        # the shards hold the mix in its order: each sentence's stored index names its own language
        assert shard_langs(corpus / "shards", split) == mix_langs(corpus, name)
    assert shards["splits"]["val"]["per_lang"] == {lang: plan[lang]["num_val"] for lang in sorted(CODES)}


def val_reader(corpus: Path, **kw) -> ShardReader:
    return ShardReader(ReaderConfig(str(corpus / "shards"), split="val", micro_batch_size=5, num_workers=0,
                                    max_len=64, **kw))


@pytest.mark.parametrize("packing", [False, True])
def test_reader_batches_carry_each_sentences_language(corpus, packing):
    val = mix_langs(corpus, "val.tsv")
    reader = val_reader(corpus, packing=packing)
    assert reader.lang_codes == CODES
    seen = Counter()
    for batch in reader:
        if packing:  # lang_ids [R, T]: each token's; sentence k of row r is the (sentences before r + k)-th id
            seq = batch["sequence_ids"]
            before = torch.cumsum(seq.max(dim=1).values, 0) - seq.max(dim=1).values
            real = seq > 0
            flat = (before[:, None] + seq - 1)[real]
            pairs = zip(batch["sentence_ids"][flat].tolist(), batch["lang_ids"][real].tolist())
        else:
            pairs = zip(batch["sentence_ids"].tolist(), batch["lang_ids"].tolist())
        for sid, lang_id in pairs:
            assert reader.lang_codes[lang_id] == val[sid]
            seen[val[sid]] += 1
    assert set(seen) == set(CODES)


def reference_perplexity(model, batches, val: list[str]) -> dict[str, float]:
    """Per-language perplexity computed apart: each row's language looked up from the mix file by sentence id."""
    loss, count = defaultdict(float), defaultdict(int)
    with torch.no_grad():
        for batch in batches:
            out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            ce = F.cross_entropy(out.logits.float(), batch["labels"][out.predicted], reduction="none")
            rows = out.predicted.nonzero()[:, 0]
            for row, value in zip(rows.tolist(), ce.tolist()):
                lang = val[int(batch["sentence_ids"][row])]
                loss[lang] += value
                count[lang] += 1
    return {f"val_ppl_{lang}": math.exp(loss[lang] / count[lang]) for lang in count}


def test_validation_perplexity_is_keyed_by_the_corpus_codes(corpus):
    vocab = read_manifest(corpus / "shards")["vocab_size"]
    torch.manual_seed(0)
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=vocab)).eval()
    got = mlm_perplexity(model, val_reader(corpus))
    expected = reference_perplexity(model, val_reader(corpus), mix_langs(corpus, "val.tsv"))
    assert sorted(k for k in got if k.startswith("val_ppl_")) == sorted(expected) == [
        "val_ppl_fi", "val_ppl_sw", "val_ppl_zh-hans"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    # the codes may also be given explicitly: the same ids then take these names
    renamed = mlm_perplexity(model, val_reader(corpus), lang_codes=("a1", "b1", "c1"))
    assert renamed["val_ppl_c1"] == pytest.approx(got["val_ppl_zh-hans"], rel=1e-6)


def test_pretraining_script_reports_validation_per_corpus_code(corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_cmd([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--deepspeed_config",
                    "ds_configs/zero2.json", "--model", "tiny-base", "--data", str(corpus), "--out", str(out),
                    "--max-steps", "2", "--max-len", "64", "--num-workers", "0",
                    "--ds-override", "train_micro_batch_size_per_gpu=4"], timeout=300)
    assert proc.returncode == 0, tail(proc)
    val = json.loads((out / "manifest.json").read_text())["val"]
    assert {k for k in val if k.startswith("val_ppl_")} == {"val_ppl_sw", "val_ppl_fi", "val_ppl_zh-hans"}
    line = r"validation at step 2: perplexity [\d.]+ \(fi [\d.]+ sw [\d.]+ zh-hans [\d.]+\)"  # the console's
    assert re.search(line, proc.stderr + proc.stdout), tail(proc)


@pytest.mark.parametrize("langs, bad", [(["sw", "FI"], "'FI'"), (["sw", "f/i"], "'f/i'"), (["english"], "'english'"),
                                        (["sw", "sw_"], "'sw_'")])
def test_a_code_of_another_form_is_refused_naming_the_flag(tmp_path, capsys, langs, bad):
    with pytest.raises(SystemExit) as exit_:
        corpus_mod.main(corpus_flags(tmp_path / "raw", tmp_path / "out", *langs))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --langs" in err and f"language code {bad}" in err and "zh-hans" in err
    with pytest.raises(ValueError, match=rf"--langs: language code {bad} is not of the form"):
        corpus_mod.run(CorpusConfig(raw=tmp_path / "raw", out=tmp_path / "out", langs=tuple(langs)))
    assert not (tmp_path / "out").exists()


def test_a_code_twice_is_refused():
    with pytest.raises(ValueError, match="--langs: language code.* sw given more than once"):
        check_langs(["sw", "fi", "sw"])


def many_codes(n: int) -> tuple[str, ...]:
    return tuple("".join(p) for p in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), n))


def test_more_than_256_languages_are_refused_before_any_work(tmp_path):
    codes = many_codes(MAX_LANGS + 1)
    with pytest.raises(ValueError, match=r"--langs: 257 languages.*at most 256"):
        corpus_mod.run(CorpusConfig(raw=tmp_path / "raw", out=tmp_path / "out", langs=codes))
    assert not (tmp_path / "out").exists()


def test_256_languages_round_trip_through_one_byte(tmp_path):
    codes = many_codes(MAX_LANGS)
    samples = write_corpus(tmp_path / "shards", {"train": [600], "val": [300]}, vocab_size=300, lang_codes=codes)
    reader = ShardReader(ReaderConfig(str(tmp_path / "shards"), split="train", micro_batch_size=50, num_workers=0,
                                      shuffle=False, epochs=1))
    assert reader.lang_codes == codes
    ids = []
    for batch in reader:
        for row, lang_id in zip(unmask(batch), batch["lang_ids"].tolist()):
            assert codes[lang_id] == sample_lang(uid_of(row, 300), codes)
            ids.append(lang_id)
    assert len(ids) == len(samples["train"]) and max(ids) == MAX_LANGS - 1


def test_manifest_codes_are_checked_and_blocks_must_index_them(tmp_path):
    shard_dir = tmp_path / "shards"
    write_corpus(shard_dir, {"train": [40], "val": [10]}, lang_codes=("sw", "fi", "yo", "ha", "zu"))
    manifest = read_manifest(shard_dir)
    fields = {k: v for k, v in manifest.items() if k not in ("stage", "finished_at", "code_version")}
    write_manifest(shard_dir, "corpus.shards", **{**fields, "lang_codes": ["sw", "fi", "yo"]})
    table = BlockTable.open(shard_dir, "train", read_manifest(shard_dir))
    with pytest.raises(ShardError, match="language index 4 outside the manifest's 3 language codes"):
        for block in range(table.num_blocks):
            table.read(block)
    write_manifest(shard_dir, "corpus.shards", **{**fields, "lang_codes": list(many_codes(300))})
    with pytest.raises(ValueError, match=r"manifest.json: lang_codes: 300 languages"):
        val_reader(tmp_path)


def test_an_interrupted_shard_step_continues_only_with_the_same_codes(tmp_path):
    from data_prep.shard import PROGRESS_DIR, finished_records, progress_path

    split_dir = tmp_path / "shards" / "train"
    split_dir.mkdir(parents=True)
    (tmp_path / "shards" / PROGRESS_DIR).mkdir()
    (split_dir / "shard-000000.tar").write_bytes(b"x" * 10)
    settings = {"tokenizer_hash": "sha256:0", "block_size": 7, "shard_mb": 1.0}
    # a record of an earlier version: no lang_codes, its blocks index the paper's eight
    progress_path(split_dir, 0).write_text(json.dumps({**settings, "num_bytes": 10}))
    assert len(finished_records(split_dir, {**settings, "lang_codes": ["en", "fr", "de", "ja", "hi", "it", "es",
                                                                       "pt"]})) == 1
    with pytest.raises(ValueError, match=r"other settings \{'lang_codes'"):
        finished_records(split_dir, {**settings, "lang_codes": ["en", "fr", "hi"]})
