"""Benchmark of the block shards against the formats users pick instead, side by side in one run.

``python benchmarks/bench_shards.py [--base-lines 20000] [--scales 1 10] [--work DIR]`` generates text in the eight
languages at each scale (1x: about the default corpus, a 200,000-sentence training mix with an 8,000-token
BPE vocabulary; 10x: ten times the input and the mix), runs the corpus command on it (recording the peak
memory of its process tree), and then, for the same training tokens:

- **bytes per token on disk**: our shards (uint16 ids at this vocabulary, and rewritten with uint32 ids as a
  vocabulary over 65,536 would need), MosaicML MDS (``mosaicml-streaming``, columns ``tokens: ndarray:uint32``
  and ``lang: uint8``, no compression), Hugging Face ``datasets`` Arrow (``save_to_disk``, ``tokens``
  a sequence of uint32, ``lang`` uint8), and the old layout of one sentence per tar member (``ids.npy`` int32
  + ``lang.txt``, schema version 1);
- **read throughput**: sentences per second into masked, padded batches of 32 with 2 DataLoader workers, ours
  (:class:`ds_kd.data.reader.ShardReader`) and MDS's ``StreamingDataset`` on the local shards (shuffled, with the same
  masking and padding), over the first ``--read-sentences`` sentences;
- **time to the first batch** of a reader resumed at sentence 10^6 and of a fresh one (medians of 3).

Goals (the shards issue): ours <= 1.05x MDS and <= 0.1x the old layout in bytes per token; read throughput
ours / MDS >= 1; first batch at 10^6 / from 0 <= 2; corpus command peak memory at 10x <= 1.25x that at 1x.
Exit status 1 when a goal is missed.

``mosaicml-streaming`` pins numpy < 2.2 and transformers < 5 and pulls torchvision and cloud SDKs: install it
without dependencies (``make bench-shards`` does). It imports its vision datasets (torchvision) at package
import; where no torchvision matches the installed torch, they are replaced by empty stand-ins here (this
benchmark uses none of them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_kd.schema import LANGS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script bench_corpus.py
from bench_corpus import LANG_WEIGHTS, peak_rss_of  # noqa: E402

GOALS = {"bytes_vs_mds": 1.05, "bytes_vs_old": 0.1, "read_vs_mds": 1.0, "seek_ratio": 2.0, "memory_growth": 0.25}


# ---- the corpus -----------------------------------------------------------------------------------------

def make_corpus(work: Path, scale: int, args) -> dict:
    """Generate raw text, run the corpus command on it; returns its shards manifest, timing and peak memory."""
    from data_prep.textgen import write_raw

    raw, out = work / f"raw-{scale}x", work / f"corpus-{scale}x"
    shutil.rmtree(out, ignore_errors=True)
    lines = {lang: args.base_lines * LANG_WEIGHTS[lang] * scale // 8 for lang in LANGS}
    write_raw(raw, lines, seed=scale)
    argv = [sys.executable, "-m", "data_prep", "corpus", "--raw", str(raw), "--out", str(out),
            "--total", str(args.total * scale), "--vocab-size", str(args.vocab_size), "--bpe-sentences",
            str(args.bpe_sentences), "--val-per-lang", "300", "--shuffle-bucket-mb", "16"]
    print(f"[bench] {scale}x: corpus command on {sum(lines.values())} paragraph lines", flush=True)
    status, wall, peak = peak_rss_of(argv, work / f"corpus-{scale}x.log")
    if status != 0:
        raise SystemExit(f"corpus command failed (exit {status}); see {work / f'corpus-{scale}x.log'}")
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    return {"dir": out, "manifest": manifest, "wall_s": wall, "peak_mib": peak / 2**20}


def iter_train_blocks(shard_dir: Path):
    """(block index, tokens, offsets, langs) of every training block, in shard order."""
    from ds_kd.data.shards import BlockTable, read_shards_manifest

    table = BlockTable.open(shard_dir, "train", read_shards_manifest(shard_dir))
    for b in range(table.num_blocks):
        yield (b, *table.read(b))


def iter_sentences(shard_dir: Path):
    for _, tokens, offsets, langs in iter_train_blocks(shard_dir):
        for i in range(len(langs)):
            yield tokens[offsets[i]:offsets[i + 1]], int(langs[i])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- the formats -------------------------------------------------------------------------------------

def write_ours_uint32(shard_dir: Path, out: Path, vocab_size: int) -> int:
    """Our layout with uint32 ids: every block re-encoded, shards closed at the default size."""
    from data_prep.shard import ShardConfig, ShardWriter, encode_block

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, int(ShardConfig.shard_mb * 2**20), {})
    for b, tokens, offsets, langs in iter_train_blocks(shard_dir):
        sentences = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(langs))]
        writer.add(encode_block(b, sentences, [LANGS[x] for x in langs], "<u4", max(vocab_size, 2**16 + 1)))
    writer.close_shard()
    return sum(r["num_bytes"] for r in writer.records)


def write_old_layout(shard_dir: Path, out: Path) -> int:
    """Schema version 1: one sentence per tar sample (``<lang>-<index>.ids.npy`` int32 + ``.lang.txt``)."""
    from data_prep.shard import END_OF_ARCHIVE, npy_bytes, tar_member

    out.mkdir(parents=True, exist_ok=True)
    size, index, shard, f = 0, 0, 0, None
    for ids, lang in iter_sentences(shard_dir):
        if f is None:
            f = open(out / f"shard-{shard:06d}.tar", "wb")
        key = f"{LANGS[lang]}-{index:010d}"
        data = tar_member(f"{key}.ids.npy", npy_bytes(ids.astype("<i4"))) + tar_member(
            f"{key}.lang.txt", LANGS[lang].encode())
        f.write(data)
        size, index = size + len(data), index + 1
        if index % 100_000 == 0:  # the old default shard size
            f.write(END_OF_ARCHIVE)
            f.close()
            f, shard = None, shard + 1
    if f is not None:
        f.write(END_OF_ARCHIVE)
        f.close()
    return dir_bytes(out)


def import_streaming():
    """``streaming``, with stand-ins for the torchvision modules its package import needs when none loads."""
    import importlib

    try:
        importlib.import_module("torchvision")  # only whether it loads
    except Exception:  # absent, or built for another torch
        import types
        from importlib.machinery import ModuleSpec

        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        names = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")
        modules = {name: types.ModuleType(name) for name in names}
        for name, module in modules.items():
            module.__spec__ = ModuleSpec(name, None)
        modules["torchvision.datasets"].VisionDataset = object
        modules["torchvision.transforms.functional"].to_tensor = None
        sys.modules.update(modules)
    import streaming

    return streaming


def write_mds(shard_dir: Path, out: Path) -> int:
    streaming = import_streaming()
    shutil.rmtree(out, ignore_errors=True)
    with streaming.MDSWriter(out=str(out), columns={"tokens": "ndarray:uint32", "lang": "uint8"},
                             compression=None) as writer:
        for ids, lang in iter_sentences(shard_dir):
            writer.write({"tokens": ids.astype(np.uint32), "lang": np.uint8(lang)})
    return dir_bytes(out)


def write_arrow(shard_dir: Path, out: Path, cache: Path) -> int:
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("uint32")),
                                  "lang": datasets.Value("uint8")})

    def rows():
        for ids, lang in iter_sentences(shard_dir):
            yield {"tokens": ids.astype(np.uint32), "lang": lang}

    shutil.rmtree(out, ignore_errors=True)
    ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache))
    ds.save_to_disk(str(out))
    return dir_bytes(out)


# ---- reading -----------------------------------------------------------------------------------------

BATCH, WORKERS = 32, 2


def masker_for(manifest: dict):
    from ds_kd.data.masking import Masker, MaskingConfig
    from ds_kd.data.shards import special_ids, unmasked_ids

    special = special_ids(manifest)
    return Masker(MaskingConfig(), manifest["vocab_size"], unmasked_ids(manifest), special["mask"]), special


def read_ours(shard_dir: Path, num_sentences: int) -> float:
    """Sentences per second of our reader (2 workers, masked, padded batches of 32, shuffled)."""
    from ds_kd.data.reader import ReaderConfig, ShardReader

    start = time.perf_counter()
    reader = ShardReader(ReaderConfig(str(shard_dir), micro_batch_size=BATCH, num_workers=WORKERS, seed=1))
    seen = 0
    for batch in reader:
        seen += len(batch["sentence_ids"])
        if seen >= num_sentences:
            break
    return seen / (time.perf_counter() - start)


class MdsMasked:
    """MDS's StreamingDataset with our masking per sentence (seeded by its index, as ours)."""

    def __new__(cls, mds_dir: str, manifest: dict):
        streaming = import_streaming()
        masker, _ = masker_for(manifest)

        class Masked(streaming.StreamingDataset):
            def get_item(self, idx):
                sample = super().get_item(idx)
                x, y = masker.mask(sample["tokens"], np.random.default_rng([1, 3, 0, idx]))
                return {"x": x, "y": y, "lang": int(sample["lang"])}

        return Masked(local=mds_dir, shuffle=True, shuffle_seed=1, batch_size=BATCH)


