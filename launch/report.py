"""Render the paper's tables (2, 4, 5, 6-10) and zero-shot charts from a grid directory.

    python launch/report.py runs/grid                # -> runs/grid/report/{report.md, table*.csv, zero_shot_*.png}

Cells are mean ± sample std over seeds of the jobs' result.json scores (percent); the best student per column
is marked; rows named like the paper's models get the paper's numbers beside ours.
"""
from __future__ import annotations

import argparse
import sys

from ds_kd.cli import name_value
from ds_kd.flags import HelpFormatter
from ds_kd.report import write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("grid_dir", help="grid directory written by launch/grid.py (any folder of result.json files works)")
    p.add_argument("--out", default=None, help="output folder (default: GRID_DIR/report)")
    p.add_argument("--students", nargs="+", default=None, metavar="NAME",
                   help="the rows that are students, for the best-student marks (default: the roles recorded in "
                        "GRID_DIR/grid.json; rows with LeanBERT in the name where none is recorded)")
    p.add_argument("--ppl", nargs="+", default=[], type=name_value, metavar="NAME=RUN_DIR",
                   help="pretraining/distillation run directory of a row for Table 2 (its manifest.json has "
                        "val.val_ppl); overrides the grid's record (default: the parent of a model dir named export)")
    p.add_argument("--extra", nargs="+", default=[], metavar="FILE.md",
                   help="Markdown files appended to report.md after the tables (e.g. retrieval.md, speed.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = write_report(args.grid_dir, args.out, args.students, dict(args.ppl), args.extra)
    for path in report.files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
