"""Tokenizer directories: how every command loads one to encode, and how they are written so that every
transformers version the project allows (``>= 4.44``) loads them.

Loading (:func:`read_tokenizer_json`, :func:`load_pretrained`): every place that encodes text with a tokenizer
it did not build (shards, fine-tuning, retrieval, speed, the teacher, vocabulary trimming) loads it here, which

- switches the ``tokenizer.json``'s own ``padding`` and ``truncation`` off, in memory only (transformers writes
  them after a padded call; sentence-embedding models ship fixed padding to 128): otherwise every encoding
  gets pad ids the model would take for words, or is cut at the tokenizer's length. The file is not rewritten:
  a teacher's digest is over its bytes;
- keeps the casing a directory states. transformers lowercases and strips accents whenever
  ``tokenizer_config.json`` does not say ``do_lower_case`` (mBERT-cased's ``Paris`` became ``paris`` and
  ``यहाँ`` ``[UNK]``), even over a ``tokenizer.json`` whose BERT normaliser keeps case: that normaliser's
  ``lowercase`` is passed on. A BERT ``vocab.txt`` without ``tokenizer.json`` takes the caller's flag when
  given, else ``do_lower_case`` or a name saying ``cased``/``uncased`` in ``tokenizer_config.json`` or
  ``config.json``, else the directory's own name; nothing saying it is refused. The choice is printed.

Writing:

transformers 5 saves ``tokenizer_config.json`` with ``"tokenizer_class": "TokenizersBackend"``, a class 4.x
does not have; both know ``PreTrainedTokenizerFast`` (5.x maps it to its tokenizers backend). tokenizers
>= 0.20 writes a BPE model's merges as pairs (``["a", "b"]``), which tokenizers 0.19 (the one transformers
4.44 requires) cannot read; the older ``"a b"`` strings are read by every version and mean the same as long as
no merged part holds a space (true of Metaspace tokenizers, where a space becomes ``▁``).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from ds_kd.errors import UsageError
from ds_kd.textfile import read_text

PORTABLE_CLASS = "PreTrainedTokenizerFast"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CASING_NAME = re.compile(r"(?:^|[^a-z])(un)?cased(?:[^a-z]|$)", re.IGNORECASE)
"""A name saying the casing, as Google's releases and the Hub's: ``multi_cased_L-12...``, ``bert-base-uncased``."""


def encoding_only(tok):
    """``tok`` (a ``tokenizers.Tokenizer``) with its padding and truncation switched off, in memory; returned."""
    tok.no_padding()
    tok.no_truncation()
    return tok


def read_tokenizer_json(path: Path | str):
    """``tokenizer.json`` at ``path`` as a ``tokenizers.Tokenizer`` ready to encode (see the module's docstring;
    a leading BOM is dropped). Raises FileNotFoundError, or the tokenizers library's error for a bad file."""
    from tokenizers import Tokenizer

    return encoding_only(Tokenizer.from_str(read_text(path)))


def file_casing(tokenizer_json: Path) -> dict[str, bool]:
    """``{"do_lower_case": ...}`` as the BERT normaliser of ``tokenizer_json`` says it; empty for other ones."""
    normalizer = json.loads(read_text(tokenizer_json)).get("normalizer") or {}
    lowercase = normalizer.get("lowercase") if normalizer.get("type") == "BertNormalizer" else None
    return {"do_lower_case": lowercase} if isinstance(lowercase, bool) else {}


def vocab_casing(directory: Path, lowercase: bool | None, how_to_say: str) -> tuple[bool, str]:
    """(lowercase, why) for the ``vocab.txt`` of ``directory`` read without ``tokenizer.json``: ``lowercase``
    when given, else what the directory says (see the module's docstring). Raises ValueError naming the file
    and ``how_to_say`` (what the user can do) when nothing does."""
    if lowercase is not None:
        return lowercase, "as asked"
    for name in (CONFIG_FILE, "config.json"):
        path = directory / name
        config = json.loads(read_text(path)) if path.is_file() else {}
        if isinstance(config.get("do_lower_case"), bool):
            return config["do_lower_case"], f"{name}: do_lower_case {str(config['do_lower_case']).lower()}"
        for key in ("name_or_path", "_name_or_path"):
            said = CASING_NAME.search(str(config.get(key, "")))
            if said:
                return bool(said.group(1)), f"{name}: {key} {config[key]}"
    said = CASING_NAME.search(directory.resolve().name)
    if said:
        return bool(said.group(1)), f"the directory's name {directory.resolve().name}"
    raise UsageError(f"{directory / VOCAB_FILE}: nothing says whether this vocabulary is cased (no do_lower_case in "
                     f"{CONFIG_FILE} or config.json, no 'cased'/'uncased' in a name); {how_to_say}")


