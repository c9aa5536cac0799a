"""The docs name only what exists: every command in a fenced block of README.md, docs/*.md and
benchmarks/results/*.md runs an entry point that exists with flags its parser knows, every `make` target is in
the Makefile, and every repository path or ``ds_kd``/``data_prep`` name in backticks or a link exists."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.md")])
SHELLS = {"", "bash", "sh", "shell", "console"}
TOP_LEVEL = ("ds_kd/", "data_prep/", "launch/", "tests/", "ds_configs/", "docs/", "benchmarks/", ".ci/")
TOP_FILES = {"Makefile", "README.md", "LICENSE", "pyproject.toml"}
PLACEHOLDER = re.compile(r"[<>*{}\[\]|…]|\.\.\.|\s")
HELP_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def fenced_blocks(text: str) -> list[str]:
    """The bodies of the shell-like fenced blocks of a Markdown text (``bash``, ``sh``, ``console`` or none)."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in SHELLS]


def command_lines(block: str) -> list[list[str]]:
    """Each command of a block as words: continuation lines joined, a leading ``$ `` and comments dropped,
    ``NAME=value`` prefixes skipped. Lines that are not shell (output, tables) come back too; callers look only
    at those that start with an entry point."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # output text with an odd quote
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        if words:
            commands.append(words)
    return commands


@functools.cache
def makefile_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return frozenset(re.findall(r"^([\w.-]+):(?!=)", text, re.M))


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@functools.cache
def known_flags(entry: str) -> frozenset[str]:
    """The option strings of an entry point (``launch/X.py``, a module, or ``data_prep <command>``): from its
    ``build_parser()`` where it has one, else from its ``--help`` text."""
    if entry.startswith("data_prep "):
        from data_prep.__main__ import COMMANDS

        module = importlib.import_module(COMMANDS[entry.split()[1]])
    elif entry.endswith(".py"):
        module = _import_file(ROOT / entry)
    else:
        module = importlib.import_module(entry)
    if hasattr(module, "build_parser"):
        return frozenset(module.build_parser()._option_string_actions)
    argv = ["-m", entry] if not entry.endswith(".py") else [entry]
    help_text = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120).stdout
    return frozenset(HELP_FLAG.findall(help_text))


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """``(entry, its arguments)`` for a project command line, else None. Entries: ``make T``, ``python X.py``,
    ``python -m module``, ``python -m data_prep CMD``, ``deepspeed [launcher flags] X.py``."""
    head = Path(words[0]).name
    if head == "make":
        return "make", words[1:]
    if head == "deepspeed":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        return (words[scripts[0]], words[scripts[0] + 1:]) if scripts else None
    if head not in ("python", "python3") or len(words) < 2:
        return None
    if words[1] == "-m" and len(words) > 2:
        module = words[2]
        if not module.startswith(("ds_kd", "data_prep")):
            return None  # another package's tool (deepspeed.checkpoint...)
        if module == "data_prep" and len(words) > 3 and not words[3].startswith("-"):
            return f"data_prep {words[3].replace('-', '_')}", words[4:]
        return module, words[3:]
    return (words[1], words[2:]) if words[1].endswith(".py") else None


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with one documented command line: an entry point that does not exist, an unknown flag."""
    found = entry_point(words)
    if found is None:
        return []
    entry, args = found
    line = " ".join(words)
    if entry == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        return [f"`{line}`: no Makefile target {t!r}" for t in targets if t not in makefile_targets()]
    if entry.startswith("data_prep "):
        from data_prep.__main__ import COMMANDS

        if entry.split()[1] not in COMMANDS:
            return [f"`{line}`: no data_prep command {entry.split()[1]!r}"]
    elif entry.endswith(".py"):
        if not (ROOT / entry).is_file():
            return [f"`{line}`: no script {entry}"]
    elif importlib.util.find_spec(entry) is None:
        return [f"`{line}`: no module {entry}"]
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2}
    return [f"`{line}`: {entry} has no flag {f}" for f in sorted(flags - known_flags(entry))]


def _resolves(dotted: str) -> bool:
    """Whether ``ds_kd.x.y`` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def reference_problems(doc: Path, text: str) -> list[str]:
    """Repository paths and ``ds_kd``/``data_prep`` names in backticks, and relative links, that do not exist."""
    problems = []
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", outside):
        span = span.rstrip("/")
        word = span.split("(")[0]
        if re.fullmatch(r"(ds_kd|data_prep)(\.\w+)+", word):
            if not _resolves(word):
                problems.append(f"`{span}`: no such module or name")
        elif (span in TOP_FILES or span.startswith(TOP_LEVEL)) and not PLACEHOLDER.search(span):
            if not (ROOT / span).exists():
                problems.append(f"`{span}`: no such file or folder in the repository")
    for target in re.findall(r"\]\(([^)\s]+)\)", outside):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            problems.append(f"link ({target}): no such file")
    return problems


def doc_problems(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    problems = reference_problems(doc, text)
    for block in fenced_blocks(text):
        for words in command_lines(block):
            problems += command_problems(words)
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_what_exists(doc):
    problems = doc_problems(doc)
    assert not problems, f"{doc.relative_to(ROOT)} names what does not exist:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    """The README stays short, starts with the two commands CI and a newcomer run, and links the docs."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 8600, "README.md grew past ~8 KB: move the detail to a page under docs/"
    first = [w for w in command_lines(fenced_blocks(text)[0])][:2]
    assert first == [["make", "demo"], ["make", "test"]]
    assert "docs/" in text and "benchmarks/results/" in text


def test_checker_catches_a_missing_flag_file_and_target(tmp_path):
    """The check itself: a page naming a flag, a script, a make target, a path and a name that do not exist is
    refused on each."""
    page = tmp_path / "page.md"
    page.write_text("See `launch/no_such.py`, `ds_kd.models.model.NoSuchThing` and [x](missing.md).\n\n```bash\n"
                    "python launch/pretrain.py --model tiny-base --no-such-flag 3 \\\n    --max-steps 2\n"
                    "python -m data_prep corpus --raw x --vocab-sise 10\n"
                    "deepspeed --num_gpus 2 launch/distill.py --teacher t --studnet s\n"
                    "python launch/nothing.py --x\nmake no-such-target\n```\n", encoding="utf-8")
    problems = "\n".join(doc_problems(page))
    for expected in ("launch/pretrain.py has no flag --no-such-flag", "data_prep corpus has no flag --vocab-sise",
                     "launch/distill.py has no flag --studnet", "no script launch/nothing.py",
                     "no Makefile target 'no-such-target'", "`launch/no_such.py`: no such file",
                     "`ds_kd.models.model.NoSuchThing`: no such module", "link (missing.md)"):
        assert expected in problems
    assert "no flag --max-steps" not in problems and "no flag --num_gpus" not in problems
