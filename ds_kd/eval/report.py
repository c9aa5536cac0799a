"""The paper's tables from a grid directory: Table 2 (perplexity), 4 (English test), 5 (zero-shot average) and
6-10 (per language), as mean ± sample standard deviation over seeds, in Markdown and CSV, plus bar charts.

Scores are the jobs' ``result.json`` headline metrics in percent (the paper's unit). The standard deviation is
the sample one (``statistics.stdev``, n - 1 in the denominator), left out where a cell has one seed. In every
column the best student (highest score; lowest perplexity) is marked: bold in Markdown, ``best_student`` in the
CSV. Rows named like one of the paper's models (``ds_kd.eval.paper_results.paper_model``) get the paper's number in a
``(paper)`` column beside ours.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ds_kd.eval import paper_results as paper
from ds_kd.eval.claims import Claim, judge_claims, sparse_checks
from ds_kd.eval.claims import markdown as claims_markdown
from ds_kd.errors import UsageError
from ds_kd.eval.findings import Comparison, ablations_markdown, default_comparisons, judge, judge_ablations
from ds_kd.eval.findings import markdown as findings_markdown
from ds_kd.eval.grid import FT_DISTILL_SUFFIX, GRID_JSON, LOG, RESULT, ROLES, default_roles, slug
from ds_kd.logbook import ResultTable
from ds_kd.data.tasks import TASKS, TaskSpec, zero_shot_langs
from ds_kd.textfile import read_text

TASK_TITLES = {"xnli": "XNLI", "pawsx": "PAWS-X", "wikiann": "WikiANN", "matis": "MultiATIS++", "mtop": "mTOP"}
METRIC_TITLES = {"accuracy": "accuracy", "f1": "span F1", "exact_match": "exact match"}
ZERO_SHOT = "zero-shot avg"


@dataclass
class Cell:
    """One table cell: our seeds' statistics and the paper's number."""

    values: list[float]
    """One value per seed (percent; perplexity as is)."""
    paper: float | None = None
    best: bool = False
    """The best student of its column."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Table:
    stem: str
    """File name without extension (``table4_english``)."""
    title: str
    columns: list[str]
    rows: dict[str, dict[str, Cell]]
    """Row name -> column -> cell, in display order."""
    roles: dict[str, str]
    lower_is_better: bool = False
    note: str = ""


@dataclass
class Gap:
    """A job of the grid's plan without a result."""

    model: str
    task: str
    seed: int
    log: Path | None
    """The job's ``log.txt`` when it started (it failed, or was stopped); None when it never started."""
    error: str
    """The first line of its error (the last exception line of its log), "" when it never started."""


@dataclass
class Report:
    tables: list[Table]
    files: list[Path] = field(default_factory=list)
    findings: list = field(default_factory=list)
    """``ds_kd.eval.findings.FindingResult`` per finding of the paper."""
    ablations: list = field(default_factory=list)
    """``ds_kd.eval.findings.AblationResult`` per (main row, ablation) pair asked for."""
    gaps: list[Gap] = field(default_factory=list)
    """The planned jobs without a result (listed in ``report.md``)."""
    claims: list = field(default_factory=list)
    """``ds_kd.eval.claims.ClaimResult`` per claim and task asked for."""
    sparse: list = field(default_factory=list)
    """``ds_kd.eval.claims.SparseCheck`` per LT-SFT job."""


def collect(grid_dir: Path | str) -> dict[tuple[str, str], dict[int, dict]]:
    """Every ``result.json`` under ``grid_dir``: ``{(model, task): {seed: result}}``; a seed found twice (a
    job directory copied elsewhere) keeps the newest file."""
    found: dict[tuple[str, str], dict[int, tuple[float, dict]]] = {}
    for path in sorted(Path(grid_dir).rglob(RESULT)):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            key, seed = (result["model"], result["task"]), int(result["seed"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}: not a fine-tuning result.json ({e})") from None
        mtime = path.stat().st_mtime
        if seed not in found.get(key, {}) or found[key][seed][0] < mtime:
            found.setdefault(key, {})[seed] = (mtime, result)
    return {key: {seed: r for seed, (_, r) in seeds.items()} for key, seeds in found.items()}


def load_plan(grid_dir: Path | str) -> dict:
    path = Path(grid_dir) / GRID_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"rows": []}


