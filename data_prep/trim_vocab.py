"""Vocabulary trimming: a checkpoint and its tokenizer cut down to the pieces that occur in a corpus.

As in BiStil and XtremeDistil: a multilingual vocabulary is most of a small model's parameters (250k pieces x
384 = 82% of multilingual-e5-small), and a corpus uses a fraction of it. ``python -m data_prep trim_vocab
--model DIR --corpus PATH... --out DIR`` tokenizes the corpus with the checkpoint's tokenizer, keeps the ids that
occur plus every special/added token (in the old order, so ``<s> <pad> </s> <unk>`` keep ids 0-3), and writes:

- the tokenizer with only those pieces (Unigram: pieces and scores, and the lowest-scoring piece is kept too,
  since the unknown-character penalty is the lowest score minus 10; WordPiece: the vocabulary; BPE: the
  vocabulary and every merge on the way to a kept token), added tokens and post-processor ids renumbered;
- the checkpoint with the kept rows of every vocabulary-sized tensor (word embeddings; MLM decoder and bias where
  present) and ``vocab_size`` in ``config.json`` updated; every other weight unchanged;
- what it was trimmed to (source model, corpus files, languages of the TSV lines and lines per language, vocabulary
  size before and after) in ``config.json`` under ``ds_kd.trimmed_to`` and in ``manifest.json``: every command
  that feeds text to the model names it when that text comes out with unknown tokens (:mod:`ds_kd.models.vocab_check`).

**A frequency threshold** (``--min-freq P``, BiStil's pair vocabulary: AlanAnsell/bistil ``trim_vocab.py``)
keeps a piece only when its relative frequency in at least one language's own text is at least P (BiStil:
``max(p_src, p_tgt) >= 1e-6``), counted per language of the TSV lines (``--langs`` keeps the lines of those
languages only, e.g. the pair's), never pooled: a piece frequent in the smaller language alone is kept. The
default 0 keeps every piece that occurs. The pieces kept per language are reported and recorded.

Tokenizing the corpus with the trimmed tokenizer gives the renumbered ids of the full one (checked on the
corpus's first lines before anything is written), so the trimmed model gives the same outputs on that text.
Corpus paths: text files (one sentence per line; ``.txt``, or ``.gz``/``.bz2``/``.xz``), TSV files of the
corpus mix (``lang<TAB>sentence``, as ``<corpus>/sample/*.tsv``), or directories searched for them. For exact
coverage of the shards, give the corpus's ``sample/`` directory (the text the shards are cut from). With a
threshold above 0 a rare piece is dropped and the text holding it tokenizes differently (into smaller pieces,
or ``<unk>``): the check then runs on the lines made of kept pieces only, and the lines that are not are counted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.read import open_binary
from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, lang_code
from ds_kd.manifest import finished_output, write_manifest
from ds_kd.models.modeldir import DS_KD_KEY
from ds_kd.models.vocab_check import TRIMMED_KEY

TEXT_FILES = (".txt", ".tsv", ".txt.gz", ".txt.bz2", ".txt.xz", ".tsv.gz", ".tsv.bz2", ".tsv.xz")
VOCAB_TENSORS = ("word_embeddings.weight", "predictions.bias", "predictions.decoder.weight",
                 "predictions.decoder.bias")
CHECK_LINES = 20000
BATCH_LINES = 10000


def corpus_files(paths: list[Path]) -> list[Path]:
    """The text and TSV files of ``paths`` (files, or directories searched recursively), sorted per path."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_FILES)
                            and not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"{path}: --corpus path does not exist")
    if not files:
        raise FileNotFoundError(f"no text files (.txt/.tsv, optionally .gz/.bz2/.xz) under {[str(p) for p in paths]}")
    return files


