"""Vocabulary trimming (python -m data_prep trim_vocab): same tokens, same outputs on the corpus's text."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cmd
from data_prep.textgen import make_paragraph
from data_prep.trim_vocab import frequent_ids, trim
from ds_kd.errors import UsageError
from ds_kd.models.model import BertForMaskedLM, make_config

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
PADDING_ROWS = 5


def lines(langs, n, seed):
    rng = random.Random(seed)
    return [make_paragraph(rng, lang) for lang in langs for _ in range(n)]


def train_tokenizer(kind: str, text: list[str]):
    """A small tokenizer of each model type, learned on ``text`` in all eight languages."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=SPECIALS, unk_token="<unk>")
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        cls, sep = "<s>", "</s>"
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                            "[MASK]"])
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        cls, sep = "[CLS]", "[SEP]"
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        cls, sep = "[CLS]", "[SEP]"
    tok.train_from_iterator(text, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def make_checkpoint(directory, tok, bare: bool):
    """A random tiny BERT over ``tok`` with padded vocabulary rows, and the tokenizer's files beside it."""
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = tok.get_vocab_size() + PADDING_ROWS
    model = BertForMaskedLM(make_config("tiny-base", vocab_size=vocab))
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    model.save_pretrained(directory)
    if bare:
        import transformers

        hf = transformers.BertForMaskedLM.from_pretrained(directory).bert
        shutil.rmtree(directory)
        hf.save_pretrained(directory)
    specials = {"cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "mask_token": "<mask>"} if tok.token_to_id("<s>") is not None else {
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def outputs(directory, text):
    """(ids, hidden states at real tokens, MLM logits at real tokens) of ``text`` through transformers."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(text, padding=True, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(directory, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    logits = None
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        has_head = "cls.predictions.bias" in f.keys()
    if has_head:
        mlm = BertForMaskedLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits = mlm(batch["input_ids"], batch["attention_mask"], predicted=real).logits
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])], hidden[real], logits


@pytest.mark.parametrize("kind,bare", [("unigram", True), ("wordpiece", False), ("bpe", False)])
def test_trimmed_model_gives_the_same_outputs_on_the_corpus_text(tmp_path, kind, bare):
    every_lang = lines(["en", "fr", "de", "ja", "hi", "it", "es", "pt"], 150, seed=0)
    full = make_checkpoint(tmp_path / "full", train_tokenizer(kind, every_lang), bare)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = lines(["en", "fr"], 60, seed=1)  # the trimming corpus: two languages only
    (corpus / "train.tsv").write_text("".join(f"en\t{t}\n" for t in text[:80]), encoding="utf-8")
    (corpus / "more.txt").write_text("".join(f"{t}\n" for t in text[80:]), encoding="utf-8")
    manifest = trim(full, [corpus], tmp_path / "trimmed")
    trimmed = tmp_path / "trimmed"
    assert manifest["vocab_before"] + PADDING_ROWS == manifest["embedding_rows_before"]
    assert manifest["vocab_after"] == manifest["embedding_rows_after"] < manifest["vocab_before"] * 0.8
    assert manifest["num_parameters_after"] < manifest["num_parameters_before"]

    full_ids, full_hidden, full_logits = outputs(full, text)
    cut_ids, cut_hidden, cut_logits = outputs(trimmed, text)
    keep = sorted({i for row in full_ids for i in row})
    from transformers import AutoTokenizer

    old = AutoTokenizer.from_pretrained(full)
    new = AutoTokenizer.from_pretrained(trimmed)
    old_of_new = [old.convert_tokens_to_ids(new.convert_ids_to_tokens(i)) for i in range(len(new))]
    assert old_of_new == sorted(old_of_new)  # the old order is kept
    assert [[old_of_new[i] for i in row] for row in cut_ids] == full_ids  # renumbered ids of the full tokenizer
    assert set(keep) <= set(old_of_new)
    for name in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token"):
        assert getattr(new, name) == getattr(old, name)
        assert old_of_new[getattr(new, f"{name}_id")] == getattr(old, f"{name}_id")
    torch.testing.assert_close(cut_hidden, full_hidden, rtol=0, atol=0)  # the same weights on the same positions
    if full_logits is not None:
        torch.testing.assert_close(cut_logits, full_logits[:, old_of_new], rtol=0, atol=0)
    else:
        assert bare


def test_errors_name_the_input(tmp_path):
    full = make_checkpoint(tmp_path / "full", train_tokenizer("unigram", lines(["en"], 50, 0)), bare=False)
    with pytest.raises(FileNotFoundError, match="nowhere: --corpus path does not exist"):
        trim(full, [tmp_path / "nowhere"], tmp_path / "out")
    config = json.loads((full / "config.json").read_text())
    config["vocab_size"] = 10
    (full / "config.json").write_text(json.dumps(config))
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="config.json: 10 vocabulary rows for a tokenizer of"):
        trim(full, [tmp_path / "c.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_trims_a_corpus_sample_directory(tiny_corpus, tmp_path):
    """The command on a corpus's sample/ (lang<TAB>sentence TSVs) with that corpus's BPE tokenizer."""
    import sys

    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tiny_corpus / "tokenizer")
    model_dir = tmp_path / "model"
    BertForMaskedLM(make_config("tiny-leanbert", vocab_size=len(vocab))).save_pretrained(model_dir)
    for f in (tiny_corpus / "tokenizer").iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, model_dir / f.name)
    proc = run_cmd([sys.executable, "-m", "data_prep", "trim_vocab", "--model", str(model_dir), "--corpus",
                    str(tiny_corpus / "sample"), "--out", str(tmp_path / "trimmed")])
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "trimmed" / "manifest.json").read_text())
    assert manifest["tokenizer_model"] == "BPE" and manifest["vocab_after"] <= manifest["vocab_before"]
    assert manifest["num_lines"] == sum(1 for f in (tiny_corpus / "sample").glob("*.tsv") for _ in open(f))


@pytest.mark.parametrize("kind", ["unigram", "wordpiece", "bpe"])
def test_tokens_added_after_training_survive_trimming(tmp_path, kind):
    """A token added after the pieces (``add_tokens``, and a special tag ``add_special_tokens``): trimming keeps
    both with their renumbered ids, and the trimmed tokenizer encodes the corpus as the full one does."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    tok = train_tokenizer(kind, lines(["en", "fr", "de", "ja"], 100, seed=0))
    tok.add_tokens(["<new>"])
    tok.add_special_tokens([AddedToken("<2ja>", special=True)])
    full = make_checkpoint(tmp_path / "full", tok, bare=False)
    text = lines(["en"], 20, seed=1) + ["hello <new> world <2ja>"]
    (tmp_path / "c.txt").write_text("".join(f"{t}\n" for t in text), encoding="utf-8")
    trim(full, [tmp_path / "c.txt"], tmp_path / "trimmed")

    new = Tokenizer.from_file(str(tmp_path / "trimmed" / "tokenizer.json"))
    old_of_new = [tok.token_to_id(new.id_to_token(i)) for i in range(new.get_vocab_size())]
    assert old_of_new == sorted(old_of_new) and None not in old_of_new
    for name in ("<new>", "<2ja>"):
        assert old_of_new[new.token_to_id(name)] == tok.token_to_id(name)
    assert [t.content for t in new.get_added_tokens_decoder().values() if t.special][-1] == "<2ja>"
    for a, b in zip(tok.encode_batch(text), new.encode_batch(text)):
        assert [old_of_new[i] for i in b.ids] == a.ids
    old_hf, new_hf = AutoTokenizer.from_pretrained(full), AutoTokenizer.from_pretrained(tmp_path / "trimmed")
    assert [[old_of_new[i] for i in ids] for ids in new_hf(text)["input_ids"]] == old_hf(text)["input_ids"]
    assert new_hf.all_special_tokens == old_hf.all_special_tokens


def test_pair_rule_keeps_a_piece_frequent_in_either_language_not_in_the_pooled_text():
    # en: 10^6 tokens, de: 10^4 tokens. Piece 3 is 1% of German text but 1e-4 of the pair pooled; piece 4 occurs
    # once in English (1e-6 of it); piece 5 once in German's 1e4 (1e-4: kept); piece 6 never occurs.
    en = np.zeros(8, dtype=np.int64)
    de = np.zeros(8, dtype=np.int64)
    en[[1, 4]] = [10**6 - 1, 1]
    de[[2, 3, 5]] = [10**4 - 101, 100, 1]
    kept, per_lang = frequent_ids({"en": en, "de": de}, 1e-5)
    assert kept.tolist() == [1, 2, 3, 5]
    assert per_lang == {"de": 3, "en": 1}
    pooled = (en + de) / (en + de).sum() >= 1e-5  # the rule BiStil does not use: drops German's piece 5
    assert np.flatnonzero(pooled).tolist() == [1, 2, 3] != kept.tolist()
    assert frequent_ids({"en": en, "de": de}, 1e-6)[0].tolist() == [1, 2, 3, 4, 5]
    assert frequent_ids({"en": en, "de": de}, 0.0)[0].tolist() == [1, 2, 3, 4, 5]  # 0: occurs at all


def test_min_freq_trims_to_the_pair_and_reports_per_language(tmp_path):
    every_lang = lines(["en", "fr", "de", "ja", "hi", "it", "es", "pt"], 150, seed=0)
    full = make_checkpoint(tmp_path / "full", train_tokenizer("unigram", every_lang), bare=False)
    corpus = tmp_path / "sample"
    corpus.mkdir()
    (corpus / "train.tsv").write_text("".join(f"{lang}\t{t}\n" for lang in ("en", "de", "ja")
                                              for t in lines([lang], 40, seed=3)), encoding="utf-8")
    every = trim(full, [corpus], tmp_path / "all")
    pair = trim(full, [corpus], tmp_path / "pair", langs=["en", "de"])
    strict = trim(full, [corpus], tmp_path / "strict", langs=["en", "de"], min_freq=2e-3)
    assert pair["lines_per_language"] == {"de": 40, "en": 40}
    assert strict["vocab_after"] < pair["vocab_after"] < every["vocab_after"]
    assert set(strict["pieces_kept_per_language"]) == {"en", "de"}
    assert strict["checked_lines_with_dropped_pieces"] > 0 == pair["checked_lines_with_dropped_pieces"]
    assert strict["num_parameters_after"] < pair["num_parameters_after"]
    with pytest.raises(UsageError, match="--langs xx: no line"):
        trim(full, [corpus], tmp_path / "none", langs=["xx"])
    with pytest.raises(UsageError, match="--min-freq 1.5"):
        trim(full, [corpus], tmp_path / "bad", min_freq=1.5)


def test_rerun_with_other_settings_is_refused_never_skipped(tmp_path, capsys):
    """The same --out asked for with another threshold or language set is not the finished trim: refused naming
    the setting (a skip would hand the old vocabulary to a recipe that asked for another); the same settings are
    skipped; --overwrite rebuilds; a threshold no piece reaches is refused rather than writing a specials-only
    vocabulary."""
    import sys

    full = make_checkpoint(tmp_path / "full", train_tokenizer("unigram", lines(["en", "de", "ja"], 80, seed=0)),
                           bare=False)
    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"{lang}\t{t}\n" for lang in ("en", "de", "ja") for t in lines([lang], 30, seed=3)),
                      encoding="utf-8")
    first = trim(full, [corpus], tmp_path / "out", langs=["en", "de"])
    assert first["settings"]["langs"] == ["de", "en"]
    assert trim(full, [corpus], tmp_path / "out", langs=["de", "en"])["finished_at"] == first["finished_at"]
    assert "same settings, skipped" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r'min_freq: 0.0 -> 0.002.*--overwrite'):
        trim(full, [corpus], tmp_path / "out", langs=["en", "de"], min_freq=2e-3)
    with pytest.raises(FileExistsError, match=r'langs: \["de", "en"\] -> null'):
        trim(full, [corpus], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["vocab_after"] == first["vocab_after"]
    proc = run_cmd([sys.executable, "-m", "data_prep", "trim_vocab", "--model", str(full), "--corpus", str(corpus),
                    "--out", str(tmp_path / "out"), "--langs", "en", "de", "--min-freq", "2e-3"])
    assert proc.returncode == 2 and "min_freq: 0.0 -> 0.002" in proc.stderr and "skipped" not in proc.stdout
    strict = trim(full, [corpus], tmp_path / "out", langs=["en", "de"], min_freq=2e-3, overwrite=True)
    assert strict["vocab_after"] < first["vocab_after"] and strict["settings"]["min_freq"] == 2e-3
    with pytest.raises(UsageError, match=r"--min-freq 0.9: no piece .* reaches it.*lower --min-freq"):
        trim(full, [corpus], tmp_path / "none", min_freq=0.9)
    assert not (tmp_path / "none").exists()
