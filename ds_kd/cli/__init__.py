"""The command line: the flags shared by ``launch/pretrain.py`` and ``launch/distill.py``, W&B flags, logging set-up
and the main guard (here); argparse types, list flags and the help formatter of every command (``flags``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ds_kd.errors import UsageError
from ds_kd.launcher_env import launcher_rank
from ds_kd.logbook import WandbConfig


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--deepspeed_config", "--deepspeed-config", required=True,
                   help="DeepSpeed JSON: ZeRO stage, precision (fp16/bf16, with a logged fallback where the "
                        "hardware lacks it), micro batch, gradient accumulation, clipping (see ds_configs/)")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for DeepSpeedExamples' command lines (deepspeed.add_config_arguments); training "
                        "always runs under DeepSpeed, so it changes nothing")
    g.add_argument("--ds-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one DeepSpeed JSON value by dotted key, e.g. train_micro_batch_size_per_gpu=8 "
                        "or zero_optimization.stage=2 (repeatable; each change is logged)")
    g.add_argument("--data", required=True,
                   help="corpus directory written by `python -m data_prep corpus` (shards/ and tokenizer/)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the corpus's tokenizer/); must match the shards")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, curves.png, export/")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out, also on another number of ranks, "
                        "nodes or --num-workers (same global batch, ZeRO stage and precision)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --out already holds a run. Without it a finished run with the same "
                        "settings (data, model, DeepSpeed JSON, global batch, budget, lr, seed, ...; not logging flags) "
                        "is skipped and one with other settings is refused, naming what differs")
    g.add_argument("--seed", type=int, default=1234, help="seed of init, data order, masking and dropout")
    g.add_argument("--max-len", type=int, default=128,
                   help="truncate sentences to this many tokens; with packing, the length of a packed row")
    g.add_argument("--packing", choices=["on", "off"], default="on",
                   help="on: pack whole sentences into rows of --max-len tokens (block-diagonal attention, "
                        "positions restart per sentence; the micro batch counts rows), for training and validation "
                        "perplexity; off: one sentence per row, padded to the longest of its batch")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank (0: the rank itself)")
    g.add_argument("--shuffle-window", type=int, default=8,
                   help="shard blocks whose sentences are shuffled together, on top of a random block order per "
                        "epoch (default 8: 64k sentences at 8192 sentences a block)")
    g.add_argument("--lang-mix", choices=["corpus", "balanced"], default="corpus",
                   help="corpus: the shards' own mix of languages; balanced: equal sentences per language in every "
                        "epoch, each optimizer step from one language (BiStil; needs --packing off) "
                        "(default: corpus)")
    g.add_argument("--dist-timeout-minutes", type=float, default=10.0,
                   help="how long a rank waits for a dead peer before the job fails")
    g.add_argument("--convert-timeout-minutes", type=float, default=120.0,
                   help="on a resume on another number of ranks: how long the other ranks wait for rank 0 to "
                        "convert the checkpoint to a universal one before the job fails")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is read too

    g = p.add_argument_group("optimisation (engine settings stay in the DeepSpeed JSON)")
    budget = g.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    budget.add_argument("--epochs", type=float, help="passes over the training shards")
    from_json = "; an optimizer block in the DeepSpeed JSON sets it instead: giving both is an error"
    g.add_argument("--optimizer", choices=["adamw", "lamb"], default=None,
                   help=f"optimizer (default adamw{from_json}); LAMB needs ZeRO stage 0, since ZeRO's flat "
                        f"partitions have no per-layer trust ratio")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default 1e-4; 2e-3 for the tiny-* presets and models of "
                        f"their width, e.g. a from-teacher student of a tiny teacher, which learn nothing at 1e-4 in "
                        f"the steps a CPU run gives them{from_json})")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"weight decay on matrices (default 0.01{from_json})")
    from_json = "; a scheduler block in the DeepSpeed JSON sets the schedule instead: giving both is an error"
    g.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warmup steps (default: --warmup-ratio of the run{from_json})")
    g.add_argument("--warmup-ratio", type=float, default=None,
                   help=f"warmup fraction when --warmup-steps is 0 (default 0.06{from_json})")
    g.add_argument("--decay", choices=["linear", "cosine", "constant"], default=None,
                   help=f"learning-rate decay after warmup (default linear{from_json})")

    g = p.add_argument_group("starting weights (default: random)")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this HF BERT checkpoint directory: the whole of it (continued pretraining), "
                        "or with --init-layers its embeddings and those layers (default: random weights)")
    g.add_argument("--init-layers", type=int, nargs="+", default=None, metavar="L",
                   help="1-based layers of --init-from to copy, in order, e.g. 3 6 9 12 (DistilBERT's recipe); "
                        "the model gets that many layers (default: all layers)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="log metrics every N optimizer steps")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end only)")
    g.add_argument("--save-every", type=int, default=1000,
                   help="checkpoint every N optimizer steps (default 1000; 0: only by time and at the end)")
    g.add_argument("--save-every-minutes", type=float, default=30.0,
                   help="also checkpoint when this many minutes passed since the last one, so a crash loses at "
                        "most that much work (default 30; 0: never by time)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    add_wandb_flags(g, "default $WANDB_MODE, else online with an API key and offline without")


def add_wandb_flags(container, mode_help: str) -> None:
    """``--wandb-project``, ``--wandb-name``, ``--wandb-group`` and ``--wandb-mode`` (``mode_help`` says its
    default) on a parser or group; :func:`wandb_config` reads them back."""
    container.add_argument("--wandb-project", default=None, help="W&B project (default $WANDB_PROJECT or ds-kd)")
    container.add_argument("--wandb-name", default=None,
                           help="W&B run name (default $WANDB_NAME or the output directory's name)")
    container.add_argument("--wandb-group", default=None, help="W&B group (default $WANDB_RUN_GROUP)")
    container.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None, help=mode_help)


def wandb_config(args: argparse.Namespace) -> WandbConfig:
    """The W&B settings of flags added by :func:`add_wandb_flags`."""
    return WandbConfig(args.wandb_project, args.wandb_name, args.wandb_group, args.wandb_mode)


RESULTS_WANDB_HELP = ("W&B for the results (default $WANDB_MODE, else disabled: W&B is on only when asked for); "
                      "offline runs are kept under the output directory for `wandb sync`")


def train_kwargs(args: argparse.Namespace) -> dict:
    """The TrainConfig fields from parsed flags."""
    from ds_kd.train.engine import parse_override

    return dict(
        deepspeed_config=args.deepspeed_config, data=args.data, out=args.out, tokenizer=args.tokenizer,
        ds_overrides=dict(parse_override(o) for o in args.ds_override), max_steps=args.max_steps,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, decay=args.decay, max_len=args.max_len,
        num_workers=args.num_workers, shuffle_window=args.shuffle_window, packing=args.packing == "on", seed=args.seed,
        lang_mix=args.lang_mix,
        log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
        save_every_minutes=args.save_every_minutes,
        keep_last=args.keep_last, resume=args.resume, overwrite=args.overwrite,
        dist_timeout_minutes=args.dist_timeout_minutes, convert_timeout_minutes=args.convert_timeout_minutes,
        wandb=wandb_config(args),
        init_from=args.init_from, init_layers=args.init_layers)


def name_value(text: str) -> tuple[str, str]:
    """argparse type of the NAME=VALUE flags (``--models NAME=DIR``, ``--teacher-of STUDENT=TEACHER``, ...)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def checkpoint_dirs(pairs: list[tuple[str, str]]) -> dict[str, Path]:
    """``--models`` pairs as name -> directory. Raises UsageError naming the flag and the model for a directory
    without ``config.json`` (pointing at ``export/`` for a training run's directory, as ``read_config`` does)."""
    from ds_kd.models.modeldir import read_config

    models = {}
    for name, directory in pairs:
        try:
            read_config(directory)
        except FileNotFoundError as e:
            raise UsageError(f"--models {name}={e}") from None
        models[name] = Path(directory)
    return models


def setup_logging() -> None:
    import warnings

    # torch.distributed's deprecation notices, raised by DeepSpeed's own calls once per step, drown the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    rank = launcher_rank()  # RANK, or the openmpi/slurm/mvapich variable it is made from
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main_guard(fn) -> int:
    """Run ``fn`` and return the exit status: 0, or 2 with one logged line for an error the user can fix.

    One line for a :class:`~ds_kd.errors.UsageError`, a missing input stage (``MissingStageError``), a path the
    user named that is missing or already taken (``FileNotFoundError``/``FileExistsError``, whose message names
    it) and a diverged run (``NonFiniteLossError``, which says what to change). Every other exception, a plain
    ValueError included, propagates with its traceback: it is a bug, not a usage error."""
    from ds_kd.train.loop import NonFiniteLossError
    from ds_kd.manifest import MissingStageError

    try:
        fn()
        return 0
    except (UsageError, MissingStageError, FileNotFoundError, FileExistsError, NonFiniteLossError) as e:
        logging.getLogger("ds_kd").error("%s", e)
        return 2