def corpus_lines(files: list[Path], langs: list[str] | None = None) -> Iterator[tuple[str | None, str]]:
    """(language, line) of every non-empty line: in a ``.tsv`` the code before the first tab and the text after
    it; in a text file no language (None) and the whole line. ``langs``: only the TSV lines of these languages
    (UsageError for a text file, whose lines have no language)."""
    if langs:
        untagged = [str(p) for p in files if ".tsv" not in p.name]
        if untagged:
            raise UsageError(f"--langs keeps the TSV lines of those languages; {untagged[0]} is a text file without "
                             f"languages: give the corpus's sample/ directory (lang<TAB>sentence lines)")
    for path in files:
        tsv = ".tsv" in path.name
        with open_binary(path) as f:
            for raw in f:
                line, lang = raw.decode("utf-8", errors="replace").rstrip("\r\n"), None
                if tsv and "\t" in line:
                    lang, line = line.split("\t", 1)
                if line.strip() and (not langs or lang in langs):
                    yield lang, line


def token_counts(tok, lines: Iterator[tuple[str | None, str]]) -> tuple[dict[str | None, np.ndarray], int, list[str],
                                                                       Counter]:
    """(token counts per id ``[V]`` per language (None: lines without one), number of lines, the first
    :data:`CHECK_LINES` lines, lines per language of the TSV files)."""
    size = tok.get_vocab_size(with_added_tokens=True)
    counts: dict[str | None, np.ndarray] = {}
    num_lines = 0
    head: list[str] = []
    batch: list[tuple[str | None, str]] = []
    langs: Counter = Counter()

    def flush():
        ids: dict[str | None, list] = {}
        for (lang, _), enc in zip(batch, tok.encode_batch([line for _, line in batch], add_special_tokens=False)):
            ids.setdefault(lang, []).append(np.asarray(enc.ids, dtype=np.int64))
        for lang, parts in ids.items():
            here = counts.setdefault(lang, np.zeros(size, dtype=np.int64))
            here += np.bincount(np.concatenate(parts), minlength=size)
        batch.clear()

    for lang, line in lines:
        batch.append((lang, line))
        num_lines += 1
        if lang is not None:
            langs[lang] += 1
        if len(head) < CHECK_LINES:
            head.append(line)
        if len(batch) == BATCH_LINES:
            flush()
    flush()
    return counts, num_lines, head, langs


def frequent_ids(counts: dict[str | None, np.ndarray], min_freq: float) -> tuple[np.ndarray, dict[str, int]]:
    """(ids kept, ascending; pieces kept per language): an id is kept when it occurs and its relative frequency in
    at least one language's own text (its count over that language's token count) is at least ``min_freq``:
    BiStil's ``max(p_src, p_tgt) >= 1e-6`` (AlanAnsell/bistil, ``trim_vocab.py``). Per language, never pooled: a
    piece frequent only in the smaller language is kept however rare it is in the text as a whole. ``counts``
    maps a language (None: lines without one, reported as ``"-"``) to its token counts per id ``[V]``;
    ``min_freq`` 0 keeps every id that occurs."""
    size = len(next(iter(counts.values()))) if counts else 0
    keep = np.zeros(size, dtype=bool)
    per_lang = {}
    for lang, counts_V in counts.items():
        here = (counts_V > 0) & (counts_V / max(int(counts_V.sum()), 1) >= min_freq)
        per_lang["-" if lang is None else lang] = int(here.sum())
        keep |= here
    return np.flatnonzero(keep), dict(sorted(per_lang.items()))


# ---- the tokenizer ----------------------------------------------------------------------------------------

def kept_ids(spec: dict, used: np.ndarray) -> list[int]:
    """Used ids + added/special tokens + what the model type needs to tokenize the same way, ascending."""
    keep = set(int(i) for i in used) | {int(t["id"]) for t in spec.get("added_tokens", [])}
    model = spec["model"]
    if model["type"] == "Unigram":
        scores = [s for _, s in model["vocab"]]
        keep.add(int(np.argmin(scores)))  # unknown-character penalty = lowest score - 10: keep it unchanged
        if model.get("unk_id") is not None:
            keep.add(int(model["unk_id"]))
    elif model["type"] in ("WordPiece", "BPE"):
        vocab = model["vocab"]
        if model.get("unk_token") in vocab:
            keep.add(vocab[model["unk_token"]])
        if model["type"] == "BPE":
            keep |= merge_closure(model, keep)
    else:
        raise UsageError(f"tokenizer model {model['type']!r} is not trimmed (Unigram, WordPiece and BPE are)")
    return sorted(keep)


