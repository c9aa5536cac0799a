"""Masking leaves every special token of a brought tokenizer alone: its roles (cls, sep, pad, mask, unk) and
the special tokens added to it (language or task tags such as ``<2en>``), never masked, never a random
replacement."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from data_prep.corpus import run
from ds_kd.manifest import read_manifest, write_manifest
from ds_kd.data.masking import IGNORE_INDEX, MaskingConfig
from ds_kd.data.reader import ReaderConfig, ShardReader
from tests.data_prep.test_brought_tokenizer import corpus_config, unigram_dir, write_raw

TAGS = ("<2en>", "<2fr>", "<task>")


def tagged_corpus(root: Path) -> tuple[Path, list[int], Path]:
    """A corpus whose every sentence starts with its language tag, cut by an XLM-R-like unigram tokenizer with
    the tags added as special tokens after training. Returns (shard dir, tag ids, tokenizer dir)."""
    raw = root / "raw"
    write_raw(raw)
    for lang in ("en", "fr"):
        path = raw / lang / "text.txt"
        path.write_text("".join(f"<2{lang}> <task> {line}\n" for line in path.read_text().splitlines()))
    tok_dir = unigram_dir(root)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in TAGS])
    tok.save(str(tok_dir / "tokenizer.json"))
    run(corpus_config(raw, root / "corpus", tok_dir))
    return root / "corpus" / "shards", [tok.token_to_id(t) for t in TAGS], tok_dir


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    return tagged_corpus(tmp_path_factory.mktemp("tagged"))


def read_all(shard_dir: Path, mask_fraction: float, random_fraction: float) -> list[dict]:
    cfg = ReaderConfig(shard_dir=str(shard_dir), split="train", micro_batch_size=32, num_workers=0, epochs=1,
                       shuffle=False, masking=MaskingConfig(1.0, mask_fraction, random_fraction))
    return list(ShardReader(cfg))


def test_added_special_tokens_are_never_masked(tagged):
    shard_dir, tag_ids, _ = tagged
    assert set(tag_ids) <= set(read_manifest(shard_dir)["all_special_ids"])
    tags = torch.tensor(tag_ids)
    seen = 0
    for batch in read_all(shard_dir, 1.0, 0.0):
        assert not torch.isin(batch["labels"], tags).any()  # a tag is never selected for prediction
        seen += int(torch.isin(batch["input_ids"], tags).sum())
    assert seen > 0  # the tags are in the text, and stay there


def test_added_special_tokens_are_never_random_replacements(tagged):
    shard_dir, tag_ids, _ = tagged
    tags = torch.tensor(tag_ids)
    num_random = 0
    for batch in read_all(shard_dir, 0.0, 1.0):  # every selected token replaced by a random one
        predicted = batch["labels"] != IGNORE_INDEX
        assert not torch.isin(batch["input_ids"][predicted], tags).any()
        num_random += int(predicted.sum())
    assert num_random > 1000  # enough draws that a tag among ~50 ids would have come up


def test_older_manifest_without_the_list_is_refused_then_repaired(tagged, tmp_path):
    """A brought tokenizer's shards manifest without ``all_special_ids`` (older version): refused naming the
    command, which records it without rewriting the shards."""
    import shutil

    shard_dir, tag_ids, tok_dir = tagged
    corpus = tmp_path / "corpus"
    shutil.copytree(shard_dir.parent, corpus)
    for step in ("tokenizer", "shards"):
        old = read_manifest(corpus / step)
        del old["all_special_ids"]
        write_manifest(corpus / step, old.pop("stage"), **old)
    with pytest.raises(ValueError, match=rf"{corpus / 'shards' / 'manifest.json'}: no all_special_ids recorded.*"
                                         rf"python -m data_prep corpus --raw .* --tokenizer {tok_dir.resolve()}"):
        ShardReader(ReaderConfig(shard_dir=str(corpus / "shards"), num_workers=0))
    raw = Path(read_manifest(corpus / "read")["settings"]["raw"])
    run(corpus_config(raw, corpus, tok_dir))
    assert set(tag_ids) <= set(read_manifest(corpus / "shards")["all_special_ids"])
