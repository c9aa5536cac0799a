"""``python -m data_prep demo_tasks``: held-out aligned help pages -> small task files in the five benchmarks'
released formats, with labels derived from the text (they are not XNLI, PAWS-X, WikiANN, MultiATIS++ or mTOP).

Two steps, each writing a directory with a ``manifest.json`` written last (a re-run skips a finished step):

1. **Split** a raw directory in the layout of :mod:`data_prep.libreoffice` (``<raw>/<lang>/help.txt`` and
   ``<raw>/alignment/<lang>.tsv``, line i = "<page><TAB><paragraph id>" of line i) by help page: a page is
   held out when ``sha1("<seed>:<page>")`` falls below ``--holdout`` (a fraction), so the choice is
   deterministic for a seed and every language holds out the same pages (their paragraphs stay aligned).
   ``<pretrain_raw>`` gets the other pages whole. ``<heldout>`` gets the held-out pages' paragraphs whose text
   (in any language) occurs on no pretraining page (help pages repeat paragraphs such as "Choose Format -
   Cells.", and share UI strings, code and names across languages; such repeats are dropped and counted), so
   no held-out paragraph is ever pretraining text. It has
   the same layout plus
   ``pages.tsv``: each held-out page's role, ``train`` / ``dev`` / ``test`` (again by hash), so a task's test
   examples never come from a page its training examples came from. Run the corpus command on
   ``<pretrain_raw>``.
2. **Build** the task files under ``<out>/{xnli,pawsx,wikiann,matis,mtop}/`` (the ``--task all`` layout of
   ``python -m data_prep tasks``): English train sets from train pages, dev and test sets for every test
   language of :data:`ds_kd.data.tasks.TASKS` from dev and test pages. See :data:`DERIVATION` for the labels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sys
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, lang_code
from ds_kd.manifest import finished_output, has_manifest, read_manifest, write_manifest
from ds_kd.schema import LANGS, check_langs
from ds_kd.data.tasks import TASKS
from ds_kd.textfile import read_text

ROLES = ("train", "dev", "test")
# Share of held-out pages per role: most go to test, as test sets are per language and Hindi is scarce.
ROLE_SHARES = (0.45, 0.15, 0.40)
# Help modules (first directory of a page path) used as intents; "shared" pages mix every module.
MODULES = ("swriter", "scalc", "simpress", "sdraw", "smath", "sbasic", "schart", "sdatabase")

# Word lists for the entity tags. Product names are written the same way in every translation.
PRODUCTS = ("LibreOffice", "OpenOffice", "Writer", "Calc", "Impress", "Draw", "Base", "Math", "Basic",
            "Microsoft", "Excel", "Word", "PowerPoint", "Access", "Java", "Python", "JavaScript", "BeanShell",
            "Windows", "macOS", "Linux", "UNO", "Firebird", "HSQLDB", "MySQL", "PostgreSQL", "ScriptForge",
            "Access2Base", "Dialog", "SQL")
# Top-level menu names of the LibreOffice user interface, per language.
MENUS = {
    "en": ("File", "Edit", "View", "Insert", "Format", "Styles", "Sheet", "Data", "Tools", "Window", "Help",
           "Table", "Slide", "Shape", "Page", "Form"),
    "fr": ("Fichier", "Édition", "Affichage", "Insertion", "Format", "Styles", "Feuille", "Données", "Outils",
           "Fenêtre", "Aide", "Tableau", "Diapo", "Forme", "Page", "Formulaire"),
    "de": ("Datei", "Bearbeiten", "Ansicht", "Einfügen", "Format", "Formatvorlagen", "Tabelle", "Daten", "Extras",
           "Fenster", "Hilfe", "Folie", "Form", "Seite", "Formular"),
    "es": ("Archivo", "Editar", "Ver", "Insertar", "Formato", "Estilos", "Hoja", "Datos", "Herramientas",
           "Ventana", "Ayuda", "Tabla", "Diapositiva", "Forma", "Página", "Formulario"),
    "pt": ("Ficheiro", "Arquivo", "Editar", "Ver", "Exibir", "Inserir", "Formatar", "Estilos", "Folha",
           "Planilha", "Dados", "Ferramentas", "Janela", "Ajuda", "Tabela", "Forma", "Página", "Formulário"),
    "it": ("File", "Modifica", "Visualizza", "Inserisci", "Formato", "Stili", "Foglio", "Dati", "Strumenti",
           "Finestra", "Aiuto", "Tabella", "Diapositiva", "Forma", "Pagina", "Formulario"),
    "hi": ("फ़ाइल", "फाइल", "संपादन", "दृश्य", "प्रविष्ट", "सम्मिलित", "प्रारूप", "शैली", "शीट", "आंकड़ा", "डेटा",
           "औज़ार", "उपकरण", "विंडो", "मदद", "सहायता", "सारणी", "तालिका", "स्लाइड", "आकार", "पृष्ठ", "फ़ॉर्म"),
    "ja": ("ファイル", "編集", "表示", "挿入", "書式", "スタイル", "シート", "データ", "ツール", "ウィンドウ", "ヘルプ",
           "表", "スライド", "図形", "ページ", "フォーム"),
}
NUMBER = re.compile(r"^\d+(?:[.,:]\d+)*%?$")
# WikiANN accepts PER/LOC/ORG only: products are ORG, menus LOC, numbers PER (a renaming, documented).
WIKIANN_TYPES = {"product": "ORG", "menu": "LOC", "number": "PER"}
XNLI_HEADER = ("language gold_label sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
               "sentence1 sentence2 promptID pairID genre label1 label2 label3 label4 label5 "
               "sentence1_tokenized sentence2_tokenized match").split()

DERIVATION = """\
Derived demo tasks (built from held-out LibreOffice help pages; NOT the benchmarks, only their file formats):
- xnli: premise = a paragraph of two or more sentences or of six or more words; entailment = one of its own
  sentences (or, for a one-sentence premise, its first half or more of its words), neutral = the
  first sentence of another paragraph of the same page, contradiction = the first sentence of a paragraph of a
  page of another help module. Classes balanced.
