"""Schemas shared by ``data_prep`` and ``ds_kd``: languages and the WebDataset shard layout.

Shard layout, schema version 2 (written by ``python -m data_prep corpus``, read by :mod:`ds_kd.data.shards`),
readable with plain ``webdataset`` (one sample per block)::

    <corpus>/shards/manifest.json            schema_version, languages, vocab size, tokenizer hash, special
                                             token ids by role, every special id (``all_special_ids``: added
                                             special tokens such as language tags too, never masked), and per
                                             split and shard: counts, bytes, sha256 and the block table
                                             (sentences, byte offset and crc32 of each block)
    <corpus>/shards/train/shard-000000.tar   blocks of many sentences each, languages interleaved (shuffled)
    <corpus>/shards/val/shard-000000.tar

Each sample (tar members sharing one key) is a **block** of up to ``block_size`` consecutive sentences::

    __key__      "block-<9-digit index of the block in the split>"
    tokens.npy   1-D uint16 (vocabularies of up to 65,536 ids) or uint32: the sentences' token ids
                 concatenated, each sentence [CLS] ... [SEP] (special tokens included, no padding)
    offsets.npy  1-D uint32, one more than the block's sentences: sentence i is tokens[offsets[i]:offsets[i+1]];
                 offsets[0] == 0 and offsets[-1] == len(tokens)
    langs.npy    1-D uint8, one per sentence: an index into ``lang_codes`` of the manifest (the corpus's
                 languages in the order ``--langs`` gave them; at most :data:`MAX_LANGS`)

A sentence's id is its index in the split: blocks are numbered in manifest order (shards in order, blocks in
order within a shard) and sentence ``i`` of a block is ``first sentence of the block + i``.

Schema version 1 (one sentence per tar member, ``ids.npy`` + ``lang.txt``) is no longer read: such shards
are refused with the command that rewrites them (:data:`REWRITE_HINT`).
"""
from __future__ import annotations

import re

from ds_kd.errors import UsageError

# The paper's eight languages, in the paper's order: the default of every command. A corpus may hold any
# languages; its shards manifest's ``lang_codes`` lists them, and language ids in blocks and batches index that.
LANGS: tuple[str, ...] = ("en", "fr", "de", "ja", "hi", "it", "es", "pt")
MAX_LANGS = 256
"""Languages a corpus may hold: a sentence's language is one byte (uint8) of its block."""
LANG_CODE = re.compile(r"[a-z]{2,3}(?:[-_][a-z0-9]{1,8})*")
"""The form of a language code: an ISO 639 code of 2-3 lower-case letters, optionally followed by BCP-47-like
subtags joined by ``-`` or ``_`` (``zh-hans``, ``pt_br``, ``sr-latn``). A code names a raw directory, a task
file and a metric (``val_ppl_<code>``), so it stays short and free of path characters."""
LANG_CODE_FORM = "2-3 lower-case letters, optionally with -/_ subtags such as zh-hans or pt_br"

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

# BERT special tokens of the project's own BPE, in the order it gives them ids 0..4. A brought tokenizer
# (``corpus --tokenizer DIR``) keeps its own ids, recorded by role in the shards manifest.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Roles of special tokens, as keys of ``special_token_ids`` in the shards manifest: pad, unk, cls (or the
# tokenizer's bos where it has no cls), sep (or eos), mask; and bos/eos where the tokenizer names them.
SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask")
REQUIRED_ROLES = ("pad", "cls", "sep", "mask")
"""Roles MLM masking and padding cannot do without."""


def role_of(name: str) -> str:
    """Role of a manifest key: ``"pad"``, or the older spelling by BERT token, ``"[PAD]"``."""
    return name.strip("[]").lower()


def bpe_special_ids() -> dict[str, int]:
    """Special ids by role of the project's own BPE (ids 0..4 in the order of :data:`SPECIAL_TOKENS`)."""
    return {role_of(token): i for i, token in enumerate(SPECIAL_TOKENS)}


def config_special_ids(special: dict[str, int]) -> dict[str, int]:
    """The ``config.json`` fields of special ids by role: ``pad_token_id``, and ``bos_token_id``/``eos_token_id``
    where the tokenizer has bos/eos tokens (XLM-R: 0 and 2; a BERT tokenizer has none)."""
    fields = {"pad_token_id": int(special["pad"])}
    for role in ("bos", "eos"):
        if role in special:
            fields[f"{role}_token_id"] = int(special[role])
    return fields


def tokenizer_special_ids(tokenizer) -> dict[str, int]:
    """Special ids by role of a ``transformers`` tokenizer (pad, unk, cls, sep, mask; bos, eos where set).

    cls falls back to bos and sep to eos. A role is taken only when its token is in the vocabulary (a BERT
    tokenizer built from a ``vocab.txt`` without ``[MASK]`` would otherwise report ``[UNK]``'s id for it).
    """
    vocab = tokenizer.get_vocab()
    ids = {}
    for role in (*SPECIAL_ROLES, "bos", "eos"):
        token = getattr(tokenizer, f"{role}_token", None)
        if token is not None and str(token) in vocab:
            ids[role] = int(vocab[str(token)])
    for role, fallback in (("cls", "bos"), ("sep", "eos")):
        if role not in ids and fallback in ids:
            ids[role] = ids[fallback]
    return ids


