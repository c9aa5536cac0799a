"""The corpus command on generated text: mix proportions, limits, hold-out, BPE, shards, resume, bad input."""
from __future__ import annotations

import bz2
import hashlib
import gzip
import json
import lzma
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from data_prep import corpus as corpus_mod
from data_prep.bpe import BpeConfig
from data_prep.corpus import CorpusConfig, run
from data_prep.read import ReadConfig, normalize, read_file, split_sentences
from data_prep.sample import SampleConfig, allocate, mix_probabilities, select_flags
from data_prep.shard import PROGRESS_DIR, ShardConfig, progress_path
from data_prep.textgen import write_raw
from ds_kd.manifest import write_manifest
from ds_kd.schema import SPECIAL_TOKENS, check_tokenizer_matches

LANGS4 = ("en", "fr", "ja", "hi")
SIZES = {"en": 1200, "fr": 600, "ja": 300, "hi": 60}  # paragraph lines; hi is the low-resource one


def make_config(raw: Path, out: Path, **kw) -> CorpusConfig:
    base = dict(raw=raw, out=out, langs=LANGS4, read=ReadConfig(max_chars=60),
                sample=SampleConfig(total=6000, seed=3, val_per_lang=30, bucket_mb=0.05),
                bpe=BpeConfig(vocab_size=600),
                shard=ShardConfig(block_size=500, shard_mb=0.04, num_workers=2, batch_size=64))
    base.update(kw)
    return CorpusConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_raw(root / "raw", SIZES, seed=1)
    config = make_config(root / "raw", root / "out")
    return config, run(config)


def read_split(shard_dir: Path, split: str) -> list[tuple[str, list[int]]]:
    """Every sentence of a split as (language, token ids), through plain webdataset, as the README shows."""
    lang_codes = json.loads((shard_dir / "manifest.json").read_text())["lang_codes"]
    files = sorted(str(p) for p in (shard_dir / split).glob("*.tar"))
    sentences = []
    for block in wds.WebDataset(files, shardshuffle=False, empty_check=False).decode():
        tokens, offsets, langs = block["tokens.npy"], block["offsets.npy"], block["langs.npy"]
        sentences += [(lang_codes[lang], tokens[a:b].tolist()) for a, b, lang in zip(offsets, offsets[1:], langs)]
    return sentences


def mix_lines(out: Path, name: str) -> list[tuple[str, str]]:
    return [tuple(line.split("\t", 1)) for line in (out / "sample" / name).read_text(encoding="utf-8").splitlines()]


def test_mix_probabilities_follow_the_formula():
    counts = {"en": 900, "hi": 100}
    assert mix_probabilities(counts, 1.0) == pytest.approx({"en": 0.9, "hi": 0.1})
    assert mix_probabilities(counts, 0.0) == pytest.approx({"en": 0.5, "hi": 0.5})
    # alpha = 0.5: sqrt(0.9) : sqrt(0.1) = 3 : 1
    assert mix_probabilities(counts, 0.5) == pytest.approx({"en": 0.75, "hi": 0.25})
    assert allocate(1001, mix_probabilities(counts, 0.5)) == {"en": 751, "hi": 250}
    flags = list(select_flags(1000, 37, __import__("random").Random(0)))
    assert sum(flags) == 37


