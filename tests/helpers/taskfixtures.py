"""Writers of tiny benchmark files in each release's own format, with the releases' quirks, for the loader tests.

Each ``write_*`` returns the folder to pass as ``--src`` and the expected counts ``{(split, lang): n}`` of the
normalised records. ``malformed=<kind>`` inserts one bad row and returns its ``(file, line)`` as well.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def _write(path: Path, lines: list[str], ending: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + ending for line in lines).encode("utf-8"))
    return path


# --- XNLI ----------------------------------------------------------------------------------------------------

XNLI_HEADER = ("language gold_label sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
               "sentence1 sentence2 promptID pairID genre label1 label2 label3 label4 label5 "
               "sentence1_tokenized sentence2_tokenized match").split()
XNLI_LABELS = ("entailment", "neutral", "contradiction")


def _xnli_row(lang: str, label: str, s1: str, s2: str, pair_id: str) -> str:
    cols = {c: "" for c in XNLI_HEADER}
    cols.update(language=lang, gold_label=label, sentence1=s1, sentence2=s2, promptID="7", pairID=pair_id,
                genre="fiction", label1=label, match="True",
                sentence1_binary_parse="( ( a b ) c )", sentence1_tokenized=s1, sentence2_tokenized=s2)
    return "\t".join(cols[c] for c in XNLI_HEADER)


def write_xnli(root: Path, malformed: str | None = None):
    """XNLI-1.0 dev (2 pairs) and test (3 pairs) in en fr de hi; XNLI-MT train en (4 rows) and fr (2 rows).

    Quirks: the MT train spells one label ``contradictory``; sentences contain lone double quotes (the files
    are not CSV-quoted). ``malformed``: ``"label"`` (test row with label ``unknown``), ``"fields"`` (an MT
    train row with a missing column).
    """
    src = root / "xnli_release"
    langs = ("en", "fr", "de", "hi")
    expected = {}
    bad = None
    for split, num_pairs in (("dev", 2), ("test", 3)):
        lines = ["\t".join(XNLI_HEADER)]
        for lang in langs:
            for i in range(num_pairs):
                label = XNLI_LABELS[i % 3]
                lines.append(_xnli_row(lang, label, f'{lang} premise {i} with a " quote', f"{lang} hypothesis {i}",
                                       str(100 + i)))
            expected[(split, lang)] = num_pairs
        if split == "test" and malformed == "label":
            lines.append(_xnli_row("fr", "unknown", "p", "h", "999"))
            bad = (src / "XNLI-1.0" / "xnli.test.tsv", len(lines))
        _write(src / "XNLI-1.0" / f"xnli.{split}.tsv", lines)
    train = ["premise\thypo\tlabel",
             'He said "yes\tHe agreed .\tentailment',
             "The cat sat .\tA dog stood .\tcontradictory",
             "It rains .\tIt may be cold .\tneutral",
             '"Quoted" start\tSomething else\tcontradiction']
    if malformed == "fields":
        train.append("only a premise\tentailment")
        bad = (src / "XNLI-MT-1.0" / "multinli" / "multinli.train.en.tsv", len(train))
    _write(src / "XNLI-MT-1.0" / "multinli" / "multinli.train.en.tsv", train)
    _write(src / "XNLI-MT-1.0" / "multinli" / "multinli.train.fr.tsv",
           ["premise\thypo\tlabel", "Il pleut .\tIl fait beau .\tcontradictory", "Oui .\tNon .\tneutral"])
    expected[("train", "en")] = 4
    return src, expected, bad


# --- PAWS-X --------------------------------------------------------------------------------------------------

def write_pawsx(root: Path, malformed: str | None = None):
    """x-final/{en,fr,de,ja}: en/train.tsv (4 rows), dev_2k/test_2k (3 rows each), translated_train (fr, de).

    Quirks (removed and counted): fr/translated_train.tsv has a row with both sentences empty, de/test_2k.tsv a
    row with an empty label, ja/dev_2k.tsv a row with one empty sentence. ``malformed``: ``"label"`` (label
    ``2`` in en/dev_2k.tsv), ``"fields"`` (a 3-column row in fr/test_2k.tsv).
    """
    src = root / "pawsx_release"
    base = src / "x-final"
    header = "id\tsentence1\tsentence2\tlabel"
    expected = {}
    bad = None

    def rows(lang: str, n: int, start: int = 1) -> list[str]:
        return [f'{start + i}\t{lang} "first" sentence {i}\t{lang} second sentence {i}\t{i % 2}' for i in range(n)]

    _write(base / "en" / "train.tsv", [header, *rows("en", 4)])
    expected[("train", "en")] = 4
    for lang in ("en", "fr", "de", "ja"):
        for name, split in (("dev_2k.tsv", "dev"), ("test_2k.tsv", "test")):
            lines = [header, *rows(lang, 3)]
            expected[(split, lang)] = 3
            if lang == "de" and split == "test":
                lines.append("50\tein Satz\tnoch ein Satz\t")
            if lang == "ja" and split == "dev":
                lines.append("51\t\t二番目\t1")
            if malformed == "label" and lang == "en" and split == "dev":
                lines.append("52\ta\tb\t2")
                bad = (base / lang / name, len(lines))
            if malformed == "fields" and lang == "fr" and split == "test":
                lines.append("53\tune phrase\t1")
                bad = (base / lang / name, len(lines))
            _write(base / lang / name, lines)
    _write(base / "fr" / "translated_train.tsv", [header, *rows("fr", 2), "32035\t\t\t0"])
    _write(base / "de" / "translated_train.tsv", [header, *rows("de", 2)])
    return src, expected, bad


# --- WikiANN -------------------------------------------------------------------------------------------------

WIKIANN_SENTENCES = [
    [("Paris", "B-LOC"), ("is", "O"), ("nice", "O")],
    [("Angela", "B-PER"), ("Merkel", "I-PER"), ("visited", "O"), ("http://x.org:80", "O")],
    [("United", "B-ORG"), ("Nations", "I-ORG")],
]


def _panx_lines(lang: str, sentences, extra_blank: bool = True) -> list[str]:
    lines: list[str] = []
    for sentence in sentences:
        lines += [f"{lang}:{token}\t{tag}" for token, tag in sentence]
        lines.append("")
        if extra_blank:
            lines.append("")  # two blank lines between sentences: still one boundary
    while lines and not lines[-1]:
        lines.pop()  # the last sentence ends at end of file, with no blank line
    return lines


def write_wikiann_xtreme(root: Path, malformed: str | None = None):
    """panx_dataset with three layouts: en/{train,dev,test} folders, fr.tar.gz, de-{dev,test} files.

    Quirks: tokens containing colons, repeated blank lines, CRLF line endings (de), no blank line at the end.
    ``malformed``: ``"tag"`` (tag B-MISC), ``"prefix"`` (a token without ``de:``), ``"fields"`` (no tag).
    """
    src = root / "wikiann_release"
    base = src / "panx_dataset"
    expected = {}
    bad = None
    for split in ("train", "dev", "test"):
        _write(base / "en" / split, _panx_lines("en", WIKIANN_SENTENCES))
        expected[(split, "en")] = 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "dev", "test"):
            payload = "\n".join(_panx_lines("fr", WIKIANN_SENTENCES[:2])).encode("utf-8") + b"\n"
            info = tarfile.TarInfo(split)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    base.mkdir(parents=True, exist_ok=True)
    (base / "fr.tar.gz").write_bytes(buf.getvalue())
    expected[("dev", "fr")] = expected[("test", "fr")] = 2
    for split in ("dev", "test"):
        lines = _panx_lines("de", WIKIANN_SENTENCES[1:], extra_blank=False)
        if split == "test" and malformed:
            lines += ["", {"tag": "de:Berlin\tB-MISC", "prefix": "Berlin\tB-LOC", "fields": "de:Berlin"}[malformed]]
            bad = (base / f"de-{split}", len(lines))
        _write(base / f"de-{split}", lines, ending="\r\n")
        expected[(split, "de")] = 2
    return src, expected, bad


def write_wikiann_hf(root: Path, per_language: bool = True):
    """The ``wikiann`` dataset as ``datasets`` saves it: ints with ClassLabel names, ``langs``, ``spans``.

    ``per_language``: one saved DatasetDict per language folder (en, fr); else one DatasetDict for en and fr
    together, the language given by the ``langs`` column.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names)),
                         "langs": Sequence(Value("string")), "spans": Sequence(Value("string"))})

    def rows(lang: str, n: int) -> dict:
        sentences = WIKIANN_SENTENCES[:n]
        return {"tokens": [[t for t, _ in s] for s in sentences],
                "ner_tags": [[names.index(tag) for _, tag in s] for s in sentences],
                "langs": [[lang] * len(s) for s in sentences],
                "spans": [[f"{tag[2:]}: {tok}" for tok, tag in s if tag.startswith("B-")] for s in sentences]}

    def dataset_dict(groups: list[tuple[str, int]]) -> DatasetDict:
        splits = {}
        for split in ("train", "validation", "test"):
            merged = {k: [] for k in features}
            for lang, n in groups:
                for k, v in rows(lang, n).items():
                    merged[k] += v
            splits[split] = Dataset.from_dict(merged, features=features)
        return DatasetDict(splits)

    src = root / ("wikiann_hf" if per_language else "wikiann_hf_single")
    if per_language:
        dataset_dict([("en", 3)]).save_to_disk(str(src / "en"))
        dataset_dict([("fr", 2)]).save_to_disk(str(src / "fr"))
    else:
        dataset_dict([("en", 3), ("fr", 2)]).save_to_disk(str(src))
    expected = {(s, "en"): 3 for s in ("train", "dev", "test")}
    expected.update({("dev", "fr"): 2, ("test", "fr"): 2})
    return src, expected


