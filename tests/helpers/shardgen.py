"""Tiny generated corpora in the block-shard schema of :mod:`ds_kd.schema`, for the reader's tests.

Written with the corpus command's own block encoder and shard writer (:mod:`data_prep.shard`), with the
shard boundaries and block size chosen by the test. Every sentence is unique: its second and third tokens
spell its id (index in the split), so a test can tell which sentences a batch holds after undoing the
masking (labels hold the original token wherever one was changed).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_prep.shard import PROGRESS_DIR, ShardConfig, ShardWriter, encode_block, layout_fields, summarize
from ds_kd.manifest import write_manifest
from ds_kd.schema import LANGS, SPECIAL_TOKENS, token_dtype

PAD, UNK, CLS, SEP, MASK = range(5)
NUM_SPECIAL = len(SPECIAL_TOKENS)


def make_sample(uid: int, vocab_size: int, rng: np.random.Generator, min_len: int, max_len: int) -> np.ndarray:
    span = vocab_size - NUM_SPECIAL
    assert uid < span * span, "vocabulary too small to spell the sample index"
    body = rng.integers(NUM_SPECIAL, vocab_size, size=int(rng.integers(min_len, max_len + 1)))
    if len(body) > 3 and rng.random() < 0.3:
        body[-1] = UNK  # an unknown word: a special token inside the sentence, never to be masked
    head = [NUM_SPECIAL + uid // span, NUM_SPECIAL + uid % span]
    return np.array([CLS, *head, *body, SEP], dtype=np.int64)


def write_corpus(shard_dir: str | Path, shard_sizes: dict[str, list[int]], vocab_size: int = 300, seed: int = 0,
                 min_len: int = 1, max_len: int = 20, block_size: int = 7,
                 lang_codes: tuple[str, ...] = LANGS) -> dict[str, list[np.ndarray]]:
    """Write ``shard_dir/<split>/shard-NNNNNN.tar`` with the given sentences per shard (cut into blocks of
    ``block_size``) and the manifest. Sentence ``uid`` is in language ``lang_codes[uid % len(lang_codes)]``.
    Returns the sentences of each split in written order (id = position)."""
    shard_dir = Path(shard_dir)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    splits = {}
    for split, sizes in shard_sizes.items():
        (shard_dir / split).mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(shard_dir / split, 2**62, {})
        samples[split], block_index = [], 0
        for size in sizes:
            for start in range(0, size, block_size):
                sentences = [make_sample(len(samples[split]) + i, vocab_size, rng, min_len, max_len)
                             for i in range(min(block_size, size - start))]
                langs = [sample_lang(len(samples[split]) + i, lang_codes) for i in range(len(sentences))]
                writer.add(encode_block(block_index, sentences, langs, token_dtype(vocab_size), vocab_size,
                                        lang_codes))
                samples[split].extend(sentences)
                block_index += 1
            writer.close_shard()
        splits[split] = summarize(writer.records)
    shutil.rmtree(shard_dir / PROGRESS_DIR)
    write_manifest(shard_dir, "corpus.shards", languages=list(lang_codes), vocab_size=vocab_size,
                   special_token_ids={token: i for i, token in enumerate(SPECIAL_TOKENS)},
                   **layout_fields(vocab_size, ShardConfig(block_size=block_size), lang_codes), splits=splits)
    return samples


def sample_lang(uid: int, lang_codes: tuple[str, ...] = LANGS) -> str:
    return lang_codes[uid % len(lang_codes)]


def sample_lang_id(uid: int, lang_codes: tuple[str, ...] = LANGS) -> int:
    return uid % len(lang_codes)


def uid_of(ids, vocab_size: int) -> int:
    """The index a sample's second and third tokens spell (see :func:`make_sample`)."""
    span = vocab_size - NUM_SPECIAL
    return (int(ids[1]) - NUM_SPECIAL) * span + int(ids[2]) - NUM_SPECIAL


def unmask(batch: dict) -> list[np.ndarray]:
    """The original token ids of each row of a batch: labels hold them wherever masking changed one."""
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    original = np.where(labels != -100, labels, inputs)
    return [row[mask.astype(bool)] for row, mask in zip(original, batch["attention_mask"].numpy())]
