"""Tokenizer directories that load with every transformers version the project allows (``>= 4.44``).

transformers 5 saves ``tokenizer_config.json`` with ``"tokenizer_class": "TokenizersBackend"``, a class 4.x
does not have; both know ``PreTrainedTokenizerFast`` (5.x maps it to its tokenizers backend). tokenizers
>= 0.20 writes a BPE model's merges as pairs (``["a", "b"]``), which tokenizers 0.19 (the one transformers
4.44 requires) cannot read; the older ``"a b"`` strings are read by every version and mean the same as long as
no merged part holds a space (true of Metaspace tokenizers, where a space becomes ``▁``).
"""
from __future__ import annotations

import json
from pathlib import Path

PORTABLE_CLASS = "PreTrainedTokenizerFast"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer_files(tokenizer, directory: Path | str) -> None:
    """``tokenizer.save_pretrained(directory)`` (a transformers fast tokenizer), then :func:`make_portable`."""
    tokenizer.save_pretrained(str(directory))
    make_portable(directory)


def make_portable(directory: Path | str, merges: bool = True) -> None:
    """Rewrite a tokenizer directory in place so that transformers 4.44 to 5.x load it alike.

    ``tokenizer_config.json`` gets :data:`PORTABLE_CLASS` and an explicit ``clean_up_tokenization_spaces``
    (false: decoding is the tokenizer's own, whatever a version's default); with ``merges``, a BPE
    ``tokenizer.json`` gets its merges as strings (:func:`write_legacy_merges`). Leave ``merges`` off where the
    file's hash must not change (a copy of a corpus tokenizer that shards were written with)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = PORTABLE_CLASS
        config.pop("backend", None)  # a 5.x-only key naming the backend class chosen above
        config.setdefault("clean_up_tokenization_spaces", False)
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
