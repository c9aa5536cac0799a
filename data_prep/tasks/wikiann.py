"""WikiANN (PAN-X) in its two common releases.

``xtreme``: the Rahimi et al. split used by XTREME (``panx_dataset``). Per language, three files
``train``, ``dev``, ``test`` found as ``<lang>/<split>``, ``<lang>-<split>`` or inside ``<lang>.tar.gz``
(optionally under ``panx_dataset/``). One token per line, ``<lang>:<token><TAB><tag>``, a blank line between
sentences. The token is what follows the first colon (tokens may contain colons, e.g. URLs); the prefix must
be the file's language. Tags must be BIO over PER/LOC/ORG.

``hf``: the ``wikiann`` dataset saved by ``datasets`` (``save_to_disk``): a ``DatasetDict`` with splits
``train``/``validation``/``test`` and columns ``tokens``, ``ner_tags`` (ints whose ``ClassLabel`` names are
the tags), ``langs``, ``spans``. Either one saved ``DatasetDict`` per language directory (``<src>/<lang>/``),
or one ``DatasetDict`` at ``<src>`` whose language is read from ``langs``.

Every malformed line or row is an error naming the file and line (or split and row). A token that is only
whitespace (a real Japanese file has ideographic spaces, U+3000, as tokens, often inside a name) is data, not a
malformed line: ``whitespace_tokens`` decides, in both formats, as :data:`WHITESPACE_RULES` says.
``xtreme-tsv``: XTREME's processed ``panx/{train,dev,test}-<lang>.tsv`` (``download_data.sh`` output), read by
:mod:`.xtreme`.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

from ds_kd.errors import UsageError
from data_prep.tasks.taskdata import LangChoice, TaskData, TaskDataError, iter_lines, read_lines, row_error

TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
XTREME_SPLITS = ("train", "dev", "test")
HF_SPLITS = {"train": "train", "validation": "dev", "test": "test"}
WHITESPACE_RULES = {
    "keep": "keep the token as it is, with its tag (default: the sentence and its entities stay whole, as "
            "released; each kept token is counted in the manifest's 'normalised')",
    "remove": "remove the sentence holding it, counted in the manifest and listed in removed.jsonl",
    "error": "stop with an error naming the file and line",
}
WHITESPACE_QUIRK = "whitespace-only token kept"


# --- XTREME / Rahimi files -------------------------------------------------------------------------------

def parse_sentences(lines: Iterator[tuple[int, str]], name: str,
                    lang: str) -> Iterator[tuple[int, list, list, list]]:
    """``(first line, tokens, tags, lines of whitespace-only tokens)`` per sentence of a ``lang:token<TAB>tag``
    file. Tokens are stripped, except one that is only whitespace, which is kept as it is."""
    tokens: list[str] = []
    tags: list[str] = []
    blank: list[int] = []
    start = 0
    for lineno, line in lines:
        if not line.strip():
            if tokens:
                yield start, tokens, tags, blank
            tokens, tags, blank = [], [], []
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise row_error(name, lineno, f"expected '<lang>:<token><TAB><tag>', found {len(fields)} field(s)")
        prefix, sep, token = fields[0].partition(":")
        if not sep or prefix != lang:
            raise row_error(name, lineno, f"token {fields[0]!r} lacks the language prefix '{lang}:'")
        if not token:
            raise row_error(name, lineno, "empty token")
        token, tag = token.strip() or token, fields[1].strip()
        if not token.strip():
            blank.append(lineno)
        if tag not in TAGS:
            raise row_error(name, lineno, f"tag {tag!r} is not one of {' '.join(TAGS)}")
        if not tokens:
            start = lineno
        tokens.append(token)
        tags.append(tag)
    if tokens:
        yield start, tokens, tags, blank


def add_sentence(data: TaskData, split: str, lang: str, record: dict, blank: list[tuple[str, int | None]],
                 rule: str) -> None:
    """Add ``record`` to ``data`` under the whitespace-token ``rule``; ``blank``: (file, line) of each of its
    whitespace-only tokens. Raises :class:`TaskDataError` naming the first under ``error``."""
    if blank and rule == "error":
        name, line = blank[0]
        raise row_error(name, line, "token is only whitespace; --wikiann-whitespace-tokens keep or remove "
                                    "decides what to do with such tokens")
    if blank and rule == "remove":
        name, line = blank[0]
        data.remove(split, lang, name, line, "whitespace-only token", record["id"])
        return
    for _ in blank:
        data.normalise(split, lang, WHITESPACE_QUIRK)
    data.add(split, lang, record)


def check_rule(rule: str) -> None:
    if rule not in WHITESPACE_RULES:
        raise UsageError(f"unknown whitespace-token rule {rule!r}; expected {', '.join(WHITESPACE_RULES)}")


def xtreme_sources(src: Path) -> dict[str, dict[str, object]]:
    """``{lang: {split: path or (tarball, member)}}`` for every language found under ``src``."""
    root = src / "panx_dataset" if (src / "panx_dataset").is_dir() else src
    found: dict[str, dict[str, object]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            for split in XTREME_SPLITS:
                if (entry / split).is_file():
                    found.setdefault(entry.name, {})[split] = entry / split
        elif entry.name.endswith(".tar.gz"):
            lang = entry.name[: -len(".tar.gz")]
            with tarfile.open(entry) as tar:
                for member in tar.getmembers():
                    split = Path(member.name).name
                    if member.isfile() and split in XTREME_SPLITS:
                        found.setdefault(lang, {}).setdefault(split, (entry, member.name))
        elif "-" in entry.name and entry.name.rsplit("-", 1)[1] in XTREME_SPLITS:
            lang, split = entry.name.rsplit("-", 1)
            found.setdefault(lang, {}).setdefault(split, entry)
    if not found:
        raise FileNotFoundError(f"{root}: no WikiANN files (<lang>/train, <lang>-train or <lang>.tar.gz)")
    return found


def _read_source(source: object, lang: str) -> tuple[str, list[tuple[int, list, list, list]]]:
    if isinstance(source, tuple):
        tarball, member = source
        name = f"{tarball}!{member}"
        with tarfile.open(tarball) as tar:
            stream = tar.extractfile(member)
            return name, list(parse_sentences(iter_lines(stream, name), name, lang))
    return str(source), list(parse_sentences(read_lines(source), str(source), lang))


def load_xtreme(src: Path, choice: LangChoice, whitespace_tokens: str = "keep") -> TaskData:
    sources = xtreme_sources(src)
    choice.check_available([lang for lang, s in sources.items() if "dev" in s or "test" in s], src,
                           train_available=[lang for lang, s in sources.items() if "train" in s])
    data = TaskData("wikiann", str(src), "XTREME/Rahimi lang:token<TAB>tag files")
    for lang, splits in sources.items():
        for split, source in sorted(splits.items()):
            if not choice.wants(split, lang):
                continue
            name, sentences = _read_source(source, lang)
            for start, tokens, tags, blank in sentences:
                record = {"id": f"{Path(name).name}:{start}", "tokens": tokens, "tags": tags}
                add_sentence(data, split, lang, record, [(name, line) for line in blank], whitespace_tokens)
            data.source_files.append(name)
    data.notes.append("XTREME/Rahimi files; record id '<file>:<first line of the sentence>'")
    return data


# --- datasets save_to_disk ---------------------------------------------------------------------------------

def is_saved_dataset(src: Path) -> bool:
    return (src / "dataset_dict.json").is_file() or any(src.glob("*/dataset_dict.json"))


def _tag_names(ds, where: str) -> list[str] | None:
    feature = ds.features["ner_tags"]
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    if names is not None:
        unknown = [n for n in names if n not in TAGS]
        if unknown:
            raise TaskDataError(f"{where}: ner_tags names {unknown} are not WikiANN tags ({' '.join(TAGS)})")
    return names


def _hf_rows(ds, where: str, lang: str | None) -> Iterator[tuple[int, str, list, list]]:
    names = _tag_names(ds, where)
    for column in ("tokens", "ner_tags"):
        if column not in ds.column_names:
            raise TaskDataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    has_langs = "langs" in ds.column_names
    for i, row in enumerate(ds):
        tokens, ids = row["tokens"], row["ner_tags"]
        if not tokens or len(tokens) != len(ids):
            raise TaskDataError(f"{where} row {i}: {len(tokens)} tokens but {len(ids)} ner_tags")
        tags = [names[t] if names is not None else t for t in ids]
        if any(t not in TAGS for t in tags):
            raise TaskDataError(f"{where} row {i}: tags {tags} are not all WikiANN tags")
        row_langs = set(row["langs"]) if has_langs else set()
        if lang is None and len(row_langs) != 1:
            raise TaskDataError(f"{where} row {i}: cannot tell the language from langs={sorted(row_langs)}")
        row_lang = lang if lang is not None else row_langs.pop()
        yield i, row_lang, tokens, tags


def load_hf(src: Path, choice: LangChoice, whitespace_tokens: str = "keep") -> TaskData:
    from datasets import load_from_disk  # slow to import; only this format needs it

    if (src / "dataset_dict.json").is_file():
        saved = [(None, src)]
    else:
        saved = [(d.name, d) for d in sorted(src.iterdir()) if (d / "dataset_dict.json").is_file()]
    data = TaskData("wikiann", str(src), "datasets save_to_disk (wikiann)")
    found_eval: set[str] = set()
    found_train: set[str] = set()
    for dir_lang, path in saved:
        dataset_dict = load_from_disk(str(path))
        unknown = sorted(set(dataset_dict) - set(HF_SPLITS))
        if unknown:
            raise TaskDataError(f"{path}: unexpected split(s) {unknown}; expected {', '.join(HF_SPLITS)}")
        for hf_split, ds in dataset_dict.items():
            split = HF_SPLITS[hf_split]
            where = f"{path} [{hf_split}]"
            for i, lang, tokens, tags in _hf_rows(ds, where, dir_lang):
                (found_train if split == "train" else found_eval).add(lang)
                if choice.wants(split, lang):
                    record = {"id": f"{hf_split}-{i}", "tokens": tokens, "tags": tags}
                    blank = [(f"{where} row {i} token {k}", None) for k, t in enumerate(tokens) if not t.strip()]
                    add_sentence(data, split, lang, record, blank, whitespace_tokens)
            data.source_files.append(where)
    choice.check_available(found_eval, src, train_available=found_train)
    data.notes.append("datasets save_to_disk layout; split 'validation' written as dev; "
                      "record id '<hf split>-<row index>'")
    return data


# --- XTREME download_data.sh output ---------------------------------------------------------------------------

def load_xtreme_tsv(src: Path, choice: LangChoice) -> TaskData:
    """XTREME's processed ``panx/<split>-<lang>.tsv`` under ``src`` (or ``src`` itself)."""
    from data_prep.tasks import xtreme

    root = xtreme.find_task_dir(src, "panx")
    if root is None:
        raise FileNotFoundError(f"{src}: no XTREME <split>-<lang>.tsv files (nor under panx/)")
    return xtreme.load_panx(root, src, choice, TAGS)


