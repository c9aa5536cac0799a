"""Starting a model from a checkpoint: all of it, or its embeddings and chosen layers (DistilBERT's recipe).

DistilBERT (Sanh et al., 2019) initialises its 6-layer student from every other layer of BERT-Base: a student of
the teacher's width starts from the teacher's embeddings and a subset of its layers, and keeps their function
(the student with layers 3 6 9 12 of a 12-layer teacher *is* that teacher with the other layers removed).

- ``--init-from DIR``: the whole checkpoint (continued pretraining, e.g. from public mBERT);
- ``--init-from DIR --init-layers 3 6 9 12``: embeddings and those layers (1-based) in that order, the MLM head
  too where the checkpoint has one;
- the shape: ``from-init`` takes the checkpoint's (width, heads, FFN, positions) with as many layers as chosen;
  a preset given instead must have exactly that shape, or the run stops naming the differing fields.

The vocabulary is always the shards' tokenizer's: the checkpoint's first rows are copied; a checkpoint with
fewer rows than the tokenizer is refused.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from ds_kd.errors import UsageError
from ds_kd.models.config import BertConfig, make_config

if TYPE_CHECKING:  # the command lines import this module for FROM_INIT and FROM_TEACHER: torch only when used
    from ds_kd.models.model import BertForMaskedLM

log = logging.getLogger("ds_kd")

FROM_INIT = "from-init"
FROM_TEACHER = "from-teacher"
"""A distillation student of the teacher's width, heads, FFN and positions with a third of its layers, at least 1
(``ds_kd.distill.run.student_config``)."""
SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                "max_position_embeddings", "type_vocab_size")


def checkpoint_config(directory: str | Path) -> BertConfig:
    """The ``config.json`` of a checkpoint directory; FileNotFoundError naming it when there is none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --init-from is not a checkpoint directory (no config.json)")
    with open(path, encoding="utf-8") as f:
        return BertConfig.from_hf_dict(json.load(f))


def check_layers(layers: list[int] | None, num_layers: int, directory: str | Path) -> None:
    """``layers`` must be distinct 1-based layer numbers of a ``num_layers``-layer checkpoint."""
    if layers is None:
        return
    if not layers:
        raise UsageError("--init-layers needs at least one layer number")
    bad = [l for l in layers if not 1 <= l <= num_layers]
    if bad:
        raise UsageError(f"--init-layers {bad}: {directory} has layers 1..{num_layers} (numbers are 1-based)")
    if len(set(layers)) != len(layers):
        raise UsageError(f"--init-layers {layers}: a layer is named twice")


def student_config(shape: str, vocab_size: int, init_from: str | Path | None = None,
                   init_layers: list[int] | None = None) -> BertConfig:
    """The model's config: a preset name or :data:`FROM_INIT` (the ``init_from`` checkpoint's shape with
    ``len(init_layers)`` layers, or all of them). Raises ValueError, before any work, for ``--init-layers``
    without ``--init-from``, bad layer numbers, a checkpoint vocabulary smaller than ``vocab_size``, or a preset
    whose shape differs from the checkpoint's (width, heads, FFN, layers, positions, token types)."""
    if init_from is None:
        if shape == FROM_INIT:
            raise UsageError(f"{FROM_INIT} takes the shape of --init-from, which is not given")
        if init_layers is not None:
            raise UsageError("--init-layers needs --init-from (the checkpoint whose layers are copied)")
        return make_config(shape, vocab_size=vocab_size)
    source = checkpoint_config(init_from)
    check_layers(init_layers, source.num_hidden_layers, init_from)
    if source.vocab_size < vocab_size:
        raise UsageError(f"{Path(init_from) / 'config.json'}: vocabulary of {source.vocab_size} rows, fewer than "
                         f"the {vocab_size} tokens of the shards' tokenizer: start from a checkpoint of that "
                         f"tokenizer")
    derived = replace(source, vocab_size=vocab_size,
                      num_hidden_layers=len(init_layers) if init_layers else source.num_hidden_layers)
    if shape == FROM_INIT:
        return derived
    preset = make_config(shape, vocab_size=vocab_size)
    differ = [f"{name} {getattr(preset, name)} vs {getattr(derived, name)}" for name in SHAPE_FIELDS
              if getattr(preset, name) != getattr(derived, name)]
    if differ:
        raise UsageError(f"preset {shape!r} does not have the shape of --init-from {init_from}"
                         f"{' with --init-layers ' + ' '.join(map(str, init_layers)) if init_layers else ''}: "
                         f"{'; '.join(differ)} (preset vs checkpoint); use {FROM_INIT} to take the checkpoint's "
                         f"shape")
    return preset


def init_model(model: BertForMaskedLM, source: BertForMaskedLM, layers: list[int] | None = None) -> dict:
    """Copy ``source``'s embeddings, its ``layers`` (1-based, in this order; None: all) and, where it has one,
    its MLM head into ``model`` (in place, before any engine wraps it). Vocabulary rows past ``model``'s are
    left out. Returns what was copied, for the run manifest."""
    import torch

    layers = list(layers) if layers else list(range(1, source.config.num_hidden_layers + 1))
    vocab = model.config.vocab_size
    src_emb, dst_emb = source.bert.embeddings, model.bert.embeddings
    head = getattr(source, "has_mlm_head", True)
    with torch.no_grad():
        dst_emb.word_embeddings.weight.copy_(src_emb.word_embeddings.weight[:vocab])
        for name in ("position_embeddings", "token_type_embeddings", "LayerNorm"):
            getattr(dst_emb, name).load_state_dict(getattr(src_emb, name).state_dict())
        for dst, number in zip(model.bert.encoder.layer, layers):
            dst.load_state_dict(source.bert.encoder.layer[number - 1].state_dict())
        if head:
            src_head, dst_head = source.cls.predictions, model.cls.predictions
            dst_head.transform.load_state_dict(src_head.transform.state_dict())
            dst_head.bias.copy_(src_head.bias[:vocab])
    summary = {"layers": layers, "embeddings": True, "mlm_head": "copied" if head else "fresh (none in checkpoint)"}
    log.info("initialised from a checkpoint: %s", summary)
    return summary
