"""``python -m data_prep corpus``: raw text per language -> sampled mix -> BPE tokenizer -> WebDataset shards.

Each step writes one directory under ``--out`` with a ``manifest.json`` written last::

    <out>/read/        <lang>.txt: normalised sentences, one per line; drop counts per language
    <out>/sample/      train.tsv (shuffled mix), val.tsv: "lang<TAB>sentence"; n_i, p_i, q_i, sampled counts
    <out>/tokenizer/   tokenizer.json + transformers files; special token ids and tokens by role, and every
                       special id (``all_special_ids``: added special tokens such as language tags too)
    <out>/shards/      train/shard-NNNNNN.tar, val/shard-NNNNNN.tar: blocks of sentences (schema: ds_kd.schema);
                       special token ids by role and ``all_special_ids``

A step whose manifest exists with the same settings is skipped; with other settings it is refused, naming
them, unless ``--overwrite`` (then it and every later step are rebuilt; a corpus directory holds one corpus). An interrupted shard step resumes at the first unwritten shard.
Manifests of an older version without the tokenizer's special token ids get them on a re-run with the same
flags (:func:`record_special_ids`), without rewriting the shards.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, lang_code
from ds_kd.manifest import finished_output, has_manifest, read_manifest, write_manifest
from ds_kd.schema import LANG_CODE_FORM, LANGS, MAX_LANGS, SCHEMA_VERSION, check_langs, check_tokenizer_matches
from ds_kd.data.tokenizer_files import vocab_casing

from data_prep.bpe import BpeConfig, describe, save_tokenizer, train_bpe
from data_prep.existing_tokenizer import LOWERCASE_FLAGS, copy_existing
from data_prep.read import DROP_REASONS, ReadConfig, check_lang_dir, read_language_job
from data_prep.sample import TRAIN_FILE, SampleConfig, write_mix
from data_prep.shard import PROGRESS_DIR, ShardConfig, write_shards

SHARD_SPECIAL_FIELDS = ("special_token_ids", "all_special_ids")
"""The tokenizer's special ids the shards manifest carries: by role, and every special id (never masked)."""
SPECIAL_FIELDS = (*SHARD_SPECIAL_FIELDS, "special_tokens")


@dataclass(frozen=True)
class CorpusConfig:
    """Everything the corpus command needs; the command line maps one flag to each field."""

    raw: Path
    """Directory with one subdirectory of text per language: <raw>/<lang>/."""
    out: Path
    """Corpus directory to write (read/, sample/, tokenizer/, shards/)."""
    langs: tuple[str, ...] = LANGS
    """Language codes to read (any codes of the form ``ds_kd.schema.LANG_CODE``, each a directory <raw>/<code>/;
    default: the paper's eight); the shards manifest's ``lang_codes`` lists them in this order."""
    read: ReadConfig = ReadConfig()
    sample: SampleConfig = SampleConfig()
    bpe: BpeConfig = BpeConfig()
    tokenizer: Path | None = None
    """Existing tokenizer directory (tokenizer.json or vocab.txt) to use instead of learning BPE."""
    lowercase: bool | None = None
    """Whether a brought ``vocab.txt`` (without tokenizer.json) lowercases; None: what its directory says
    (``ds_kd.data.tokenizer_files.vocab_casing``), and refused when nothing does."""
    shard: ShardConfig = ShardConfig()
    overwrite: bool = False
    """Rebuild a step finished with other settings, and every step after it (else refused, naming them)."""


@dataclass
class StepRule:
    """How a step treats a finished output: the re-run rule (:func:`ds_kd.manifest.finished_output`) with a
    cascade: once a step runs in this command, every later step runs again (its input changed)."""
    overwrite: bool = False
    """--overwrite: rebuild a step finished with other settings (else such a step is refused, naming them); a
    step with the same settings before it is kept."""
    rebuilt: bool = False
    """A step ran in this command."""


