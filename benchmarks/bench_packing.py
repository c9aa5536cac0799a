"""Packing benchmark on a corpus's real sentence lengths, packed and padded side by side in one process.

    python benchmarks/bench_packing.py --corpus out/demo/corpus

1. Packing efficiency (real tokens / row tokens) of the training stream at each --max-len, beside the padded
   efficiency of batches of --padded-batch sentences padded to their longest.
2. Real tokens per second of an MLM training step and of a distillation step (teacher --teacher-layers deep,
   student --student-layers) on the same sentences, packed rows vs padded batches, same model and precision;
   the goal is packed / padded >= 0.8 / padded efficiency. The packed rows attend per sentence (the default),
   and again with one masked T x T product per row (``packed, masked``), to show what that saves. The throughput
   lines use the first --max-len (``--max-len 512 --rows 2`` measures 512 with as many tokens a batch).

Timings are medians over interleaved repeats after warm-up.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ds_kd.cli.flags import HelpFormatter, positive_int  # noqa: E402


def corpus_lengths(corpus: Path, limit: int) -> np.ndarray:
    """Token counts of the first ``limit`` training sentences in stream order (seed 0)."""
    from ds_kd.data.reader import ReaderConfig, ShardReader

    shard_dir = corpus / "shards" if (corpus / "shards").is_dir() else corpus
    reader = ShardReader(ReaderConfig(str(shard_dir), split="train", num_workers=0, max_len=10**6))
    plan = reader.plan
    _, ids = plan.order.lookup(np.arange(min(limit, plan.order.num_sentences)))
    from ds_kd.data.packed_stream import PackedStreamPlan

    return PackedStreamPlan.lengths(plan, ids)


def efficiencies(lengths: np.ndarray, max_len: int, padded_batch: int, window: int) -> tuple[float, float]:
    """(packed, padded) efficiency: best-fit rows per window of sentences vs batches padded to their longest."""
    from ds_kd.data.packing import best_fit

    cut = np.minimum(lengths, max_len)
    rows = sum(len(best_fit(cut[i:i + window].tolist(), max_len)) for i in range(0, len(cut), window))
    packed = cut.sum() / (rows * max_len)
    batches = [cut[i:i + padded_batch] for i in range(0, len(cut), padded_batch)]
    padded = cut.sum() / sum(len(b) * b.max() for b in batches)
    return float(packed), float(padded)


def score_fraction(lengths: np.ndarray, max_len: int, rows_per_batch: int, sentences: int = 8192) -> float:
    """Attention scores computed per sentence (ds_kd.models.sentence_attention) / those of the masked T x T product, over
    packed batches of ``rows_per_batch`` rows of the first ``sentences`` sentences."""
    from ds_kd.data.packing import best_fit
    from ds_kd.models.sentence_attention import SentenceBuckets

    cut = np.minimum(lengths[:sentences], max_len).tolist()
    rows = best_fit(cut, max_len)
    ours = masked = 0
    for i in range(0, len(rows), rows_per_batch):
        ids = torch.zeros(len(rows[i:i + rows_per_batch]), max_len, dtype=torch.long)
        for r, row in enumerate(rows[i:i + rows_per_batch]):
            start = 0
            for k, s in enumerate(row, start=1):
                ids[r, start:start + cut[s]] = k
                start += cut[s]
        ours += sum(n * w * w for n, w in SentenceBuckets.build(ids).shapes)
        masked += ids.numel() * max_len
    return ours / masked


def batches(lengths: np.ndarray, max_len: int, vocab: int, rows_per_batch: int, padded_batch: int):
    """The same sentences as packed rows (``rows_per_batch`` a batch) and as padded batches."""
    from ds_kd.data.masking import Masker, MaskingConfig, pad_batch
    from ds_kd.data.packing import best_fit, packed_batch

    rng = np.random.default_rng(0)
    masker = Masker(MaskingConfig(), vocab, range(5), 4)
    inputs, labels = [], []
    for i, n in enumerate(np.minimum(lengths, max_len)):
        ids = np.concatenate([[2], rng.integers(5, vocab, n - 2), [3]])
        x, y = masker.mask(ids, np.random.default_rng([0, i]))
        inputs.append(x)
        labels.append(y)
    langs = [0] * len(inputs)
    rows = best_fit([len(x) for x in inputs], max_len)
    packed = [packed_batch(inputs, labels, langs, rows[i:i + rows_per_batch], 0)
              for i in range(0, len(rows), rows_per_batch)]
    padded = [pad_batch(inputs[i:i + padded_batch], labels[i:i + padded_batch], langs[i:i + padded_batch], 0)
              for i in range(0, len(inputs), padded_batch)]
    return packed, padded


def throughput(args, lengths: np.ndarray) -> None:
    from bench_train import time_interleaved

    from ds_kd.distill import DistillConfig, Distiller
    from ds_kd.train.loop import global_denominators
    from ds_kd.models.model import BertConfig, BertForMaskedLM, BertModel
    from ds_kd.train.pretrain import mlm_step

    torch.manual_seed(0)
    sample = lengths[: args.sentences]
    packed, padded = batches(sample, args.max_len[0], args.vocab, args.rows, args.padded_batch)
    real = int(np.minimum(sample, args.max_len[0]).sum())

    def shape(layers: int) -> BertConfig:
        return BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=layers,
                          num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                          max_position_embeddings=max(512, args.max_len[0]))

    student = BertForMaskedLM(shape(args.student_layers))
    distiller = Distiller(BertForMaskedLM(shape(args.teacher_layers)), BertForMaskedLM(shape(args.student_layers)),
                          DistillConfig(output_weight=1.0))

    def run(model, data, distill: bool, attention: str = "sentences"):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        encoders = [m for m in model.modules() if isinstance(m, BertModel)]

        def epoch():
            for encoder in encoders:
                encoder.packed_attention = attention
            for batch in data:
                denominators = global_denominators([batch])
                optimizer.zero_grad(set_to_none=True)
                if distill:
                    loss = model(batch, denominators).loss
                else:
                    loss = mlm_step(lambda *a, **k: model(*a, **k), batch, denominators)[0]
                loss.backward()
                optimizer.step()
        return epoch

    for name, model, distill in (("MLM step", student, False), ("distillation step", distiller, True)):
        times = time_interleaved({"packed": run(model, packed, distill),
                                  "packed, masked": run(model, packed, distill, "masked"),
                                  "padded": run(model, padded, distill)}, args.repeats, 1)
        speed = {k: real / v for k, v in times.items()}
        print(f"{name:18s} real tokens/s  packed {speed['packed']:7.0f} (masked T x T attention "
              f"{speed['packed, masked']:7.0f})  padded {speed['padded']:7.0f}  packed / padded "
              f"{speed['packed'] / speed['padded']:.2f} (masked: {speed['packed, masked'] / speed['padded']:.2f})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("out/demo/corpus"),
                   help="corpus directory of `python -m data_prep corpus` (its training shards' lengths)")
    p.add_argument("--max-len", type=positive_int, nargs="+", default=[128, 512], help="row lengths to measure")
    p.add_argument("--padded-batch", type=positive_int, default=32, help="sentences per padded batch")
    p.add_argument("--window", type=positive_int, default=65536,
                   help="sentences packed together: the reader packs each shuffle window (training's "
                        "--shuffle-window blocks of the corpus's --block-size sentences: 8 x 8192 = 65536 by default)")
    p.add_argument("--limit", type=positive_int, default=200_000, help="sentences whose lengths are read")
    p.add_argument("--sentences", type=positive_int, default=1024, help="sentences the throughput runs train on")
    p.add_argument("--rows", type=positive_int, default=8, help="packed rows per batch in the throughput runs")
    p.add_argument("--vocab", type=positive_int, default=8000, help="vocabulary of the benchmark models")
    p.add_argument("--hidden", type=positive_int, default=256, help="width of the benchmark models")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--student-layers", type=positive_int, default=4, help="layers of the MLM model and the student")
    p.add_argument("--teacher-layers", type=positive_int, default=12, help="layers of the distillation teacher")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes over the sentences, per layout")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 lets torch choose")
    return p


def main() -> int:
    p = build_parser()
    args = p.parse_args()
    if not (args.corpus / "shards").is_dir() and not (args.corpus / "manifest.json").is_file():
        p.error(f"{args.corpus}: no corpus shards; build them with `python -m data_prep corpus` (or `make demo`)")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = corpus_lengths(args.corpus, args.limit)
    print(f"{len(lengths)} sentences of {args.corpus}: mean {lengths.mean():.1f} tokens, median "
          f"{np.median(lengths):.0f}, 99th percentile {np.percentile(lengths, 99):.0f}")
    for max_len in args.max_len:
        packed, padded = efficiencies(lengths, max_len, args.padded_batch, args.window)
        print(f"--max-len {max_len:4d}: packing efficiency {packed:.3f}  (padded batches of {args.padded_batch}: "
              f"{padded:.3f}; goal >= 0.95); attention scores per sentence / masked T x T: "
              f"{score_fraction(lengths, max_len, args.rows):.2f}")
    throughput(args, lengths)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