def row_order(names: set[str], plan: dict) -> list[str]:
    """The paper's rows first in its order, then the grid's rows in its order, then any others sorted."""
    planned = [r["name"] for r in plan.get("rows", [])]
    rank = {m: i for i, m in enumerate(paper.MODELS)}

    def key(name: str):
        matched = paper.paper_model(name)
        if matched is not None:
            return (0, rank[matched], name)
        return (1, planned.index(name) if name in planned else len(planned), name)

    return sorted(names, key=key)


def resolve_roles(names: list[str], plan: dict, students: list[str] | None = None,
                  model_dirs: dict[str, str] | None = None, given: dict[str, str] | None = None) -> dict[str, str]:
    """The grid's recorded roles; rows it does not record take :func:`ds_kd.eval.grid.default_roles` of their model
    directories (``model_dirs``: row name -> directory, e.g. from the results), baseline where none is known.
    ``students``, when given, is the complete list of students (rows the grid called students and that are not
    listed become baselines). ``given`` (row -> role) overrides all of these, e.g. for jobs that
    ``launch/finetune.py`` or ``launch/task_distill.py`` wrote under the grid directory, which the grid does not
    record. Raises UsageError for a role outside ``ROLES`` or a row that has no result and is not in the plan."""
    recorded = {r["name"]: r["role"] for r in plan.get("rows", [])}
    dirs = {**(model_dirs or {}), **{r["name"]: r["model_dir"] for r in plan.get("rows", []) if r.get("model_dir")}}
    derived = default_roles(dirs)
    roles = {n: recorded.get(n) or derived.get(n, "baseline") for n in names}
    if students is not None:
        roles = {n: "student" if n in students else ("baseline" if r == "student" else r) for n, r in roles.items()}
    for name, role in (given or {}).items():
        if role not in ROLES:
            raise UsageError(f"--roles {name}={role}: the role is one of {', '.join(ROLES)}")
        if name not in roles:
            raise UsageError(f"--roles {name}={role}: no row {name!r} among the grid's results and plan "
                             f"({', '.join(names)})")
        roles[name] = role
    return roles


def find_gaps(grid_dir: Path | str, plan: dict, results: dict) -> list[Gap]:
    """Every job of ``grid.json``'s plan (its rows x tasks x seeds) that has no result in ``results``
    (:func:`collect`): failed or stopped when its directory has a log (with the first line of its error), missing
    when it never started (its teacher job failed, or the grid stopped before it)."""
    gaps = []
    for row in plan.get("rows", []):
        for task in plan.get("tasks", []):
            for seed in plan.get("seeds", []):
                if seed not in results.get((row["name"], task), {}):
                    log = Path(grid_dir) / "jobs" / slug(row["name"]) / task / f"seed{seed}" / LOG
                    gaps.append(Gap(row["name"], task, seed, *((log, first_error(log)) if log.is_file()
                                                               else (None, ""))))
    return gaps