def load_pretrained(directory: Path | str, lowercase: bool | None = None,
                    how_to_say: str = f'add "do_lower_case": false (cased) or true to its {CONFIG_FILE}'):
    """The tokenizer of ``directory`` (``tokenizer.json``, transformers files or a BERT ``vocab.txt``) as a
    transformers fast tokenizer ready to encode: padding and truncation off, a ``vocab.txt``'s casing decided
    by :func:`vocab_casing` (``lowercase``, ``how_to_say``) and printed. Nothing is downloaded."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

    directory = Path(directory)
    tok_file, config_file = directory / TOKENIZER_FILE, directory / CONFIG_FILE
    if tok_file.is_file() and not config_file.is_file():
        # built from the file as it is: transformers takes the pad token from its padding, switched off below
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(read_text(tok_file)))
    elif tok_file.is_file():
        stated = "do_lower_case" in json.loads(read_text(config_file))
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **({} if stated else file_casing(tok_file)))
    elif not (directory / VOCAB_FILE).is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    else:
        lower, why = vocab_casing(directory, lowercase, how_to_say)
        print(f"[tokenizer] {directory / VOCAB_FILE}: read {'lowercased' if lower else 'cased'} ({why})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:  # the vocabulary without a BOM, which would glue itself to [PAD]
            (Path(tmp) / VOCAB_FILE).write_text(read_text(directory / VOCAB_FILE), encoding="utf-8")
            for name in (CONFIG_FILE, "special_tokens_map.json", "added_tokens.json"):
                if (directory / name).is_file():
                    shutil.copyfile(directory / name, Path(tmp) / name)
            tokenizer = BertTokenizerFast.from_pretrained(tmp, do_lower_case=lower)
    encoding_only(tokenizer.backend_tokenizer)
    return tokenizer


def save_tokenizer_files(tokenizer, directory: Path | str, model_max_length: int) -> None:
    """``tokenizer.save_pretrained(directory)`` (a transformers fast tokenizer), then :func:`make_portable`
    with the model's ``max_position_embeddings`` as ``model_max_length``."""
    tokenizer.save_pretrained(str(directory))
    make_portable(directory, model_max_length=model_max_length)


def make_portable(directory: Path | str, merges: bool = True, model_max_length: int | None = None) -> None:
    """Rewrite a tokenizer directory in place so that transformers 4.44 to 5.x load it alike.

    ``tokenizer_config.json`` gets :data:`PORTABLE_CLASS` and an explicit ``clean_up_tokenization_spaces``
    (false: decoding is the tokenizer's own, whatever a version's default), and ``model_max_length`` when given
    (a model directory's: its ``max_position_embeddings``, so that ``truncation=True`` gives inputs the model
    takes); with ``merges``, a BPE ``tokenizer.json`` gets its merges as strings (:func:`write_legacy_merges`).
    Leave ``merges`` off where the file's hash must not change (a copy of a corpus tokenizer that shards were
    written with)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = PORTABLE_CLASS
        config.pop("backend", None)  # a 5.x-only key naming the backend class chosen above
        config.setdefault("clean_up_tokenization_spaces", False)
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if merges and (directory / TOKENIZER_FILE).is_file():
        write_legacy_merges(directory / TOKENIZER_FILE)


def write_legacy_merges(tokenizer_json: Path) -> bool:
    """Rewrite a BPE ``tokenizer.json``'s merges from pairs to ``"a b"`` strings; False (file untouched) when
    it is not BPE, already uses strings, or a merged part holds a space (then only tokenizers >= 0.20 reads it)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    pairs = model.get("merges")
    if model.get("type") != "BPE" or not pairs or not isinstance(pairs[0], list):
        return False
    if any(" " in part for pair in pairs for part in pair):
        return False
    model["merges"] = [" ".join(pair) for pair in pairs]
    tokenizer_json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