def run_step(directory: Path, stage: str, settings: dict, work: Callable[[], dict], rule: StepRule) -> dict:
    """Run ``work`` unless ``directory`` already holds a finished step with the same settings and no earlier step
    ran in this command. Raises FileExistsError naming the settings that differ (without ``rule.overwrite``)."""
    if not rule.rebuilt:
        try:
            done = finished_output(directory, stage, settings, overwrite=False)
        except FileExistsError:
            if not rule.overwrite:
                raise
            done = None
        if done is not None:
            print(f"[corpus] {stage}: done already ({directory}), skipped", flush=True)
            return done
    if directory.exists() and (rule.rebuilt or has_manifest(directory)):  # not an interrupted step to resume
        why = "an earlier step ran again" if rule.rebuilt else "--overwrite"
        print(f"[corpus] {stage}: rebuilding {directory} ({why})", flush=True)
        shutil.rmtree(directory)
    rule.rebuilt = True
    print(f"[corpus] {stage} -> {directory}", flush=True)
    return write_manifest(directory, stage, settings=settings, **work())


def read_step(config: CorpusConfig, rule: StepRule) -> dict:
    check_langs(config.langs)
    for lang in config.langs:
        check_lang_dir(config.raw / lang)  # fail before any work, naming the directory
    out = config.out / "read"
    settings = {"raw": str(config.raw.resolve()), "langs": list(config.langs), **asdict(config.read)}

    def work() -> dict:
        out.mkdir(parents=True, exist_ok=True)
        jobs = [(lang, str(config.raw / lang), str(out / f"{lang}.txt"), config.read) for lang in config.langs]
        num_procs = min(len(jobs), os.cpu_count() or 1)
        with mp.get_context("spawn").Pool(num_procs) as pool:
            counts = dict(pool.imap(read_language_job, jobs))
        return {"languages": {lang: counts[lang] for lang in config.langs}}

    return run_step(out, "corpus.read", settings, work, rule)


def sample_step(config: CorpusConfig, read_manifest_: dict, rule: StepRule) -> dict:
    out = config.out / "sample"
    settings = asdict(config.sample)

    def work() -> dict:
        return write_mix(config.out / "read", read_manifest_["languages"], out, config.sample)

    return run_step(out, "corpus.sample", settings, work, rule)


def tokenizer_step(config: CorpusConfig, rule: StepRule) -> dict:
    out = config.out / "tokenizer"
    source = str(config.tokenizer.resolve()) if config.tokenizer else "bpe"
    settings = {"source": source, **(asdict(config.bpe) if not config.tokenizer else {})}
    if config.tokenizer and config.lowercase is not None:
        settings["lowercase"] = config.lowercase

    fresh: dict = {}

    def work() -> dict:
        added = {}
        if config.tokenizer:
            added = copy_existing(config.tokenizer, out, config.lowercase)
        else:
            save_tokenizer(train_bpe(config.out / "sample" / TRAIN_FILE, config.bpe), out)
        fresh.update(describe(out))
        return {**fresh, **added}

    manifest = run_step(out, "corpus.tokenizer", settings, work, rule)
    fresh = fresh or describe(out)  # a finished step: check its manifest has the special ids (older ones lack them)
    return record_special_ids(out, manifest, {k: fresh[k] for k in SPECIAL_FIELDS})


def record_special_ids(directory: Path, manifest: dict, fields: dict) -> dict:
    """Write ``fields`` (the tokenizer's special ids) into a finished step's manifest that lacks or differs
    in them: a manifest of an older version recorded none for a brought tokenizer, and the shards reader
    refuses it. The step's other files are unchanged."""
    if all(manifest.get(k) == v for k, v in fields.items()):
        return manifest
    print(f"[corpus] {directory / 'manifest.json'}: recording the tokenizer's special token ids "
          f"{fields['special_token_ids']} (was {manifest.get('special_token_ids')})", flush=True)
    kept = {k: v for k, v in manifest.items() if k not in ("stage", "finished_at", "code_version")}
    return write_manifest(directory, manifest["stage"], **{**kept, **fields})


