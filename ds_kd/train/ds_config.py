"""Checking the DeepSpeed JSON before any work, and honouring its ``optimizer`` and ``scheduler`` blocks.

DeepSpeed validates the sections it knows (``zero_optimization``, ``fp16``, ...) but ignores an unknown
top-level key without a word: ``"zero_optimisation": {"stage": 3}`` trains at ZeRO stage 0. Here every
top-level key must be one DeepSpeed reads (recorded by letting DeepSpeed's own config parser read a probe
config, plus the names of its constants), and the whole JSON goes through DeepSpeed's parser once before the
engine is built, so a bad value stops the run with one line naming the file and the key.

The ``optimizer`` block of DeepSpeedExamples-style configs is honoured: ``Adam``/``AdamW`` and ``Lamb`` with
their ``lr``, ``betas``, ``eps`` and ``weight_decay`` build the same optimizers as ``--optimizer`` (so a
JSON that worked elsewhere keeps its settings), and a command-line flag that contradicts the block is an
error rather than a silent replacement. The ``scheduler`` block is handed to DeepSpeed, which builds its own
schedules on any accelerator.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ds_kd.errors import UsageError

OPTIMIZER_TYPES = {"adam": "adamw", "adamw": "adamw", "lamb": "lamb"}
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction"}
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-6}


class _ReadRecorder(dict):
    """A dict that records which keys are asked of it (get, [], in, keys() in)."""

    def __init__(self, data: dict, asked: set):
        super().__init__(data)
        self.asked = asked

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):
        recorder = self

        class _Keys:
            def __contains__(self, key):
                return key in recorder

            def __iter__(self):
                return iter(dict.keys(recorder))

            def __len__(self):
                return dict.__len__(recorder)

        return _Keys()


def known_top_level_keys() -> set[str]:
    """Top-level keys of the DeepSpeed JSON that the installed DeepSpeed reads."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig

    asked: set[str] = set()
    DeepSpeedConfig(_ReadRecorder({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}, asked))
    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.islower()
             and v.replace("_", "").isalnum()}
    return {k for k in asked if isinstance(k, str)} | names


def check_keys(keys, where: str) -> None:
    """Raise ValueError naming the first key DeepSpeed does not know, with the nearest known one."""
    known = known_top_level_keys()
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"{where}: unknown DeepSpeed config key {key!r}{hint}; DeepSpeed would ignore it")


def check_ds_config(config: dict, source: str) -> None:
    """Raise ValueError (one line naming ``source`` and the key) unless DeepSpeed accepts ``config`` as it is.

    Checks the top-level keys, then runs DeepSpeed's own parser (batch sizes, ZeRO, precision sections) with
    the world size of the process group, if one is up."""
    from deepspeed.runtime.config import DeepSpeedConfig

    check_keys(config, source)
    try:
        DeepSpeedConfig(dict(config))
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError ...: one line each
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic" not in line]
        raise UsageError(f"{source}: DeepSpeed rejects the config: {' | '.join(lines[:3]) or type(e).__name__}") \
            from None


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer a run builds (``ds_kd.train.optim.build_optimizer``) and where its settings came from."""

    name: str
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    source: str
    """``flags`` (command line and defaults) or the DeepSpeed JSON's path."""

    def as_ds_block(self) -> dict:
        """The same optimizer as a DeepSpeed ``optimizer`` block (written into the run's effective config)."""
        return {"type": {"adamw": "AdamW", "lamb": "Lamb"}[self.name],
                "params": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                           "weight_decay": self.weight_decay}}


def resolve_optimizer(config: dict, flags: dict, source: str,
                      default_lr: float | None = None) -> tuple[OptimizerSpec, dict]:
    """The optimizer from the JSON's ``optimizer`` block or from ``flags`` (``optimizer``, ``lr``,
    ``weight_decay``; None = not given), and the config without the block (the engine gets the optimizer
    built). ``default_lr``: the model's default peak rate where neither gives one (None: 1e-4). Raises
    ValueError for an unsupported type or parameter, or a flag that contradicts the block."""
    given = {k: v for k, v in flags.items() if v is not None}
    block = config.get("optimizer")
    defaults = {**DEFAULT_OPTIMIZER, **({"lr": default_lr} if default_lr is not None else {})}
    if block is None:
        settings = {**defaults, **{("name" if k == "optimizer" else k): v for k, v in given.items()}}
        return OptimizerSpec(settings["name"], float(settings["lr"]), float(settings["weight_decay"]),
                             tuple(settings["betas"]), float(settings["eps"]), "flags"), config
    if given:
        flag_list = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise UsageError(f"{source}: the config's optimizer block sets the optimizer; {flag_list} would "
                         f"contradict it: drop the flag(s) or the block")
    kind = str(block.get("type", "")).lower()
    if kind not in OPTIMIZER_TYPES:
        raise UsageError(f"{source}: optimizer type {block.get('type')!r} is not supported here; use one of "
                         f"Adam, AdamW, Lamb (or drop the block and use --optimizer)")
    params = dict(block.get("params", {}))
    unknown = sorted(set(params) - OPTIMIZER_PARAMS)
    if unknown:
        raise UsageError(f"{source}: optimizer.params {unknown} not supported (known: {sorted(OPTIMIZER_PARAMS)})")
    if kind == "adam" and params.get("adam_w_mode", True) is False:
        raise UsageError(f"{source}: Adam with adam_w_mode false (L2 regularisation) is not supported; use AdamW")
    spec = OptimizerSpec(OPTIMIZER_TYPES[kind], float(params.get("lr", defaults["lr"])),
                         float(params.get("weight_decay", 0.0)),
                         tuple(params.get("betas", DEFAULT_OPTIMIZER["betas"])),
                         float(params.get("eps", DEFAULT_OPTIMIZER["eps"])), source)
    return spec, {k: v for k, v in config.items() if k != "optimizer"}


def check_scheduler(config: dict, flags: dict, source: str) -> bool:
    """True when the JSON has a ``scheduler`` block (DeepSpeed then builds the schedule from it). Raises
    ValueError for a type DeepSpeed does not know or a schedule flag (``flags``: None = not given) given too."""
    block = config.get("scheduler")
    if block is None:
        return False
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    if block.get("type") not in VALID_LR_SCHEDULES:
        raise UsageError(f"{source}: scheduler type {block.get('type')!r} unknown to DeepSpeed; known: "
                         f"{', '.join(VALID_LR_SCHEDULES)}")
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if given:
        raise UsageError(f"{source}: the config's scheduler block sets the learning-rate schedule; "
                         f"{', '.join(given)} would contradict it: drop the flag(s) or the block")
    return True


def write_effective_config(config: dict, optimizer: OptimizerSpec, path: Path) -> None:
    """The config the engine got (after overrides and the precision fallback), with the optimizer as built."""
    import json

    from ds_kd.manifest import atomic_write_text

    atomic_write_text(path, json.dumps({**config, "optimizer": optimizer.as_ds_block()}, indent=2) + "\n")
