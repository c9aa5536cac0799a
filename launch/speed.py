"""Inference speed of exported encoders on this CPU, side by side in one process, with parameter counts.

    python launch/speed.py --models mBERT8=out/demo/runs/mbert8-base/export mLeanBERT=out/demo/runs/mleanbert/export \\
        --teacher-of mLeanBERT=mBERT8 --heldout out/demo/heldout --out out/demo/speed

Writes OUT/speed.json and OUT/speed.md: ms per sentence at batch 1, sentences/s at batch 32, parameters with
and without embeddings, and each student's speed-up over its teacher.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_kd.cli import checkpoint_dirs, name_value
from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter
from ds_kd.eval.speed import SpeedConfig, run
from ds_kd.textfile import read_text


def read_texts(heldout: Path, lang: str) -> list[str]:
    path = heldout / lang / "help.txt"
    if not path.is_file():
        raise UsageError(f"--heldout {heldout}: no {lang}/help.txt in it (--heldout must hold <lang>/help.txt, one "
                         f"text per line)")
    return read_text(path).splitlines()


def build_parser() -> argparse.ArgumentParser:
    d = SpeedConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", type=name_value,
                   help="HF BERT checkpoint directories to time, each with its tokenizer files (a directory without "
                        "them, or whose tokenizer has more ids than the model's embedding rows, is refused)")
    p.add_argument("--teacher-of", nargs="*", default=[], metavar="STUDENT=TEACHER", type=name_value,
                   help="report STUDENT's speed-up over TEACHER (both names of --models)")
    p.add_argument("--out", type=Path, required=True, help="folder for speed.json and speed.md")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--heldout", type=Path, help="take sentence lengths from <dir>/<lang>/help.txt")
    src.add_argument("--lengths", type=int, nargs="+", help="sentence lengths in sub-word tokens instead")
    p.add_argument("--lang", default="en", help="language of the --heldout text (default: %(default)s)")
    p.add_argument("--num-sentences", type=int, default=d.num_sentences,
                   help="sentences timed per pass (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="large batch size (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest sentence in sub-words (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.num_warmup, help="untimed passes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=d.num_repeats, help="timed passes, median reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads; 0: as many as torch chooses (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of sentences and token ids (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SpeedConfig(num_sentences=len(args.lengths) if args.lengths else args.num_sentences,
                      batch_size=args.batch_size, max_len=args.max_len, num_warmup=args.warmup,
                      num_repeats=args.repeats, threads=args.threads, seed=args.seed)
    try:
        texts = read_texts(args.heldout, args.lang) if args.heldout else None
        result = run(checkpoint_dirs(args.models), args.out, dict(args.teacher_of), texts, args.lengths, cfg,
                     str(args.heldout / args.lang / "help.txt") if args.heldout else "")
    except (FileNotFoundError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "speed.md").read_text(encoding="utf-8"))
    print(f"[speed] {result['threads']} torch thread(s) -> {args.out / 'speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