def detect_format(src: Path) -> str:
    from data_prep.tasks import xtreme

    if is_saved_dataset(src):
        return "hf"
    return "xtreme-tsv" if xtreme.find_task_dir(src, "panx") is not None else "xtreme"


def load(src: Path, choice: LangChoice = LangChoice(), source_format: str = "auto",
         whitespace_tokens: str = "keep") -> TaskData:
    """``source_format``: ``xtreme``, ``xtreme-tsv``, ``hf`` or ``auto`` (``hf`` where a ``dataset_dict.json``
    is found, ``xtreme-tsv`` where ``<split>-<lang>.tsv`` files are); ``whitespace_tokens``: a key of
    :data:`WHITESPACE_RULES` (not read for ``xtreme-tsv``, whose loader keeps tokens as they are)."""
    check_rule(whitespace_tokens)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory")
    if source_format == "auto":
        source_format = detect_format(src)
    if source_format == "hf":
        return load_hf(src, choice, whitespace_tokens)
    if source_format == "xtreme":
        return load_xtreme(src, choice, whitespace_tokens)
    if source_format == "xtreme-tsv":
        return load_xtreme_tsv(src, choice)
    raise UsageError(f"unknown WikiANN format {source_format!r}; expected auto, xtreme, xtreme-tsv or hf")
