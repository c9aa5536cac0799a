"""Distillation through the real ``deepspeed`` launcher from a public-style teacher: a bare ``BertModel`` (no MLM
head) with padded embedding rows and an XLM-R-like Unigram tokenizer whose specials are ``<s> </s> <pad> <mask>
<unk>`` (ids 0-4 in that order, not BERT's), the corpus built with that tokenizer by ``python -m data_prep corpus
--tokenizer``, and the student started from two of the teacher's layers (``--init-from --init-layers``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_SIZES, deepspeed_cmd, run_cmd, tail
from ds_kd.logbook import read_metrics

SPECIALS = ["<s>", "</s>", "<pad>", "<mask>", "<unk>"]
PADDING_ROWS = 3
STEPS = 6


def unigram_teacher(raw: Path, directory: Path) -> Path:
    """A random 4-layer BertModel (48 wide) over a Unigram tokenizer learned on ``raw``, saved by transformers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = [line for f in sorted(raw.rglob("*.txt")) for line in f.read_text(encoding="utf-8").splitlines()]
    tok.train_from_iterator(text, trainer=trainers.UnigramTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                                  unk_token="<unk>"))
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                         sep_token="</s>", pad_token="<pad>", mask_token="<mask>",
                                         unk_token="<unk>").save_pretrained(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    torch.manual_seed(4)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size() + PADDING_ROWS, hidden_size=48,
                                     num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
                                     max_position_embeddings=128, pad_token_id=2)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def unigram_run(tmp_path_factory):
    from data_prep.textgen import write_raw

    root = tmp_path_factory.mktemp("unigram_kd")
    write_raw(root / "raw", TINY_SIZES, seed=8)
    teacher = unigram_teacher(root / "raw", root / "teacher")
    corpus = root / "corpus"
    proc = run_cmd([sys.executable, "-m", "data_prep", "corpus", "--raw", str(root / "raw"), "--out", str(corpus),
                    "--langs", ",".join(TINY_SIZES), "--tokenizer", str(teacher), "--total", "1200",
                    "--val-per-lang", "24", "--block-size", "400", "--num-workers", "1", "--shuffle-bucket-mb", "1"])
    assert proc.returncode == 0, tail(proc)
    out = root / "run"
    proc = run_cmd(deepspeed_cmd("launch/distill.py", [
        "--deepspeed_config", "ds_configs/zero3.json", "--teacher", str(teacher), "--init-from", str(teacher),
        "--init-layers", "2", "4", "--data", str(corpus), "--out", str(out), "--max-steps", str(STEPS),
        "--ds-override", "train_micro_batch_size_per_gpu=8", "--num-workers", "1", "--log-every", "1",
        "--lr", "1e-3", "--warmup-steps", "1", "--max-len", "64", "--seed", "3"]))
    assert proc.returncode == 0, tail(proc)
    return teacher, corpus, out, proc


def test_distils_a_bertmodel_teacher_with_a_unigram_tokenizer_on_two_ranks(unigram_run):
    teacher, corpus, out, proc = unigram_run
    assert "no MLM head" in proc.stderr  # the output loss is off, as the log says
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["engine"]["world_size"] == 2
    assert manifest["distillation"]["output_loss"] is False
    assert manifest["distillation"]["layer_map"] == [2, 4]  # each student layer against the layer it came from
    assert manifest["init"]["layers"] == [2, 4] and manifest["student"] == "from-init"
    vocab = json.loads((corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    assert manifest["student_config"]["vocab_size"] == vocab  # the tokenizer's, not the teacher's padded rows
    assert manifest["teacher_digest"] == manifest["teacher_digest_after"]
    assert manifest["val"]["val_ppl"] > 1  # the MLM loss trains the student's head: its perplexity is measured
    steps = {r["optimizer_step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert "loss_output" not in steps[1] and {"loss_mlm", "loss_hidden", "loss_attention"} <= set(steps[1])
    import transformers

    exported = transformers.AutoModelForMaskedLM.from_pretrained(out / "export")
    assert exported.config.num_hidden_layers == 2 and exported.config.hidden_size == 48
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "export")
    assert (tokenizer.cls_token, tokenizer.mask_token, tokenizer.pad_token) == ("<s>", "<mask>", "<pad>")


def test_masking_and_padding_use_the_tokenizers_own_special_ids(unigram_run):
    """The shards record the brought tokenizer's ids (<s>=0 </s>=1 <pad>=2 <mask>=3 <unk>=4), so the reader
    masks with <mask> and pads with <pad>, not with BERT's default positions 0-4."""
    from ds_kd.data.reader import ReaderConfig, ShardReader, special_ids

    _, corpus, _, _ = unigram_run
    manifest = json.loads((corpus / "shards" / "manifest.json").read_text())
    ids = special_ids(manifest)
    assert {k: ids.get(k) for k in ("cls", "sep", "pad", "mask", "unk")} == {"cls": 0, "sep": 1, "pad": 2,
                                                                            "mask": 3, "unk": 4}
    reader = ShardReader(ReaderConfig(shard_dir=str(corpus / "shards"), split="train", micro_batch_size=16, seed=1,
                                      num_workers=0, epochs=1, max_len=64), 0, 1)
    batch = next(iter(reader))
    changed = batch["labels"].ne(-100) & batch["input_ids"].ne(batch["labels"])
    assert batch["input_ids"][changed].eq(3).float().mean() > 0.5  # most changed tokens became <mask>
    padding = batch["attention_mask"].eq(0)
    assert padding.any() and batch["input_ids"][padding].eq(2).all()