# --- MultiATIS++ ---------------------------------------------------------------------------------------------

MATIS_HEADER = "id\tutterance\tslot_labels\tintent"
MATIS_ROWS = [
    ("1", "show flights from boston to denver", "O O O B-fromloc.city_name O B-toloc.city_name", "atis_flight"),
    ("2", "what is the fare from boston", "O O O O O B-fromloc.city_name", "atis_airfare"),
    ("3", "flights and fares to dallas", "O O O O B-toloc.city_name", "atis_flight#atis_airfare"),
]


def write_matis(root: Path, malformed: str | None = None):
    """{train,dev,test}_EN.tsv, dev_FR, test_FR, test_DE under data/train_dev_test/.

    Quirk: test_FR.tsv has one row with fewer slot labels than tokens (removed and counted). ``malformed``:
    ``"count"`` (the same mismatch in train_EN.tsv), ``"slot"`` (slot label ``X-city`` in dev_EN.tsv).
    """
    src = root / "matis_release"
    base = src / "data" / "train_dev_test"
    expected = {}
    bad = None
    for split, lang in (("train", "EN"), ("dev", "EN"), ("test", "EN"), ("dev", "FR"), ("test", "FR"),
                        ("test", "DE")):
        lines = [MATIS_HEADER, *("\t".join(r) for r in MATIS_ROWS)]
        expected[(split, lang.lower())] = 3
        if (split, lang) == ("test", "FR"):
            lines.append("4\tvols de boston à denver\tO O B-fromloc.city_name\tatis_flight")
        if malformed == "count" and (split, lang) == ("train", "EN"):
            lines.append("5\tflights to dallas\tO B-toloc.city_name\tatis_flight")
            bad = (base / f"{split}_{lang}.tsv", len(lines))
        if malformed == "slot" and (split, lang) == ("dev", "EN"):
            lines.append("6\tflights to dallas\tO O X-city\tatis_flight")
            bad = (base / f"{split}_{lang}.tsv", len(lines))
        _write(base / f"{split}_{lang}.tsv", lines)
    return src, expected, bad