def shard_step(config: CorpusConfig, sample_manifest: dict, tok_manifest: dict, rule: StepRule) -> dict:
    out = config.out / "shards"
    settings = {"schema_version": SCHEMA_VERSION, "block_size": config.shard.block_size,
                "shard_mb": config.shard.shard_mb}
    if has_manifest(out) and not rule.rebuilt:
        version = read_manifest(out).get("schema_version", 1)
        if version != SCHEMA_VERSION and not rule.overwrite:
            raise UsageError(f"{out / 'manifest.json'}: shards of schema version {version}, this code writes and "
                             f"reads version {SCHEMA_VERSION}: run the same command again with --overwrite to "
                             f"rewrite them (the earlier steps are kept)")
        if version == SCHEMA_VERSION:
            check_tokenizer_matches(out, config.out / "tokenizer")
    sizes = {"train": sample_manifest["total"],
             "val": sum(lang["num_val"] for lang in sample_manifest["languages"].values())}

    def work() -> dict:
        result = write_shards(config.out / "sample", config.out / "tokenizer", out, tok_manifest["tokenizer_hash"],
                              tok_manifest["vocab_size"], config.shard, sizes, list(sample_manifest["languages"]))
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # the manifest now holds the counts
        return {"languages": list(sample_manifest["languages"]),
                "vocab_size": tok_manifest["vocab_size"], "tokenizer_hash": tok_manifest["tokenizer_hash"],
                **{k: tok_manifest[k] for k in SHARD_SPECIAL_FIELDS}, **result}

    manifest = run_step(out, "corpus.shards", settings, work, rule)
    return record_special_ids(out, manifest, {k: tok_manifest[k] for k in SHARD_SPECIAL_FIELDS})


def run(config: CorpusConfig) -> dict:
    """Run the four steps (skipping finished ones) and return their manifests by step name. Raises UsageError,
    before any step writes, for ``lowercase`` set where no ``vocab.txt`` alone is brought (it would be ignored)
    and for a ``vocab.txt`` alone whose casing neither ``lowercase`` nor its directory states."""
    if config.lowercase is not None and (config.tokenizer is None or (config.tokenizer / "tokenizer.json").is_file()):
        raise UsageError("--lowercase/--no-lowercase applies only to a --tokenizer directory holding a vocab.txt "
                         "without tokenizer.json (a tokenizer.json's normaliser decides the casing); drop the flag")
    if config.tokenizer is not None and not (config.tokenizer / "tokenizer.json").is_file():
        vocab_casing(config.tokenizer, config.lowercase, LOWERCASE_FLAGS)  # refused before any step writes
    rule = StepRule(overwrite=config.overwrite)
    read_m = read_step(config, rule)
    sample_m = sample_step(config, read_m, rule)
    tok_m = tokenizer_step(config, rule)
    shards_m = shard_step(config, sample_m, tok_m, rule)
    manifests = {"read": read_m, "sample": sample_m, "tokenizer": tok_m, "shards": shards_m}
    print(format_summary(manifests), flush=True)
    return manifests


