"""Render the paper's tables (2, 4, 5, 6-10) and zero-shot charts from a grid directory.

    python launch/report.py runs/grid                # -> runs/grid/report/{report.md, table*.csv, zero_shot_*.png}

Cells are mean ± sample std over seeds of the jobs' result.json scores (percent); the best student per column
is marked; rows named like the paper's models get the paper's numbers beside ours. Then, per finding of the paper,
whether these runs agree, disagree or cannot tell (a difference within 2 sample std of either row: cannot tell).

    python launch/report.py runs/grid --finding 1 "e5-3L KD=e5-3L init, MLM"    # one more pair for finding (1)
    python launch/report.py runs/grid --ablation "XD=XD, labels only"           # an ablation against its main row
    python launch/report.py runs/grid --retention "BiStil en-de=e5-small" \\
        --within "BiStil en-de=BiStil en-de, phase A (dense)"                  # a recipe's claims
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_kd.cli import RESULTS_WANDB_HELP, add_wandb_flags, name_value, wandb_config
from ds_kd.errors import UsageError
from ds_kd.eval.findings import FINDINGS, Comparison
from ds_kd.eval.claims import parse_claims
from ds_kd.cli.flags import HelpFormatter
from ds_kd.logbook import log_results
from ds_kd.eval.report import report_tables, write_report


def parse_findings(groups: list[list[str]]) -> list[Comparison]:
    """``--finding N A=B ...`` groups as comparisons; ValueError naming a bad number or pair."""
    out = []
    for number, *pairs in groups:
        if number not in {str(n) for n in FINDINGS}:
            raise UsageError(f"--finding {number}: the paper's findings are {', '.join(map(str, FINDINGS))}")
        if not pairs:
            raise UsageError(f"--finding {number}: give at least one EXPECTED=OTHER pair of rows")
        for pair in pairs:
            try:
                out.append(Comparison(int(number), *name_value(pair)))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--finding {number}: {e} (EXPECTED=OTHER)") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("grid_dir", help="grid directory written by launch/grid.py (any folder of result.json files works)")
    p.add_argument("--out", default=None, help="output folder (default: GRID_DIR/report)")
    p.add_argument("--students", nargs="+", default=None, metavar="NAME",
                   help="the rows that are students, for the best-student marks (default: the roles recorded in "
                        "GRID_DIR/grid.json; where none is recorded, distilled models are students, see launch/grid.py "
                        "--students)")
    p.add_argument("--roles", nargs="+", default=[], type=name_value, metavar="NAME=ROLE",
                   help="the role (teacher, student or baseline) of these rows, over the grid's record and --students, "
                        "e.g. for jobs that launch/finetune.py or launch/task_distill.py wrote under GRID_DIR, which the "
                        "grid does not record (default: none)")
    p.add_argument("--ppl", nargs="+", default=[], type=name_value, metavar="NAME=RUN_DIR",
                   help="pretraining/distillation run directory of a row for Table 2 (its manifest.json has "
                        "val.val_ppl); overrides the grid's record (default: the parent of a model dir named export)")
    p.add_argument("--extra", nargs="+", default=[], metavar="FILE.md",
                   help="Markdown files appended to report.md after the tables (e.g. retrieval.md, speed.md)")
    p.add_argument("--finding", nargs="+", action="append", default=[], metavar=("N", "EXPECTED=OTHER"),
                   help="test the paper's finding N (1: KD in pretraining helps zero-shot over Vanilla; 2: KD in "
                        "fine-tuning can hurt it; 3: the larger teacher gives the stronger student) also with these "
                        "row pairs, EXPECTED being the row the paper expects to score higher; repeatable (default: "
                        "only the paper's own pairs among its rows present: mLeanBERT and mXLeanBERT vs Vanilla "
                        "mLeanBERT, ft-distill rows vs their plain rows, mXLeanBERT vs mLeanBERT)")
    p.add_argument("--ablation", nargs="+", action="extend", default=[], type=name_value, metavar="MAIN=ABLATION",
                   help="judge each ablation against its main row, both rows of the report, on English and zero-shot "
                        "scores, in a section after the findings: agree (the ingredient the ablation lacks helps) "
                        "when the main row is ahead by more than 2 sample std of the seeds, disagree when behind by "
                        "as much, else cannot tell; the rows' fine-tuning settings need not match; repeatable "
                        "(default: none)")
    p.add_argument("--retention", nargs="+", action="extend", default=[], type=name_value, metavar="ROW=REFERENCE",
                   help="judge the claim that ROW keeps at least 90%% of REFERENCE's zero-shot score on ROW's own "
                        "zero-shot languages (e.g. a pair student's target language against the multilingual "
                        "teacher tested on many), per task, in the claims section; repeatable (default: none)")
    p.add_argument("--within", nargs="+", action="extend", default=[], type=name_value, metavar="ROW=REFERENCE",
                   help="judge the claim that ROW's zero-shot score on its own zero-shot languages is at most 1 point "
                        "below REFERENCE's (BiStil: LT-SFT within a point of dense fine-tuning); repeatable (default: "
                        "none). Every LT-SFT job's changed weights are checked against its K without a flag")
    add_wandb_flags(p.add_argument_group("Weights & Biases: every table (mean, std and seeds per cell), the charts "
                                         "and the report folder as an artifact"), RESULTS_WANDB_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        comparisons = parse_findings(args.finding)
    except UsageError as e:
        p.error(str(e))
    try:
        report = write_report(args.grid_dir, args.out, args.students, dict(args.ppl), args.extra, comparisons,
                              dict(args.roles), list(args.ablation),
                              parse_claims({"retention": args.retention, "within": args.within}))
    except UsageError as e:  # a bad --roles, a file that is no result.json: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in report.files:
        print(path)
    if report.gaps:
        print(f"{len(report.gaps)} planned job(s) have no result (failed, stopped or never started): listed in "
              f"{report.files[0]}", file=sys.stderr)
    out = report.files[0].parent
    images = {f"report/{p.stem}": p for p in report.files if p.suffix == ".png"}
    findings = {f"finding {f.finding}": f.verdict for f in report.findings}
    findings.update({f"ablation {r.ablation}": "; ".join(f"{metric} {v.task}: {v.verdict}"
                                                         for metric, vs in r.verdicts.items() for v in vs)
                     or r.missing for r in report.ablations})
    findings.update({f"claim {r.claim.describe()}" + (f" ({r.task})" if r.task else ""):
                     r.missing or ("holds" if r.holds else "does not hold") for r in report.claims})
    if log_results(out, wandb_config(args), "report", {"grid": str(Path(args.grid_dir).resolve())},
                   report_tables(report), findings, images, ("report", report.files)):
        print(f"W&B: the report's tables, charts and files logged (run directory {out / 'wandb'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