def first_error(log: Path) -> str:
    """The line that names a job's error: the last exception line of its log (``ValueError: ...``, the first line
    of the message), else its last line."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or [""])[-1]


def gaps_markdown(gaps: list[Gap]) -> str:
    """The table of planned jobs without a result (nothing when every job has one)."""
    if not gaps:
        return ""
    lines = ["### Jobs without a result", "", "| model | task | seed | status | error | log |", "|---" * 6 + "|"]
    for gap in gaps:
        status = "failed or stopped" if gap.log else "missing (never started)"
        error = gap.error.replace("|", "\\|")
        lines.append(f"| {gap.model} | {gap.task} | {gap.seed} | {status} | {error} | {gap.log or ''} |")
    return "\n".join(lines + ["", f"{len(gaps)} job(s) of the grid's plan (grid.json) have no result.json: the "
                                   f"tables below leave them out. Run the grid's command again to run them.", ""])


def mark_best(table: Table) -> None:
    for column in table.columns:
        cells = [(cell.mean, name) for name, row in table.rows.items() if table.roles.get(name) == "student"
                 for cell in [row.get(column)] if cell is not None and cell.mean is not None]
        if cells:
            best = (min if table.lower_is_better else max)(mean for mean, _ in cells)
            for mean, name in cells:  # ties are all marked
                table.rows[name][column].best = mean == best


def score_table(stem: str, title: str, columns: list[str], results, order: list[str], roles,
                value, paper_value) -> Table:
    """A table of ``value(result, column)`` (None: not available) over seeds, per row and column."""
    rows = {}
    for name in order:
        row = {}
        for column in columns:
            values = [v for r in results(name, column) for v in [value(r, column)] if v is not None]
            matched = paper.paper_model(name)
            ref = paper_value(matched, column) if matched else None
            if values or ref is not None:
                row[column] = Cell([100.0 * v for v in values], ref)
        if any(c.values for c in row.values()):
            rows[name] = row
    table = Table(stem, title, columns, rows, roles)
    mark_best(table)
    return table


def perplexity_table(plan: dict, order: list[str], roles: dict[str, str], ppl: dict[str, str]) -> Table:
    """Table 2 from the pretraining/distillation runs' manifests (``val.val_ppl``); ft-distill rows have none."""
    runs = {r["name"]: r.get("ppl_run") for r in plan.get("rows", [])}
    runs.update(ppl)
    rows = {}
    for name in order:
        if any(r["name"] == name and r.get("teacher") for r in plan.get("rows", [])):
            continue
        values = []
        if runs.get(name):
            manifest = Path(runs[name]) / "manifest.json"
            if not manifest.is_file():
                raise FileNotFoundError(f"{manifest}: no manifest for the perplexity of {name!r} (the run has not "
                                        f"finished, or --ppl points elsewhere)")
            record = json.loads(manifest.read_text(encoding="utf-8"))
            val = record.get("val") or {}
            if "val_ppl" in val:
                values = [float(val["val_ppl"])]
            elif record.get("perplexity_measured", True):
                raise UsageError(f"{manifest}: no val.val_ppl (the run never evaluated on its validation split)")
        matched = paper.paper_model(name)
        rows[name] = {"perplexity": Cell(values, paper.PERPLEXITY.get(matched) if matched else None)}
    table = Table("table2_perplexity", "Table 2: MLM perplexity on the validation set (all languages)",
                  ["perplexity"], rows, roles, lower_is_better=True,
                  note="From each row's pretraining/distillation run manifest (val.val_ppl); blank where the "
                       "row has no run of ours (e.g. a public checkpoint) or its run trained no MLM head "
                       "(distillation with --mlm-weight 0 and no output loss: no perplexity is measured).")
    mark_best(table)
    return table


def build_tables(grid_dir: Path | str, students: list[str] | None = None,
                 ppl: dict[str, str] | None = None, roles: dict[str, str] | None = None) -> list[Table]:
    results = collect(grid_dir)
    plan = load_plan(grid_dir)
    names = {m for m, _ in results} | {r["name"] for r in plan.get("rows", [])}
    order = row_order(names, plan)
    roles = resolve_roles(order, plan, students,
                          {m: r["model_dir"] for (m, _), seeds in results.items() for r in seeds.values()
                           if r.get("model_dir")}, roles)
    tasks = [t for t in paper.TASK_ORDER if any(t == task for _, task in results)]
    tasks += sorted({task for _, task in results} - set(tasks))

    specs = {task: task_spec(task, results) for task in tasks}

    def by_task(name: str, task: str) -> list[dict]:
        return list(results.get((name, task), {}).values())

    titles = [TASK_TITLES.get(t, t) for t in tasks]
    tables = [perplexity_table(plan, order, roles, ppl or {})]
    for stem, title, key, ref in (
            ("table4_english", "Table 4: English test score", "en", paper.ENGLISH),
            ("table5_zero_shot", "Table 5: average zero-shot score", "zero_shot_avg_paper", paper.ZERO_SHOT)):
        table = score_table(stem, title, titles, lambda n, c: by_task(n, tasks[titles.index(c)]), order, roles,
                            lambda r, c, key=key: paper_zero_shot(r) if key == "zero_shot_avg_paper" else r.get(key),
                            lambda m, c, ref=ref: ref.get(m, {}).get(tasks[titles.index(c)]))
        table.note = "Headline metric per task: " + ", ".join(
            f"{TASK_TITLES.get(t, t)} {METRIC_TITLES.get(specs[t].metric, specs[t].metric)}" for t in tasks) + "."
        tables.append(table)
    for task in tasks:
        spec = specs[task]
        seen = {lang for r in results_for_task(results, task) for lang in r["scores"]}
        langs = [lang for lang in spec.test_langs if lang in seen] + sorted(seen - set(spec.test_langs))
        numbered = f"Table {spec.paper_table}: " if spec.paper_table else ""
        table = score_table(f"table{spec.paper_table}_{task}" if spec.paper_table else f"task_{task}",
                            f"{numbered}{TASK_TITLES.get(task, task)} "
                            f"({METRIC_TITLES.get(spec.metric, spec.metric)}) per language",
                            langs + [ZERO_SHOT], lambda n, c, task=task: by_task(n, task), order, roles,
                            lambda r, c: paper_zero_shot(r) if c == ZERO_SHOT
                            else r["scores"].get(c, {}).get(r["metric"]),
                            lambda m, c, task=task: paper.ZERO_SHOT.get(m, {}).get(task) if c == ZERO_SHOT
                            else paper.PER_LANGUAGE.get(task, {}).get(m, {}).get(c))
        over = ", ".join(zero_shot_langs(spec)) or "every tested language but en (a task of one's own)"
        table.note = (f"Zero-shot average over {over} (where tested)"
                      + (f"; {', '.join(spec.zero_shot_exclude)} left out as in the paper" if spec.zero_shot_exclude
                         else "") + ".")
        tables.append(table)
    return tables


