"""A recipe's claims about its fine-tuned rows, judged on the claiming row's own zero-shot languages.

BiStil (Ansell et al., 2023) claims for its task-distilled, sparsely fine-tuned student (phase 2) that its score on
the target language is at least 90% of the fine-tuned teacher's (``--retention STUDENT=TEACHER``) and within a
point of dense fine-tuning of the same student (``--within STUDENT=DENSE``), with at most K body weights changed
(:func:`sparse_checks`, for every LT-SFT job). A pair student is tested on its pair's target language only, while
the teacher is tested on many: each claim compares the two rows on the languages the claiming row was tested on
zero-shot (``zero_shot_langs`` of its ``result.json``), per task both rows have.

Scores are points (the task's metric x 100): per seed the mean over those languages, then the mean over seeds. A
claim holds or does not on those means; the seeds and their sample standard deviation are printed beside it, as
a one-seed verdict has no yardstick of its spread.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ds_kd.errors import UsageError
from ds_kd.eval.findings import fmt_cell

RETENTION = 0.9
"""--retention: the share of the reference's score the row keeps at least (BiStil, and XtremeDistil's 90%)."""
WITHIN_POINTS = 1.0
"""--within: how many points the row may be below the reference (BiStil: within a point of dense fine-tuning)."""
KINDS = ("retention", "within")


@dataclass(frozen=True)
class Claim:
    """``row`` keeps at least :data:`RETENTION` of ``reference``'s score (``retention``), or is at most
    :data:`WITHIN_POINTS` below it (``within``), on ``row``'s zero-shot languages."""

    kind: str
    row: str
    reference: str

    def describe(self) -> str:
        if self.kind == "retention":
            return f"{self.row} keeps at least {RETENTION:.0%} of {self.reference}'s score"
        return f"{self.row} is within {WITHIN_POINTS:g} point of {self.reference}"


@dataclass
class ClaimResult:
    """One claim on one task: the languages compared, each seed's score of both rows (points) and the verdict;
    ``missing`` says why the claim could not be judged (``holds`` is then None)."""

    claim: Claim
    task: str = ""
    langs: list[str] = field(default_factory=list)
    row_scores: list[float] = field(default_factory=list)
    reference_scores: list[float] = field(default_factory=list)
    holds: bool | None = None
    missing: str = ""


@dataclass(frozen=True)
class SparseCheck:
    """One LT-SFT job's count of changed body weights against its K (``result.json``'s ``sparse`` facts, counted
    exactly from the saved sparse difference)."""

    row: str
    task: str
    seed: int
    changed: int
    k: int
    num_body_weights: int
    density: float

    @property
    def holds(self) -> bool:
        return self.changed <= self.k


def parse_claims(pairs: dict[str, list[tuple[str, str]]]) -> list[Claim]:
    """``{"retention": [(row, reference), ...], "within": [...]}`` (the flags' NAME=NAME pairs) as claims."""
    return [Claim(kind, row, reference) for kind in KINDS for row, reference in pairs.get(kind, [])]


def seed_score(result: dict, langs: list[str]) -> float:
    """The mean over ``langs`` of the result's headline metric, in points."""
    return 100 * statistics.fmean(result["scores"][lang][result["metric"]] for lang in langs)


def judge_claims(claims: list[Claim], results: dict[tuple[str, str], dict[int, dict]]) -> list[ClaimResult]:
    """Each claim on every task both rows have (``results``: ``report.collect``'s ``{(row, task): {seed:
    result}}``). Raises UsageError naming a row that has no result at all (a typo in the flag)."""
    rows = {row for row, _ in results}
    out = []
    for claim in claims:
        for name in (claim.row, claim.reference):
            if name not in rows:
                raise UsageError(f"--{claim.kind} {claim.row}={claim.reference}: no row named {name!r} (rows: "
                                 f"{', '.join(sorted(rows))})")
        tasks = sorted({t for r, t in results if r == claim.row} & {t for r, t in results if r == claim.reference})
        if not tasks:
            out.append(ClaimResult(claim, missing="no task has results of both rows"))
        for task in tasks:
            mine, theirs = results[(claim.row, task)], results[(claim.reference, task)]
            langs = sorted(set.intersection(*(set(r.get("zero_shot_langs") or []) for r in mine.values()))
                           & set.intersection(*(set(r["scores"]) for r in theirs.values())))
            if not langs:
                out.append(ClaimResult(claim, task, missing=f"no zero-shot language of {claim.row} was tested on "
                                                            f"{claim.reference}"))
                continue
            row_scores = [seed_score(r, langs) for _, r in sorted(mine.items())]
            reference_scores = [seed_score(r, langs) for _, r in sorted(theirs.items())]
            row_mean, reference_mean = statistics.fmean(row_scores), statistics.fmean(reference_scores)
            holds = (row_mean >= RETENTION * reference_mean if claim.kind == "retention"
                     else row_mean >= reference_mean - WITHIN_POINTS)
            out.append(ClaimResult(claim, task, langs, row_scores, reference_scores, holds))
    return out


def sparse_checks(results: dict[tuple[str, str], dict[int, dict]]) -> list[SparseCheck]:
    """Every LT-SFT job among ``results`` (a ``sparse`` record in its ``result.json``) with its changed weights."""
    return [SparseCheck(row, task, seed, r["sparse"]["num_changed_body_weights"], r["sparse"]["k"],
                        r["sparse"]["num_body_weights"], r["sparse"]["density"])
            for (row, task), seeds in sorted(results.items()) for seed, r in sorted(seeds.items())
            if r.get("sparse")]


def _cell(scores: list[float]) -> str:
    return fmt_cell(statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else None, len(scores))


def markdown(results: list[ClaimResult], checks: list[SparseCheck], task_titles: dict[str, str]) -> str:
    """The section stating whether each claim holds on these runs, and each LT-SFT job's changed weights against
    its K; empty when there is neither."""
    if not results and not checks:
        return ""
    lines = ["## The recipes' claims against these runs", ""]
    if results:
        lines += [f"Zero-shot score (points) on the claiming row's own zero-shot languages, mean ± sample std over "
                  f"seeds (a single seed has no spread: read its verdict with that in mind). Retention: at least "
                  f"{RETENTION:.0%} of the reference; within: at most {WITHIN_POINTS:g} point below it.", "",
                  "| claim | task | languages | row | reference | ratio | difference | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        missing = []
        for r in results:
            if r.missing:
                missing.append(f"Not judged: {r.claim.describe()}{f' on {r.task}' if r.task else ''} ({r.missing}).")
                continue
            row, ref = statistics.fmean(r.row_scores), statistics.fmean(r.reference_scores)
            ratio = f"{row / ref:.0%}" if ref > 0 else "n/a"
            lines.append(f"| {r.claim.describe()} | {task_titles.get(r.task, r.task)} | {' '.join(r.langs)} | "
                         f"{_cell(r.row_scores)} | {_cell(r.reference_scores)} | {ratio} | {row - ref:+.1f} | "
                         f"**{'holds' if r.holds else 'does not hold'}** |")
        lines += [""] + (missing + [""] if missing else [])
    if checks:
        lines += ["LT-SFT jobs: body weights that differ from the student before phase B (counted exactly from the "
                  "saved sparse difference) against K = floor(density x body weights).", "",
                  "| row | task | seed | changed | K | body weights | density | at most K |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c.row} | {task_titles.get(c.task, c.task)} | {c.seed} | {c.changed:,} | {c.k:,} | "
                  f"{c.num_body_weights:,} | {c.density:g} | {'yes' if c.holds else '**no**'} |" for c in checks]
        lines.append("")
    return "\n".join(lines)