- pawsx: word scrambling as PAWS: sentence2 = sentence1 (label 1, half of them without the final punctuation)
  or sentence1 with two words swapped or one word replaced by a word of another sentence (label 0). Balanced.
- wikiann: paragraphs of at most 40 words; product names (LibreOffice, Calc, Microsoft Excel...) tagged ORG,
  the language's top-level menu names (Format, Einfügen, Affichage...) LOC, numbers PER; consecutive words of
  one type form one span. About 3 in 4 sentences hold an entity.
- matis: utterance = a paragraph of at most 30 words; intent = the help module of its page (help_swriter,
  help_scalc, ...; pages under shared/ are not used), balanced over modules; slots product/menu/number as above.
- mtop: tokens = a paragraph of at most 24 words; logical form [IN:HELP_<MODULE> [SL:<TYPE> copied words ] ... ]
  with the slots of matis in text order; domain = the module.
English train sets; dev and test sets per test language of the paper's tables (ds_kd.data.tasks.TASKS).
"""


# --- step 1: the held-out split ------------------------------------------------------------------------------

def fraction_of(seed: int, text: str) -> float:
    """A deterministic number in [0, 1) for ``text`` (sha1, independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{text}".encode("utf-8")).digest()[:8], "big") / 2 ** 64


def page_role(page: str, seed: int) -> str:
    """The role of a held-out page: train, dev or test."""
    x = fraction_of(seed + 1, page)
    return "train" if x < ROLE_SHARES[0] else "dev" if x < ROLE_SHARES[0] + ROLE_SHARES[1] else "test"


def read_language(raw: Path, lang: str) -> list[tuple[str, str, str]]:
    """``(page, paragraph id, text)`` of one language of a libreoffice-layout raw directory."""
    text_path, key_path = raw / lang / "help.txt", raw / "alignment" / f"{lang}.tsv"
    for path in (text_path, key_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; --raw must be a directory written by "
                                    "`python -m data_prep libreoffice` (<lang>/help.txt, alignment/<lang>.tsv)")
    texts = read_text(text_path).split("\n")
    keys = read_text(key_path).split("\n")
    texts, keys = texts[:-1] if texts[-1] == "" else texts, keys[:-1] if keys[-1] == "" else keys
    if len(texts) != len(keys):
        raise UsageError(f"{key_path}: {len(keys)} alignment keys for {len(texts)} lines of {text_path}")
    rows = []
    for lineno, (key, text) in enumerate(zip(keys, texts), 1):
        page, sep, pid = key.partition("\t")
        if not sep or not page or not pid:
            raise UsageError(f"{key_path}:{lineno}: expected '<page><TAB><paragraph id>', found {key!r}")
        rows.append((page, pid, text))
    return rows


def write_language(raw: Path, lang: str, rows: list[tuple[str, str, str]]) -> None:
    (raw / lang).mkdir(parents=True, exist_ok=True)
    (raw / "alignment").mkdir(parents=True, exist_ok=True)
    with open(raw / lang / "help.txt", "w", encoding="utf-8") as text_out, \
            open(raw / "alignment" / f"{lang}.tsv", "w", encoding="utf-8") as key_out:
        for page, pid, text in rows:
            text_out.write(text + "\n")
            key_out.write(f"{page}\t{pid}\n")


def split_heldout(raw: Path, pretrain_raw: Path, heldout: Path, fraction: float = 0.2, seed: int = 0,
                  langs: tuple[str, ...] = LANGS, overwrite: bool = False) -> dict:
    """Split ``raw`` by page into ``pretrain_raw`` and ``heldout`` (see the module docstring); skipped when
    both manifests exist with the same settings, refused naming them (FileExistsError) with other settings unless
    ``overwrite``. Returns the held-out manifest."""
    check_langs(langs)
    if not 0 < fraction < 1:
        raise UsageError(f"--holdout must be a fraction in (0, 1), not {fraction}")
    settings = {"raw": str(raw), "fraction": fraction, "seed": seed, "langs": list(langs)}
    if has_manifest(pretrain_raw):
        done = finished_output(heldout, "held-out split", settings, overwrite=overwrite)
        if done is not None:
            print(f"[demo_tasks] held-out split done already ({heldout}), skipped", flush=True)
            return done
    for d in (pretrain_raw, heldout):
        shutil.rmtree(d, ignore_errors=True)  # an unfinished split is redone from the start
    counts: dict[str, dict] = {}
    held_pages: set[str] = set()
    # every language's pretraining text: help pages share UI strings, code and names across languages
    kept_texts = {text for lang in langs for page, _, text in read_language(raw, lang)
                  if fraction_of(seed, page) >= fraction}
    for lang in tqdm(langs, desc="held-out split", unit="lang", disable=None):
        rows = read_language(raw, lang)
        kept = [r for r in rows if fraction_of(seed, r[0]) >= fraction]
        held = [r for r in rows if fraction_of(seed, r[0]) < fraction and r[2] not in kept_texts]
        held_pages |= {page for page, _, _ in held}
        write_language(heldout, lang, held)
        write_language(pretrain_raw, lang, kept)
        counts[lang] = {"num_heldout": len(held), "num_pretrain": len(kept),
                        "num_dropped_same_text": len(rows) - len(held) - len(kept)}
    roles = {page: page_role(page, seed) for page in sorted(held_pages)}
    (heldout / "pages.tsv").write_text("".join(f"{p}\t{r}\n" for p, r in roles.items()), encoding="utf-8")
    write_manifest(pretrain_raw, "pretrain_raw", settings=settings, languages=counts,
                   note=f"the pages of {raw} not held out in {heldout}")
    return write_manifest(heldout, "heldout", settings=settings, languages=counts, num_pages=len(roles),
                          pages_per_role={r: sum(v == r for v in roles.values()) for r in ROLES})


# --- the held-out text -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paragraph:
    """One held-out paragraph in one language."""

    page: str
    """Page path, e.g. scalc/guide/cell_protect.html; its first directory is the help module."""
    pid: str
    """Paragraph id within the page (with ``page``: the alignment key)."""
    text: str
    """The paragraph."""

    @property
    def module(self) -> str:
        return self.page.split("/", 1)[0]


def read_heldout(heldout: Path, langs: tuple[str, ...]) -> tuple[dict[str, str], dict[str, list[Paragraph]]]:
    """``({page: role}, {lang: paragraphs})`` of a held-out directory."""
    pages_file = heldout / "pages.tsv"
    if not has_manifest(heldout) or not pages_file.is_file():
        raise FileNotFoundError(f"{heldout}: no finished held-out split (manifest.json, pages.tsv); run "
                                "`python -m data_prep demo_tasks --raw RAW --pretrain-raw DIR --heldout DIR` first")
    roles = dict(line.split("\t") for line in read_text(pages_file).splitlines() if line)
    return roles, {lang: [Paragraph(*r) for r in read_language(heldout, lang)] for lang in langs}


# --- words and entities ----------------------------------------------------------------------------------------

def is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def words(text: str) -> list[str]:
    """Whitespace words with leading and trailing punctuation split off as their own tokens."""
    out: list[str] = []
    for chunk in text.split():
        start, end = 0, len(chunk)
        while start < end and is_punct(chunk[start]):
            start += 1
        while end > start and is_punct(chunk[end - 1]):
            end -= 1
        out += list(chunk[:start]) + ([chunk[start:end]] if end > start else []) + list(chunk[end:])
    return out


def entity_types(tokens: list[str], lang: str) -> list[str | None]:
    """Per token: product, menu, number or None (the word lists above)."""
    menus = set(MENUS.get(lang, ()))
    products = set(PRODUCTS)
    return ["product" if t in products else "menu" if t in menus else "number" if NUMBER.match(t) else None
            for t in tokens]


def bio(types: list[str | None], rename: dict[str, str] | None = None) -> list[str]:
    """BIO tags: consecutive tokens of one type form one span."""
    tags, previous = [], None
    for t in types:
        if t is None:
            tags.append("O")
        else:
            name = rename[t] if rename else t
            tags.append(("I-" if t == previous else "B-") + name)
        previous = t
    return tags


def spans(tokens: list[str], types: list[str | None]) -> list[tuple[str, list[str]]]:
    """``(type, words)`` of each span, in text order."""
    out: list[tuple[str, list[str]]] = []
    for i, (token, t) in enumerate(zip(tokens, types)):
        if t is None:
            continue
        if i > 0 and types[i - 1] == t:
            out[-1][1].append(token)
        else:
            out.append((t, [token]))
    return out


def clean(text: str) -> str:
    """Fields of the releases are tab-separated and unquoted: no tabs inside a field."""
    return " ".join(text.replace("\t", " ").split())


def segments(text: str) -> tuple[list[str], str]:
    """Units to scramble and the joiner: words, or script runs for text written without spaces (Japanese)."""
    if len(text.split()) >= 3:
        return text.split(), " "
    return re.findall(r"[\u3040-\u309f]+|[\u30a0-\u30ffー]+|[\u4e00-\u9fff々]+|[A-Za-z0-9]+|\S", text), ""


# --- step 2: the task files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """How many examples each task file gets (at most: a language with fewer held-out paragraphs gets fewer)."""

    num_train: int = 1000
    """English training examples per task."""
    num_dev: int = 150
    """Dev examples per task and language."""
    num_test: int = 300
    """Test examples per task and language."""

    def of(self, role: str) -> int:
        return {"train": self.num_train, "dev": self.num_dev, "test": self.num_test}[role]


def split_sentences(text: str) -> list[str]:
    from data_prep.read import split_sentences as split

    return split(text)


def balanced(groups: list[list], num: int, rng: random.Random) -> list:
    """Up to ``num`` items taken round-robin from shuffled groups (classes stay balanced while they last)."""
    pools = [rng.sample(g, len(g)) for g in groups]
    out: list = []
    while len(out) < num and any(pools):
        for pool in pools:
            if pool and len(out) < num:
                out.append(pool.pop())
    rng.shuffle(out)
    return out


def xnli_pairs(paras: list[Paragraph], others: list[Paragraph], num: int, rng: random.Random) -> list:
    by_page: dict[str, list[Paragraph]] = defaultdict(list)
    for p in paras:
        by_page[p.page].append(p)
    firsts = {id(p): (split_sentences(p.text) or [p.text])[0] for p in others}
    groups: dict[str, list] = {"entailment": [], "neutral": [], "contradiction": []}
    for p in paras:
        sentences = split_sentences(p.text)
        tokens = p.text.split()
        if len(sentences) >= 2:
            groups["entailment"].append((p.text, rng.choice(sentences), "entailment"))
        elif len(tokens) >= 6:
            # One sentence: its opening words (at least half of it) stand for "a part of the premise".
            groups["entailment"].append((p.text, " ".join(tokens[:rng.randint(len(tokens) // 2, len(tokens) - 2)]),
                                         "entailment"))
        else:
            continue
        same_page = [q for q in by_page[p.page] if q.text != p.text]
        if same_page:
            groups["neutral"].append((p.text, (split_sentences(rng.choice(same_page).text) or [""])[0], "neutral"))
        # A page of another module (shared/ pages belong to every module, so they are never the other one).
        for _ in range(8):
            other = rng.choice(others)
            if other.module not in (p.module, "shared"):
                groups["contradiction"].append((p.text, firsts[id(other)], "contradiction"))
                break
    return [g for g in balanced(list(groups.values()), num, rng) if g[1].strip()]


def write_xnli(out: Path, data: dict, sizes: Sizes, rng: random.Random) -> dict:
    counts = {}
    en_train = xnli_pairs(data["en"]["train"], data["en"]["train"], sizes.num_train, rng)
    mt = out / "xnli" / "XNLI-MT-1.0" / "multinli"
    mt.mkdir(parents=True, exist_ok=True)
    # The released MT train file spells the class "contradictory"; we keep the release's spelling.
    rows = [f"{clean(a)}\t{clean(b)}\t{'contradictory' if label == 'contradiction' else label}"
            for a, b, label in en_train]
    (mt / "multinli.train.en.tsv").write_text("premise\thypo\tlabel\n" + "".join(r + "\n" for r in rows), "utf-8")
    counts["train.en"] = len(rows)
    for role in ("dev", "test"):
        lines = ["\t".join(XNLI_HEADER)]
        for lang in TASKS["xnli"].test_langs:
            pairs = xnli_pairs(data[lang][role], data[lang][role], sizes.of(role), rng)
            for i, (a, b, label) in enumerate(pairs):
                cols = dict.fromkeys(XNLI_HEADER, "")
                cols.update(language=lang, gold_label=label, sentence1=clean(a), sentence2=clean(b),
                            pairID=f"{role}-{i}", promptID=str(i), genre="help", label1=label,
                            sentence1_tokenized=" ".join(words(a)), sentence2_tokenized=" ".join(words(b)))
                lines.append("\t".join(cols[c] for c in XNLI_HEADER))
            counts[f"{role}.{lang}"] = len(pairs)
        (out / "xnli" / "XNLI-1.0").mkdir(parents=True, exist_ok=True)
        (out / "xnli" / "XNLI-1.0" / f"xnli.{role}.tsv").write_text("\n".join(lines) + "\n", "utf-8")
    return counts


def scramble(text: str, pool: list[str], rng: random.Random) -> str | None:
    units, joiner = segments(text)
    content = [i for i, u in enumerate(units) if not all(is_punct(c) for c in u)]
    if len(content) < 3:
        return None
    if rng.random() < 0.5:
        i, j = rng.sample(content, 2)
        if units[i] == units[j]:
            return None
        units[i], units[j] = units[j], units[i]
    else:
        i = rng.choice(content)
        other_units, _ = segments(rng.choice(pool))
        replacement = [u for u in other_units if u != units[i] and not all(is_punct(c) for c in u)]
        if not replacement:
            return None
        units[i] = rng.choice(replacement)
    return joiner.join(units)


def pawsx_pairs(paras: list[Paragraph], num: int, rng: random.Random) -> list:
    sentences = [s for p in paras for s in split_sentences(p.text)[:1] if 3 <= len(segments(s)[0]) <= 40]
    sentences = list(dict.fromkeys(sentences))
    positives, negatives = [], []
    for s in sentences:
        # Both classes from each sentence, as PAWS pairs a sentence with its paraphrase and its scrambling.
        kept = s.rstrip(".。।!?") if rng.random() < 0.5 else s
        positives.append((s, kept or s, "1"))
        changed = scramble(s, sentences, rng)
        if changed and changed != s:
            negatives.append((s, changed, "0"))
    return balanced([positives, negatives], num, rng)


def write_pawsx(out: Path, data: dict, sizes: Sizes, rng: random.Random) -> dict:
    counts = {}
    base = out / "pawsx" / "x-final"
    jobs = [("en", "train", "train.tsv")] + [(lang, role, f"{role}_2k.tsv") for lang in TASKS["pawsx"].test_langs
                                             for role in ("dev", "test")]
    for lang, role, name in jobs:
        pairs = pawsx_pairs(data[lang][role], sizes.of(role), rng)
        (base / lang).mkdir(parents=True, exist_ok=True)
        lines = ["id\tsentence1\tsentence2\tlabel"] + [f"{i + 1}\t{clean(a)}\t{clean(b)}\t{label}"
                                                      for i, (a, b, label) in enumerate(pairs)]
        (base / lang / name).write_text("\n".join(lines) + "\n", "utf-8")
        counts[f"{role}.{lang}"] = len(pairs)
    return counts


def tagged_sentences(paras: list[Paragraph], lang: str, max_words: int, num: int, rng: random.Random,
                     rename: dict[str, str] | None) -> list[tuple[list[str], list[str]]]:
    """About 3 in 4 with an entity; texts repeated across pages are used once."""
    with_entity, without = [], []
    for text in dict.fromkeys(p.text for p in paras):
        tokens = words(clean(text))
        if not 3 <= len(tokens) <= max_words:
            continue
        types = entity_types(tokens, lang)
        (with_entity if any(types) else without).append((tokens, bio(types, rename)))
    rng.shuffle(with_entity)
    rng.shuffle(without)
    num_with = min(len(with_entity), max(num * 3 // 4, num - len(without)))
    chosen = with_entity[:num_with] + without[: num - num_with]
    rng.shuffle(chosen)
    return chosen


def write_wikiann(out: Path, data: dict, sizes: Sizes, rng: random.Random) -> dict:
    counts = {}
    base = out / "wikiann" / "panx_dataset"
    jobs = [("en", "train")] + [(lang, role) for lang in TASKS["wikiann"].test_langs for role in ("dev", "test")]
    for lang, role in jobs:
        sentences = tagged_sentences(data[lang][role], lang, 40, sizes.of(role), rng, WIKIANN_TYPES)
        (base / lang).mkdir(parents=True, exist_ok=True)
        blocks = ["\n".join(f"{lang}:{t}\t{tag}" for t, tag in zip(tokens, tags)) for tokens, tags in sentences]
        (base / lang / role).write_text("\n\n".join(blocks) + "\n", "utf-8")
        counts[f"{role}.{lang}"] = len(sentences)
    return counts


def intent_examples(paras: list[Paragraph], lang: str, max_words: int, num: int, rng: random.Random) -> list:
    by_module: dict[str, list] = defaultdict(list)
    seen = set()
    for p in paras:
        if p.module not in MODULES or p.text in seen:
            continue
        seen.add(p.text)
        tokens = words(clean(p.text))
        if 3 <= len(tokens) <= max_words:
            by_module[p.module].append((p.module, tokens, entity_types(tokens, lang)))
    return balanced([by_module[m] for m in MODULES], num, rng)


def write_matis(out: Path, data: dict, sizes: Sizes, rng: random.Random) -> dict:
    counts = {}
    base = out / "matis"
    base.mkdir(parents=True, exist_ok=True)
    jobs = [("en", "train")] + [(lang, role) for lang in TASKS["matis"].test_langs for role in ("dev", "test")]
    for lang, role in jobs:
        rows = intent_examples(data[lang][role], lang, 30, sizes.of(role), rng)
        lines = ["id\tutterance\tslot_labels\tintent"] + [
            f"{i}\t{' '.join(tokens)}\t{' '.join(bio(types))}\thelp_{module}"
            for i, (module, tokens, types) in enumerate(rows)]
        (base / f"{role}_{lang.upper()}.tsv").write_text("\n".join(lines) + "\n", "utf-8")
        counts[f"{role}.{lang}"] = len(rows)
    return counts


def mtop_line(row_id: str, lang: str, module: str, tokens: list[str], types: list[str | None]) -> str:
    intent = f"IN:HELP_{module.upper()}"
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t) + 1
    slot_spans, i = [], 0
    for kind, span_words in spans(tokens, types):
        while types[i] != kind:
            i += 1
        start = starts[i]
        slot_spans.append(f"{start}:{start + len(' '.join(span_words))}:SL:{kind.upper()}")
        i += len(span_words)
    form = " ".join([f"[{intent}", *(f"[SL:{k.upper()} {' '.join(w)} ]" for k, w in spans(tokens, types)), "]"])
    tokens_json = json.dumps({"tokens": tokens, "tokenSpans": [{"start": s, "length": len(t)}
                                                               for s, t in zip(starts, tokens)]}, ensure_ascii=False)
    return "\t".join([row_id, intent, ",".join(slot_spans), " ".join(tokens), module, f"{lang}_XX", form,
                      tokens_json])


def write_mtop(out: Path, data: dict, sizes: Sizes, rng: random.Random) -> dict:
    counts = {}
    base = out / "mtop" / "mtop"
    jobs = [("en", "train")] + [(lang, role) for lang in TASKS["mtop"].test_langs for role in ("dev", "test")]
    for lang, role in jobs:
        rows = intent_examples(data[lang][role], lang, 24, sizes.of(role), rng)
        (base / lang).mkdir(parents=True, exist_ok=True)
        name = "eval" if role == "dev" else role
        lines = [mtop_line(f"{role}-{i}", lang, *row) for i, row in enumerate(rows)]
        (base / lang / f"{name}.txt").write_text("\n".join(lines) + "\n", "utf-8")
        counts[f"{role}.{lang}"] = len(rows)
    return counts


WRITERS = {"xnli": write_xnli, "pawsx": write_pawsx, "wikiann": write_wikiann, "matis": write_matis,
           "mtop": write_mtop}


def build_tasks(heldout: Path, out: Path, sizes: Sizes = Sizes(), seed: int = 0, overwrite: bool = False) -> dict:
    """Write the five task folders under ``out`` from a held-out directory; skipped when ``out`` is finished with
    the same settings, refused naming them (FileExistsError) with other settings unless ``overwrite``."""
    settings = {"heldout": str(heldout), "sizes": vars(sizes), "seed": seed}
    done = finished_output(out, "set of demo task files", settings, overwrite=overwrite)
    if done is not None:
        print(f"[demo_tasks] task files done already ({out}), skipped", flush=True)
        return done
    langs = tuple(sorted({lang for spec in TASKS.values() for lang in spec.test_langs}))
    roles, paragraphs = read_heldout(heldout, langs)
    data = {lang: {role: [p for p in paras if roles.get(p.page) == role] for role in ROLES}
            for lang, paras in paragraphs.items()}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    counts = {}
    for task, writer in tqdm(WRITERS.items(), desc="demo task files", unit="task", disable=None):
        # One generator per task, so adding or changing one task leaves the others' files as they were.
        counts[task] = writer(out, data, sizes, random.Random(f"{seed}:{task}"))
        empty = [k for k, n in counts[task].items() if n == 0]
        if empty:
            raise UsageError(f"{heldout}: too few held-out paragraphs for {task} {', '.join(empty)}; "
                             "raise --holdout")
    (out / "DERIVED.txt").write_text(DERIVATION, encoding="utf-8")
    return write_manifest(out, "demo_tasks", settings=settings, counts=counts, derivation=DERIVATION,
                          heldout_manifest=read_manifest(heldout))


# --- command line -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep demo_tasks", description=__doc__.split("\n\n")[0],
                                epilog=DERIVATION, formatter_class=HelpFormatter)
    p.add_argument("--raw", type=Path, help="raw directory of `python -m data_prep libreoffice` to split "
                                            "(default: none; build from an existing --heldout)")
    p.add_argument("--pretrain-raw", type=Path, help="where the pages not held out are written (with --raw); "
                                                     "run the corpus command on this directory (default: none; "
                                                     "needed with --raw)")
    p.add_argument("--heldout", type=Path, required=True, help="held-out pages (written with --raw, read otherwise)")
    p.add_argument("--out", type=Path, help="task source folder to write: OUT/{xnli,pawsx,wikiann,matis,mtop}/, "
                                            "for `python -m data_prep tasks --task all --src OUT` (default: none; "
                                            "no task files)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of help pages held out (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the page choice and the examples (default %(default)s)")
    add_list_argument(p, "--langs", default=list(LANGS), metavar="LANG", item_type=lang_code,
                      help="languages to split, space- or comma-separated (any codes of the raw directory; the "
                           "task files are built for the paper's test languages among them)")
    p.add_argument("--num-train", type=int, default=Sizes.num_train, help="English train examples per task")
    p.add_argument("--num-dev", type=int, default=Sizes.num_dev, help="dev examples per task and language")
    p.add_argument("--num-test", type=int, default=Sizes.num_test, help="test examples per task and language")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a split or task folder finished with other settings (default: refused, naming the "
                        "settings that differ; one with the same settings is skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.raw is not None:
            if args.pretrain_raw is None:
                raise UsageError("--raw needs --pretrain-raw (where the pretraining pages go)")
            langs = tuple(args.langs)
            m = split_heldout(args.raw, args.pretrain_raw, args.heldout, args.holdout, args.seed, langs,
                              args.overwrite)
            print("[demo_tasks] held out: " + "  ".join(f"{lang}={c['num_heldout']}"
                                                         for lang, c in m["languages"].items()), flush=True)
        if args.out is not None:
            m = build_tasks(args.heldout, args.out, Sizes(args.num_train, args.num_dev, args.num_test), args.seed,
                            args.overwrite)
            for task, counts in m["counts"].items():
                print(f"[demo_tasks] {task}: " + "  ".join(f"{k}={n}" for k, n in counts.items()), flush=True)
    except (FileNotFoundError, FileExistsError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
