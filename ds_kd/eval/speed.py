"""Inference speed of exported encoders on this machine, side by side in one process (the paper's motivation).

Per model: milliseconds per sentence at batch 1, sentences per second at batch 32 (each batch padded to its
longest sentence), and parameters with and without embeddings (the paper's Table 1); per student given its
teacher, the speed-up (teacher time / student time at batch 1, student / teacher throughput at batch 32).

Every model sees the same sentence lengths: the sub-word lengths of real sentences (the held-out text
tokenised by the first model's tokenizer) or lengths given on the command line. The token ids are drawn at
random from each model's vocabulary (the cost of a forward pass does not depend on which ids). After warm-up
passes, the repeats are interleaved across models (repeat 1 of every model, then repeat 2, ...), so load from
other processes on a shared machine falls on all models alike; each figure is the median over the repeats.
The encoder alone is timed (no MLM head), in fp32 eval mode under ``torch.inference_mode``.
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ds_kd.errors import UsageError
from ds_kd.manifest import atomic_write_text

if TYPE_CHECKING:  # torch is imported where the models run: the command's --help does without it
    import torch


@dataclass(frozen=True)
class SpeedConfig:
    """What is timed and how often."""

    num_sentences: int = 64
    """Sentences timed per pass (at batch 1 one at a time, at batch ``batch_size`` in batches)."""
    batch_size: int = 32
    """The large batch size."""
    max_len: int = 128
    """Sentence lengths are capped at this many sub-word tokens ([CLS] and [SEP] included)."""
    num_warmup: int = 2
    """Untimed passes per model and batch size before the repeats."""
    num_repeats: int = 5
    """Timed passes per model and batch size; the median is reported."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    seed: int = 0
    """Seed of the sentence choice and the token ids."""


@dataclass
class Timed:
    """One model under test."""

    name: str
    directory: str
    encoder: torch.nn.Module
    vocab_size: int
    shape: dict
    """layers, hidden, heads, FFN and vocabulary of its config, for the parameter table."""
    tokenizer: object = None
    """The directory's tokenizer (checked against the model by ``ds_kd.models.modeldir.load_tokenizer``)."""


def sentence_lengths(texts: list[str], tokenizer, cfg: SpeedConfig) -> list[int]:
    """Sub-word lengths ([CLS] and [SEP] included) of ``num_sentences`` texts drawn with the seed."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError("no text to take sentence lengths from")
    rng = random.Random(cfg.seed)
    chosen = [rng.choice(texts) for _ in range(cfg.num_sentences)]
    # [CLS] and [SEP] counted here: not every tokenizer adds them itself.
    ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    return [min(len(x) + 2, cfg.max_len) for x in ids]


def make_batches(lengths: list[int], vocab_size: int, batch_size: int, seed: int) -> list[tuple]:
    """(input_ids, attention_mask) batches in order; each padded with id 0 to its longest sentence."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        ids = torch.zeros(len(chunk), max(chunk), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(chunk):
            ids[row, :n] = torch.randint(5, vocab_size, (n,), generator=gen)
            mask[row, :n] = 1
        batches.append((ids, mask))
    return batches


def time_pass(encoder: torch.nn.Module, batches: list[tuple]) -> float:
    """Seconds for one forward pass over every batch (under ``torch.inference_mode``)."""
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        for ids, mask in batches:
            encoder(ids, mask)
        return time.perf_counter() - start


def load_timed(name: str, directory: Path | str) -> Timed:
    """The encoder of ``directory`` (its MLM head dropped), after checking its tokenizer belongs to it; a
    fine-tuned task model (``launch/finetune.py --save-model``, an XtremeDistil student) gives its encoder."""
    from ds_kd.finetune.heads import TASK_MODEL_JSON, load_task_model
    from ds_kd.models.model import BertForMaskedLM
    from ds_kd.models.modeldir import load_tokenizer

    tokenizer = load_tokenizer(directory, f"speed (--models {name})")
    if (Path(directory) / TASK_MODEL_JSON).is_file():
        encoder = load_task_model(directory)[0].encoder.eval()
    else:
        encoder = BertForMaskedLM.from_pretrained(directory).eval().bert
    c = encoder.config
    shape = {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_heads": c.num_attention_heads,
             "ffn_size": c.intermediate_size, "vocab_size": c.vocab_size}
    return Timed(name, str(directory), encoder, c.vocab_size, shape, tokenizer)


