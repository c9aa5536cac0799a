"""Model directories that later stages load: the check every loading command makes, and what ds-kd records.

A model directory is a Hugging Face BERT checkpoint: ``config.json``, the weights and the tokenizer files
(an export of ours, a fine-tuned task model, or a public checkpoint). Every command that loads one
(fine-tuning, the grid, retrieval, speed, the distillation teacher) goes through :func:`load_tokenizer`, which
refuses a directory without tokenizer files (transformers would build an empty tokenizer and turn every word
into ``[UNK]``) or whose tokenizer has ids beyond the model's embedding rows; it loads through
:func:`ds_kd.data.tokenizer_files.load_pretrained` (padding and truncation off, a ``vocab.txt``'s casing decided). More rows than tokenizer ids is
valid: vocabularies are often padded (e.g. 250037 rows for 250002 pieces).

ds-kd records facts about its own exports under a ``"ds_kd"`` key of ``config.json`` (transformers keeps
unknown keys and ignores them):

- ``segment_ids_trained``: whether the encoder was trained with segment (token type) ids. Our pretraining and
  distillation pass none, so row 1 of ``token_type_embeddings`` keeps its random initial value; such an encoder
  is fine-tuned with one segment id for both sentences of a pair (the RoBERTa / XLM-R convention). A
  directory without the key (a public BERT, whose segments were trained with next-sentence prediction) keeps
  BERT's 0/1.
"""
from __future__ import annotations

import json
from pathlib import Path

from ds_kd.errors import UsageError

DS_KD_KEY = "ds_kd"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
                   "vocab.json")
"""A directory holding none of these has no tokenizer (``tokenizer_config.json`` alone describes none)."""


def read_config(directory: Path | str) -> dict:
    """``config.json`` of a model directory; FileNotFoundError naming the directory when absent (and its
    ``export/`` when it is a training run's directory, which holds the model there)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        export = Path(directory) / "export" / "config.json"
        hint = (f": it is a training run's directory; its model is {export.parent}" if export.is_file()
                else " (no config.json)")
        raise FileNotFoundError(f"{directory}: not a model directory{hint}")
    return json.loads(path.read_text(encoding="utf-8"))


def segment_ids_trained(directory: Path | str) -> bool:
    """Whether the encoder in ``directory`` learnt segment ids (see the module's docstring): the ``ds_kd`` record
    of ``config.json``, else True (a checkpoint we did not make is taken as BERT-trained, segments 0/1)."""
    return bool(read_config(directory).get(DS_KD_KEY, {}).get("segment_ids_trained", True))


def record(directory: Path | str, **facts) -> None:
    """Add ``facts`` to the ``ds_kd`` record of ``directory/config.json`` (e.g. ``segment_ids_trained=False``)."""
    path = Path(directory) / "config.json"
    config = read_config(directory)
    config[DS_KD_KEY] = {**config.get(DS_KD_KEY, {}), **facts}
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(directory: Path | str, needed_by: str):
    """The tokenizer of model directory ``directory``, after checking it belongs to the model.

    Raises FileNotFoundError when the directory has no ``config.json`` or no tokenizer files, ValueError when
    the tokenizer is empty or has token ids at or beyond the model's ``vocab_size`` embedding rows, or when
    nothing says the casing of a ``vocab.txt`` brought without ``tokenizer.json``; the message names the
    directory and ``needed_by`` (the command or flag that asked for it)."""
    from ds_kd.data.tokenizer_files import load_pretrained

    directory = Path(directory)
    rows = read_config(directory).get("vocab_size")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) next to the model "
                                f"(needed by {needed_by}); copy the tokenizer the model was trained with into it")
    tokenizer = load_pretrained(directory, how_to_say=f'add "do_lower_case": false (cased) or true to '
                                                      f'{directory / "tokenizer_config.json"} (needed by {needed_by})')
    ids = tokenizer.get_vocab().values()
    if not ids:
        raise UsageError(f"{directory}: its tokenizer has an empty vocabulary (needed by {needed_by})")
    num_ids = max(ids) + 1
    if rows is not None and num_ids > int(rows):
        raise UsageError(f"{directory}: the tokenizer has token ids up to {num_ids - 1}, but the model's embedding "
                         f"has {rows} rows (config.json vocab_size): not this model's tokenizer (needed by "
                         f"{needed_by})")
    return tokenizer
