"""MLM pretraining of a BERT teacher (or the Vanilla LeanBERT student) under DeepSpeed ZeRO-2/3.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3.json --model mbert8-large \
        --data <corpus dir> --out <run dir> --epochs 2
    deepspeed launch/pretrain.py ... --init-from <checkpoint dir>                  # continue from a checkpoint
    deepspeed launch/pretrain.py ... --init-from <checkpoint dir> --init-layers 3 6 9 12   # 4 of its layers
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_kd.cli import add_train_args, main_guard, setup_logging, train_kwargs  # noqa: E402
from ds_kd.model import PRESETS  # noqa: E402
from ds_kd.warmstart import FROM_INIT  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, choices=[*sorted(PRESETS), FROM_INIT],
                   help="model preset: the paper's mbert8-large/mbert8-base teachers and leanbert student, or "
                        f"their tiny CPU twins; or {FROM_INIT}: the shape of --init-from (with as many layers as "
                        f"--init-layers names). Required, except with --init-from (default then: {FROM_INIT})")
    add_train_args(p)
    args = p.parse_args()
    if args.model is None:
        if args.init_from is None:
            p.error("--model is required (a preset), unless --init-from gives the starting checkpoint")
        args.model = FROM_INIT
    setup_logging()
    from ds_kd.pretrain import PretrainConfig, run

    return main_guard(lambda: run(PretrainConfig(model=args.model, **train_kwargs(args))))


if __name__ == "__main__":
    sys.exit(main())
