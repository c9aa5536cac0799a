"""Move ds_kd's flat modules into packages that read as the pipeline, and rewrite every reference to them.

    python tools/relayout.py            # git mv every file below, then rewrite every tracked text file
    python tools/relayout.py FILE ...   # rewrite only these files (e.g. a branch's new files after a rebase)

Idempotent: a rewritten reference no longer matches an old name, and files already moved are left alone. The
layering the packages follow (checked by tests/project/test_imports.py):
eval -> finetune -> distill -> train -> models -> data -> core (errors, manifest, schema, logbook, textfile);
cli -> train and below; data_prep -> ds_kd.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = {
    "cli": ["flags"],
    "data": ["shards", "order", "reader", "packed_stream", "packing", "masking", "tokenizer_files", "tasks"],
    "models": ["model", "sentence_attention", "warmstart", "modeldir", "vocab_check"],
    "train": ["engine", "ds_config", "optim", "checkpoint", "loop", "training", "pretrain"],
    "finetune": ["metrics"],
    "eval": ["grid", "retrieval", "speed", "report", "findings", "paper_results"],
}
MODULES = {m: f"{pkg}.{m}" for pkg, mods in PACKAGES.items() for m in mods}  # old ds_kd.<m> -> ds_kd.<new>

TESTS = {
    "data_prep": ["corpus", "corpus_libreoffice", "cli", "demo_tasks", "holdout", "task_layouts", "task_loaders",
                  "trim_vocab", "e5_teacher", "added_specials", "brought_tokenizer", "user_files"],
    "data": ["reader", "packing", "langs", "tokenizer_loading"],
    "models": ["model", "model_config", "sentence_attention", "warmstart", "tokenizer_export", "vocab_check"],
    "train": ["engine", "checkpoint", "pretrain", "resume_topology", "train_units", "step_syncs", "console",
              "shm_cleanup", "loss_counting"],
    "distill": ["distill_launch", "distill_losses", "distill_unigram_launch", "distiller"],
    "finetune": ["finetune", "metrics"],
    "eval": ["grid", "report", "findings", "retrieval", "speed", "wandb_results"],
    "cli": ["usage_error"],
    "project": ["docs", "imports", "demo_plan", "gpu_check"],
}
TEST_HELPERS = ["finetune_fixtures", "q4fixture", "shardgen", "taskfixtures"]
BENCHES = {"launch/bench_grid.py", "launch/bench_packing.py", "launch/bench_train.py",
           "data_prep/bench_corpus.py", "data_prep/bench_shards.py"}

MOVES = {f"ds_kd/{m}.py": f"ds_kd/{new.replace('.', '/')}.py" for m, new in MODULES.items()}
MOVES["ds_kd/cli.py"] = "ds_kd/cli/__init__.py"
MOVES.update({b: f"benchmarks/{Path(b).name}" for b in BENCHES})
MOVES.update({f"tests/test_{t}.py": f"tests/{pkg}/test_{t}.py" for pkg, ts in TESTS.items() for t in ts})
MOVES.update({f"tests/{h}.py": f"tests/helpers/{h}.py" for h in TEST_HELPERS})
DEEPER = {new for old, new in MOVES.items() if old.startswith("tests/")}  # one folder deeper than before

NAME = r"(?<![\w.])ds_kd\.({})\b(?!\.py)"
MODULE_REF = re.compile(NAME.format("|".join(MODULES)))
FROM_IMPORT = re.compile(r"^(\s*)from ds_kd import ([\w, ]+?)(\s*(#.*)?)$", re.M)
PATH_REF = re.compile(r"(?<![\w/.-])({})(?![\w/])".format("|".join(re.escape(p) for p in sorted(MOVES, key=len, reverse=True))))
BENCH_MODULE = re.compile(r"(\S*python\S*|\$\(PY\)) -m data_prep\.(bench_corpus|bench_shards)\b|\bdata_prep\.(bench_corpus|bench_shards)\b")


def split_from_import(m: re.Match) -> str:
    """``from ds_kd import a, b as c`` -> one ``from ds_kd.<package> import ...`` line per package."""
    indent, names, comment = m.group(1), [n.strip() for n in m.group(2).split(",")], m.group(3) or ""
    by_base: dict[str, list[str]] = {}
    for n in names:
        old = n.split(" as ")[0].strip()
        base = "ds_kd." + MODULES[old].rpartition(".")[0] if old in MODULES else "ds_kd"
        by_base.setdefault(base, []).append(n)
    lines = [f"{indent}from {base} import {', '.join(ns)}" for base, ns in by_base.items()]
    lines[0] += comment
    return "\n".join(lines)


TEST_PACKAGE = {t: pkg for pkg, ts in TESTS.items() for t in ts}
TEST_IMPORT = re.compile(r"^(\s*)(from|import) (conftest|{}|test_({}))\b".format(
    "|".join(TEST_HELPERS), "|".join(TEST_PACKAGE)), re.M)


def test_import(m: re.Match) -> str:
    """Tests are packages: ``from shardgen import`` -> ``from tests.helpers.shardgen import``, ``import taskfixtures
    as fx`` -> ``import tests.helpers.taskfixtures as fx``, ``from test_grid import`` -> ``from tests.eval.test_grid
    import``."""
    indent, kw, name, test = m.groups()
    where = "tests" if name == "conftest" else f"tests.{TEST_PACKAGE[test]}" if test else "tests.helpers"
    return f"{indent}{kw} {where}.{name}"


def rewrite(text: str, path: str) -> str:
    """Every old module path, file path and bench command in ``text`` replaced by its new one."""
    text = FROM_IMPORT.sub(split_from_import, text)
    text = re.sub(r"\bfrom data_prep\.(bench_corpus|bench_shards) import", r"from \1 import", text)  # a sibling script
    text = MODULE_REF.sub(lambda m: "ds_kd." + MODULES[m.group(1)], text)
    text = BENCH_MODULE.sub(lambda m: f"{m.group(1)} benchmarks/{m.group(2)}.py" if m.group(1)
                            else f"benchmarks/{m.group(3)}.py", text)
    text = PATH_REF.sub(lambda m: MOVES[m.group(1)], text)
    if path.startswith(("tests/", "benchmarks/")):
        text = TEST_IMPORT.sub(test_import, text)
    if path in DEEPER:
        text = text.replace("Path(__file__).resolve().parent.parent", "Path(__file__).resolve().parents[2]")
        text = text.replace("Path(__file__).parent.parent", "Path(__file__).parents[2]")
    return text


def rewrite_files(paths: list[str]) -> list[str]:
    changed = []
    for p in paths:
        f = ROOT / p
        if f.suffix not in {".py", ".md", ".toml", ".cfg", ".txt", ".sh", ".json", ".yml", ".yaml"} \
                and f.name not in {"Makefile", "run"}:
            continue
        try:
            old = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        new = rewrite(old, p)
        if new != old:
            f.write_text(new, encoding="utf-8")
            changed.append(p)
    return changed


def move_all() -> None:
    for old, new in MOVES.items():
        if (ROOT / old).exists():
            (ROOT / new).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "mv", old, new], cwd=ROOT, check=True)
    inits = [ROOT / "ds_kd" / pkg / "__init__.py" for pkg in PACKAGES]
    inits += [ROOT / "tests" / "__init__.py", ROOT / "tests" / "helpers" / "__init__.py"]
    inits += [ROOT / "tests" / pkg / "__init__.py" for pkg in TESTS]
    for init in inits:
        if not init.exists():
            init.write_text("")
            subprocess.run(["git", "add", str(init)], cwd=ROOT, check=True)


def main(argv: list[str]) -> int:
    if argv:
        paths = [str(Path(a).resolve().relative_to(ROOT)) for a in argv]
    else:
        move_all()
        paths = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        paths = [p for p in paths if p != "tools/relayout.py"]
    for p in rewrite_files(paths):
        print("rewrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