def count_encoder(timed: Timed) -> dict:
    from ds_kd.models.model import count_parameters

    return {"num_params": count_parameters(timed.encoder, True),
            "num_params_without_embeddings": count_parameters(timed.encoder, False), **timed.shape}


def measure(models: list[Timed], lengths: list[int], cfg: SpeedConfig) -> dict[str, dict]:
    """Median ms per sentence at batch 1 and sentences/s at ``batch_size`` per model, repeats interleaved."""
    from tqdm import tqdm

    plans = {m.name: {1: make_batches(lengths, m.vocab_size, 1, cfg.seed),
                      cfg.batch_size: make_batches(lengths, m.vocab_size, cfg.batch_size, cfg.seed)}
             for m in models}
    for m in models:
        for batches in plans[m.name].values():
            for _ in range(cfg.num_warmup):
                time_pass(m.encoder, batches)
    seconds: dict[str, dict[int, list[float]]] = {m.name: {1: [], cfg.batch_size: []} for m in models}
    for _ in tqdm(range(cfg.num_repeats), desc="speed repeats", unit="repeat", disable=None):
        for m in models:
            for size, batches in plans[m.name].items():
                seconds[m.name][size].append(time_pass(m.encoder, batches))
    n = len(lengths)
    return {name: {"ms_per_sentence_batch1": 1000 * statistics.median(s[1]) / n,
                   f"sentences_per_s_batch{cfg.batch_size}": n / statistics.median(s[cfg.batch_size]),
                   "seconds_batch1": s[1], f"seconds_batch{cfg.batch_size}": s[cfg.batch_size]}
            for name, s in seconds.items()}


def speedups(results: dict[str, dict], teacher_of: dict[str, str], batch_size: int) -> dict[str, dict]:
    """Per student: its teacher and how many times faster it is at batch 1 and at ``batch_size``."""
    out = {}
    big = f"sentences_per_s_batch{batch_size}"
    for student, teacher in teacher_of.items():
        for name in (student, teacher):
            if name not in results:
                raise UsageError(f"--teacher-of {student}={teacher}: no model named {name!r} "
                                 f"(models: {', '.join(results)})")
        s, t = results[student], results[teacher]
        out[student] = {"teacher": teacher,
                        "speedup_batch1": t["ms_per_sentence_batch1"] / s["ms_per_sentence_batch1"],
                        f"speedup_batch{batch_size}": s[big] / t[big]}
    return out