def merge_parts(model: dict) -> list[tuple[str, str, str]]:
    """(left, right, merged) of every BPE merge, in rank order."""
    prefix = model.get("continuing_subword_prefix") or ""
    out = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        out.append((left, right, left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)))
    return out


def merge_closure(model: dict, keep: set[int]) -> set[int]:
    """Ids of every token a kept BPE token is merged from, recursively (BPE builds tokens through them)."""
    vocab = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    producers: dict[str, list[tuple[str, str]]] = {}
    for left, right, merged in merge_parts(model):
        producers.setdefault(merged, []).append((left, right))
    todo, closed = [by_id[i] for i in keep if i in by_id], set()
    while todo:
        token = todo.pop()
        if token in closed:
            continue
        closed.add(token)
        for pair in producers.get(token, []):
            todo += [p for p in pair if p in vocab]
    return {vocab[t] for t in closed}


def remap_processor(proc: dict | None, new_id: dict[int, int]) -> dict | None:
    """The post-processor with its special token ids renumbered (Template, Roberta, Bert, Sequence)."""
    if proc is None:
        return None
    proc = json.loads(json.dumps(proc))
    if proc["type"] == "Sequence":
        proc["processors"] = [remap_processor(p, new_id) for p in proc["processors"]]
    elif proc["type"] == "TemplateProcessing":
        for special in proc.get("special_tokens", {}).values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    elif proc["type"] in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            proc[key] = [proc[key][0], new_id[proc[key][1]]]
    return proc


def trimmed_spec(spec: dict, keep: list[int]) -> dict:
    """``tokenizer.json`` content with only the ``keep`` ids, renumbered 0..len(keep)-1 in the old order."""
    new_id = {old: new for new, old in enumerate(keep)}
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    if model["type"] == "Unigram":  # ids past the pieces are tokens added after training (added_tokens only)
        model["vocab"] = [model["vocab"][i] for i in keep if i < len(model["vocab"])]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        by_id = {i: t for t, i in model["vocab"].items()}
        model["vocab"] = {by_id[old]: new for new, old in enumerate(keep) if old in by_id}
        if model["type"] == "BPE":
            kept = set(model["vocab"])
            model["merges"] = [m for m, (left, right, merged) in zip(model["merges"], merge_parts(model))
                               if merged in kept and left in kept and right in kept]
    for token in spec.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    spec["post_processor"] = remap_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    return spec


