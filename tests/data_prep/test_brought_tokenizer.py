"""A tokenizer the project did not make (``corpus --tokenizer DIR``): its own special ids through corpus, reader,
model and export.

Two shapes, each written here with the ``tokenizers`` library: mBERT-like WordPiece (``[PAD]``=0, ``[UNK]``=100,
``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103; transformers files naming them) and XLM-R-like unigram (``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``,``=4, ``<mask>`` last; a bare ``tokenizer.json``, with or without
its post-processor). With the ids 0..4 of the project's own BPE, XLM-R's padding would be ``<s>`` and its
masks ``,``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from tests.conftest import run_cmd, tail
from data_prep.bpe import BpeConfig
from data_prep.corpus import CorpusConfig, run
from data_prep.read import ReadConfig
from data_prep.sample import SampleConfig
from data_prep.shard import ShardConfig
from ds_kd.manifest import read_manifest, write_manifest
from ds_kd.data.masking import IGNORE_INDEX, MaskingConfig
from ds_kd.data.reader import ReaderConfig, ShardReader, special_ids

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "and", "a", "ran", "far", "le", "chat", "et", "un", "chien"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDPIECE_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def write_raw(raw: Path) -> None:
    """Sentences with commas, so a real comma (XLM-R's id 4) must be masked like any word."""
    rng = np.random.default_rng(0)
    for lang in ("en", "fr"):
        (raw / lang).mkdir(parents=True)
        lines = []
        for _ in range(300):
            words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(3, 9)))]
            words[int(rng.integers(0, len(words) - 1))] += ","
            lines.append(" ".join(words) + ".")
        (raw / lang / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def wordpiece_dir(root: Path) -> Path:
    """mBERT's layout: [PAD]=0, [unusedN] fillers, [UNK]=100 .. [MASK]=103; transformers files name them."""
    from transformers import PreTrainedTokenizerFast

    vocab = list(dict.fromkeys(["[PAD]", *[f"[unused{i}]" for i in range(1, 100)], "[UNK]", "[CLS]", "[SEP]",
                                "[MASK]", ",", ".", *LETTERS, *[f"##{c}" for c in LETTERS], *WORDS]))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 102), ("[CLS]", 101))
    tok.decoder = decoders.WordPiece()
    out = root / "wordpiece"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))
    return out


def unigram_dir(root: Path, post_processor: bool = True, specials=("<s>", "<pad>", "</s>", "<unk>"),
                mask: bool = True) -> Path:
    """XLM-R's layout as a bare tokenizer.json: <s>=0 <pad>=1 </s>=2 <unk>=3 ,=4 ... <mask>=last."""
    pieces = [(t, 0.0) for t in specials] + [(",", -2.0), (".", -2.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -4.0) for w in WORDS] + [(c, -8.0) for c in LETTERS]
    pieces += [("<mask>", 0.0)] if mask else []
    tok = Tokenizer(models.Unigram(pieces, unk_id=[t for t, _ in pieces].index("<unk>")))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (*specials, *(["<mask>"] if mask else []))])
    if post_processor:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    out = root / ("unigram" if post_processor else "unigram_bare")
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def xlmr_files_dir(root: Path) -> Path:
    """The unigram tokenizer with transformers files as XLM-R ships them (bos/eos named too)."""
    out = unigram_dir(root)
    names = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "unk_token": "<unk>",
             "pad_token": "<pad>", "mask_token": "<mask>"}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer", **names}))
    return out


def corpus_config(raw: Path, out: Path, tokenizer: Path | None) -> CorpusConfig:
    return CorpusConfig(raw=raw, out=out, langs=("en", "fr"), read=ReadConfig(),
                        sample=SampleConfig(total=800, seed=1, val_per_lang=20, bucket_mb=0.05),
                        bpe=BpeConfig(vocab_size=120), tokenizer=tokenizer,
                        shard=ShardConfig(block_size=300, num_workers=1, batch_size=64))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("brought") / "raw"
    write_raw(path)
    return path


def unigram_ids(tokenizer_dir: Path) -> dict[str, int]:
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": tok.token_to_id("<mask>")}


def all_masked(shard_dir: Path, split: str) -> list[dict]:
    """Every batch of a split with every non-special token selected and replaced by the mask."""
    cfg = ReaderConfig(shard_dir=str(shard_dir), split=split, micro_batch_size=8, num_workers=0, epochs=1,
                       shuffle=False, masking=MaskingConfig(mlm_probability=1.0, mask_fraction=1.0,
                                                            random_fraction=0.0))
    return list(ShardReader(cfg))


