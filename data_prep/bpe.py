"""Step 3 of the corpus: the BPE tokenizer, learned on the training mix or taken from an existing directory.

The tokenizer directory holds ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``) and the files of
``PreTrainedTokenizerFast.save_pretrained`` (``transformers.AutoTokenizer.from_pretrained(dir)``), written so
that every transformers version the project allows loads them (:mod:`ds_kd.data.tokenizer_files`).

A learned tokenizer: NFKC (plus lower-casing and punctuation removal in spoken mode, so fine-tuning text
gets the pretraining form), SentencePiece-style word boundaries (``▁``; works for Japanese, which has no
spaces, and decodes back to the text), BPE, and ``[CLS] ... [SEP]`` added around every encoding. The BERT
special tokens take ids 0..4 in the order of :data:`ds_kd.schema.SPECIAL_TOKENS`. A brought tokenizer is
:mod:`data_prep.existing_tokenizer`'s.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ds_kd.schema import SPECIAL_TOKENS, every_special_id, tokenizer_hash
from ds_kd.data.tokenizer_files import make_portable

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class BpeConfig:
    """How the tokenizer is learned."""

    vocab_size: int = 120_000
    """Vocabulary size, special tokens included (paper: 120k)."""
    max_sentences: int = 5_000_000
    """Learn from at most this many sentences of the (shuffled) training mix, which bounds the trainer's memory."""
    min_frequency: int = 2
    """A merge must occur at least this often."""
    spoken: bool = False
    """Put the spoken-form normalisation (lower-case, no punctuation) into the tokenizer itself."""


def build_untrained(spoken: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    steps = [normalizers.NFKC()]
    if spoken:
        steps += [normalizers.Lowercase(), normalizers.Replace(Regex(r"\p{P}"), "")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def add_bert_template(tok: Tokenizer) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def iter_mix_text(path: Path, max_sentences: int) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in itertools.islice(f, max_sentences):
            yield line.rstrip("\n").split("\t", 1)[-1]


def train_bpe(mix_file: Path, config: BpeConfig) -> Tokenizer:
    """Learn BPE on the head of the shuffled training mix (any stretch of it is a sample of the mix)."""
    tok = build_untrained(config.spoken)
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=True)
    tok.train_from_iterator(iter_mix_text(mix_file, config.max_sentences), trainer=trainer)
    add_bert_template(tok)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Save ``tokenizer.json`` and the transformers files (special tokens named) into ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=512)
    fast.save_pretrained(str(out_dir))
    tok.save(str(out_dir / TOKENIZER_FILE))  # the exact object, so its hash is that of what we trained
    make_portable(out_dir)  # before describe() hashes tokenizer.json


def describe(tokenizer_dir: Path) -> dict:
    """Manifest fields of a corpus tokenizer directory: vocab size, hash, special token ids and tokens by role
    (:func:`data_prep.existing_tokenizer.corpus_special_ids`; raises ValueError naming a missing role), and
    ``all_special_ids``: those and every other special token (:func:`ds_kd.schema.every_special_id`)."""
    from data_prep.existing_tokenizer import corpus_special_ids, load_existing

    tok = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
    ids, tokens = corpus_special_ids(tokenizer_dir)
    every = sorted({*ids.values(), *every_special_id(load_existing(tokenizer_dir))})
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "tokenizer_hash": tokenizer_hash(tokenizer_dir / TOKENIZER_FILE),
            "special_token_ids": ids, "special_tokens": tokens, "all_special_ids": every}
