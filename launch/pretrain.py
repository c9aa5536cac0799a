"""MLM pretraining of a BERT teacher (or the Vanilla LeanBERT student) under DeepSpeed ZeRO-2/3.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3.json --model mbert8-large \\
        --data <corpus dir> --out <run dir> --epochs 2
    deepspeed launch/pretrain.py --deepspeed --deepspeed_config ds_configs/zero2.json \\
        --model-config my_bert/config.json --data <corpus dir> --out <run dir> --max-steps 10000
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_kd.cli import add_train_args, main_guard, setup_logging, train_kwargs  # noqa: E402
from ds_kd.flags import HelpFormatter  # noqa: E402
from ds_kd.model import PRESETS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", choices=sorted(PRESETS),
                       help="model preset: the paper's mbert8-large/mbert8-base teachers and leanbert student, or "
                            "their tiny CPU twins")
    model.add_argument("--model-config", metavar="FILE",
                       help="any BERT shape instead of a preset: a Hugging Face config.json (layers, width, heads, "
                            "FFN, positions...; its vocab_size is replaced by the corpus tokenizer's)")
    add_train_args(p)
    return p


def main() -> int:
    args = build_parser().parse_args()
    setup_logging()
    from ds_kd.pretrain import PretrainConfig, run

    return main_guard(lambda: run(PretrainConfig(model=args.model or args.model_config, **train_kwargs(args))))


if __name__ == "__main__":
    sys.exit(main())