def pad_collate(pad_id: int):
    from ds_kd.data.masking import pad_batch

    def collate(rows):
        return pad_batch([r["x"] for r in rows], [r["y"] for r in rows], [r["lang"] for r in rows], pad_id)

    return collate


def read_mds(mds_dir: Path, manifest: dict, num_sentences: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    streaming = import_streaming()
    streaming.base.util.clean_stale_shared_memory()
    start = time.perf_counter()
    dataset = MdsMasked(str(mds_dir), manifest)
    _, special = masker_for(manifest)
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, collate_fn=pad_collate(special["pad"]),
                        generator=torch.Generator())
    seen = 0
    for batch in loader:
        seen += len(batch["lang_ids"])
        if seen >= num_sentences:
            break
    rate = seen / (time.perf_counter() - start)
    del loader, dataset
    return rate


def first_batch_seconds(shard_dir: Path, offset: int) -> float:
    """Seconds from building our reader to its first batch, resumed at ``offset`` sentences (0: fresh)."""
    from ds_kd.data.reader import ReaderConfig, ShardReader

    start = time.perf_counter()
    reader = ShardReader(ReaderConfig(str(shard_dir), micro_batch_size=BATCH, num_workers=WORKERS, seed=1))
    if offset:
        reader.load_state_dict({**reader.state_dict(), "sentences_consumed": offset // BATCH * BATCH})
    next(iter(reader))
    return time.perf_counter() - start


# ---- the run -----------------------------------------------------------------------------------------

def measure(corpus: dict, scale: int, work: Path, args) -> dict:
    shard_dir, manifest = corpus["dir"] / "shards", corpus["manifest"]
    train = manifest["splits"]["train"]
    tokens = train["num_tokens"]
    row = {"scale": f"{scale}x", "sentences": train["num_samples"], "tokens": tokens,
           "corpus_peak_mib": corpus["peak_mib"], "corpus_wall_s": corpus["wall_s"],
           "shard_sent_per_s": manifest["sentences_per_s"]}
    print(f"[bench] {scale}x: writing the other formats", flush=True)
    sizes = {"ours": train["num_bytes"],
             "ours_u32": write_ours_uint32(shard_dir, work / f"ours32-{scale}x", manifest["vocab_size"]),
             "mds": write_mds(shard_dir, work / f"mds-{scale}x"),
             "arrow": write_arrow(shard_dir, work / f"arrow-{scale}x", work / "hf-cache"),
             "old": write_old_layout(shard_dir, work / f"old-{scale}x")}
    row.update({f"bpt_{name}": size / tokens for name, size in sizes.items()})
    print(f"[bench] {scale}x: reading", flush=True)
    num = min(args.read_sentences, train["num_samples"])
    row["read_ours"] = read_ours(shard_dir, num)
    row["read_mds"] = read_mds(work / f"mds-{scale}x", manifest, num)
    fresh = [first_batch_seconds(shard_dir, 0) for _ in range(3)]
    seek = [first_batch_seconds(shard_dir, args.offset) for _ in range(3)]
    row["first_batch_s"], row["seek_batch_s"] = statistics.median(fresh), statistics.median(seek)
    for name in ("mds", "arrow", "old", "ours_u32"):
        shutil.rmtree(work / f"{name.replace('_u32', '32')}-{scale}x", ignore_errors=True)
    return row


def format_report(rows: list[dict], offset: int, num_cores: int) -> tuple[str, dict]:
    head = ["input", "sentences", "tokens", "B/token ours", "ours u32", "MDS u32", "Arrow u32", "old layout",
            "read ours sent/s", "read MDS sent/s", "1st batch @0 s", f"1st batch @{offset:.0e} s",
            "corpus peak MiB"]
    cells = [head] + [[r["scale"], str(r["sentences"]), str(r["tokens"]), f"{r['bpt_ours']:.2f}",
                       f"{r['bpt_ours_u32']:.2f}", f"{r['bpt_mds']:.2f}", f"{r['bpt_arrow']:.2f}",
                       f"{r['bpt_old']:.1f}", f"{r['read_ours']:.0f}", f"{r['read_mds']:.0f}",
                       f"{r['first_batch_s']:.2f}", f"{r['seek_batch_s']:.2f}", f"{r['corpus_peak_mib']:.0f}"]
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    big = rows[-1]
    ratios = {"bytes_vs_mds": max(r["bpt_ours"] / r["bpt_mds"] for r in rows),
              "bytes_u32_vs_mds": max(r["bpt_ours_u32"] / r["bpt_mds"] for r in rows),
              "bytes_vs_old": max(r["bpt_ours"] / r["bpt_old"] for r in rows),
              "read_vs_mds": min(r["read_ours"] / r["read_mds"] for r in rows),
              "seek_ratio": max(r["seek_batch_s"] / r["first_batch_s"] for r in rows)}
    if len(rows) > 1:
        ratios["memory_growth"] = rows[-1]["corpus_peak_mib"] / rows[0]["corpus_peak_mib"] - 1
    for name, value in ratios.items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else (" ok" if (value >= goal if name == "read_vs_mds" else value <= goal)
                                           else " MISSED")
        bound = "" if goal is None else (f" (goal >= {goal})" if name == "read_vs_mds" else f" (goal <= {goal})")
        lines.append(f"{name}: {value:.3f}{bound}{verdict}")
    bytes_per_sentence = big["bpt_ours"] * big["tokens"] / big["sentences"]
    per_core = big["shard_sent_per_s"] / num_cores
    lines.append(f"500M sentences of this length ({big['tokens'] / big['sentences']:.1f} tokens): "
                 f"{bytes_per_sentence * 5e8 / 1e9:.1f} GB on disk as ours (uint16), "
                 f"{big['bpt_ours_u32'] * big['tokens'] / big['sentences'] * 5e8 / 1e9:.1f} GB with uint32 ids, "
                 f"{big['bpt_old'] * big['tokens'] / big['sentences'] * 5e8 / 1e9:.0f} GB in the old layout; "
                 f"tokenize+shard {per_core:.0f} sentences/s per core here: {5e8 / per_core / 3600:.1f} core-hours")
    return "\n".join(lines), ratios


def build_parser() -> argparse.ArgumentParser:
    from ds_kd.cli.flags import HelpFormatter

    p = argparse.ArgumentParser(prog="python benchmarks/bench_shards.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--base-lines", type=int, default=20000,
                   help="paragraph lines of English at 1x; the other languages in proportion")
    p.add_argument("--total", type=int, default=200_000,
                   help="sentences in the training mix at 1x, as the default corpus")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="input sizes")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary, as the demo")
    p.add_argument("--bpe-sentences", type=int, default=200_000,
                   help="BPE learns on this many sentences at every size")
    p.add_argument("--read-sentences", type=int, default=200_000,
                   help="sentences read in the throughput runs")
    p.add_argument("--offset", type=int, default=10**6, help="resume position of the seek test")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_shards-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for scale in args.scales:
            corpus = make_corpus(work, scale, args)
            rows.append(measure(corpus, scale, work, args))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import os

    report, ratios = format_report(rows, args.offset, os.cpu_count() or 1)
    print(report)
    missed = [k for k, goal in GOALS.items() if k in ratios and
              not (ratios[k] >= goal if k == "read_vs_mds" else ratios[k] <= goal)]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