# --- mTOP ----------------------------------------------------------------------------------------------------

def _mtop_line(row_id: str, tokens: list[str], form: str, tokens_json: str | None = None,
               domain: str = "messaging", locale: str = "en_XX") -> str:
    intent = form.split()[0][1:]
    if tokens_json is None:
        spans, pos = [], 0
        for t in tokens:
            spans.append({"start": pos, "length": len(t)})
            pos += len(t) + 1
        tokens_json = json.dumps({"tokens": tokens, "tokenSpans": spans}, ensure_ascii=False)
    return "\t".join([row_id, intent, "", " ".join(tokens), domain, locale, form, tokens_json])


def write_mtop(root: Path, malformed: str | None = None):
    """mtop/en/{train,eval,test}.txt (3 rows each) and mtop/de/{eval,test}.txt (2 rows each).

    Quirks (normalised and counted): a logical form with doubled and trailing spaces; a copied token that
    differs from the source token in case; a tokens JSON with an unescaped ``"`` token. ``malformed``:
    ``"brackets"`` (unbalanced), ``"copy"`` (a copied token absent from the source), ``"columns"`` (7 columns).
    """
    src = root / "mtop_release"
    base = src / "mtop"
    expected = {}
    bad = None
    en_rows = [
        _mtop_line("1", ["Has", "Angelika", "Kratzer", "video", "messaged", "me", "?"],
                   "[IN:GET_MESSAGE [SL:CONTACT Angelika Kratzer ] [SL:TYPE_CONTENT video ] [SL:RECIPIENT me ] ]"),
        _mtop_line("2", ["set", "an", "alarm", "for", "7", "am"],
                   "[IN:CREATE_ALARM  [SL:DATE_TIME for 7 am ] ] ", domain="alarm"),
        _mtop_line("3", ["play", '"', "Hello", '"'], '[IN:PLAY_MUSIC [SL:MUSIC_TRACK_TITLE hello ] ]',
                   tokens_json='{"tokens":["play",""","Hello","""],"tokenSpans":[]}', domain="music"),
    ]
    de_rows = [
        _mtop_line("10", ["Haben", "mir", "Ben", "und", "Leroy", "heute", "geschrieben"],
                   "[IN:GET_MESSAGE [SL:SENDER Ben ] [SL:SENDER Leroy ] [SL:RECIPIENT mir ] [SL:DATE_TIME heute ] ]",
                   locale="de_XX"),
        _mtop_line("11", ["Wecker", "um", "7"], "[IN:CREATE_ALARM [SL:DATE_TIME um 7 ] ]", domain="alarm",
                   locale="de_XX"),
    ]
    for name, split in (("train", "train"), ("eval", "dev"), ("test", "test")):
        lines = list(en_rows)
        if malformed and name == "test":
            lines.append({
                "brackets": _mtop_line("90", ["wake", "me"], "[IN:CREATE_ALARM [SL:PERSON me ]"),
                "copy": _mtop_line("91", ["wake", "me"], "[IN:CREATE_ALARM [SL:PERSON you ] ]"),
                "columns": "\t".join(_mtop_line("92", ["wake"], "[IN:CREATE_ALARM wake ]").split("\t")[:7]),
            }[malformed])
            bad = (base / "en" / "test.txt", len(lines))
        _write(base / "en" / f"{name}.txt", lines)
        expected[(split, "en")] = 3
        if name != "train":
            _write(base / "de" / f"{name}.txt", de_rows)
            expected[(split, "de")] = 2
    return src, expected, bad