def check_same_tokens(full, trimmed, keep: list[int], lines: list[str]) -> int:
    """Raise ValueError unless ``trimmed`` gives the renumbered ids of ``full`` on every line made of kept pieces;
    returns the number of lines holding a piece that was dropped (none when every piece that occurs is kept)."""
    new_id = np.full(full.get_vocab_size(with_added_tokens=True), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    dropped = 0
    for a, b, line in zip(full.encode_batch(lines), trimmed.encode_batch(lines), lines):
        if (new_id[a.ids] < 0).any():
            dropped += 1
        elif new_id[a.ids].tolist() != b.ids:
            raise ValueError(f"the trimmed tokenizer tokenizes {line[:80]!r} differently ({a.tokens} vs {b.tokens})")
    return dropped


def write_tokenizer_files(src: Path, out: Path, spec: dict, keep: list[int]) -> None:
    """tokenizer.json plus the transformers files, with added-token ids renumbered; vocab.txt rewritten for
    WordPiece; files of the full vocabulary (sentencepiece models, vocab.json/merges.txt) are not carried."""
    new_id = {old: new for new, old in enumerate(keep)}
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = src / "tokenizer_config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if (src / "special_tokens_map.json").is_file():
        shutil.copy2(src / "special_tokens_map.json", out / "special_tokens_map.json")
    if (src / "added_tokens.json").is_file():
        added = json.loads((src / "added_tokens.json").read_text(encoding="utf-8"))
        (out / "added_tokens.json").write_text(json.dumps({k: new_id[v] for k, v in added.items()}),
                                               encoding="utf-8")
    if spec["model"]["type"] == "WordPiece" and (src / "vocab.txt").is_file():
        by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")


# ---- the checkpoint ---------------------------------------------------------------------------------------

def trim_checkpoint(model_dir: Path, out: Path, keep: list[int], tokenizer_size: int, trimmed_to: dict) -> dict:
    """Write ``out/model.safetensors`` and ``out/config.json`` with the kept vocabulary rows and ``trimmed_to``
    (what the vocabulary was trimmed to) as ``config.json``'s ``ds_kd.trimmed_to``; returns counts."""
    import torch
    from safetensors.torch import save_file

    from ds_kd.models.model import load_hf_state_dict

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rows = int(config["vocab_size"])
    if rows < tokenizer_size:
        raise UsageError(f"{model_dir / 'config.json'}: {rows} vocabulary rows for a tokenizer of {tokenizer_size} "
                         f"tokens: not the checkpoint of this tokenizer")
    state = load_hf_state_dict(model_dir)
    index = torch.tensor(keep, dtype=torch.long)
    trimmed, cut = {}, []
    for name, t in state.items():
        if name.endswith(VOCAB_TENSORS) and t.shape[0] == rows:
            trimmed[name] = t.index_select(0, index).contiguous()
            cut.append(name)
        else:
            trimmed[name] = t.contiguous()
    if not any(n.endswith("word_embeddings.weight") for n in cut):
        raise UsageError(f"{model_dir}: no word_embeddings.weight with {rows} rows found to trim")
    save_file(trimmed, str(out / "model.safetensors"), metadata={"format": "pt"})
    new_id = {old: new for new, old in enumerate(keep)}
    config["vocab_size"] = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if config.get(key) is not None:
            config[key] = new_id.get(config[key])
    config[DS_KD_KEY] = {**config.get(DS_KD_KEY, {}), TRIMMED_KEY: trimmed_to}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"embedding_rows_before": rows, "embedding_rows_after": len(keep), "trimmed_tensors": cut,
            "num_parameters_before": sum(t.numel() for t in state.values()),
            "num_parameters_after": sum(t.numel() for t in trimmed.values())}


