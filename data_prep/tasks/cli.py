"""``python -m data_prep tasks``: normalise the fine-tuning benchmarks from their released files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.tasks import TASK_NAMES, LangChoice, prepare_task, task_settings
from data_prep.tasks.wikiann import WHITESPACE_RULES
from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument
from ds_kd.manifest import describe_differences, has_manifest, read_manifest, settings_differences

DESCRIPTION = """\
Read a benchmark as released and write normalised task data:
  OUT/<task>/<split>.<lang>.jsonl   (split: train, dev, test), OUT/<task>/removed.jsonl, OUT/<task>/manifest.json
The manifest (written last) records counts per split and language, label sets, removed rows and the
release quirks that were normalised. A malformed row stops the run with an error naming file and line.

What --src holds, per task (each layout is recognised by its files):
  xnli     XNLI-1.0/xnli.{dev,test}.tsv and XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv
  pawsx    [x-final/]<lang>/{dev_2k,test_2k}.tsv, en/train.tsv, <lang>/translated_train.tsv
  wikiann  [panx_dataset/]<lang>/{train,dev,test}, <lang>-<split> or <lang>.tar.gz (lang:token<TAB>tag lines),
           or the wikiann dataset saved by datasets (save_to_disk: one DatasetDict, or one per <lang>/)
  matis    {train,dev,test}_<LANG>.tsv anywhere below --src
  mtop     [mtop/]<lang>/{train,eval,test}.txt (eval is written as dev)
  all      one folder per task named as above: SRC/xnli, SRC/pawsx, SRC/wikiann (or SRC/panx), SRC/matis, SRC/mtop
  own      a task of one's own (--name NAME), SRC/<split>.<lang>.<ext> (split: train, dev, test), one format:
           .tsv   classification: text<TAB>label or text_a<TAB>text_b<TAB>label (no header)
           .jsonl classification: {"text": ..., "label": ...} or {"text_a": ..., "text_b": ..., "label": ...}
           .conll tagging: token ... tag per line (BIO tags), a blank line between sentences
           train.en and dev.en are required, no file may be empty, dev/test labels (entity types) must be
           train's; a .tsv/.jsonl/.conll file, or one starting with a split, named otherwise is refused
xnli, pawsx and wikiann may also be
  - XTREME's download_data.sh output: [xnli/|pawsx/|panx/]{train,dev,test}-<lang>.tsv (test files without
    labels, as later XTREME versions ship them, are not written; the manifest notes them)
  - datasets save_to_disk folders, one DatasetDict per language: SRC/<lang>/ (load_dataset("xnli", lang),
    load_dataset("paws-x", lang), load_dataset("wikiann", lang))
"""


RELEASES = {
    "xnli": "XNLI-1.0 and XNLI-MT-1.0 (github.com/facebookresearch/XNLI), or XTREME's download_data.sh xnli/",
    "pawsx": "PAWS-X's x-final/ (github.com/google-research-datasets/paws), or XTREME's download_data.sh pawsx/",
    "wikiann": "XTREME's panx_dataset or its download_data.sh panx/ (github.com/google-research/xtreme), or the "
               "wikiann dataset saved with datasets' save_to_disk",
    "matis": "the MultiATIS++ release (Xu et al., 2020: {train,dev,test}_<LANG>.tsv)",
    "mtop": "mtop.zip (Li et al., 2021: dl.fbaipublicfiles.com/mtop/mtop.zip)",
}
"""Where each benchmark's release comes from, for ``--task all`` to name the source of a missing one."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep tasks", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--task", required=True, choices=(*TASK_NAMES, "all", "own"),
                   help="benchmark to normalise; 'all' reads SRC/<task> for each of the five, builds those "
                        "present, names the release and the command of each missing one, and exits 2 only when "
                        "none is present; 'own' reads a task of one's own (--name) from plain files")
    p.add_argument("--name", default=None,
                   help="with --task own: the task's name, its folder under --out and what --task of "
                        "launch/finetune.py and launch/grid.py call it (lower case, digits, - and _; default: none)")
    p.add_argument("--src", required=True, type=Path, help="folder holding the release files (see above)")
    p.add_argument("--out", required=True, type=Path, help="root of the normalised task data; writes OUT/<task>/")
    add_list_argument(p, "--langs", metavar="LANG",
                      help="dev/test languages to write, space- or comma-separated, any codes the source's file "
                           "names hold (sw, zh-hans, ...) (default: every language the source has)")
    add_list_argument(p, "--train-langs", metavar="LANG", default=["en"],
                      help="training languages to write, space- or comma-separated (default: en, as the paper "
                           "fine-tunes on English only; others are the releases' translated or native train sets)")
    p.add_argument("--wikiann-format", choices=("auto", "xtreme", "xtreme-tsv", "hf"), default="auto",
                   help="WikiANN source: XTREME/Rahimi panx_dataset files (xtreme), XTREME's processed "
                        "panx/<split>-<lang>.tsv (xtreme-tsv), a datasets save_to_disk folder (hf), or auto: hf "
                        "where a dataset_dict.json exists, xtreme-tsv where <split>-<lang>.tsv files do")
    p.add_argument("--wikiann-whitespace-tokens", choices=tuple(WHITESPACE_RULES), default="keep",
                   help="WikiANN tokens that are only whitespace (e.g. an ideographic space, U+3000, in Japanese "
                        "files): " + "; ".join(f"{k}: {v}" for k, v in WHITESPACE_RULES.items()))
    p.add_argument("--mtop-uncopyable", choices=("error", "remove"), default="error",
                   help="mTOP rows whose logical form copies a token absent from the source tokens: stop with an "
                        "error (default) or remove and count them in the manifest")
    p.add_argument("--matis-misaligned", choices=("error", "remove"), default="error",
                   help="MultiATIS++ train/dev rows whose slot labels and words differ in number (the public "
                        "Spanish train file has some): stop with an error (default) or remove and count them in "
                        "the manifest; such test rows are always removed and counted, as in the paper")
    p.add_argument("--overwrite", "--force", dest="force", action="store_true",
                   help="rebuild a task whose OUT/<task>/manifest.json exists (default: skipped when built with "
                        "the same settings, refused naming them when built with other settings); --force is the "
                        "older spelling")
    return p


