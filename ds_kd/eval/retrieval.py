"""Cross-lingual sentence retrieval without fine-tuning, as XTREME's Tatoeba task.

For each language X, the held-out aligned paragraphs give pairs (English text, X text). Every encoder embeds
both sides: the mean of one layer's hidden states over the sub-word tokens of ``[CLS] text [SEP]`` ([CLS], [SEP] and
padding left out), L2-normalised; a model directory that records its own sentence recipe (see :class:`Pooling`;
multilingual-e5's: ``query: `` before the text, the mean of the last layer over every token, specials included,
as it was trained) is embedded by that recipe instead. Each row says how its model was pooled. The layer is XTREME's choice for mBERT, a middle layer (layer 8 of 12), generalised as
``round(2/3 · L)`` of an L-layer encoder ("xtreme"); "last" or a layer number may be asked for instead, for all
models or per model: each model is pooled where it is meant to be (a sentence encoder such as multilingual-e5 at
the mean of its last layer, as it was trained; a student distilled to match that layer there too; an MLM-trained
encoder at XTREME's middle layer). With ``all_layers`` the average accuracy of every layer is recorded beside it,
so that a reader can see whether another layer would have told a different story.
Each X sentence is a query whose candidates are all the English sentences of that language's pairs; the
answer is the cosine nearest neighbour, and top-1 accuracy is the share of queries whose answer is their
translation. The headline, as XTREME reports Tatoeba, is X→en; en→X is reported beside it.

Pairs: held-out alignment keys present in both languages, texts of at least ``min_chars`` characters; a pair
whose English or X text occurs twice is left out (help pages repeat sentences, and a query with two correct
answers has no single translation), then at most ``max_pairs`` pairs drawn with the seed (Tatoeba has 1000).

The held-out directory has one of three layouts, recognised by its files:

- keyed, as the default corpus's held-out text: ``<dir>/<lang>/help.txt`` and ``<dir>/alignment/<lang>.tsv``
  (line i: "<page><TAB><paragraph id>" of line i of the text); a pair is a paragraph id present in both languages;
- line-aligned, one file per language: ``<dir>/<lang>.txt``, line i of every file the same sentence (a parallel
  corpus such as FLORES, or one's own translations);
- line-aligned per pair, as Tatoeba: ``<dir>/<lang>-<pivot>.<lang>`` and ``<dir>/<lang>-<pivot>.<pivot>``
  (XTREME's download: ``fr-en.fr``, ``fr-en.en``), or with a ``tatoeba.`` prefix (LASER's release:
  ``tatoeba.fra-eng.fra``, ``tatoeba.fra-eng.eng``, codes as in the file names, the pivot ``eng``); line i of
  the two files is a pair.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ds_kd.errors import UsageError
from ds_kd.manifest import atomic_write_text
from ds_kd.textfile import read_text

if TYPE_CHECKING:  # torch is imported where embeddings are computed: the command's --help does without it
    import torch


@dataclass(frozen=True)
class RetrievalConfig:
    """How pairs are chosen and sentences embedded."""

    layer: str = "xtreme"
    """Hidden layer to mean-pool: "xtreme" (round(2L/3), layer 8 of 12 as XTREME for mBERT), "last", or a
    number (0 = embeddings, L = last layer)."""
    max_pairs: int = 1000
    """Pairs per language at most (XTREME's Tatoeba: 1000)."""
    min_chars: int = 10
    """Shorter texts (on either side) are left out: single words such as menu names are not sentences."""
    max_len: int = 128
    """Sub-word tokens per sentence at most, [CLS] and [SEP] included."""
    batch_size: int = 32
    """Sentences per forward pass."""
    seed: int = 0
    """Seed of the pair sample."""
    pivot: str = "en"
    """The language every other one is aligned to."""
    all_layers: bool = False
    """Also record the X→en average of every layer (0 = embeddings .. L); the whole encoder then runs."""


RECIPE_KEY = "sentence_embedding"
"""Key of a model's sentence recipe in the ``ds_kd`` record of its ``config.json`` (see :mod:`ds_kd.models.modeldir`)."""


@dataclass(frozen=True)
class Pooling:
    """How a model turns a text into one vector: the mean of hidden ``layer`` over the tokens of
    ``[CLS] prefix+text [SEP]``, [CLS] and [SEP] counted when ``specials``. The default is XTREME's (no prefix,
    sub-words only); a model directory may record its own recipe as ``{"prefix", "layer", "specials"}`` under
    :data:`RECIPE_KEY` (e.g. multilingual-e5: ``query: `` for symmetric tasks such as bitext mining, mean over
    the attention mask of the last layer: Wang et al. 2022, "Text Embeddings by Weakly-Supervised Contrastive
    Pre-training", and its model card)."""

    layer: str
    prefix: str = ""
    specials: bool = False
    recipe: bool = False
    """Taken from the model directory's record."""

    @classmethod
    def of(cls, model_dir: Path | str, layer: str | None, default_layer: str) -> "Pooling":
        """The model's recorded recipe, else XTREME's pooling; ``layer`` (asked for this model) overrides
        the recipe's layer, which overrides ``default_layer``."""
        from ds_kd.models.modeldir import DS_KD_KEY, read_config

        recipe = read_config(model_dir).get(DS_KD_KEY, {}).get(RECIPE_KEY)
        if recipe is None:
            return cls(layer or default_layer)
        return cls(layer or recipe["layer"], recipe["prefix"], recipe["specials"], recipe=True)

    def label(self) -> str:
        """What the result's ``pooling`` and the table's pooling column say."""
        tokens = "every token, [CLS]/[SEP] included" if self.specials else "the sub-word tokens"
        text = f"'{self.prefix}' + text" if self.prefix else "the text as is"
        return (f"mean of layer {self.layer} over {tokens}, of {text}"
                + (" (the model's recipe)" if self.recipe else ""))


# --- pairs ------------------------------------------------------------------------------------------------------

def read_keyed_text(root: Path, lang: str) -> list[tuple[tuple[str, str], str]]:
    """``((page, paragraph id), text)`` of one language of a held-out directory."""
    text_path, key_path = root / lang / "help.txt", root / "alignment" / f"{lang}.tsv"
    for path in (text_path, key_path):
        if not path.is_file():
            present = sorted(p.stem for p in (root / "alignment").glob("*.tsv")
                             if (root / p.stem / "help.txt").is_file())
            raise FileNotFoundError(f"{path}: not found (expected <dir>/<lang>/help.txt and <dir>/alignment/"
                                    f"<lang>.tsv, as `python -m data_prep demo_tasks` writes for --heldout); "
                                    f"languages in {root}: {' '.join(present) or 'none'}")
    texts = read_text(text_path).splitlines()
    keys = read_text(key_path).splitlines()
    if len(texts) != len(keys):
        raise UsageError(f"{key_path}: {len(keys)} alignment keys for {len(texts)} lines of {text_path}")
    out = []
    for lineno, (key, text) in enumerate(zip(keys, texts), 1):
        page, sep, pid = key.partition("\t")
        if not sep:
            raise UsageError(f"{key_path}:{lineno}: expected '<page><TAB><paragraph id>', found {key!r}")
        out.append(((page, pid), text))
    return out


PAIR_PREFIXES = ("", "tatoeba.")
"""File-name prefixes of the per-pair layout: XTREME's download (``fr-en.fr``), LASER's Tatoeba release
(``tatoeba.fra-eng.fra``)."""


def pair_files(root: Path, lang: str, pivot: str) -> tuple[Path, Path]:
    """The per-pair files of one language: (pivot side, ``lang`` side), the first prefix of
    :data:`PAIR_PREFIXES` whose two files exist (else the first's names)."""
    candidates = [(root / f"{pre}{lang}-{pivot}.{pivot}", root / f"{pre}{lang}-{pivot}.{lang}")
                  for pre in PAIR_PREFIXES]
    return next((pair for pair in candidates if all(path.is_file() for path in pair)), candidates[0])


def text_files(root: Path, lang: str, pivot: str) -> tuple[Path, Path]:
    """The (pivot side, ``lang`` side) files of one language's pairs in held-out directory ``root``, whichever
    of the module's layouts it has (the files may not exist: :func:`line_aligned_pairs` says so)."""
    if (root / "alignment").is_dir():
        return root / pivot / "help.txt", root / lang / "help.txt"
    if all(path.is_file() for path in pair_files(root, lang, pivot)):
        return pair_files(root, lang, pivot)
    return root / f"{pivot}.txt", root / f"{lang}.txt"


def heldout_langs(root: Path, pivot: str) -> list[str]:
    """The languages ``root`` aligns to ``pivot`` (alignment files, Tatoeba pairs or ``<lang>.txt`` files, by
    its layout): the paper's in its order, then the others sorted."""
    from ds_kd.schema import LANGS, lang_code_problem

    if (root / "alignment").is_dir():
        found = {p.stem for p in (root / "alignment").glob("*.tsv")}
    else:
        suffix = f"-{pivot}.{pivot}"
        found = ({p.name[:-len(suffix)].removeprefix("tatoeba.") for p in root.glob(f"*{suffix}")}
                 | ({p.stem for p in root.glob("*.txt")} if (root / f"{pivot}.txt").is_file() else set()))
    found = {code for code in found if lang_code_problem(code) is None} - {pivot}
    return [lang for lang in LANGS if lang in found] + sorted(found - set(LANGS))


def line_aligned_pairs(root: Path, lang: str, pivot: str) -> list[tuple[str, str]]:
    """(pivot text, ``lang`` text) of line i of the two line-aligned files (:func:`text_files`). Raises
    FileNotFoundError naming the files expected and the languages found, UsageError when their line counts
    differ."""
    pivot_file, lang_file = text_files(root, lang, pivot)
    for path in (pivot_file, lang_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found (expected line-aligned {root}/{lang}.txt beside {root}/{pivot}.txt, "
                f"Tatoeba's {lang}-{pivot}.{lang} and .{pivot} (XTREME; LASER: tatoeba.{lang}-{pivot}.*), or the "
                f"keyed layout "
                f"<dir>/<lang>/help.txt with <dir>/alignment/<lang>.tsv); languages in {root}: "
                f"{' '.join(heldout_langs(root, pivot)) or 'none'}")
    pivots, others = read_text(pivot_file).splitlines(), read_text(lang_file).splitlines()
    if len(pivots) != len(others):
        raise UsageError(f"{lang_file}: {len(others)} lines for the {len(pivots)} of {pivot_file}; line-aligned "
                         f"files hold line i of each as one translation pair")
    return list(zip(pivots, others))


def keyed_pairs(root: Path, langs: list[str], pivot: str) -> dict[str, list[tuple[str, str]]]:
    """(pivot text, lang text) of each alignment key present in both languages, per language but the pivot."""
    pivot_texts = dict(read_keyed_text(root, pivot))
    return {lang: [(pivot_texts[key], text) for key, text in read_keyed_text(root, lang) if key in pivot_texts]
            for lang in langs if lang != pivot}


def select_pairs(pairs: list[tuple[str, str]], cfg: RetrievalConfig) -> list[tuple[str, str]]:
    """Long-enough pairs whose two texts are each unique, at most ``max_pairs`` drawn with the seed."""
    pivots, others = Counter(p for p, _ in pairs), Counter(x for _, x in pairs)
    kept = [(p, x) for p, x in pairs
            if pivots[p] == 1 and others[x] == 1 and len(p) >= cfg.min_chars and len(x) >= cfg.min_chars]
    if len(kept) > cfg.max_pairs:
        kept = random.Random(cfg.seed).sample(kept, cfg.max_pairs)
    return kept


def read_pairs(heldout: Path | str, langs: list[str], cfg: RetrievalConfig) -> dict[str, list[tuple[str, str]]]:
    """``{lang: [(pivot text, lang text)]}`` for every language but the pivot (any codes the held-out directory
    holds, in any layout of the module's). ValueError naming --langs/--pivot for a code of another form."""
    from ds_kd.schema import check_langs

    check_langs(list(langs), "--langs")
    check_langs([cfg.pivot], "--pivot")
    heldout = Path(heldout)
    if (heldout / "alignment").is_dir():
        found = keyed_pairs(heldout, langs, cfg.pivot)
    else:
        found = {lang: line_aligned_pairs(heldout, lang, cfg.pivot) for lang in langs if lang != cfg.pivot}
    out = {}
    for lang, pairs in found.items():
        out[lang] = select_pairs(pairs, cfg)
        if not out[lang]:
            raise UsageError(f"{heldout}: no aligned {cfg.pivot}-{lang} pairs left to retrieve")
    return out


# --- embeddings and scoring -------------------------------------------------------------------------------------

def pick_layer(layer: str | int, num_layers: int) -> int:
    """Index into the hidden states (0 = embeddings, ``num_layers`` = last layer)."""
    if layer == "xtreme":
        return max(1, round(2 * num_layers / 3))
    if layer == "last":
        return num_layers
    try:
        index = int(layer)
    except ValueError:
        raise UsageError(f"layer {layer!r}: expected 'xtreme', 'last' or a layer number") from None
    if not 0 <= index <= num_layers:
        raise UsageError(f"layer {index} is outside 0..{num_layers}")
    return index


def encode(tokenizer, texts: list[str], max_len: int,
           specials: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, pooled_mask) of ``[CLS] pieces [SEP]``, padded; ``pooled_mask`` marks the
    pieces, and [CLS] and [SEP] too when ``specials`` (the special tokens are added here, whatever the
    tokenizer's own post-processing)."""
    import torch

    from ds_kd.finetune.data import special_ids

    cls_id, sep_id, pad_id = special_ids(tokenizer)
    pieces = [ids[: max_len - 2] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(len(p) for p in pieces) + 2
    # Plain lists first and one tensor at the end: filling tensors row by row costs more than the forward.
    rows = [[cls_id, *p, sep_id] + [pad_id] * (width - len(p) - 2) for p in pieces]
    masks = [[1] * (len(p) + 2) + [0] * (width - len(p) - 2) for p in pieces]
    # A text with no pieces is pooled over [CLS] [SEP], so it still has an embedding.
    pooled = [mask if specials or not p else [0] + [1] * len(p) + [0] * (width - len(p) - 1)
              for p, mask in zip(pieces, masks)]
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(pooled, dtype=torch.bool)


def pool_batch(encoder, ids, mask, pooled, layers: list[int]):
    """[len(layers), B, D]: the L2-normalised mean of each of ``layers``' hidden states over ``pooled``."""
    import torch

    # One sentence: segment 0 (no token types), right for encoders with and without trained segments.
    hidden = encoder(ids, mask, output_hidden_states=True).hidden_states
    weights_BT1 = pooled.unsqueeze(-1).float()
    means_LBD = torch.stack([(hidden[i].float() * weights_BT1).sum(1) / weights_BT1.sum(1) for i in layers])
    return torch.nn.functional.normalize(means_LBD, dim=-1)


def embed(encoder, tokenizer, texts: list[str], layers: list[int], cfg: RetrievalConfig,
          desc: str = "", pooling: Pooling = Pooling("xtreme")) -> torch.Tensor:
    """[len(layers), N, D]: per hidden layer in ``layers`` (0 = embeddings), the L2-normalised mean over each
    text's tokens, with ``pooling``'s prefix and specials (its layer is the caller's to pick)."""
    import torch
    from tqdm import tqdm

    texts = [pooling.prefix + t for t in texts]
    out = []
    # Batches of similar length waste little on padding; the rows are put back in order at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), cfg.batch_size), desc=desc or "embed", unit="batch", leave=False,
                          disable=None):
            batch = encode(tokenizer, [texts[i] for i in order[start:start + cfg.batch_size]], cfg.max_len,
                           pooling.specials)
            out.append(pool_batch(encoder, *batch, layers))
        embedded_LND = torch.empty_like(torch.cat(out, dim=1))
        embedded_LND[:, torch.tensor(order)] = torch.cat(out, dim=1)
    return embedded_LND


def top1_accuracy(queries_ND: torch.Tensor, candidates_ND: torch.Tensor) -> float:
    """Share of queries i whose most cosine-similar candidate is candidate i (rows L2-normalised)."""
    import torch

    nearest = (queries_ND @ candidates_ND.T).argmax(dim=1)
    return (nearest == torch.arange(len(queries_ND))).float().mean().item()


def load_encoder(model_dir: Path | str):
    """(encoder, tokenizer, number of layers) of any HF BERT directory with its tokenizer (checked by
    ``ds_kd.models.modeldir.load_tokenizer``: a directory without one, or with another model's, is refused)."""
    from ds_kd.models.model import BertForMaskedLM
    from ds_kd.models.modeldir import load_tokenizer

    tokenizer = load_tokenizer(model_dir, "retrieval (--models)")
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    return model.bert, tokenizer, model.config.num_hidden_layers


def evaluate_model(model_dir: Path | str, pairs: dict[str, list[tuple[str, str]]], cfg: RetrievalConfig,
                   name: str = "", layer: str | None = None) -> dict:
    """Per language: X→en and en→X top-1 accuracy and the number of pairs, at ``layer`` (default
    ``cfg.layer``, or the layer of the model's recorded recipe: see :class:`Pooling`); with ``cfg.all_layers``
    also ``per_layer``: the X→en average of every layer. ``pooling`` says how the model was pooled."""
    encoder, tokenizer, num_layers = load_encoder(model_dir)
    pooling = Pooling.of(model_dir, layer, cfg.layer)
    pooled = pick_layer(pooling.layer, num_layers)
    layers = list(range(num_layers + 1)) if cfg.all_layers else [pooled]
    if not cfg.all_layers:
        # The layers above the pooled one do not change its output: this private copy of the encoder drops them.
        encoder.encoder.layer = encoder.encoder.layer[:pooled]
    # The pivot side of most languages' pairs overlaps: each pivot text is embedded once.
    pivot_texts = list(dict.fromkeys(p for lang_pairs in pairs.values() for p, _ in lang_pairs))
    pivot_all = embed(encoder, tokenizer, pivot_texts, layers, cfg, f"{name} {cfg.pivot}", pooling)
    row_of = {text: i for i, text in enumerate(pivot_texts)}
    at = layers.index(pooled)
    scores, per_layer = {}, [0.0] * len(layers)
    for lang, lang_pairs in pairs.items():
        pivot = pivot_all[:, [row_of[p] for p, _ in lang_pairs]]
        other = embed(encoder, tokenizer, [x for _, x in lang_pairs], layers, cfg, f"{name} {lang}", pooling)
        scores[lang] = {f"{lang}->{cfg.pivot}": top1_accuracy(other[at], pivot[at]),
                        f"{cfg.pivot}->{lang}": top1_accuracy(pivot[at], other[at]), "num_pairs": len(lang_pairs)}
        for i in range(len(layers)):
            per_layer[i] += top1_accuracy(other[i], pivot[i]) / len(pairs)
    average = sum(s[f"{lang}->{cfg.pivot}"] for lang, s in scores.items()) / len(scores)
    from ds_kd.models.modeldir import segment_ids_trained

    result = {"model": str(model_dir), "pooling": pooling.label(),
              "layer": pooled, "num_layers": num_layers, "per_lang": scores, "average": average,
              "segment_ids_trained": segment_ids_trained(model_dir)}
    if cfg.all_layers:
        result["per_layer"] = per_layer
    return result


# --- the run ----------------------------------------------------------------------------------------------------

def pair_unknown_rates(model_dir: Path | str, tokenizer, pairs: dict[str, list[tuple[str, str]]],
                       heldout: Path | str, pivot: str) -> dict[str, float]:
    """Unknown-token rate of the chosen texts of each file (:func:`text_files`) under ``tokenizer``, reported
    with a warning above 1% (:func:`ds_kd.models.vocab_check.report_unknown`)."""
    from ds_kd.models.vocab_check import report_unknown, text_unknown_rate

    texts: dict[str, list[str]] = {}
    for lang, lang_pairs in pairs.items():
        pivot_file, lang_file = text_files(Path(heldout), lang, pivot)
        texts.setdefault(str(pivot_file), []).extend(p for p, _ in lang_pairs)
        texts[str(lang_file)] = [x for _, x in lang_pairs]
    rates = {path: text_unknown_rate(tokenizer, list(dict.fromkeys(t))) for path, t in texts.items()}
    report_unknown(model_dir, rates)
    return rates


def format_table(result: dict) -> str:
    """Markdown: one row per model, X→en top-1 accuracy (%) per language and the average."""
    pivot = result["config"]["pivot"]
    langs = result["langs"]
    every = all("per_layer" in r for r in result["models"].values())
    lines = ["| model | layer | pooling | " + " | ".join(f"{lang}→{pivot}" for lang in langs) + " | avg |"
             + (" best layer (avg) |" if every else ""), "|---|---|---|" + "---|" * (len(langs) + 1 + every)]
    for name, r in result["models"].items():
        cells = [f"{100 * r['per_lang'][lang][f'{lang}->{pivot}']:.1f}" for lang in langs]
        best = ""
        if every:
            top = max(range(len(r["per_layer"])), key=r["per_layer"].__getitem__)
            best = f" {top} ({100 * r['per_layer'][top]:.1f}) |"
        lines.append(f"| {name} | {r['layer']}/{r['num_layers']} | {r['pooling']} | " + " | ".join(cells)
                     + f" | {100 * r['average']:.1f} |" + best)
    counts = ", ".join(f"{lang} {result['num_pairs'][lang]}" for lang in langs)
    lines.append(f"\nTop-1 accuracy (%) of finding the {pivot} translation of each sentence among all {pivot} "
                 f"candidates (cosine, each row pooled as its pooling column says, no fine-tuning). Pairs: {counts}. "
                 f"Layer: the pooled "
                 f"layer of each model / its number of layers (0 = embeddings)"
                 + ("; best layer: the layer whose average would have been highest (not chosen on it)." if every
                    else "."))
    return "\n".join(lines) + "\n"


def judge(result: dict, retention: dict[str, str], at_least: dict[str, str], goal: float = 0.9) -> list[dict]:
    """Claims on a retrieval result, each a dict with ``text`` (one Markdown line) and ``verdict``.

    ``retention``: student -> teacher: the student's X→pivot average as a share of the teacher's, against
    ``goal`` (holds / does not hold). ``at_least``: model A -> model B, the claim "A retrieves at least as well as
    B" (BiStil: a bilingual student against a multilingual one of the same shape and budget): agree when A's
    average is higher by more than two standard errors of the difference, disagree when lower by as much, else
    cannot tell. The standard error treats the two accuracies as independent binomial proportions over the pairs
    (``sqrt((a(1-a) + b(1-b)) / n)``, n the pairs of all languages): on the same pairs the errors are positively
    correlated, so this errs towards "cannot tell" (project rule). Raises UsageError naming a model that is not
    in ``result``."""
    models = result["models"]
    for name in [*retention, *retention.values(), *at_least, *at_least.values()]:
        if name not in models:
            raise UsageError(f"{name!r}: not among the evaluated models ({', '.join(models)})")
    n = sum(result["num_pairs"].values())
    pivot = result["config"]["pivot"]
    where = f"{'/'.join(result['langs'])}→{pivot}"
    claims = []
    for student, teacher in retention.items():
        s, t = models[student]["average"], models[teacher]["average"]
        share = s / t if t else float("nan")
        verdict = "holds" if share >= goal else "does not hold"
        claims.append({"claim": f"{student} keeps at least {goal:.0%} of {teacher}'s retrieval", "verdict": verdict,
                       "share": share, "text": f"- {student} keeps **{share:.0%}** of {teacher}'s {where} retrieval "
                                                f"({100 * s:.1f} vs {100 * t:.1f}); the claim of at least {goal:.0%}: "
                                                f"**{verdict}**."})
    for a, b in at_least.items():
        pa, pb = models[a]["average"], models[b]["average"]
        se = ((pa * (1 - pa) + pb * (1 - pb)) / max(n, 1)) ** 0.5
        diff = pa - pb
        verdict = "agree" if diff > 2 * se else "disagree" if diff < -2 * se else "cannot tell"
        claims.append({"claim": f"{a} retrieves at least as well as {b}", "verdict": verdict, "difference": diff,
                       "standard_error": se,
                       "text": f"- {a} against {b}: {100 * pa:.1f} vs {100 * pb:.1f} ({where}, {n} pairs; difference "
                               f"{100 * diff:+.1f}, two standard errors {200 * se:.1f}): the claim that {a} retrieves "
                               f"at least as well, our runs **{verdict}**."})
    return claims


def run(models: dict[str, Path | str], heldout: Path | str, out: Path | str, langs: list[str],
        cfg: RetrievalConfig = RetrievalConfig(), layers: dict[str, str] | None = None,
        retention: dict[str, str] | None = None, at_least: dict[str, str] | None = None) -> dict:
    """Evaluate every model (pooled at ``layers[name]`` where given, else ``cfg.layer``); write
    ``<out>/retrieval.json`` and ``<out>/retrieval.md`` (with the claims of :func:`judge` on ``retention`` and
    ``at_least`` under the table); return the result. UsageError for a layer or claim naming a model that is not
    evaluated (before any is)."""
    if not models:
        raise UsageError("no models to evaluate")
    from ds_kd.models.modeldir import load_tokenizer

    layers = layers or {}
    unknown = sorted(set(layers) - set(models))
    if unknown:
        raise UsageError(f"--layer-of {', '.join(unknown)}: not among the models ({', '.join(models)})")
    retention, at_least = retention or {}, at_least or {}
    for flag, named in (("--retention", retention), ("--at-least", at_least)):
        unknown = sorted({*named, *named.values()} - set(models))
        if unknown:
            raise UsageError(f"{flag} {', '.join(unknown)}: not among the models ({', '.join(models)})")
    out = Path(out)
    start = time.perf_counter()
    # every model directory is checked before the first is evaluated
    tokenizers = {name: load_tokenizer(d, f"retrieval (--models {name})") for name, d in models.items()}
    pairs = read_pairs(heldout, langs, cfg)
    result = {"config": asdict(cfg), "heldout": str(heldout), "langs": list(pairs),
              "num_pairs": {lang: len(p) for lang, p in pairs.items()},
              "unknown_token_rates": {name: pair_unknown_rates(d, tokenizers[name], pairs, heldout, cfg.pivot)
                                      for name, d in models.items()},
              "models": {name: evaluate_model(d, pairs, cfg, name, layers.get(name)) for name, d in models.items()}}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["claims"] = judge(result, retention, at_least)
    out.mkdir(parents=True, exist_ok=True)
    claims = "".join(f"{c['text']}\n" for c in result["claims"])
    atomic_write_text(out / "retrieval.md", format_table(result) + (f"\n{claims}" if claims else ""))
    atomic_write_text(out / "retrieval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