def format_summary(m: dict) -> str:
    head = ["lang", "read", *DROP_REASONS, "p", "q", "train", "val"]
    rows = [head]
    for lang, c in m["read"]["languages"].items():
        s = m["sample"]["languages"][lang]
        rows.append([lang, c["num_sentences"], *(c["dropped"][r] for r in DROP_REASONS),
                     f"{s['p']:.3f}", f"{s['q']:.3f}", s["num_sampled"], s["num_val"]])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows]
    sh = m["shards"]
    lines.append(f"vocab {sh['vocab_size']}; train {sh['splits']['train']['num_samples']} sentences in "
                 f"{len(sh['splits']['train']['shards'])} shards, val {sh['splits']['val']['num_samples']} in "
                 f"{len(sh['splits']['val']['shards'])}; shard step {sh.get('sentences_per_s', '?')} sentences/s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep corpus", formatter_class=HelpFormatter,
        description="Raw text per language -> upsampled language mix -> BPE tokenizer -> WebDataset shards. "
                    "Each step writes <out>/<step>/manifest.json last and is skipped when it exists with the same "
                    "settings (with other settings it is refused, naming them, unless --overwrite).")
    p.add_argument("--raw", type=Path, required=True, help="directory with <raw>/<lang>/ text files per language "
                   "(.txt/.gz/.bz2/.xz, one sentence or paragraph per line, or WikiExtractor output)")
    p.add_argument("--out", type=Path, required=True, help="corpus directory to write")
    add_list_argument(p, "--langs", default=list(LANGS), metavar="LANG", item_type=lang_code,
                      help=f"languages, space- or comma-separated: any codes of {LANG_CODE_FORM}, at most "
                           f"{MAX_LANGS}, each read from <raw>/<code>/; validation perplexity is reported per code")
    p.add_argument("--max-chars", type=int, default=256, help="drop sentences longer than this (default: %(default)s)")
    p.add_argument("--spoken", action="store_true", help="spoken form: lower-case and strip punctuation (after NFKC)")
    p.add_argument("--alpha", type=float, default=0.5, help="mix exponent: q_i ~ p_i^alpha (default: %(default)s)")
    p.add_argument("--total", type=int, default=None,
                   help="sentences in the training mix (default: as many as the training sentences read)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and the shuffle (default: %(default)s)")
    p.add_argument("--val-per-lang", type=int, default=1000,
                   help="validation sentences held out per language, at most 10%% of it (default: %(default)s)")
    p.add_argument("--shuffle-bucket-mb", type=float, default=256,
                   help="size of one shuffle bucket in MiB; bounds the shuffle's memory (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=120_000, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--bpe-sentences", type=int, default=5_000_000,
                   help="learn BPE on at most this many sentences of the mix (default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE minimum merge frequency (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="existing tokenizer directory (tokenizer.json, transformers files or a BERT vocab.txt) "
                        "to use instead of BPE; its own special token ids (pad, unk, cls, sep, mask) are kept "
                        "and recorded; one without pad, mask, cls or sep is refused (default: learn BPE)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="with a --tokenizer that is a BERT vocab.txt alone: --lowercase for an uncased vocabulary, "
                        "--no-lowercase for a cased one (default: what its tokenizer_config.json or config.json "
                        "says, do_lower_case or a name with 'cased'/'uncased', then the directory's name; "
                        "refused when nothing says it)")
    p.add_argument("--block-size", type=int, default=ShardConfig.block_size,
                   help="sentences per block, the unit of a shard that is read at once")
    p.add_argument("--shard-mb", type=float, default=ShardConfig.shard_mb,
                   help="a shard file is closed once it holds this many MiB")
    p.add_argument("--num-workers", type=int, default=0, help="tokenizing processes; 0: one per core (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a step finished with other settings and every step after it (default: refused, "
                        "naming the settings that differ; steps with the same settings are skipped)")
    return p


def config_from_args(args: argparse.Namespace) -> CorpusConfig:
    langs = tuple(args.langs)
    return CorpusConfig(
        raw=args.raw, out=args.out, langs=langs,
        read=ReadConfig(max_chars=args.max_chars, spoken=args.spoken),
        sample=SampleConfig(alpha=args.alpha, total=args.total, seed=args.seed, val_per_lang=args.val_per_lang,
                            bucket_mb=args.shuffle_bucket_mb),
        bpe=BpeConfig(vocab_size=args.vocab_size, max_sentences=args.bpe_sentences,
                      min_frequency=args.min_frequency, spoken=args.spoken),
        tokenizer=args.tokenizer, lowercase=args.lowercase,
        shard=ShardConfig(block_size=args.block_size, shard_mb=args.shard_mb, num_workers=args.num_workers),
        overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(config_from_args(args))
    except (UsageError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