def parameter_table(result: dict) -> list[str]:
    """Markdown lines: shape and parameters of every model (the paper's Table 1, with the vocabulary's share)."""
    lines = ["| model | layers | hidden | heads | FFN | vocabulary | embedding params | params w/o embeddings "
             "| params |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        embedding = r["num_params"] - r["num_params_without_embeddings"]
        lines.append(f"| {name} | {r.get('num_layers', '')} | {r.get('hidden_size', '')} | {r.get('num_heads', '')} "
                     f"| {r.get('ffn_size', '')} | {r.get('vocab_size', '')} | {embedding / 1e6:.2f}M "
                     f"| {r['num_params_without_embeddings'] / 1e6:.2f}M | {r['num_params'] / 1e6:.2f}M |")
    return lines


def latency_lines(result: dict) -> list[str]:
    """One sentence per student given its teacher: CPU latency at batch 1, both sides and the ratio."""
    out = []
    for student, up in result["speedups"].items():
        s, t = result["models"][student], result["models"][up["teacher"]]
        out.append(f"- {student}: {s['ms_per_sentence_batch1']:.1f} ms per sentence at batch 1 on this CPU, "
                   f"{up['teacher']}: {t['ms_per_sentence_batch1']:.1f} ms: **{up['speedup_batch1']:.1f}× "
                   f"faster** ({s['num_params_without_embeddings'] / 1e6:.1f}M vs "
                   f"{t['num_params_without_embeddings'] / 1e6:.1f}M parameters without embeddings).")
    return out


def format_table(result: dict) -> str:
    """Markdown in the spirit of the paper's Table 1: the measured speed, each student's latency against its
    teacher's, and the parameter table."""
    b = result["config"]["batch_size"]
    lines = ["### Inference speed on this CPU", "",
             f"| model | params | params w/o embeddings | ms/sentence (batch 1) | sentences/s (batch {b}) "
             f"| speed-up b1 | speed-up b{b} |", "|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        up = result["speedups"].get(name)
        cells = (f"{up['speedup_batch1']:.2f}× vs {up['teacher']}", f"{up[f'speedup_batch{b}']:.2f}×") if up else ("", "")
        lines.append(f"| {name} | {r['num_params'] / 1e6:.2f}M | {r['num_params_without_embeddings'] / 1e6:.2f}M "
                     f"| {r['ms_per_sentence_batch1']:.2f} | {r[f'sentences_per_s_batch{b}']:.1f} | "
                     + " | ".join(cells) + " |")
    lengths = result["lengths"]
    lines.append(f"\n{platform.processor() or platform.machine()}, torch {result['torch']}, "
                 f"{result['threads']} thread(s); {len(lengths)} sentences of {min(lengths)}-{max(lengths)} "
                 f"sub-words (mean {statistics.mean(lengths):.1f}, from {result['lengths_from']}); median of "
                 f"{result['config']['num_repeats']} repeats after {result['config']['num_warmup']} warm-up passes.")
    latency = latency_lines(result)
    if latency:
        lines += ["", "Latency at batch 1, each student against its teacher:", "", *latency]
    lines += ["", "### Parameters", "", *parameter_table(result)]
    return "\n".join(lines) + "\n"


def run(models: dict[str, Path | str], out: Path | str, teacher_of: dict[str, str] | None = None,
        texts: list[str] | None = None, lengths: list[int] | None = None, cfg: SpeedConfig = SpeedConfig(),
        texts_from: str = "the given texts") -> dict:
    """Time every model; write ``<out>/speed.json`` and ``<out>/speed.md``; return the result.

    Sentence lengths: ``lengths`` if given, else those of ``texts`` under the first model's tokenizer. The
    unknown-token rate of ``texts`` (named ``texts_from``) under every model's tokenizer is reported, with a
    warning above 1% (``ds_kd.models.vocab_check``)."""
    if not models:
        raise UsageError("no models to time")
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timed = [load_timed(name, d) for name, d in models.items()]
    if lengths:
        lengths_from = "the command line"
        lengths = [min(n, cfg.max_len) for n in lengths]
    else:
        if not texts:
            raise UsageError("give sentence lengths or texts to take them from")
        from ds_kd.models.vocab_check import report_unknown, text_unknown_rate

        for m in timed:
            report_unknown(m.directory, {texts_from: text_unknown_rate(m.tokenizer, texts)})
        lengths = sentence_lengths(texts, timed[0].tokenizer, cfg)
        lengths_from = f"held-out text tokenised by {next(iter(models))}'s tokenizer"
    measured = measure(timed, lengths, cfg)
    result = {"config": asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "lengths": lengths, "lengths_from": lengths_from,
              "models": {m.name: {"directory": m.directory, **count_encoder(m), **measured[m.name]} for m in timed},
              "speedups": speedups(measured, teacher_of or {}, cfg.batch_size)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.md", format_table(result))
    atomic_write_text(out / "speed.json", json.dumps(result, indent=2) + "\n")
    return result
