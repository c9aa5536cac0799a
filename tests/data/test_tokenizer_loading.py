"""Every encoder of a brought tokenizer loads it through ``ds_kd.data.tokenizer_files``: its ``tokenizer.json``'s own
padding and truncation are switched off (the file kept byte for byte), and a ``vocab.txt`` alone is read with
the casing its directory states, or refused until the user states it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_prep.corpus import run
from ds_kd.models.modeldir import load_tokenizer
from tests.data_prep.test_brought_tokenizer import corpus_config, wordpiece_dir, write_raw
from tests.data_prep.test_corpus import read_split

LONG = "the cat sat on the mat and the dog ran far"
PADDINGS = {"fixed to 128": {"length": 128}, "to the longest": {"length": None}}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokload") / "raw"
    write_raw(path)
    return path


def padded_wordpiece(root: Path, padding: dict) -> tuple[Path, Tokenizer]:
    """The mBERT-like WordPiece with ``padding`` and truncation at 6 written into its tokenizer.json (as
    transformers writes them after a padded call); returns it and the plain tokenizer (neither)."""
    directory = wordpiece_dir(root)
    plain = Tokenizer.from_file(str(directory / "tokenizer.json"))
    padded = Tokenizer.from_file(str(directory / "tokenizer.json"))
    padded.enable_padding(pad_id=0, pad_token="[PAD]", **padding)
    padded.enable_truncation(max_length=6)
    padded.save(str(directory / "tokenizer.json"))
    return directory, plain


@pytest.mark.parametrize("padding", PADDINGS, ids=list(PADDINGS))
def test_corpus_shards_hold_whole_sentences_without_pads_and_keep_the_file(raw, tmp_path, padding):
    tok_dir, plain = padded_wordpiece(tmp_path, PADDINGS[padding])
    brought = (tok_dir / "tokenizer.json").read_bytes()
    run(corpus_config(raw, tmp_path / "corpus", tok_dir))  # fixed padding: refused before ("encodes 'a' as ...")
    assert (tmp_path / "corpus" / "tokenizer" / "tokenizer.json").read_bytes() == brought  # the teacher's digest
    lines = (tmp_path / "corpus" / "sample" / "val.tsv").read_text(encoding="utf-8").splitlines()
    want = [plain.encode(line.split("\t", 1)[1]).ids for line in lines]
    got = [ids for _, ids in read_split(tmp_path / "corpus" / "shards", "val")]
    assert sorted(got) == sorted(want)  # no [PAD] stored as a token, no sentence cut at 6
    assert max(len(ids) for ids in got) > 6 and not any(0 in ids for ids in got)


@pytest.mark.parametrize("padding", PADDINGS, ids=list(PADDINGS))
def test_model_directory_encoders_take_no_padding_or_truncation_from_the_file(tmp_path, padding):
    """Fine-tuning, retrieval, speed and the teacher load through ``load_tokenizer``: whether they encode with
    the transformers tokenizer or its ``tokenizers`` backend, a sentence comes out whole and unpadded."""
    from ds_kd.finetune.data import encode_words
    from ds_kd.eval.retrieval import encode

    model_dir, plain = padded_wordpiece(tmp_path, PADDINGS[padding])
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": plain.get_vocab_size()}))
    tokenizer = load_tokenizer(model_dir, "the test")
    want = plain.encode(LONG).ids
    assert tokenizer.backend_tokenizer.encode(LONG).ids == want
    assert tokenizer(LONG)["input_ids"] == want
    assert encode(tokenizer, [LONG, "a"], 64)[0][0].tolist() == want  # retrieval
    assert encode_words(tokenizer, [{"tokens": LONG.split()}], 64)[0].input_ids == want  # fine-tuning


CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris", "यहाँ", "यहा", "is", "."]


def cased_vocab_dir(root: Path, name: str = "bert", **files: dict) -> Path:
    """A cased BERT vocab.txt brought alone (as Google's mBERT-cased release), with ``files`` (name: JSON)."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(CASED_VOCAB) + "\n", encoding="utf-8")
    for file_name, content in files.items():
        (directory / f"{file_name}.json").write_text(json.dumps(content), encoding="utf-8")
    return directory


def test_a_vocab_txt_alone_whose_casing_nothing_states_is_refused_naming_the_flag(raw, tmp_path, capsys):
    from data_prep.corpus import main

    tok_dir = cased_vocab_dir(tmp_path)
    code = main(["--raw", str(raw), "--out", str(tmp_path / "corpus"), "--langs", "en,fr", "--total", "100",
                 "--val-per-lang", "5", "--tokenizer", str(tok_dir)])
    err = capsys.readouterr().err
    assert code == 2 and f"{tok_dir / 'vocab.txt'}: nothing says whether this vocabulary is cased" in err
    assert "--lowercase" in err and "--no-lowercase" in err
    assert not (tmp_path / "corpus").exists()  # refused before the read and sample steps wrote anything
    assert main(["--raw", str(raw), "--out", str(tmp_path / "bpe"), "--lowercase"]) == 2  # it would be ignored
    assert "--lowercase/--no-lowercase applies only to a --tokenizer directory" in capsys.readouterr().err
    model_dir = cased_vocab_dir(tmp_path, "model", config={"model_type": "bert", "vocab_size": len(CASED_VOCAB)})
    with pytest.raises(ValueError, match=r"tokenizer_config.json \(needed by fine-tuning"):
        load_tokenizer(model_dir, "fine-tuning")


@pytest.mark.parametrize("how", ["flag", "config name", "tokenizer_config", "directory name"])
def test_a_cased_vocab_txt_keeps_case_and_accents_and_says_so(raw, tmp_path, capsys, how):
    name = "multi_cased_L-12_H-768_A-12" if how == "directory name" else "bert"
    files = {"config name": {"config": {"_name_or_path": "bert-base-multilingual-cased"}},
             "tokenizer_config": {"tokenizer_config": {"do_lower_case": False}}}.get(how, {})
    tok_dir = cased_vocab_dir(tmp_path, name, **files)
    config = corpus_config(raw, tmp_path / "corpus", tok_dir)
    if how == "flag":
        config = dataclasses.replace(config, lowercase=False)
    run(config)
    assert f"{tok_dir / 'vocab.txt'}: read cased" in capsys.readouterr().out
    corpus_tok = Tokenizer.from_file(str(tmp_path / "corpus" / "tokenizer" / "tokenizer.json"))
    assert corpus_tok.encode("Paris यहाँ is.", add_special_tokens=False).tokens == ["Paris", "यहाँ", "is", "."]


def test_an_uncased_vocab_txt_is_lowercased_when_its_directory_says_so(tmp_path, capsys):
    model_dir = cased_vocab_dir(tmp_path, "model", config={"vocab_size": len(CASED_VOCAB),
                                                           "_name_or_path": "bert-base-multilingual-uncased"})
    assert load_tokenizer(model_dir, "the test").tokenize("Paris यहाँ") == ["paris", "यहा"]
    assert "read lowercased (config.json: _name_or_path bert-base-multilingual-uncased)" in capsys.readouterr().out


def test_a_cased_tokenizer_json_is_not_lowercased_by_a_tokenizer_config_that_omits_the_casing(tmp_path):
    """transformers lowercases a BERT-class tokenizer whose tokenizer_config.json says no do_lower_case, over
    a tokenizer.json that keeps case."""
    from tokenizers import models, normalizers, pre_tokenizers

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(CASED_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": len(CASED_VOCAB)}))
    assert load_tokenizer(model_dir, "the test").tokenize("Paris यहाँ is.") == ["Paris", "यहाँ", "is", "."]
