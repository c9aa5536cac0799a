"""The configuration of the BERT family, apart from the model so that it loads without torch (as Hugging
Face's ``configuration_bert.py`` beside ``modeling_bert.py``): :class:`BertConfig`, the presets of the paper's
Table 1 and their tiny CPU twins (see :mod:`ds_kd.models.model`), their default learning rates, and configs read
from a Hugging Face ``config.json``. Command lines list the presets in ``--help`` without importing torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ds_kd.errors import UsageError


@dataclass(frozen=True)
class BertConfig:
    """Shape and regularisation of a BERT encoder (field names as in ``transformers.BertConfig``)."""

    vocab_size: int = 120000
    """Token vocabulary (input embeddings and the tied MLM output layer)."""
    hidden_size: int = 768
    """Width of every layer."""
    num_hidden_layers: int = 12
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide ``hidden_size``."""
    intermediate_size: int = 3072
    """Width of the feed-forward block."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position embeddings cover."""
    type_vocab_size: int = 2
    """Segment (token type) vocabulary."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon."""
    hidden_dropout_prob: float = 0.1
    """Dropout after embeddings, attention output and feed-forward."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    pad_token_id: int = 0
    """Id of the tokenizer's pad token (its embedding row starts at zero and gets no gradient); a model built for
    training takes it from the shards' special ids (XLM-R's tokenizer pads with 1)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self, special_token_ids: dict[str, int] | None = None) -> dict:
        """The ``config.json`` of ``transformers.BertConfig``. ``special_token_ids`` are the config fields of the
        tokenizer saved alongside (``pad_token_id``, ``bos_token_id``/``eos_token_id`` where it has them; see
        :func:`ds_kd.schema.config_special_ids`): the tokenizer is what every consumer pads with, so they win."""
        return {**asdict(self), **(special_token_ids or {}), "model_type": "bert",
                "architectures": ["BertForMaskedLM"], "hidden_act": "gelu", "tie_word_embeddings": True,
                "position_embedding_type": "absolute"}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "BertConfig":
        if d.get("model_type", "bert") != "bert":
            raise UsageError(f"not a BERT checkpoint: model_type={d.get('model_type')!r}")
        if d.get("hidden_act", "gelu") != "gelu":
            raise UsageError(f"unsupported hidden_act {d.get('hidden_act')!r} (only 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UsageError(f"unsupported position_embedding_type {d.get('position_embedding_type')!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


PRESETS: dict[str, BertConfig] = {
    "mbert8-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "mbert8-base": BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "leanbert": BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200),
    # 3 and 4 layers of multilingual-e5-small's shape: real-teacher students (from random weights, or with
    # --init-from the teacher and as many --init-layers, which must give this shape); the demo's have 3.
    "e5-small-3l": BertConfig(hidden_size=384, num_hidden_layers=3, num_attention_heads=12, intermediate_size=1536),
    "e5-small-4l": BertConfig(hidden_size=384, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1536),
    # An XtremeDistil student of e5 (launch/task_distill.py; the demo's): 13.5x fewer non-embedding parameters.
    "xd-2l-256": BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
    "tiny-large": BertConfig(vocab_size=8000, hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                             intermediate_size=256, max_position_embeddings=256),
    "tiny-base": BertConfig(vocab_size=8000, hidden_size=48, num_hidden_layers=6, num_attention_heads=3,
                            intermediate_size=192, max_position_embeddings=256),
    "tiny-leanbert": BertConfig(vocab_size=8000, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=76, max_position_embeddings=256),
}


PRESET_LR: dict[str, float] = {"tiny-large": 2e-3, "tiny-base": 2e-3, "tiny-leanbert": 2e-3}
"""Default peak learning rate of the presets whose default is not the optimizer's 1e-4: at 1e-4
the tiny CPU presets learn nothing in the few hundred steps they get (after 30 steps their MLM perplexity was
still at the uniform level); 2e-3, the demo's rate, trains them."""


def default_lr(shape: str | None) -> float | None:
    """The default peak learning rate for a model of ``shape`` (a preset, a ``config.json`` or a checkpoint
    directory): that of the preset with the same width, heads and FFN (any number of layers, so a student of a
    tiny teacher's width counts as tiny), from :data:`PRESET_LR`; None (the optimizer's default) for the others
    and for a shape that cannot be read (the stage reports that itself, naming the flag)."""
    if shape is None:
        return None
    try:
        config = make_config(shape)
    except (ValueError, FileNotFoundError):
        return None
    width = (config.hidden_size, config.num_attention_heads, config.intermediate_size)
    return next((PRESET_LR[name] for name in PRESET_LR
                 if (PRESETS[name].hidden_size, PRESETS[name].num_attention_heads,
                     PRESETS[name].intermediate_size) == width), None)


def make_config(preset: str, vocab_size: int | None = None, **overrides) -> BertConfig:
    """The config of a preset name or of a Hugging Face ``config.json`` file (any BERT shape; a checkpoint
    directory means its config.json), with the vocabulary (normally the tokenizer's) and any field overridden.

    Raises ValueError for an unknown preset or a config that is not BERT's, FileNotFoundError for a missing
    file (the file is what ``launch/pretrain.py --model-config`` names)."""
    if preset in PRESETS:
        base = PRESETS[preset]
    elif preset.endswith(".json") or Path(preset).exists():
        base = config_from_file(Path(preset))
    else:
        raise UsageError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)} (or a config.json file)")
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return replace(base, **overrides)


def config_from_file(path: Path) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face ``config.json`` (or a directory holding one); errors name it."""
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config file not found")
    try:
        return BertConfig.from_hf_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:  # bad JSON, a non-BERT model_type, heads not dividing the width, ...
        raise UsageError(f"{path}: {e}") from None
