"""mTOP as released: ``mtop/<lang>/{train,eval,test}.txt`` (``eval`` is written as dev).

Each line has 8 tab-separated columns and no header: id, intent, slot string, utterance, domain, locale,
decoupled logical form, tokens JSON (``{"tokens": [...], "tokenSpans": [...]}``). A record takes the tokens from
the JSON and the decoupled logical form, whose tokens are ontology tokens (``[IN:X``, ``[SL:Y``, ``]``) or copies
of source tokens, as a pointer decoder needs.

Checks and normalisations (counted in the manifest):
- the logical form is whitespace-normalised (single spaces);
- a copied token that matches a source token only up to letter case takes the source token's spelling;
- a tokens JSON whose double-quote token is written as three quotes in a row, unescaped, is repaired.
A logical form with unbalanced brackets, or a copied token found nowhere among the source tokens, is an error
naming the file and line (``uncopyable="remove"`` removes and counts such rows instead).
"""
from __future__ import annotations

import json
from pathlib import Path

from ds_kd.errors import UsageError
from data_prep.tasks.taskdata import LangChoice, TaskData, read_lines, row_error

FILE_SPLITS = {"train": "train", "eval": "dev", "test": "test"}
NUM_COLUMNS = 8
QUIRK_WHITESPACE = "logical form whitespace normalised"
QUIRK_CASE = "copied token matched a source token up to case; source spelling kept"
QUIRK_QUOTE_JSON = "tokens JSON with an unescaped '\"' token repaired"
REASON_UNCOPYABLE = "logical form copies a token that is not among the source tokens"


class UncopyableToken(Exception):
    pass


def find_root(src: Path) -> Path:
    root = src / "mtop" if (src / "mtop").is_dir() else src
    if not any(root.glob("*/test.txt")) and not any(root.glob("*/train.txt")):
        raise FileNotFoundError(f"{src}: no <lang>/{{train,eval,test}}.txt (nor under mtop/)")
    return root


def parse_tokens_json(text: str, path: Path, lineno: int, on_quirk) -> list[str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        try:
            obj = json.loads(text.replace('"""', '"\\""'))
        except json.JSONDecodeError as e:
            raise row_error(path, lineno, f"tokens column is not JSON ({e.msg} at char {e.pos})") from None
        on_quirk(QUIRK_QUOTE_JSON)
    tokens = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise row_error(path, lineno, "tokens JSON has no non-empty list of non-empty 'tokens'")
    return tokens


def check_logical_form(form: str, tokens: list[str], path: Path, lineno: int, on_quirk) -> str:
    """The whitespace-normalised form with copies spelled as in the source; raises on malformed forms."""
    parts = form.split()
    if not parts or not parts[0].startswith("[IN:"):
        raise row_error(path, lineno, f"logical form does not start with an intent '[IN:': {form!r}")
    by_lower = {}
    for t in tokens:
        by_lower.setdefault(t.lower(), t)
    source = set(tokens)
    depth = 0
    out = []
    for i, part in enumerate(parts):
        if part.startswith(("[IN:", "[SL:")):
            if len(part) == 4:
                raise row_error(path, lineno, f"empty ontology label {part!r} in the logical form")
            depth += 1
        elif part == "]":
            depth -= 1
        elif part not in source:
            if part.lower() not in by_lower:
                raise UncopyableToken(part)
            on_quirk(QUIRK_CASE)
            part = by_lower[part.lower()]
        if depth < 0 or (depth == 0 and i < len(parts) - 1):
            raise row_error(path, lineno, f"unbalanced brackets in the logical form {form!r}")
        out.append(part)
    if depth != 0:
        raise row_error(path, lineno, f"unbalanced brackets in the logical form {form!r}")
    normalised = " ".join(out)
    if " ".join(parts) != form:
        on_quirk(QUIRK_WHITESPACE)
    return normalised


def read_file(path: Path, split: str, lang: str, data: TaskData, uncopyable: str) -> None:
    def on_quirk(quirk: str) -> None:
        data.normalise(split, lang, quirk)

    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != NUM_COLUMNS:
            raise row_error(path, lineno, f"expected {NUM_COLUMNS} tab-separated columns (id, intent, slots, "
                                          f"utterance, domain, locale, decoupled form, tokens JSON), found {len(cols)}")
        row_id, intent, _slots, _utterance, domain, _locale, form, tokens_json = cols
        tokens = parse_tokens_json(tokens_json, path, lineno, on_quirk)
        try:
            form = check_logical_form(form, tokens, path, lineno, on_quirk)
        except UncopyableToken as e:
            if uncopyable == "remove":
                data.remove(split, lang, path, lineno, REASON_UNCOPYABLE, row_id)
                continue
            raise row_error(path, lineno, f"logical form copies {str(e)!r}, which is not among the source tokens "
                                          f"{tokens} (use --mtop-uncopyable remove to remove such rows)") from None
        data.add(split, lang, {"id": row_id, "tokens": tokens, "logical_form": form, "intent": intent,
                               "domain": domain})
    data.source_files.append(str(path))


def load(src: Path, choice: LangChoice = LangChoice(), uncopyable: str = "error") -> TaskData:
    """``uncopyable``: ``error`` (default) or ``remove`` rows whose form copies a token absent from the source."""
    if uncopyable not in ("error", "remove"):
        raise UsageError(f"uncopyable must be 'error' or 'remove', not {uncopyable!r}")
    root = find_root(src)
    langs = sorted(d.name for d in root.iterdir() if d.is_dir())
    choice.check_available([lang for lang in langs if any((root / lang / f"{s}.txt").is_file() for s in ("eval", "test"))],
                           root, train_available=[lang for lang in langs if (root / lang / "train.txt").is_file()])
    data = TaskData("mtop", str(src), "mTOP <lang>/{train,eval,test}.txt")
    for lang in langs:
        for name, split in FILE_SPLITS.items():
            path = root / lang / f"{name}.txt"
            if path.is_file() and choice.wants(split, lang):
                read_file(path, split, lang, data, uncopyable)
    data.notes.append("eval.txt written as dev; records carry the decoupled logical form, the tokens of the "
                      "tokens JSON, and the intent and domain columns")
    return data
