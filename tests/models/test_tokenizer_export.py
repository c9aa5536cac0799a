"""Tokenizer directories load with every transformers version pyproject.toml allows (>= 4.44).

The fast checks here run on the installed transformers; tests/scripts/check_old_transformers.py loads the
same files with transformers 4.44 in a throw-away environment (see its docstring)."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from data_prep.bpe import BpeConfig, save_tokenizer, train_bpe
from data_prep.existing_tokenizer import copy_existing
from ds_kd.data.tokenizer_files import make_portable

# transformers 4.44 resolves tokenizer_class by name among its own classes; PreTrainedTokenizerFast is one
# (TokenizersBackend, what transformers 5 writes by itself, is not), and transformers 5 still maps it.
CLASS_KNOWN_TO_4_44 = "PreTrainedTokenizerFast"
TEXTS = ["the quick brown fox jumps over the lazy dog", "le renard brun saute par-dessus le chien paresseux",
         "der schnelle braune fuchs", "日本語の文も読める", "numbers 1234 and: punctuation!"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    mix = root / "train.tsv"
    mix.write_text("".join(f"xx\t{t}\n" for t in TEXTS * 40), encoding="utf-8")
    tok = train_bpe(mix, BpeConfig(vocab_size=150, min_frequency=1))
    save_tokenizer(tok, root / "tokenizer")
    return tok, root / "tokenizer"


def _assert_portable(directory, reference: Tokenizer) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == CLASS_KNOWN_TO_4_44
    assert "backend" not in config
    merges = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # readable by tokenizers 0.19
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    for text in TEXTS:
        ids = reference.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids == ids
        assert hf.decode(ids, skip_special_tokens=True) == reference.decode(ids)


def test_trained_tokenizer_is_written_with_a_class_every_allowed_transformers_knows(trained):
    tok, directory = trained
    _assert_portable(directory, tok)


def test_an_existing_tokenizer_brought_into_a_corpus_is_written_the_same_way(trained, tmp_path):
    tok, directory = trained
    copy_existing(directory, tmp_path / "copy")
    _assert_portable(tmp_path / "copy", tok)


def test_export_fix_keeps_tokenizer_json_byte_identical(trained, tmp_path):
    """An export copies the corpus tokenizer; its tokenizer.json hash ties it to the shards, so only the config
    is rewritten (a corpus tokenizer written before this fix says TokenizersBackend)."""
    tok, directory = trained
    old = tmp_path / "old"
    old.mkdir()
    tok.save(str(old / "tokenizer.json"))
    before = (old / "tokenizer.json").read_bytes()
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend",
                                                           "backend": "tokenizers"}))
    make_portable(old, merges=False)
    assert (old / "tokenizer.json").read_bytes() == before
    assert json.loads((old / "tokenizer_config.json").read_text())["tokenizer_class"] == CLASS_KNOWN_TO_4_44
    assert AutoTokenizer.from_pretrained(str(old))(TEXTS[0])["input_ids"] == tok.encode(TEXTS[0]).ids


def test_fine_tuned_task_model_saves_a_portable_tokenizer(tmp_path):
    from tests.helpers.finetune_fixtures import make_tokenizer

    from ds_kd.finetune.data import TaskLabels
    from ds_kd.finetune.heads import TaskModel, save_task_model
    from ds_kd.models.model import BertForMaskedLM, make_config

    tokenizer = make_tokenizer()
    encoder = BertForMaskedLM(make_config("tiny-leanbert", vocab_size=len(tokenizer))).bert
    model = TaskModel(encoder, "pair", TaskLabels(classes=("0", "1")))
    save_task_model(model, tmp_path, tokenizer)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == CLASS_KNOWN_TO_4_44
    assert AutoTokenizer.from_pretrained(str(tmp_path))("john visited paris")["input_ids"] == \
        tokenizer("john visited paris")["input_ids"]


def test_exports_tokenizer_length_is_the_models_own(trained, tmp_path):
    """A model with 256 positions: its export's and its fine-tuned task model's tokenizers truncate to 256
    (the corpus tokenizer says 512), so ``truncation=True`` gives inputs the model takes."""
    from ds_kd.finetune.data import TaskLabels
    from ds_kd.finetune.heads import TaskModel, save_task_model
    from ds_kd.models.model import BertForMaskedLM, make_config
    from ds_kd.train.training import export

    tok, directory = trained
    model = BertForMaskedLM(make_config("tiny-leanbert", vocab_size=tok.get_vocab_size()))
    assert model.config.max_position_embeddings == 256
    export(model, directory, tmp_path / "export", {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    save_task_model(TaskModel(model.bert, "pair", TaskLabels(classes=("0", "1"))), tmp_path / "task", exported)
    long_text = " ".join(TEXTS * 30)
    for where in ("export", "task"):
        hf = AutoTokenizer.from_pretrained(str(tmp_path / where))
        assert hf.model_max_length == 256, where
        ids = hf(long_text, truncation=True, return_tensors="pt")["input_ids"]
        assert ids.shape[1] == 256, where
    model.bert(ids, ids.ne(0).long())  # the model takes it (512 would be past its position table)