def task_source(src: Path, task: str) -> Path:
    """``SRC/<task>`` of ``--task all``; WikiANN may be XTREME's ``SRC/panx``."""
    if task == "wikiann" and not (src / task).is_dir() and (src / "panx").is_dir():
        return src / "panx"
    return src / task


def built_differently(manifest: dict, wanted: dict) -> dict:
    """Settings of ``wanted`` that the manifest recorded otherwise (source folders compared resolved)."""
    recorded = {key: manifest.get(key) for key in wanted}
    if recorded["source"] is not None and Path(recorded["source"]).resolve() == Path(wanted["source"]).resolve():
        recorded["source"] = wanted["source"]
    return settings_differences(recorded, wanted)


def _summary(manifest: dict) -> str:
    lines = [f"{manifest['task']}: {manifest['num_removed']} row(s) removed"]
    for split, per_lang in manifest["counts"].items():
        lines.append(f"  {split:5s} " + "  ".join(f"{lang}={n}" for lang, n in per_lang.items()))
    if manifest["missing_test_langs"]:
        lines.append(f"  warning: no test data for {' '.join(manifest['missing_test_langs'])} "
                     "(languages of the paper's table)")
    return "\n".join(lines)


def missing_task_line(task: str, src: Path, out: Path) -> str:
    """What ``--task all`` prints for a task whose ``SRC/<task>`` folder is missing: the release and the
    command that builds the task from it."""
    folders = f"{src / task} or {src / 'panx'}" if task == "wikiann" else f"{src / task}"
    return (f"{task}: skipped, no {folders}: it comes from {RELEASES[task]}; put it there, or run "
            f"python -m data_prep tasks --task {task} --src <its folder> --out {out}")


def task_sources(args: argparse.Namespace) -> dict[str, Path]:
    """The source folder of each task asked for: ``--src`` for one task, ``SRC/<task>`` for ``all``."""
    if args.task == "own":
        return {args.name: args.src}
    if args.task != "all":
        return {args.task: args.src}
    return {task: task_source(args.src, task) for task in TASK_NAMES}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.task == "own") != (args.name is not None):
        parser.error("--name goes with --task own, and --task own needs it")
    sources = task_sources(args)
    missing = [task for task, folder in sources.items() if not folder.is_dir()]
    if args.task != "all" and missing:
        print(f"error: source folder not found: {args.src}", file=sys.stderr)
        return 2
    present = {task: folder for task, folder in sources.items() if task not in missing}
    status = build_tasks(args, present) if present else 2
    for task in missing:
        print(missing_task_line(task, args.src, args.out), file=sys.stderr)
    if not present:
        print(f"error: none of the task folders {', '.join(TASK_NAMES)} is in --src {args.src}", file=sys.stderr)
    return status


def build_tasks(args: argparse.Namespace, sources: dict[str, Path]) -> int:
    """Build each task of ``sources`` (task -> source folder) under ``--out``; the exit status: 0, 1 for a
    malformed source, 2 for a task built earlier with other settings (each stops the run, naming it)."""
    choice = LangChoice(frozenset(args.langs) if args.langs else None, frozenset(args.train_langs))
    for task in sources:
        options = ({"wikiann_format": args.wikiann_format, "wikiann_whitespace": args.wikiann_whitespace_tokens}
                   if task == "wikiann" else {})
        if task == "mtop":
            options["mtop_uncopyable"] = args.mtop_uncopyable
        if task == "matis":
            options["matis_misaligned"] = args.matis_misaligned
        if args.task == "own":
            options["own"] = True
        if has_manifest(args.out / task) and not args.force:
            diffs = built_differently(read_manifest(args.out / task), task_settings(sources[task], choice, options))
            if diffs:
                print(f"error: {args.out / task} was built with other settings ({describe_differences(diffs)}); "
                      f"--overwrite rebuilds it with these, or give another --out", file=sys.stderr)
                return 2
            print(f"{task}: {args.out / task}/manifest.json exists with the same settings, skipping "
                  f"(--overwrite rebuilds)")
            continue
        try:
            manifest = prepare_task(task, sources[task], args.out, choice, **options)
        except (UsageError, FileNotFoundError) as e:
            print(f"error: {task}: {e}", file=sys.stderr)
            return 2
        print(_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
