"""The paper's three findings, checked against a grid's zero-shot averages with no claim stronger than the seeds
allow.

Soltan et al. (2021) find that (1) knowledge distillation during pretraining helps zero-shot transfer over the
Vanilla student, (2) distillation during fine-tuning can hurt zero-shot transfer, and (3) distilling the larger
teacher gives the stronger student. Each finding is tested by comparisons of two rows, ``expected`` (the row the
paper says does better) against ``other``, on every task's zero-shot average (Table 5), over fine-tuning seeds.

The rule for one comparison on one task: with ``d = mean(expected) - mean(other)`` and ``s`` the larger of the two
sample standard deviations (n - 1), the runs *agree* when ``d > 2 s``, *disagree* when ``d < -2 s``, and *cannot
tell* otherwise, and always when either side has fewer than two seeds (no spread, so no yardstick). A finding
agrees when some comparisons agree and none disagrees, disagrees in the opposite case, is *mixed* when both occur,
and cannot be told when no comparison decides. Two standard deviations of the seeds is a yardstick, not a
significance test: with two to four seeds the spread itself is uncertain, so the rule errs towards "cannot tell".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ds_kd.errors import UsageError

FINDINGS = {
    1: "KD during pretraining helps zero-shot transfer over Vanilla",
    2: "KD during fine-tuning can hurt zero-shot transfer",
    3: "distilling the larger teacher gives the stronger student",
}
"""The paper's findings, by number, in its words (SPEC.md)."""

AGREE, DISAGREE, CANNOT_TELL, MIXED = "agree", "disagree", "cannot tell", "mixed"
NUM_STD = 2.0
"""A difference must exceed this many sample standard deviations (the larger side's) to count."""


@dataclass(frozen=True)
class Comparison:
    """Two rows of the grid that test a finding: the paper expects ``expected`` to score higher than ``other``."""

    finding: int
    expected: str
    other: str
    note: str = ""
    """What the comparison isolates (e.g. "same teacher-initialised start, with vs without the teacher")."""


@dataclass
class Verdict:
    """One comparison on one task."""

    task: str
    expected_mean: float
    other_mean: float
    expected_std: float | None
    other_std: float | None
    num_seeds: tuple[int, int]
    verdict: str

    @property
    def difference(self) -> float:
        return self.expected_mean - self.other_mean


@dataclass
class FindingResult:
    """A finding's comparisons with their per-task verdicts, and the finding's verdict."""

    finding: int
    comparisons: list[tuple[Comparison, list[Verdict]]] = field(default_factory=list)
    untested: list[tuple[Comparison, str]] = field(default_factory=list)
    """Comparisons that could not be made, with the reason (no results, different fine-tuning settings)."""

    @property
    def counts(self) -> dict[str, int]:
        counts = {AGREE: 0, DISAGREE: 0, CANNOT_TELL: 0}
        for _, verdicts in self.comparisons:
            for v in verdicts:
                counts[v.verdict] += 1
        return counts

    @property
    def verdict(self) -> str:
        c = self.counts
        if c[AGREE] and c[DISAGREE]:
            return MIXED
        if c[AGREE]:
            return AGREE
        if c[DISAGREE]:
            return DISAGREE
        return CANNOT_TELL


def compare(expected: list[float], other: list[float]) -> str:
    """The verdict on one task from the two rows' per-seed values (the rule in the module docstring)."""
    from statistics import fmean, stdev

    if len(expected) < 2 or len(other) < 2:
        return CANNOT_TELL
    margin = NUM_STD * max(stdev(expected), stdev(other))
    difference = fmean(expected) - fmean(other)
    if difference > margin:
        return AGREE
    if difference < -margin:
        return DISAGREE
    return CANNOT_TELL