def trim(model_dir: Path, corpus: list[Path], out: Path, tokenizer_dir: Path | None = None, min_freq: float = 0.0,
         langs: list[str] | None = None, overwrite: bool = False) -> dict:
    """Trim ``model_dir`` (and ``tokenizer_dir``, default the same directory) to the pieces of ``corpus`` (the
    lines of ``langs`` only, when given) whose relative frequency in some language reaches ``min_freq`` (see
    :func:`frequent_ids`). An ``out`` finished with the same settings is skipped; with other settings it raises
    FileExistsError naming them unless ``overwrite`` (:func:`ds_kd.manifest.finished_output`). Raises
    ValueError/FileNotFoundError naming the bad input, UsageError for a threshold outside [0, 1), ``langs`` that
    select no line, or a threshold that no piece reaches."""
    if not 0 <= min_freq < 1:
        raise UsageError(f"--min-freq {min_freq}: a relative frequency in [0, 1) (BiStil: 1e-6; 0 keeps every "
                         f"piece that occurs)")
    from tokenizers import Tokenizer

    from ds_kd.data.tokenizer_files import encoding_only, read_tokenizer_json

    tokenizer_dir = tokenizer_dir or model_dir
    settings = {"model": str(model_dir.resolve()), "tokenizer": str(tokenizer_dir.resolve()),
                "corpus": sorted(str(c.resolve()) for c in corpus), "min_freq": min_freq,
                "langs": sorted(langs) if langs else None}
    done = finished_output(out, "vocabulary trim", settings, overwrite=overwrite)
    if done is not None:
        print(f"[trim_vocab] {out}: finished with the same settings, skipped (--overwrite rebuilds it)", flush=True)
        return done
    tok_file = tokenizer_dir / "tokenizer.json"
    for needed in (tok_file, model_dir / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found (--model must be a checkpoint directory with a "
                                    f"tokenizer.json, or give --tokenizer)")
    full = read_tokenizer_json(tok_file)  # padding and truncation off (ds_kd.data.tokenizer_files)
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    files = corpus_files(corpus)
    counts, num_lines, head, lines_per_lang = token_counts(full, corpus_lines(files, langs))
    if langs and not num_lines:
        raise UsageError(f"--langs {' '.join(langs)}: no line of these languages in {[str(f) for f in files]}")
    used, kept_per_lang = frequent_ids(counts, min_freq)
    if not len(used):
        highest = max((float(c.max()) / max(int(c.sum()), 1) for c in counts.values()), default=0.0)
        raise UsageError(f"--min-freq {min_freq:g}: no piece of {[str(f) for f in files]} reaches it (the most "
                         f"frequent piece of a language: {highest:.3g} of its tokens); lower --min-freq")
    keep = kept_ids(spec, used)
    new_spec = trimmed_spec(spec, keep)
    dropped_lines = check_same_tokens(full, encoding_only(Tokenizer.from_str(json.dumps(new_spec))), keep, head)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trimmed_to = {"model": str(model_dir.resolve()), "corpus": [str(f.resolve()) for f in files],
                  "languages": sorted(lines_per_lang), "lines_per_language": dict(sorted(lines_per_lang.items())),
                  "vocab_before": full.get_vocab_size(with_added_tokens=True), "vocab_after": len(keep),
                  "min_freq": min_freq, "pieces_kept_per_language": kept_per_lang}
    sizes = trim_checkpoint(model_dir, tmp, keep, full.get_vocab_size(with_added_tokens=True), trimmed_to)
    write_tokenizer_files(tokenizer_dir, tmp, new_spec, keep)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    num_tokens = int(sum(c.sum() for c in counts.values()))
    per_lang = ", ".join(f"{lang} {n}" for lang, n in kept_per_lang.items())
    print(f"[trim_vocab] {full.get_vocab_size(with_added_tokens=True)} -> {len(keep)} tokens "
          f"({num_lines} lines, {num_tokens} tokens of corpus; min frequency {min_freq:g}, pieces reaching it per "
          f"language: {per_lang}); parameters {sizes['num_parameters_before']} -> {sizes['num_parameters_after']}",
          flush=True)
    return write_manifest(out, "trim_vocab", settings=settings, **trimmed_to, tokenizer=str(tok_file.resolve()), num_lines=num_lines,
                          num_tokens=num_tokens, checked_lines=len(head), checked_lines_with_dropped_pieces=dropped_lines,
                          tokenizer_model=spec["model"]["type"], **sizes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep trim_vocab", formatter_class=HelpFormatter,
                                description="Trim a checkpoint and its tokenizer to the pieces that occur in a corpus "
                                            "(plus the special tokens); the trimmed model gives the same outputs on "
                                            "that corpus's text.")
    p.add_argument("--model", type=Path, required=True,
                   help="HF BERT checkpoint directory (config.json, weights, and tokenizer.json unless --tokenizer)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--corpus", type=Path, nargs="+", required=True,
                   help="text (.txt, one sentence per line) or corpus-mix TSV (lang<TAB>sentence) files, plain or "
                        ".gz/.bz2/.xz, or directories holding them, e.g. <corpus>/sample")
    p.add_argument("--out", type=Path, required=True, help="trimmed checkpoint directory to write")
    p.add_argument("--min-freq", type=float, default=0.0,
                   help="keep a piece when its relative frequency in at least one language's own text reaches this "
                        "(BiStil's pair vocabulary: 1e-6); 0 keeps every piece that occurs (default: 0)")
    add_list_argument(p, "--langs", default=None, metavar="LANG", item_type=lang_code,
                      help="only the TSV lines of these languages, space- or comma-separated, e.g. en de for a "
                           "pair (default: every line)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an --out finished with other settings (default: such an --out is refused, naming "
                        "the settings that differ; one with the same settings is skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trim(args.model, args.corpus, args.out, args.tokenizer, args.min_freq, args.langs, args.overwrite)
    except (UsageError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