@pytest.mark.parametrize("shape", ["wordpiece", "unigram", "unigram_bare", "xlmr_files"])
def test_brought_tokenizer_masks_pads_and_wraps_with_its_own_ids(raw, tmp_path, shape):
    tok_dir = {"wordpiece": wordpiece_dir, "unigram": unigram_dir, "xlmr_files": xlmr_files_dir,
               "unigram_bare": lambda r: unigram_dir(r, post_processor=False)}[shape](tmp_path)
    expected = WORDPIECE_IDS if shape == "wordpiece" else unigram_ids(tok_dir)
    comma = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).token_to_id(",")
    m = run(corpus_config(raw, tmp_path / "corpus", tok_dir))
    assert {k: m["shards"]["special_token_ids"][k] for k in expected} == expected
    assert m["tokenizer"]["post_processor_added"] == (shape == "unigram_bare")
    shard_dir = tmp_path / "corpus" / "shards"
    assert {k: special_ids(m["shards"], shard_dir)[k] for k in expected} == expected

    specials = set(expected.values())
    seen_comma = num_padded = 0
    for batch in all_masked(shard_dir, "val"):
        ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
        lengths = attn.sum(1)
        assert (ids[:, 0] == expected["cls"]).all()  # every sequence is cls ... sep, the tokenizer's own
        assert (ids[torch.arange(len(ids)), lengths - 1] == expected["sep"]).all()
        assert (ids[~attn] == expected["pad"]).all()
        num_padded += int((~attn).sum())
        predicted = labels != IGNORE_INDEX
        assert (ids[predicted] == expected["mask"]).all()
        assert not set(labels[predicted].tolist()) & specials  # specials are never selected
        original = torch.where(predicted, labels, ids)
        assert (predicted == attn & ~torch.isin(original, torch.tensor(sorted(specials)))).all()  # others are
        seen_comma += int((labels == comma).sum())
    assert num_padded > 0 and seen_comma > 0  # padding happened, and real commas were predicted


def test_bare_unigram_corpus_encodes_s_text_end_s(raw, tmp_path):
    """No post-processor in the brought tokenizer.json: the corpus's copy wraps every sentence in <s> ... </s>."""
    from transformers import AutoTokenizer

    tok_dir = unigram_dir(tmp_path, post_processor=False)
    run(corpus_config(raw, tmp_path / "corpus", tok_dir))
    corpus_tok = tmp_path / "corpus" / "tokenizer"
    enc = Tokenizer.from_file(str(corpus_tok / "tokenizer.json")).encode("the cat, sat.")
    assert enc.tokens == ["<s>", "▁the", "▁cat", ",", "▁sat", ".", "</s>"]
    hf = AutoTokenizer.from_pretrained(str(corpus_tok))
    assert hf("the cat, sat.")["input_ids"] == enc.ids
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id) == (1, 0, 2, 3)
    assert hf.mask_token_id == unigram_ids(tok_dir)["mask"]


@pytest.mark.parametrize("missing", ["mask", "pad"])
def test_tokenizer_without_mask_or_pad_is_refused_naming_it(raw, tmp_path, missing):
    specials = ("<s>", "</s>", "<unk>") if missing == "pad" else ("<s>", "<pad>", "</s>", "<unk>")
    tok_dir = unigram_dir(tmp_path, specials=specials, mask=missing != "mask")
    with pytest.raises(ValueError, match=rf"{tok_dir}: the tokenizer has no {missing} token"):
        run(corpus_config(raw, tmp_path / "corpus", tok_dir))
    assert not (tmp_path / "corpus" / "shards").exists()


def test_manifest_without_special_ids_is_refused_then_repaired_by_the_corpus_command(raw, tmp_path):
    tok_dir = unigram_dir(tmp_path)
    config = corpus_config(raw, tmp_path / "corpus", tok_dir)
    run(config)
    shard_dir = tmp_path / "corpus" / "shards"
    shard_bytes = {p: p.read_bytes() for p in sorted(shard_dir.rglob("*.tar"))}
    for step in ("tokenizer", "shards"):  # as an older version wrote them
        old = read_manifest(tmp_path / "corpus" / step)
        old["special_token_ids"] = {}
        write_manifest(tmp_path / "corpus" / step, old.pop("stage"), **old)
    with pytest.raises(ValueError, match=rf"{shard_dir / 'manifest.json'}: no special token ids.*"
                                         rf"python -m data_prep corpus --raw {raw.resolve()} --out "
                                         rf"{tmp_path / 'corpus'} --tokenizer {tok_dir.resolve()}"):
        ShardReader(ReaderConfig(shard_dir=str(shard_dir), num_workers=0))
    m = run(config)  # the same command again: records the ids, rewrites no shard
    assert m["shards"]["special_token_ids"]["pad"] == 1 and m["tokenizer"]["special_token_ids"]["mask"] > 4
    assert {p: p.read_bytes() for p in sorted(shard_dir.rglob("*.tar"))} == shard_bytes
    batch = next(iter(ShardReader(ReaderConfig(shard_dir=str(shard_dir), num_workers=0, micro_batch_size=16))))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()