def test_read_splits_normalises_and_counts_drops(tmp_path):
    assert split_sentences("これは本です。あれは猫です。") == ["これは本です。", "あれは猫です。"]
    assert split_sentences("यह किताब है। वह बिल्ली है।") == ["यह किताब है।", "वह बिल्ली है।"]
    assert normalize("ﬁle  ｶﾞ") == "file ガ"
    assert normalize("Hello, World! It's «fine».", spoken=True) == "hello world its fine"
    lang_dir = tmp_path / "en"
    lang_dir.mkdir()
    raw = b"Good line. Second one.\n\xff\xfe broken bytes\n\n" + b"x" * 300 + b"\n"
    (lang_dir / "a.txt").write_bytes(raw)
    drops = Counter()
    assert list(read_file(lang_dir / "a.txt", ReadConfig(max_chars=256), drops)) == ["Good line.", "Second one."]
    assert drops == {"undecodable": 1, "empty": 1, "too_long": 1}
    wiki = '{"id": "1", "title": "T", "text": "T\\n\\nFirst para. Next."}\nnot json {\n{"broken": \n'
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        with opener(lang_dir / f"wiki_00{suffix}", "wt", encoding="utf-8") as f:
            f.write(wiki)
        drops = Counter()
        assert list(read_file(lang_dir / f"wiki_00{suffix}", ReadConfig(), drops)) == [
            "T", "First para.", "Next.", "not json {"]
        assert drops == {"empty": 1, "bad_json": 1}


def test_mix_counts_limits_and_holdout(corpus):
    config, m = corpus
    plan = m["sample"]["languages"]
    q = mix_probabilities({lang: plan[lang]["num_read"] for lang in LANGS4}, 0.5)
    assert {lang: plan[lang]["num_sampled"] for lang in LANGS4} == allocate(6000, q)
    assert plan["hi"]["num_sampled"] > plan["hi"]["num_train_available"]  # the small language is repeated
    train, val = mix_lines(config.out, "train.tsv"), mix_lines(config.out, "val.tsv")
    assert Counter(lang for lang, _ in train) == {lang: plan[lang]["num_sampled"] for lang in LANGS4}
    assert Counter(lang for lang, _ in val) == {lang: plan[lang]["num_val"] for lang in LANGS4}
    assert max(len(text) for _, text in train) <= 60
    assert not {text for _, text in train} & {text for _, text in val}
    assert sum(m["read"]["languages"][lang]["dropped"]["too_long"] for lang in LANGS4) > 0


def test_training_mix_is_interleaved(corpus):
    config, _ = corpus
    train = mix_lines(config.out, "train.tsv")
    for start in range(0, 6000, 1000):  # every stretch holds every language, near its share
        window = Counter(lang for lang, _ in train[start:start + 1000])
        assert set(window) == set(LANGS4)
    hi_positions = [i for i, (lang, _) in enumerate(train) if lang == "hi"]
    assert np.mean(hi_positions) == pytest.approx(3000, abs=400)


def test_tokenizer_loads_both_ways_and_round_trips(corpus):
    from transformers import AutoTokenizer

    config, m = corpus
    tok_dir = config.out / "tokenizer"
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert m["tokenizer"]["vocab_size"] == tok.get_vocab_size() <= 600
    for _, text in mix_lines(config.out, "val.tsv")[::10]:
        ids = tok.encode(text).ids
        assert ids[0] == 2 and ids[-1] == 3
        assert tok.decode(ids) == text
        assert hf(text)["input_ids"] == ids


