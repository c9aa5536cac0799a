"""Benchmark of the corpus command: flat memory as the input grows, and throughput against a naive baseline.

``python benchmarks/bench_corpus.py [--base-lines 4000] [--work DIR]`` generates text in the eight languages at
1x and 10x size and, side by side in one run:

- runs the whole corpus command on each (a fresh process each time) and records the peak resident memory of
  its process tree (main process and workers, summed, sampled every 50 ms);
- runs a naive baseline on the same mix and tokenizer: ``datasets`` loads the mix, ``Dataset.map`` calls the
  tokenizer once per example, and the result is written to the same shards.

It prints a table and checks that the 10x peak is within +25% of the 1x peak.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ds_kd.schema import LANGS

# Paragraph lines per language at 1x, relative: a large/small spread like Wikipedia's.
LANG_WEIGHTS = {"en": 8, "fr": 6, "de": 6, "ja": 3, "hi": 1, "it": 5, "es": 5, "pt": 4}


def peak_rss_of(argv: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``argv``; return (exit status, wall seconds, peak summed RSS in bytes of the process tree)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    return proc.returncode, time.perf_counter() - start, peak


def naive_shards(sample_dir: Path, tokenizer_dir: Path, out_dir: Path, block_size: int, cache: Path) -> int:
    """The baseline: datasets.map calling the tokenizer per example, written to the same block shards."""
    import datasets

    from data_prep.shard import ShardConfig, ShardWriter, encode_block
    from ds_kd.schema import token_dtype
    from ds_kd.data.tokenizer_files import read_tokenizer_json

    tok = read_tokenizer_json(tokenizer_dir / "tokenizer.json")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    num = 0
    for split in ("train", "val"):
        ds = datasets.load_dataset("text", data_files=str(sample_dir / f"{split}.tsv"), split="train",
                                   cache_dir=str(cache))

        def encode(example):
            lang, text = example["text"].split("\t", 1)
            return {"lang": lang, "ids": tok.encode(text).ids}

        ds = ds.map(encode, remove_columns=["text"])
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out_dir / split, int(ShardConfig.shard_mb * 2**20), {})
        for index, start in enumerate(range(0, len(ds), block_size)):
            rows = ds[start:start + block_size]
            writer.add(encode_block(index, rows["ids"], rows["lang"], token_dtype(vocab_size), vocab_size))
        writer.close_shard()
        num += len(ds)
    return num


def run_ours(raw: Path, out: Path, scale: int, base_lines: int, args, log: Path) -> dict:
    argv = [sys.executable, "-m", "data_prep", "corpus", "--raw", str(raw), "--out", str(out),
            "--vocab-size", str(args.vocab_size), "--bpe-sentences", str(args.bpe_sentences),
            "--block-size", str(args.block_size), "--val-per-lang", "200", "--shuffle-bucket-mb", "4"]
    status, wall, peak = peak_rss_of(argv, log)
    if status != 0:
        raise SystemExit(f"corpus command failed (exit {status}); see {log}")
    shards = json.loads((out / "shards" / "manifest.json").read_text())
    num = sum(s["num_samples"] for s in shards["splits"].values())
    return {"run": "corpus command", "input": f"{scale}x", "sentences": num, "wall_s": wall, "peak_mib": peak / 2**20,
            "shard_sent_per_s": shards["sentences_per_s"]}


def run_naive(out: Path, scale: int, args, log: Path, work: Path) -> dict:
    naive_out = work / f"naive-{scale}x"
    shutil.rmtree(naive_out, ignore_errors=True)
    argv = [sys.executable, "-m", "benchmarks/bench_corpus.py", "--naive", str(out), str(naive_out),
            "--block-size", str(args.block_size)]
    status, wall, peak = peak_rss_of(argv, log)
    if status != 0:
        raise SystemExit(f"naive baseline failed (exit {status}); see {log}")
    result = json.loads((naive_out / "result.json").read_text())
    return {"run": "naive datasets.map", "input": f"{scale}x", "sentences": result["sentences"], "wall_s": wall,
            "peak_mib": peak / 2**20, "shard_sent_per_s": result["sentences_per_s"]}


def format_table(rows: list[dict]) -> str:
    head = ["run", "input", "sentences", "tokenize+shard sent/s", "peak RSS MiB", "wall s"]
    cells = [head] + [[r["run"], r["input"], str(r["sentences"]), f"{r['shard_sent_per_s']:.0f}",
                       f"{r['peak_mib']:.0f}", f"{r['wall_s']:.1f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def naive_main(corpus_dir: Path, out_dir: Path, block_size: int) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    num = naive_shards(corpus_dir / "sample", corpus_dir / "tokenizer", out_dir, block_size, out_dir / "hf-cache")
    seconds = time.perf_counter() - start
    (out_dir / "result.json").write_text(json.dumps({"sentences": num, "sentences_per_s": num / seconds}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ds_kd.cli.flags import HelpFormatter

    p = argparse.ArgumentParser(prog="python benchmarks/bench_corpus.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--base-lines", type=int, default=4000, help="paragraph lines of English at 1x (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=4000, help="BPE vocabulary (default: %(default)s)")
    p.add_argument("--bpe-sentences", type=int, default=20000,
                   help="BPE learns on this many sentences at every size (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=8192, help="sentences per shard block (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one, removed)")
    p.add_argument("--naive", nargs=2, type=Path, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.naive:
        return naive_main(args.naive[0], args.naive[1], args.block_size)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_corpus-"))
    rows = []
    try:
        from data_prep.textgen import write_raw

        for scale in (1, 10):
            raw = work / f"raw-{scale}x"
            lines = {lang: args.base_lines * LANG_WEIGHTS[lang] * scale // 8 for lang in LANGS}
            write_raw(raw, lines, seed=scale)
            out = work / f"corpus-{scale}x"
            shutil.rmtree(out, ignore_errors=True)
            print(f"[bench] {scale}x: corpus command on {sum(lines.values())} paragraph lines", flush=True)
            rows.append(run_ours(raw, out, scale, args.base_lines, args, work / f"corpus-{scale}x.log"))
            print(f"[bench] {scale}x: naive baseline", flush=True)
            rows.append(run_naive(out, scale, args, work / f"naive-{scale}x.log", work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows))
    ours = [r for r in rows if r["run"] == "corpus command"]
    growth = ours[1]["peak_mib"] / ours[0]["peak_mib"] - 1
    naive = [r for r in rows if r["run"] != "corpus command"]
    print(f"peak memory at 10x input: {growth:+.0%} of 1x (limit +25%): {'ok' if growth <= 0.25 else 'EXCEEDED'}")
    print(f"tokenize+shard speed-up over the naive baseline: "
          f"{ours[0]['shard_sent_per_s'] / naive[0]['shard_sent_per_s']:.1f}x at 1x, "
          f"{ours[1]['shard_sent_per_s'] / naive[1]['shard_sent_per_s']:.1f}x at 10x")
    return 0 if growth <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