def task_verdicts(expected: dict[str, list[float]], other: dict[str, list[float]], tasks: list[str]) -> list[Verdict]:
    """A :class:`Verdict` per task of ``tasks`` from the two rows' per-seed values (task -> values)."""
    from statistics import fmean, stdev

    return [Verdict(t, fmean(expected[t]), fmean(other[t]), stdev(expected[t]) if len(expected[t]) > 1 else None,
                    stdev(other[t]) if len(other[t]) > 1 else None, (len(expected[t]), len(other[t])),
                    compare(expected[t], other[t])) for t in tasks]


def judge(comparisons: list[Comparison], zero_shot: dict[str, dict[str, list[float]]],
          settings: dict[str, object] | None = None) -> list[FindingResult]:
    """Every finding's result from ``zero_shot[row][task]`` = the seeds' zero-shot averages. Findings without a
    comparison are returned too (nothing to test them with). ``settings[row]``, where given, is what the row
    was fine-tuned with: two rows whose settings differ are not compared. ValueError for an unknown finding."""
    results = {number: FindingResult(number) for number in FINDINGS}
    for comp in comparisons:
        if comp.finding not in FINDINGS:
            raise UsageError(f"finding {comp.finding}: the paper has findings {', '.join(map(str, FINDINGS))}")
        a, b = zero_shot.get(comp.expected, {}), zero_shot.get(comp.other, {})
        tasks = [t for t in a if t in b and a[t] and b[t]]
        if not tasks:
            results[comp.finding].untested.append((comp, "no zero-shot results of both rows on a common task"))
            continue
        if settings and settings.get(comp.expected) != settings.get(comp.other):
            results[comp.finding].untested.append((comp, "fine-tuned with different settings"))
            continue
        results[comp.finding].comparisons.append((comp, task_verdicts(a, b, tasks)))
    return list(results.values())


def default_comparisons(rows: list[str], ft_distill: dict[str, str]) -> list[Comparison]:
    """The paper's comparisons among the rows present under its names: (1) mLeanBERT and mXLeanBERT against
    Vanilla mLeanBERT, (2) every ``X (ft-distill)`` row (``ft_distill``: row -> its plain student row) against
    its plain row, (3) mXLeanBERT (from mBERT8-Large) against mLeanBERT (from mBERT8)."""
    from ds_kd.eval.paper_results import paper_model

    by_paper = {paper_model(r): r for r in rows if paper_model(r)}
    out = []
    for student in ("mLeanBERT", "mXLeanBERT"):
        if student in by_paper and "Vanilla mLeanBERT" in by_paper:
            out.append(Comparison(1, by_paper[student], by_paper["Vanilla mLeanBERT"]))
    out += [Comparison(2, plain, row, "the same student fine-tuned without vs with its fine-tuned teacher")
            for row, plain in ft_distill.items() if plain in rows]
    if "mXLeanBERT" in by_paper and "mLeanBERT" in by_paper:
        out.append(Comparison(3, by_paper["mXLeanBERT"], by_paper["mLeanBERT"],
                              "students of the larger vs the smaller teacher"))
    return out


def fmt_cell(mean: float, std: float | None, n: int) -> str:
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "") + f" (n={n})"