def test_shards_round_trip_with_plain_webdataset(corpus):
    config, m = corpus
    tok = Tokenizer.from_file(str(config.out / "tokenizer" / "tokenizer.json"))
    shard_dir = config.out / "shards"
    manifest = m["shards"]
    for split, name in (("train", "train.tsv"), ("val", "val.tsv")):
        sentences, lines = read_split(shard_dir, split), mix_lines(config.out, name)
        assert len(sentences) == len(lines) == manifest["splits"][split]["num_samples"]
        for (lang, ids), (line_lang, text) in zip(sentences[::7], lines[::7]):
            assert lang == line_lang and ids == tok.encode(text).ids
        assert sum(len(ids) for _, ids in sentences) == manifest["splits"][split]["num_tokens"]
    assert manifest["schema_version"] == 2 and manifest["token_dtype"] == "<u2"  # 600 ids fit 16 bits
    assert manifest["vocab_size"] == m["tokenizer"]["vocab_size"]
    assert manifest["splits"]["train"]["per_lang"] == {
        lang: m["sample"]["languages"][lang]["num_sampled"] for lang in sorted(LANGS4)}
    shards = manifest["splits"]["train"]["shards"]
    blocks = [n for s in shards for n in s["blocks"]["num_samples"]]
    assert blocks == [500] * 12  # 6000 sentences in blocks of 500, grouped into shards of ~0.04 MiB
    assert len(shards) > 2
    for shard in shards:
        data = (shard_dir / "train" / shard["file"]).read_bytes()
        assert len(data) == shard["num_bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) - 1024 >= 0.04 * 2**20 or shard is shards[-1]  # closed once full
    check_tokenizer_matches(shard_dir, config.out / "tokenizer")


def test_rerun_skips_finished_steps(corpus, capsys):
    config, m = corpus
    again = run(config)
    assert all(again[step]["finished_at"] == m[step]["finished_at"] for step in m)
    assert "skipped" in capsys.readouterr().out


def test_rerun_with_other_settings_is_refused_and_overwrite_rebuilds_that_step_and_the_later_ones(corpus, tmp_path,
                                                                                                  capsys):
    """A finished step is never reused for other settings: refused naming the setting, and --overwrite rebuilds
    it and every step after it (their input changed), keeping the earlier ones."""
    config, m = corpus
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    other = make_config(config.raw, out, sample=SampleConfig(total=5000, seed=3, val_per_lang=30, bucket_mb=0.05))
    with pytest.raises(FileExistsError, match=r"finished corpus.sample with other settings \(total: 6000 -> 5000\)"
                                              r".*--overwrite"):
        run(other)
    assert json.loads((out / "sample" / "manifest.json").read_text())["total"] == m["sample"]["total"]
    assert corpus_mod.main(["--raw", str(config.raw), "--out", str(out), "--langs", *LANGS4, "--total", "5000"]) == 2
    capsys.readouterr()
    rebuilt = run(CorpusConfig(**{**vars(other), "overwrite": True}))
    log = capsys.readouterr().out
    assert "corpus.read: done already" in log  # same settings, before the change: kept
    assert "corpus.sample: rebuilding" in log and rebuilt["sample"]["total"] == 5000
    assert "corpus.tokenizer: rebuilding" in log and "corpus.shards: rebuilding" in log  # same settings, new input
    assert rebuilt["shards"]["splits"]["train"]["num_samples"] == 5000  # the shards follow the new mix
    check_tokenizer_matches(out / "shards", out / "tokenizer")


def test_interrupted_shard_step_resumes_without_redoing_or_duplicating(corpus, tmp_path):
    config, m = corpus
    out = tmp_path / "out"
    for step in ("read", "sample", "tokenizer"):
        shutil.copytree(config.out / step, out / step)
    # An interrupted run: train shards 0 and 1 finished (with their progress records), shard 2 half-written,
    # no manifest.
    split_dir = out / "shards" / "train"
    split_dir.mkdir(parents=True)
    (out / "shards" / PROGRESS_DIR).mkdir()
    settings = {"tokenizer_hash": m["tokenizer"]["tokenizer_hash"], "block_size": 500, "shard_mb": 0.04,
                "lang_codes": list(LANGS4)}
    for index, shard in enumerate(m["shards"]["splits"]["train"]["shards"][:2]):
        shutil.copy2(config.out / "shards" / "train" / shard["file"], split_dir / shard["file"])
        progress_path(split_dir, index).write_text(json.dumps({**shard, **settings}))
    (split_dir / ".shard-000002.tar.tmp123").write_bytes(b"half a shard")
    os.utime(split_dir / "shard-000000.tar", (1, 1))
    resumed = run(make_config(config.raw, out))
    assert (split_dir / "shard-000000.tar").stat().st_mtime == 1  # not rewritten
    for split in ("train", "val"):
        for shard in m["shards"]["splits"][split]["shards"]:
            name = shard["file"]
            assert (out / "shards" / split / name).read_bytes() == (config.out / "shards" / split / name).read_bytes()
    assert resumed["shards"]["splits"] == m["shards"]["splits"]
    assert sorted(p.name for p in split_dir.glob("*.tar")) == [s["file"] for s in m["shards"]["splits"]["train"]["shards"]]


def test_old_schema_shards_are_refused_naming_the_fix(corpus, tmp_path):
    config, m = corpus
    out = tmp_path / "out"
    for step in ("read", "sample", "tokenizer"):
        shutil.copytree(config.out / step, out / step)
    old = {k: v for k, v in m["shards"].items() if k not in ("schema_version", "settings", "stage", "finished_at", "code_version")}
    write_manifest(out / "shards", "corpus.shards", settings={"shard_size": 700}, **old)
    with pytest.raises(ValueError, match="schema version 1.*run the same command again with --overwrite"):
        run(make_config(config.raw, out))


def test_bad_language_dirs_and_codes_name_the_problem(tmp_path, capsys):
    write_raw(tmp_path / "raw", {"en": 20}, seed=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "raw" / "hi")):
        run(make_config(tmp_path / "raw", tmp_path / "out", langs=("en", "hi")))
    (tmp_path / "raw" / "hi").mkdir()
    (tmp_path / "raw" / "hi" / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=f"{tmp_path / 'raw' / 'hi'}: language directory holds no input"):
        run(make_config(tmp_path / "raw", tmp_path / "out", langs=("en", "hi")))
    (tmp_path / "raw" / "hi" / "text.txt").write_bytes(b"\n\xff\xff\n   \n")
    with pytest.raises(ValueError, match=r"hi: no sentence survived.*'undecodable': 1"):
        run(make_config(tmp_path / "raw", tmp_path / "out", langs=("en", "hi")))
    capsys.readouterr()
    # any code of the right form is a language; one without its directory is named (tests/data/test_langs.py: forms)
    assert corpus_mod.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), "--langs", "en,xx"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'raw' / 'xx'}: language directory does not exist" in err
    assert f"language folders in {tmp_path / 'raw'}: en, hi: name those with --langs" in err
    assert not (tmp_path / "o").exists()
    assert corpus_mod.main(["--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--langs", "en"]) == 2
    assert f"--raw {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_tokenizer_not_matching_the_shards_is_named(corpus, tmp_path):
    config, m = corpus
    other = tmp_path / "other"
    other.mkdir()
    tok = Tokenizer.from_file(str(config.out / "tokenizer" / "tokenizer.json"))
    tok.add_tokens(["extra-token"])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"{other / 'tokenizer.json'}: vocabulary of {m['tokenizer']['vocab_size'] + 1}"):
        check_tokenizer_matches(config.out / "shards", other)
    manifest = json.loads((config.out / "shards" / "manifest.json").read_text())
    manifest["tokenizer_hash"] = "sha256:0"
    with pytest.raises(ValueError, match="hash differs"):
        check_tokenizer_matches(manifest, config.out / "tokenizer")


def test_existing_bert_vocab_is_used_instead_of_bpe(tmp_path):
    write_raw(tmp_path / "raw", {"en": 200, "fr": 100}, seed=2)
    letters = sorted(set("abcdefghijklmnopqrstuvwxyzéèàçœ"))
    vocab = [*SPECIAL_TOKENS, *letters, *[f"##{c}" for c in letters], ".", "the", "##the"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = make_config(tmp_path / "raw", tmp_path / "out", langs=("en", "fr"), tokenizer=tmp_path / "bert",
                         lowercase=True)
    m = run(config)
    assert m["tokenizer"]["vocab_size"] == m["shards"]["vocab_size"] == len(vocab)
    assert m["shards"]["special_token_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    _, ids = read_split(config.out / "shards", "val")[0]
    assert ids[0] == 2 and ids[-1] == 3
