"""Schemas shared by ``data_prep`` and ``ds_kd``: languages and the WebDataset shard layout.

Shard layout, schema version 2 (written by ``python -m data_prep corpus``, read by :mod:`ds_kd.shards`),
readable with plain ``webdataset`` (one sample per block)::

    <corpus>/shards/manifest.json            schema_version, languages, vocab size, tokenizer hash, special
                                             token ids, and per split and shard: counts, bytes, sha256 and
                                             the block table (sentences, byte offset and crc32 of each block)
    <corpus>/shards/train/shard-000000.tar   blocks of many sentences each, languages interleaved (shuffled)
    <corpus>/shards/val/shard-000000.tar

Each sample (tar members sharing one key) is a **block** of up to ``block_size`` consecutive sentences::

    __key__      "block-<9-digit index of the block in the split>"
    tokens.npy   1-D uint16 (vocabularies of up to 65,536 ids) or uint32: the sentences' token ids
                 concatenated, each sentence [CLS] ... [SEP] (special tokens included, no padding)
    offsets.npy  1-D uint32, one more than the block's sentences: sentence i is tokens[offsets[i]:offsets[i+1]];
                 offsets[0] == 0 and offsets[-1] == len(tokens)
    langs.npy    1-D uint8, one per sentence: an index into ``lang_codes`` of the manifest (= :data:`LANGS`)

A sentence's id is its index in the split: blocks are numbered in manifest order (shards in order, blocks in
order within a shard) and sentence ``i`` of a block is ``first sentence of the block + i``.

Schema version 1 (one sentence per tar member, ``ids.npy`` + ``lang.txt``) is no longer read: such shards
are refused with the command that rewrites them (:data:`REWRITE_HINT`).
"""
from __future__ import annotations

# The paper's eight languages, in the paper's order. Language ids in batches and in blocks index this tuple.
LANGS: tuple[str, ...] = ("en", "fr", "de", "ja", "hi", "it", "es", "pt")
LANG_TO_ID = {lang: i for i, lang in enumerate(LANGS)}

SCHEMA_VERSION = 2
BLOCK_TOKENS = "tokens.npy"
BLOCK_OFFSETS = "offsets.npy"
BLOCK_LANGS = "langs.npy"
BLOCK_MEMBERS = (BLOCK_TOKENS, BLOCK_OFFSETS, BLOCK_LANGS)
"""The members of a block in the order they are written."""
SHARD_PATTERN = "shard-{:06d}.tar"
SPLITS = ("train", "val")
REWRITE_HINT = ("rewrite them with `python -m data_prep corpus --raw <raw dir> --out <corpus dir>` into a new "
                "--out (or delete <corpus dir>/shards and run the same command again)")
"""What to do with shards of an older schema: the corpus command writes the current one."""

# BERT special tokens, in the order the tokenizer gives them ids 0..4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def block_key(index: int) -> str:
    """The ``__key__`` of block ``index`` of a split."""
    return f"block-{index:09d}"


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned numpy dtype that holds every id of a vocabulary: ``<u2`` up to 65,536 ids, else ``<u4``."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocabulary size {vocab_size} outside 1..2^32")
    return "<u2" if vocab_size <= 2**16 else "<u4"


def check_langs(langs: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError naming any language code outside :data:`LANGS`."""
    unknown = [lang for lang in langs if lang not in LANG_TO_ID]
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown}; known: {' '.join(LANGS)}")


def tokenizer_hash(tokenizer_json) -> str:
    """sha256 of a ``tokenizer.json``: the shards manifest records it so a different tokenizer is caught."""
    import hashlib
    from pathlib import Path

    return "sha256:" + hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()


def check_tokenizer_matches(shards_manifest, tokenizer_dir) -> None:
    """Raise ValueError naming both files when a tokenizer is not the one the shards were written with.

    ``shards_manifest`` is the manifest dict or the path of ``<corpus>/shards`` (or its manifest.json);
    ``tokenizer_dir`` holds ``tokenizer.json``. The vocabulary size must match, and so must the file hash.
    """
    import json
    from pathlib import Path

    where = "the given shards manifest"
    if not isinstance(shards_manifest, dict):
        path = Path(shards_manifest)
        path = path / "manifest.json" if path.is_dir() else path
        where = str(path)
        shards_manifest = json.loads(path.read_text(encoding="utf-8"))
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file}: no tokenizer.json (needed to check it against {where})")
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tok_file)).get_vocab_size(with_added_tokens=True)
    if vocab_size != shards_manifest["vocab_size"]:
        raise ValueError(f"{tok_file}: vocabulary of {vocab_size} tokens, but {where} was written with "
                         f"{shards_manifest['vocab_size']}; use the corpus's own tokenizer directory")
    if tokenizer_hash(tok_file) != shards_manifest["tokenizer_hash"]:
        raise ValueError(f"{tok_file}: not the tokenizer {where} was written with (hash differs, same "
                         f"vocabulary size); use the corpus's own tokenizer directory")
