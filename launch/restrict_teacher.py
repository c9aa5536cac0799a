"""A fine-tuned task teacher cut to a smaller vocabulary (BiStil's phase-2 teacher):

    python launch/restrict_teacher.py --teacher out/teacher/model --vocab out/bistil/e5_en_de \\
        --out out/bistil/wikiann-teacher-en-de

The multilingual teacher fine-tuned on English keeps only the word-embedding rows of the pieces of the tokenizer
in --vocab (a pair vocabulary from ``python -m data_prep trim_vocab --langs``), in that tokenizer's order: on the
pair's text it gives the full teacher's outputs, and ``launch/finetune.py --teacher`` accepts it for a student
of that vocabulary (ds_kd.finetune.distill.restrict_task_model).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_kd.cli.flags import HelpFormatter
from ds_kd.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", type=Path, required=True,
                   help="the fine-tuned task model (the model/ folder of a launch/finetune.py job run with "
                        "--save-model) (required)")
    p.add_argument("--vocab", type=Path, required=True,
                   help="a folder with the smaller tokenizer, trimmed from this teacher's (e.g. the pair-trimmed "
                        "encoder of python -m data_prep trim_vocab) (required)")
    p.add_argument("--out", type=Path, required=True, help="folder for the restricted task model (required)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ds_kd.finetune.distill import restrict_task_model

    try:
        out = restrict_task_model(args.teacher, args.vocab, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[restrict_teacher] {args.teacher} cut to the vocabulary of {args.vocab}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
