"""MLM pretraining of a BERT teacher (or the Vanilla LeanBERT student) under DeepSpeed ZeRO-2/3.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3.json --model mbert8-large \\
        --data <corpus dir> --out <run dir> --epochs 2
    deepspeed launch/pretrain.py ... --init-from <checkpoint dir>                  # continue from a checkpoint
    deepspeed launch/pretrain.py ... --init-from <checkpoint dir> --init-layers 3 6 9 12   # 4 of its layers
    deepspeed launch/pretrain.py --deepspeed --deepspeed_config ds_configs/zero2.json \\
        --model-config my_bert/config.json --data <corpus dir> --out <run dir> --max-steps 10000
"""
import argparse
import sys


from ds_kd.cli import add_train_args, main_guard, setup_logging, train_kwargs
from ds_kd.cli.flags import HelpFormatter
from ds_kd.models.config import PRESETS
from ds_kd.models.warmstart import FROM_INIT


class _Parser(argparse.ArgumentParser):
    """Resolves the model flags: --model-config FILE becomes the model; no --model means the --init-from shape."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if parsed.model_config:
            parsed.model = parsed.model_config
        elif parsed.model is None:
            if parsed.init_from is None:
                self.error("--model is required (a preset), or --model-config FILE, unless --init-from gives the "
                           "starting checkpoint")
            parsed.model = FROM_INIT
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=HelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, choices=[*sorted(PRESETS), FROM_INIT],
                       help="model preset: the paper's mbert8-large/mbert8-base teachers and leanbert student, or "
                            f"their tiny CPU twins; or {FROM_INIT}: the shape of --init-from (with as many layers as "
                            f"--init-layers names). One of --model and --model-config is required, except with "
                            f"--init-from (default then: {FROM_INIT})")
    model.add_argument("--model-config", metavar="FILE",
                       help="any BERT shape instead of a preset: a Hugging Face config.json (layers, width, heads, "
                            "FFN, positions...; its vocab_size is replaced by the corpus tokenizer's) (default: a "
                            "preset from --model)")
    add_train_args(p)
    return p


def main() -> int:
    args = build_parser().parse_args()
    setup_logging()
    from ds_kd.train.pretrain import PretrainConfig, run

    return main_guard(lambda: run(PretrainConfig(model=args.model, **train_kwargs(args))))


if __name__ == "__main__":
    sys.exit(main())