def markdown(results: list[FindingResult], task_titles: dict[str, str]) -> str:
    """A section stating, per finding, whether these runs agree, disagree or cannot tell, and why."""
    lines = ["## The paper's findings against these runs", "",
             f"Zero-shot averages (Table 5), mean ± sample std over fine-tuning seeds. Per task: **agree** when the "
             f"row the paper expects to be better is ahead by more than {NUM_STD:g} sample std (the larger of the "
             f"two), **disagree** when it is behind by as much, otherwise **cannot tell** (always with a single "
             f"seed: no spread). A finding agrees when some tasks agree and none disagrees.", ""]
    for result in results:
        c = result.counts
        lines.append(f"**Finding ({result.finding}): {FINDINGS[result.finding]}.** These runs: "
                     f"**{result.verdict}** ({c[AGREE]} task comparison(s) agree, {c[DISAGREE]} disagree, "
                     f"{c[CANNOT_TELL]} cannot tell).")
        if not result.comparisons and not result.untested:
            lines.append("No pair of rows in this grid tests it.")
        lines += [f"Not compared: {comp.expected} vs {comp.other} ({why})." for comp, why in result.untested]
        lines.append("")
        if result.comparisons:
            lines += ["| expected better | vs | task | expected | other | difference | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for comp, verdicts in result.comparisons:
                for v in verdicts:
                    lines.append(f"| {comp.expected} | {comp.other} | {task_titles.get(v.task, v.task)} | "
                                 f"{fmt_cell(v.expected_mean, v.expected_std, v.num_seeds[0])} | "
                                 f"{fmt_cell(v.other_mean, v.other_std, v.num_seeds[1])} | "
                                 f"{v.difference:+.1f} | {v.verdict} |")
            notes = [f"{comp.expected} vs {comp.other}: {comp.note}" for comp, _ in result.comparisons if comp.note]
            lines += ([""] + [f"- {n}" for n in notes] if notes else []) + [""]
    return "\n".join(lines)


@dataclass
class AblationResult:
    """A main row against one of its ablations (the main row with one ingredient removed or changed), per task,
    on English and on the zero-shot average."""

    main: str
    ablation: str
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict)
    """``"English"`` / ``"zero-shot"`` -> a verdict per task both rows have."""
    missing: str = ""
    """Why nothing was compared (empty when something was)."""


def judge_ablations(pairs: list[tuple[str, str]], scores: dict[str, dict[str, dict[str, list[float]]]]
                    ) -> list[AblationResult]:
    """Each ``(main, ablation)`` pair judged by :func:`compare` with the main row expected ahead (the ingredient
    helps), on ``scores[metric][row][task]`` = the seeds' values, ``metric`` being ``English`` and
    ``zero-shot``. Unlike the findings, the rows' settings are not required to match: an ablation differs from
    its main row by design. A row without results in a common task is reported as missing, not dropped."""
    out = []
    for main, ablation in pairs:
        result = AblationResult(main, ablation)
        for metric, rows in scores.items():
            a, b = rows.get(main, {}), rows.get(ablation, {})
            tasks = [t for t in a if t in b and a[t] and b[t]]
            result.verdicts[metric] = task_verdicts(a, b, tasks)
        if not any(result.verdicts.values()):
            result.missing = "no results of both rows on a common task"
        out.append(result)
    return out


def ablations_markdown(results: list[AblationResult], task_titles: dict[str, str]) -> str:
    """The section saying, per ablation, whether its ingredient helps on these runs (agree), hurts (disagree) or
    cannot be told within the seeds' spread; empty without ablations."""
    if not results:
        return ""
    lines = ["## What each ingredient adds (ablations)", "",
             f"Each ablation is its main row with one ingredient removed or changed; the main row is expected "
             f"ahead. Mean ± sample std over seeds. Per task and metric: **agree** (the ingredient helps) when the "
             f"main row is ahead by more than {NUM_STD:g} sample std (the larger of the two), **disagree** (it "
             f"hurts) when behind by as much, otherwise **cannot tell** (always with a single seed).", "",
             "| main row | ablation | task | metric | main | ablation | difference | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    missing = []
    for r in results:
        if r.missing:
            missing.append(f"Not compared: {r.main} vs {r.ablation} ({r.missing}).")
        for metric, verdicts in r.verdicts.items():
            for v in verdicts:
                lines.append(f"| {r.main} | {r.ablation} | {task_titles.get(v.task, v.task)} | {metric} | "
                             f"{fmt_cell(v.expected_mean, v.expected_std, v.num_seeds[0])} | "
                             f"{fmt_cell(v.other_mean, v.other_std, v.num_seeds[1])} | {v.difference:+.1f} | "
                             f"{v.verdict} |")
    return "\n".join(lines + ([""] + missing if missing else []) + [""])