def test_only_the_projects_own_bpe_gets_ids_0_to_4_without_a_record(tmp_path):
    shard_dir = tmp_path / "corpus" / "shards"
    write_manifest(tmp_path / "corpus" / "tokenizer", "corpus.tokenizer", settings={"source": "bpe"})
    assert special_ids({}, shard_dir) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    write_manifest(tmp_path / "corpus" / "tokenizer", "corpus.tokenizer", settings={"source": "/x/xlmr"})
    with pytest.raises(ValueError, match="no special token ids.*--tokenizer /x/xlmr"):
        special_ids({}, shard_dir)
    assert special_ids({"special_token_ids": {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102,
                                              "[MASK]": 103}}, shard_dir) == WORDPIECE_IDS  # older spelling


# --- item 2: exports carry the tokenizer's special ids ----------------------------------------------------------

@pytest.fixture(scope="module")
def unigram_corpus(raw, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unigram_corpus")
    run(corpus_config(raw, root / "corpus", unigram_dir(root)))
    return root / "corpus"


def test_model_built_for_training_and_its_export_use_the_tokenizers_pad_id(unigram_corpus, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from ds_kd.models.model import BertForMaskedLM
    from ds_kd.train.training import export, model_config, resolve_data

    data = resolve_data(unigram_corpus, None)
    cfg = model_config("tiny-leanbert", data)  # pretraining's model and distillation's student
    assert cfg.pad_token_id == 1 and cfg.vocab_size == data.vocab_size
    model = BertForMaskedLM(cfg)
    assert model.bert.embeddings.word_embeddings.padding_idx == 1
    out = export(model, data.tokenizer_dir, tmp_path / "export", data.special_ids)
    config = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert config["pad_token_id"] == tok.pad_token_id == 1
    assert AutoConfig.from_pretrained(str(out)).pad_token_id == 1
    assert BertForMaskedLM.from_pretrained(out).config.pad_token_id == 1


def test_export_of_an_xlmr_shaped_tokenizer_carries_its_bos_and_eos(raw, tmp_path):
    from transformers import AutoConfig

    from ds_kd.models.model import BertForMaskedLM
    from ds_kd.train.training import export, model_config, resolve_data

    run(corpus_config(raw, tmp_path / "corpus", xlmr_files_dir(tmp_path)))
    data = resolve_data(tmp_path / "corpus", None)
    out = export(BertForMaskedLM(model_config("tiny-leanbert", data)), data.tokenizer_dir, tmp_path / "export",
                 data.special_ids)
    config = AutoConfig.from_pretrained(str(out))
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 0, 2)


def test_fine_tuned_model_config_takes_its_tokenizers_pad_id(unigram_corpus, tmp_path):
    """An export of an older version said pad 0 with a tokenizer padding with 1: the saved task model agrees
    with its tokenizer."""
    from transformers import AutoTokenizer

    from ds_kd.finetune import TaskModel, save_task_model
    from ds_kd.finetune.data import TaskLabels
    from ds_kd.models.model import BertModel, make_config

    tok = AutoTokenizer.from_pretrained(str(unigram_corpus / "tokenizer"))
    encoder = BertModel(make_config("tiny-leanbert", vocab_size=len(tok), pad_token_id=0))
    save_task_model(TaskModel(encoder, "tagging", TaskLabels(tags=("O", "B-PER"))), tmp_path / "model", tok)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["pad_token_id"] == AutoTokenizer.from_pretrained(str(tmp_path / "model")).pad_token_id == 1
    meta = json.loads((tmp_path / "model" / "task_model.json").read_text())
    assert meta["encoder_config"]["pad_token_id"] == 1


def test_pretraining_run_on_unigram_shards_exports_the_tokenizers_pad_id(unigram_corpus, tmp_path):
    """A short real run (one process, ZeRO-2): trains on the shards and exports config and tokenizer that agree."""
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    proc = run_cmd([sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
                    "--model", "tiny-leanbert", "--data", str(unigram_corpus), "--out", str(out), "--max-steps", "2",
                    "--ds-override", "train_micro_batch_size_per_gpu=8", "--num-workers", "0", "--max-len", "32"])
    assert proc.returncode == 0, tail(proc)
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["pad_token_id"] == AutoTokenizer.from_pretrained(str(out / "export")).pad_token_id == 1
    assert read_manifest(out)["model_config"]["pad_token_id"] == 1
