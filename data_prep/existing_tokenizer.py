"""A tokenizer the user brings (``corpus --tokenizer DIR``): its special tokens by role, and its copy in the corpus.

A brought tokenizer keeps its own numbering: mBERT's WordPiece has ``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101,
``[SEP]``=102, ``[MASK]``=103; XLM-R's unigram has ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and
``<mask>`` last. The roles (pad, unk, cls, sep, mask; bos, eos where named) are read from the tokenizer itself:

1. the transformers files (``tokenizer_config.json``, ``special_tokens_map.json``) or a BERT ``vocab.txt``
   (whose tokenizer names ``[PAD]`` ... ``[MASK]``), where the named token is in the vocabulary;
2. else, from ``tokenizer.json``: cls and sep are what its post-processor puts first and last, pad is its
   padding token (transformers names it so when it loads the file), unk its model's unknown token, and the rest the bracketed names ``[MASK]``/``<mask>``,
   ``[PAD]``/``<pad>``, ``[CLS]``/``<cls>``/``<s>``, ``[SEP]``/``<sep>``/``</s>``, ``[UNK]``/``<unk>``.

A tokenizer without a pad, mask, cls or sep token is refused, naming it: MLM cannot mask or pad without
them. Every sequence must come out as ``cls ... sep`` (the reader and fine-tuning rely on it): a tokenizer
whose post-processor adds no special token (or that has none) gets the template ``cls $A sep`` in the corpus
copy (said in the log and the manifest); one whose post-processor adds something else is refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, processors

from ds_kd.errors import UsageError
from ds_kd.schema import REQUIRED_ROLES, tokenizer_special_ids
from ds_kd.data.tokenizer_files import load_pretrained, make_portable

TOKENIZER_FILE = "tokenizer.json"
ROLE_NAMES = {
    "pad": ("[pad]", "<pad>", "<|pad|>"),
    "unk": ("[unk]", "<unk>", "<|unk|>"),
    "mask": ("[mask]", "<mask>", "<|mask|>"),
    "cls": ("[cls]", "<cls>", "<s>", "<|cls|>"),
    "sep": ("[sep]", "<sep>", "</s>", "<|sep|>"),
}
PROBE = "a"
"""Text encoded to see what the post-processor adds around a sequence."""


LOWERCASE_FLAGS = "pass --lowercase (an uncased vocabulary) or --no-lowercase (a cased one) to the corpus command"


def load_existing(tokenizer_dir: Path, lowercase: bool | None = None):
    """An existing tokenizer directory (``tokenizer.json``, transformers files or a BERT ``vocab.txt``) as a
    transformers fast tokenizer, ready to encode (:func:`ds_kd.data.tokenizer_files.load_pretrained`: padding and
    truncation off; a ``vocab.txt``'s casing from the directory, else ``lowercase``, the corpus command's flag).
    Raises ``FileNotFoundError`` naming the directory when it holds none, ValueError when a ``vocab.txt``'s
    casing is unknown."""
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: --tokenizer directory does not exist")
    if not any((tokenizer_dir / name).is_file() for name in (TOKENIZER_FILE, "tokenizer_config.json", "vocab.txt")):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json, tokenizer_config.json or vocab.txt in it")
    return load_pretrained(tokenizer_dir, lowercase, LOWERCASE_FLAGS)


def roles_from_json(tok: Tokenizer) -> dict[str, int]:
    """Special ids by role read from a ``tokenizers.Tokenizer`` alone (see the module doc, rule 2)."""
    ids: dict[str, int] = {}
    enc = tok.encode(PROBE)
    if enc.ids and enc.special_tokens_mask[0]:
        ids["cls"] = enc.ids[0]
    if len(enc.ids) > 1 and enc.special_tokens_mask[-1]:
        ids["sep"] = enc.ids[-1]
    model = json.loads(tok.to_str())["model"]
    unk = model.get("unk_id") if model.get("type") == "Unigram" else tok.token_to_id(model.get("unk_token") or "")
    if unk is not None:
        ids["unk"] = int(unk)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    vocab = tok.get_vocab(with_added_tokens=True)
    for role, names in ROLE_NAMES.items():
        if role in ids:
            continue
        found = sorted(t for t in vocab if t.lower() in names)
        preferred = [t for t in found if t in special] or found
        if len(preferred) > 1:
            raise UsageError(f"several tokens could be the {role} token: {preferred}; name it in the "
                             f"tokenizer's transformers files (tokenizer_config.json: {role}_token)")
        if preferred:
            ids[role] = vocab[preferred[0]]
    return ids


def special_token_ids(fast, where: Path | str) -> dict[str, int]:
    """Special ids by role of a transformers fast tokenizer: its named tokens first, then ``tokenizer.json``.
    Raises ValueError naming ``where`` when pad, mask, cls or sep is missing."""
    ids = {**roles_from_json(fast.backend_tokenizer), **tokenizer_special_ids(fast)}
    missing = [role for role in REQUIRED_ROLES if role not in ids]
    if missing:
        raise UsageError(f"{where}: the tokenizer has no {' / '.join(missing)} token; MLM pretraining needs "
                         f"pad, mask, cls and sep tokens (found {ids or 'none'}). Add them to the tokenizer or "
                         f"name them in its tokenizer_config.json")
    return ids


def wraps_with_cls_sep(tok: Tokenizer, ids: dict[str, int]) -> bool:
    enc = tok.encode(PROBE)
    return len(enc.ids) >= 2 and enc.ids[0] == ids["cls"] and enc.ids[-1] == ids["sep"]


def add_template(tok: Tokenizer, ids: dict[str, int]) -> None:
    """``cls $A sep`` (pairs: ``cls $A sep $B sep``, as BERT) around every encoding."""
    cls, sep = tok.id_to_token(ids["cls"]), tok.id_to_token(ids["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])])


def copy_existing(tokenizer_dir: Path, out_dir: Path, lowercase: bool | None = None) -> dict:
    """Bring an existing tokenizer into the corpus as ``out_dir`` (``tokenizer.json`` + transformers files
    naming its special tokens; a brought ``tokenizer.json`` byte for byte, its padding and truncation included,
    which every loader switches off). ``lowercase``: see :func:`load_existing`. Returns
    ``{"post_processor_added": bool}`` (True: the copy got ``cls $A sep``). Raises ValueError naming
    ``tokenizer_dir`` for a missing special token or a post-processor that does not give ``cls ... sep``."""
    fast = load_existing(tokenizer_dir, lowercase)
    ids = special_token_ids(fast, tokenizer_dir)
    backend = fast.backend_tokenizer
    added = False
    if not wraps_with_cls_sep(backend, ids):
        enc = backend.encode(PROBE)
        if any(enc.special_tokens_mask):
            raise UsageError(f"{tokenizer_dir}: its post-processor encodes {PROBE!r} as {enc.tokens}, not "
                             f"{backend.id_to_token(ids['cls'])} ... {backend.id_to_token(ids['sep'])}; "
                             f"MLM shards need every sentence between its cls and sep tokens")
        add_template(backend, ids)
        added = True
        print(f"[corpus] {tokenizer_dir}: its post-processor adds no special token; every sentence is encoded as "
              f"{backend.id_to_token(ids['cls'])} ... {backend.id_to_token(ids['sep'])}", flush=True)
    for role in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        if role in ids and getattr(fast, f"{role}_token", None) is None:
            setattr(fast, f"{role}_token", backend.id_to_token(ids[role]))
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    byte_copy = (tokenizer_dir / TOKENIZER_FILE).is_file() and not added
    if byte_copy:
        # the brought file byte for byte: a re-serialised one differs (float digits, or a pipeline transformers
        # rebuilt), and a teacher's tokenizer.json must hash like the shards' (ds_kd.schema)
        shutil.copyfile(tokenizer_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    else:
        backend.save(str(out_dir / TOKENIZER_FILE))  # the exact object (post-processor included)
    make_portable(out_dir, merges=not byte_copy)
    return {"post_processor_added": added}


def corpus_special_ids(tokenizer_dir: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Special ids and tokens by role of a corpus tokenizer directory (learned BPE or brought tokenizer).

    Raises ValueError naming the directory when a role is missing or its sequences are not ``cls ... sep``
    (a corpus written before that was checked: delete it and run ``python -m data_prep corpus`` again)."""
    fast = load_existing(tokenizer_dir)
    ids = special_token_ids(fast, tokenizer_dir)
    if not wraps_with_cls_sep(fast.backend_tokenizer, ids):
        raise UsageError(f"{tokenizer_dir}: sequences are not encoded as cls ... sep; delete "
                         f"{tokenizer_dir.parent / 'tokenizer'} and {tokenizer_dir.parent / 'shards'} and run "
                         f"python -m data_prep corpus again")
    tokens = {role: fast.backend_tokenizer.id_to_token(i) for role, i in ids.items()}
    return ids, tokens