def every_special_id(tokenizer) -> list[int]:
    """Every special token id of a ``transformers`` fast tokenizer, ascending: the named ones (pad, cls, ...,
    ``additional_special_tokens``) and every added token marked special in its ``tokenizer.json`` (language or
    task tags such as ``<2ja>``), which transformers does not always list by name."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return sorted({*map(int, tokenizer.all_special_ids), *(int(i) for i, t in added.items() if t.special)})


def block_key(index: int) -> str:
    """The ``__key__`` of block ``index`` of a split."""
    return f"block-{index:09d}"


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned numpy dtype that holds every id of a vocabulary: ``<u2`` up to 65,536 ids, else ``<u4``."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocabulary size {vocab_size} outside 1..2^32")
    return "<u2" if vocab_size <= 2**16 else "<u4"


def lang_code_problem(code: str) -> str | None:
    """Why ``code`` is not a language code of the form :data:`LANG_CODE`, or None when it is."""
    if LANG_CODE.fullmatch(code):
        return None
    hint = f" (lower case: {code.lower()!r})" if LANG_CODE.fullmatch(code.lower()) else ""
    return f"language code {code!r} is not of the form {LANG_CODE_FORM}{hint}"


def check_langs(langs: list[str] | tuple[str, ...], flag: str = "--langs") -> None:
    """Raise ValueError naming ``flag`` unless ``langs`` are at least one and at most :data:`MAX_LANGS`
    distinct codes of the form :data:`LANG_CODE` (any language, not only :data:`LANGS`)."""
    if not langs:
        raise UsageError(f"{flag}: no language given")
    for code in langs:
        if (problem := lang_code_problem(code)) is not None:
            raise UsageError(f"{flag}: {problem}")
    from collections import Counter

    twice = sorted(code for code, n in Counter(langs).items() if n > 1)
    if twice:
        raise UsageError(f"{flag}: language code(s) {', '.join(twice)} given more than once")
    if len(langs) > MAX_LANGS:
        raise UsageError(f"{flag}: {len(langs)} languages, but a shard stores a sentence's language in one byte, "
                         f"so a corpus holds at most {MAX_LANGS}; build several corpora or merge languages")


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
        raise UsageError(f"{tok_file}: vocabulary of {vocab_size} tokens, but {where} was written with "
                         f"{shards_manifest['vocab_size']}; use the corpus's own tokenizer directory")
    if tokenizer_hash(tok_file) != shards_manifest["tokenizer_hash"]:
        raise UsageError(f"{tok_file}: not the tokenizer {where} was written with (hash differs, same "
                         f"vocabulary size); use the corpus's own tokenizer directory")


def model_tokenizer_mismatch(model_dir, shards_manifest: dict, corpus_tokenizer_dir) -> str | None:
    """How the tokenizer of model directory ``model_dir`` differs from the one the shards were written with
    (``shards_manifest``; ``corpus_tokenizer_dir``: the corpus's tokenizer), or None when it is that one or the
    directory has no tokenizer to compare. A ``tokenizer.json`` must hash like the shards' (a corpus built with
    ``--tokenizer model_dir`` copies it byte for byte); a bare BERT ``vocab.txt`` must list the corpus
    tokenizer's tokens in id order."""
    from pathlib import Path

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        if tokenizer_hash(model_dir / "tokenizer.json") == shards_manifest["tokenizer_hash"]:
            return None
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    elif (model_dir / "vocab.txt").is_file():
        from tokenizers import Tokenizer

        lines = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        corpus_vocab = Tokenizer.from_file(str(Path(corpus_tokenizer_dir) / "tokenizer.json")).get_vocab(True)
        if {token: i for i, token in enumerate(lines)} == corpus_vocab:
            return None
        size = len(lines)
    else:
        return None
    if size != shards_manifest["vocab_size"]:
        return f"{size} tokens, the corpus's {shards_manifest['vocab_size']}"
    return f"the same {size} tokens in number, but other tokens or rules"


def check_model_tokenizer(model_dir, flag: str, shards_manifest: dict, corpus_tokenizer_dir) -> None:
    """Raise UsageError, one line naming ``flag`` and ``model_dir``, when the model's tokenizer is not the one the
    shards were written with (:func:`model_tokenizer_mismatch`): the shards' token ids would index other tokens'
    embedding rows. The fix it names: build the corpus with ``python -m data_prep corpus --tokenizer model_dir``."""
    differs = model_tokenizer_mismatch(model_dir, shards_manifest, corpus_tokenizer_dir)
    if differs is not None:
        raise UsageError(f"{flag} {model_dir}: its tokenizer is not the one the shards were written with "
                         f"({differs}); build the corpus with it: python -m data_prep corpus --tokenizer "
                         f"{model_dir} (with your --raw and --langs, a new --out), and train on that corpus")