def task_spec(task: str, results) -> TaskSpec:
    """A benchmark's spec, or for a task of one's own (``ds_kd.data.tasks.own_task``) one made from its results: their
    metric, no paper table, no paper languages."""
    if task in TASKS:
        return TASKS[task]
    return TaskSpec(task, "own", next(r["metric"] for r in results_for_task(results, task)), ())


def paper_zero_shot(result: dict) -> float | None:
    """A job's zero-shot average over the paper's languages of its task (the tables keep the paper's lists; a
    result written before the run's own average existed has only ``zero_shot_avg``, which was the paper's; a task
    of one's own has no paper languages: its average is over every tested language but English)."""
    if "zero_shot_avg_paper" in result and result.get("task") in TASKS:
        return result["zero_shot_avg_paper"]
    return result.get("zero_shot_avg")


def results_for_task(results, task: str) -> list[dict]:
    return [r for (_, t), seeds in results.items() if t == task for r in seeds.values()]


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(table: Table) -> str:
    has_paper = any(c.paper is not None for row in table.rows.values() for c in row.values())
    header = ["model", "role"]
    for column in table.columns:
        header += [column] + ([f"{column} (paper)"] if has_paper else [])
    num_seeds = max((c.n for row in table.rows.values() for c in row.values()), default=0)
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.rows.items():
        cells = [name, table.roles.get(name, "")]
        for column in table.columns:
            cell = row.get(column)
            text = ""
            if cell is not None and cell.mean is not None:
                text = fmt(cell.mean) + (f" ± {fmt(cell.std)}" if cell.std is not None else "")
                text += f" (n={cell.n})" if cell.n != num_seeds else ""
                text = f"**{text}**" if cell.best else text
            cells.append(text)
            if has_paper:
                cells.append(fmt(cell.paper) if cell is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    stat = "value" if table.lower_is_better else f"mean ± sample std (n−1) over {num_seeds} seed(s)"
    lines += ["", f"{stat}; bold: best student per column ({'lowest' if table.lower_is_better else 'highest'})."
              + (f" {table.note}" if table.note else ""), ""]
    return "\n".join(lines)


def write_csv(table: Table, path: Path) -> None:
    """Long format: one line per (row, column) with mean, std, n, the seeds' values, paper and best_student."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "role", "column", "mean", "std", "n", "values", "paper", "best_student"])
        for name, row in table.rows.items():
            for column in table.columns:
                cell = row.get(column)
                if cell is None:
                    continue
                w.writerow([name, table.roles.get(name, ""), column,
                            "" if cell.mean is None else repr(cell.mean), "" if cell.std is None else repr(cell.std),
                            cell.n, " ".join(repr(v) for v in cell.values),
                            "" if cell.paper is None else cell.paper, int(cell.best)])


def plot_zero_shot(table: Table, out: Path) -> list[Path]:
    """One bar chart per task of the zero-shot averages (error bars: sample std; dots: the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"teacher": "#4c72b0", "student": "#dd8452", "baseline": "#8c8c8c"}
    files = []
    for column in table.columns:
        rows = [(name, row[column]) for name, row in table.rows.items()
                if column in row and row[column].mean is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
        xs = range(len(rows))
        ax.bar(xs, [c.mean for _, c in rows], yerr=[c.std or 0.0 for _, c in rows], capsize=3,
               color=[colours.get(table.roles.get(n), "#8c8c8c") for n, _ in rows])
        paper_points = [(x, c.paper) for x, (_, c) in zip(xs, rows) if c.paper is not None]
        if paper_points:
            ax.plot(*zip(*paper_points), "k.", markersize=9, label="paper")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(list(xs), [n for n, _ in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("zero-shot average (%)")
        ax.set_title(f"{column}: zero-shot average over seeds")
        fig.tight_layout()
        path = out / f"zero_shot_{column.lower().replace('+', 'p').replace('-', '')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


SETTINGS = ("epochs", "lr", "head_lr", "batch_size", "max_len", "max_train_examples", "unfreeze_embeddings")
"""Fine-tuning settings that make two rows comparable (the ``config`` of each job's result.json)."""


def finetune_settings(grid_dir: Path | str) -> dict[str, tuple]:
    """Each row's fine-tuning settings (:data:`SETTINGS`), or a tuple of them where its jobs differ."""
    per_row: dict[str, set] = {}
    for (name, _), seeds in collect(grid_dir).items():
        for r in seeds.values():
            config = r.get("config") or {}
            per_row.setdefault(name, set()).add(tuple(config.get(k) for k in SETTINGS))
    return {name: next(iter(v)) if len(v) == 1 else tuple(sorted(v, key=str)) for name, v in per_row.items()}


def settings_markdown(settings: dict[str, tuple]) -> str:
    """The settings table, when the rows were not all fine-tuned alike (else nothing)."""
    if len(set(settings.values())) <= 1:
        return ""
    lines = ["### Fine-tuning settings per row", "", "| model | " + " | ".join(SETTINGS) + " |",
             "|" + "---|" * (len(SETTINGS) + 1)]
    for name, values in settings.items():
        groups = values if values and isinstance(values[0], tuple) else (values,)
        for group in groups:
            lines.append(f"| {name} | " + " | ".join("" if v is None else str(v) for v in group) + " |")
    return "\n".join(lines + ["", "Rows fine-tuned with different settings are not compared in the findings.", ""])


def table_values(table: Table) -> dict[str, dict[str, list[float]]]:
    """row -> column -> the seeds' values of ``table`` (cells without values left out)."""
    return {name: {column: cell.values for column, cell in row.items() if cell.values}
            for name, row in table.rows.items()}


def find(tables: list[Table], plan: dict, comparisons: list[Comparison] | None,
         settings: dict[str, tuple]) -> list:
    """The paper's findings judged on Table 5: the paper's own comparisons among its rows present (ft-distill
    rows against their plain rows) and then ``comparisons``."""
    zero_shot = next(t for t in tables if t.stem == "table5_zero_shot")
    values = table_values(zero_shot)
    plain_of = {r["name"]: r["name"][: -len(FT_DISTILL_SUFFIX)] for r in plan.get("rows", [])
                if r.get("teacher") and r["name"].endswith(FT_DISTILL_SUFFIX)}
    given = list(comparisons or [])
    pairs = {(c.expected, c.other) for c in given}
    defaults = [c for c in default_comparisons(list(zero_shot.rows), plain_of) if (c.expected, c.other) not in pairs]
    return judge(defaults + given, values, settings)


def write_report(grid_dir: Path | str, out: Path | str | None = None, students: list[str] | None = None,
                 ppl: dict[str, str] | None = None, extra: list[Path | str] = (),
                 comparisons: list[Comparison] | None = None, roles: dict[str, str] | None = None,
                 ablations: list[tuple[str, str]] = (), claims: list[Claim] = ()) -> Report:
    """Write ``report.md`` (every table, the paper's findings judged on these runs, then the ``extra`` Markdown
    files, e.g. retrieval and speed), one CSV per table and the zero-shot charts to ``out`` (default
    ``<grid_dir>/report``). The findings are tested by the paper's comparisons among its rows present
    (``ds_kd.eval.findings.default_comparisons``) and by ``comparisons``; ``roles`` (row -> role) overrides the
    rows' roles (:func:`resolve_roles`); each ``(main, ablation)`` pair of ``ablations`` is judged on English and
    zero-shot scores (``ds_kd.eval.findings.judge_ablations``) in a section after the findings; then ``claims``
    (``ds_kd.eval.claims``) and every LT-SFT job's changed weights against its K. Raises UsageError naming an
    ablation or claim row that has no result."""
    out = Path(out) if out is not None else Path(grid_dir) / "report"
    tables = build_tables(grid_dir, students, ppl, roles)
    settings = finetune_settings(grid_dir)
    plan = load_plan(grid_dir)
    results = collect(grid_dir)
    report = Report(tables, findings=find(tables, plan, comparisons, settings),
                    gaps=find_gaps(grid_dir, plan, results), claims=judge_claims(list(claims), results),
                    sparse=sparse_checks(results))
    by_stem = {t.stem: t for t in tables}
    for pair in ablations:
        unknown = [name for name in pair if name not in by_stem["table5_zero_shot"].rows]
        if unknown:
            raise UsageError(f"--ablation {pair[0]}={pair[1]}: no row named {unknown[0]!r} under {grid_dir} (rows: "
                             f"{', '.join(by_stem['table5_zero_shot'].rows)})")
    report.ablations = judge_ablations(list(ablations), {
        metric: table_values(by_stem[stem])
        for metric, stem in (("English", "table4_english"), ("zero-shot", "table5_zero_shot"))})
    out.mkdir(parents=True, exist_ok=True)  # after every refusal: a refused report leaves no folder
    parts = [f"# Results of {Path(grid_dir).resolve().name}", "", gaps_markdown(report.gaps)]
    for table in tables:
        parts.append(markdown(table))
        path = out / f"{table.stem}.csv"
        write_csv(table, path)
        report.files.append(path)
    parts += [settings_markdown(settings), findings_markdown(report.findings, {}),
              ablations_markdown(report.ablations, {}), claims_markdown(report.claims, report.sparse, {})]
    for section in extra:
        parts += ["", read_text(section).strip(), ""]
    md = out / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    report.files.insert(0, md)
    report.files += plot_zero_shot(next(t for t in tables if t.stem == "table5_zero_shot"), out)
    return report


def job_tables(grid_dir: Path | str) -> dict[str, ResultTable]:
    """Every fine-tuning job's results under ``grid_dir``, for W&B: ``finetune/jobs`` (one row per job: English
    test, the zero-shot averages, best dev score and epoch, seconds; headline metric as a fraction, like
    ``result.json``), ``finetune/scores`` (one row per job, test language and metric) and
    ``finetune/dev_history`` (one row per job, epoch and numeric value; a job whose history records sub-stages
    instead of epochs, XtremeDistil's ``launch/task_distill.py``, numbers them 1, 2, ... in the epoch column)."""
    jobs = ResultTable(["model", "task", "seed", "metric", "en", "zero_shot_avg", "zero_shot_avg_paper",
                        "dev_best", "best_epoch", "seconds"], [])
    scores = ResultTable(["model", "task", "seed", "lang", "metric", "value"], [])
    history = ResultTable(["model", "task", "seed", "epoch", "name", "value"], [])
    for (model, task), seeds in sorted(collect(grid_dir).items()):
        for seed, r in sorted(seeds.items()):
            key = [model, task, seed]
            jobs.rows.append([*key, r["metric"], r.get("en"), r.get("zero_shot_avg"), r.get("zero_shot_avg_paper"),
                              r.get("dev_best"), r.get("best_epoch"), r.get("seconds")])
            scores.rows += [[*key, lang, metric, value] for lang, metrics in sorted(r["scores"].items())
                            for metric, value in sorted(metrics.items())]
            history.rows += [[*key, int(point.get("epoch", i)), name, value]
                             for i, point in enumerate(r.get("dev_history", []), start=1)
                             for name, value in point.items()
                             if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {"finetune/jobs": jobs, "finetune/scores": scores, "finetune/dev_history": history}


def report_tables(report: Report) -> dict[str, ResultTable]:
    """The report's tables for W&B, one per table (key ``report/<stem>``): a ``model`` column, then per column
    of the table its mean over seeds, sample std and number of seeds (the paper's value where it has one)."""
    out = {}
    for table in report.tables:
        columns = ["model", "role"]
        for column in table.columns:
            columns += [column, f"{column} std", f"{column} seeds", f"{column} (paper)"]
        rows = []
        for name, cells in table.rows.items():
            row: list = [name, table.roles.get(name, "")]
            for column in table.columns:
                cell = cells.get(column)
                row += [None, None, 0, None] if cell is None else [cell.mean, cell.std, cell.n, cell.paper]
            rows.append(row)
        out[f"report/{table.stem}"] = ResultTable(columns, rows)
    return out
