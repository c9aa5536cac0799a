"""The training loop shared by pretraining and distillation; what differs between them is the step function.

A step function maps (engine, batch, denominators) to (loss, terms): the loss to back-propagate and named
scalar terms to log (``mlm`` among them gives the training perplexity). The loop owns micro-batches and
accumulation (read from the engine), the loss denominators, the non-finite-loss policy, fp16 skipped steps,
logging, periodic validation and checkpoints.

Every per-token loss is the mean over the whole global batch: before an optimizer step the loop reads all of
its micro-batches, counts what each loss averages over (masked tokens, real tokens, real attention pairs) on
every rank, and hands each micro-batch the global count divided by accumulation x ranks. DeepSpeed averages
the micro-batches' gradients over both, so the step's gradient is that of sum(loss) / global count, the same
for micro batch 8 x accumulation 1, 4 x 2, or 2 ranks x 4. A mean per micro-batch would weigh the tokens of a
short micro-batch more. The counts reach the losses as Python numbers, never as tensors: DeepSpeed's
``fp16.auto_cast`` casts every floating tensor given to ``engine(...)`` to fp16, whose largest number is 65,504.

The host never waits for the device within a micro-batch: what depends on the token ids alone (the counts, the
masked positions, the per-sentence attention layout) is computed on the host by :func:`host_layout`, in the
DataLoader worker where the ids already are, and the loop reads device values back twice per optimizer step
(the global counts, then the step's metrics with the finite-loss flag), not once per micro-batch.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ds_kd.train import checkpoint
from ds_kd.train import engine as dist
from ds_kd.logbook import Logbook
from ds_kd.schema import LANGS
from ds_kd.models.sentence_attention import SentenceBuckets

log = logging.getLogger("ds_kd")

StepFn = Callable[[object, dict, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
MAX_CONSECUTIVE_SKIPS = 50
"""fp16 steps skipped in a row (loss-scale overflow) after which the run stops: the scale cannot recover."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite without a loss scaler to skip the step."""


@dataclass
class LoopConfig:
    max_steps: int
    """Optimizer steps to train for in total (a resumed run continues to the same total)."""
    log_every: int = 10
    """Log training metrics every this many optimizer steps."""
    eval_every: int = 0
    """Validate every this many optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every this many optimizer steps (0: only by time and at the end)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted once a newer one is complete)."""
    save_every_minutes: float = 0.0
    """Also checkpoint once this many minutes of wall time passed since the last checkpoint (0: never by time).
    Rank 0's clock decides, so every rank saves at the same step."""
    sentences_per_epoch: int = 0
    """Sentences of the training split: the logged ``epoch`` is sentences seen / this (0: no epoch logged)."""
    sentences_per_lang: Callable[[int], dict[str, int]] | None = None
    """Sentences of each language among the first N of the stream, logged as ``sentences_<code>`` (a balanced
    mix, whose counts the order fixes: :meth:`ds_kd.data.reader.ShardReader.sentences_per_lang`)."""


@dataclass
class LoopResult:
    steps: int
    """Optimizer steps applied (in total, over resumes); fp16 overflow-skipped steps do not count."""
    losses: list[float] = field(default_factory=list)
    """The mean training loss of each optimizer step run by this process (all ranks averaged)."""
    val: dict[str, float] = field(default_factory=dict)
    """The last validation metrics."""
    tokens: int = 0
    """Real tokens trained on by this process's steps, all ranks together."""
    row_tokens: int = 0
    """Tokens of the rows those steps ran (real and padding), all ranks together."""
    seconds: float = 0.0
    """Wall time of this process's steps, validation and checkpoints included."""

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row tokens over this process's steps (1.0: no padding)."""
        return self.tokens / max(1, self.row_tokens)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors (and per-sentence layout) on ``device``; copies from pinned memory do not block."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, SentenceBuckets)) else v
            for k, v in batch.items()}


def host_layout(batch: dict) -> dict:
    """Add to a micro-batch of host tensors what the training step would otherwise make the host wait for the
    device to compute: ``counts`` (:func:`loss_denominators`, Python ints), ``masked_positions`` [N] long (the
    flat positions ``row * T + t`` of the predicted tokens, row-major: the MLM head's rows, gathered without a
    boolean mask) and, for packed rows, ``sentence_buckets`` (:meth:`SentenceBuckets.build`). The training reader
    runs it in its DataLoader workers (``ShardReader(prepare=host_layout)``); the loop runs it on any batch that
    lacks it, before the copy to the device. Returns the same dict."""
    if "counts" not in batch:
        batch["counts"] = loss_denominators(batch)
        batch["masked_positions"] = batch["labels"].flatten().ne(-100).nonzero().squeeze(1)
        if batch.get("sequence_ids") is not None:
            batch["sentence_buckets"] = SentenceBuckets.build(batch["sequence_ids"])
    return batch


def masked_positions(batch: dict) -> torch.Tensor:
    """Where a batch's MLM logits are needed: the host-computed ``masked_positions`` of :func:`host_layout`, else
    the [B, T] bool mask ``labels != -100`` (gathering with it makes the host wait for the device)."""
    return batch["masked_positions"] if "masked_positions" in batch else batch["labels"].ne(-100)


def loss_denominators(batch: dict) -> dict[str, int]:
    """What the per-token losses of one micro-batch average over, as Python ints (from host tensors: reading
    device tensors makes the host wait for the device).

    ``masked``: predicted positions (``labels`` != -100; MLM and output loss); ``tokens``: real tokens
    (``attention_mask``; embedding and hidden-state MSE); ``pairs``: (query, key) pairs within one sentence,
    the attention-score MSE's count: the sum of squared sentence lengths (a row's length, unpacked; each packed
    sentence's, from ``sequence_ids``); ``sentences``: sentences (rows unpacked, packed sentences), what the
    logged sentences/s and epoch count.
    """
    lengths = sentence_lengths(batch)
    return {"masked": int(batch["labels"].ne(-100).sum()), "tokens": int(lengths.sum()),
            "pairs": int(lengths.square().sum()), "sentences": len(lengths)}


def sentence_lengths(batch: dict) -> torch.Tensor:
    """Token count of every sentence in the batch (1-D): per row, or per packed sentence (``sequence_ids``)."""
    sequence_ids = batch.get("sequence_ids")
    if sequence_ids is None:
        return batch["attention_mask"].sum(dim=1)
    rows, width = sequence_ids.shape
    slot = torch.arange(rows, device=sequence_ids.device)[:, None] * (int(sequence_ids.max()) + 1) + sequence_ids
    counts = torch.bincount(slot[sequence_ids > 0])
    return counts[counts > 0]


def global_denominators(micro_batches: list[dict]) -> dict[str, float]:
    """The counts of :func:`loss_denominators` over every micro-batch of the step on every rank, divided by
    (micro-batches x ranks): the denominator each micro-batch's loss uses so that DeepSpeed's averaging over
    accumulation and ranks yields the mean over the global batch. Python floats, so that no cast of the inputs
    of ``engine(...)`` reaches them (fp16 made a micro-batch's 387k attention pairs inf, and the term 0).
    Every rank must call it (an all-reduce); the host reads the result back once."""
    counts = [b["counts"] if "counts" in b else loss_denominators(b) for b in micro_batches]
    names = sorted(counts[0])
    total = torch.tensor([sum(c[n] for c in counts) for n in names], dtype=torch.float64)
    total = dist.all_reduce(total.to(dist.device())).tolist()
    share = len(micro_batches) * dist.world_size()
    return {n: total[i] / share for i, n in enumerate(names)}


def train(engine, batches: Iterable[dict], step_fn: StepFn, evaluate: Callable[[], dict[str, float]],
          logbook: Logbook, ckpt_dir: Path, cfg: LoopConfig, start_step: int,
          reader_state: Callable[[], dict], checkpoint_extras: dict | None = None,
          sentences_before: int = 0) -> LoopResult:
    """Run optimizer steps ``start_step+1 .. cfg.max_steps``; ``reader_state()`` gives the data position for
    checkpoints, ``checkpoint_extras`` more facts to store in each, ``sentences_before`` the sentences read
    before ``start_step`` (each checkpoint stores ``sentences_seen``). Every rank runs this; only rank 0's
    logbook writes. A step that DeepSpeed skips (fp16 overflow: no update, no LR step) does not count: the run
    applies exactly ``cfg.max_steps`` updates, though its sentences count as seen. Logged training metrics are
    means over the steps since the last log, and every ``cfg.log_every`` steps rank 0 logs them in one line
    (:meth:`Logbook.log_train`)."""
    device = dist.device()
    accumulation = engine.gradient_accumulation_steps()
    uses_loss_scaler = engine.fp16_enabled()
    result = LoopResult(steps=start_step)
    stream: Iterator[dict] = iter(batches)
    step, skipped_in_a_row, sentences_seen = start_step, 0, sentences_before
    window = _Window()
    started = last_save = time.perf_counter()

    def save() -> None:
        nonlocal last_save
        t0 = time.perf_counter()
        extras = {"reader": reader_state(), "elapsed_s": logbook.elapsed(), "sentences_seen": sentences_seen,
                  **(checkpoint_extras or {})}
        tag = checkpoint.save(engine, ckpt_dir, step, extras, cfg.keep_last)
        last_save = time.perf_counter()
        log.info("checkpoint %s written to %s (%.1f s)", tag, ckpt_dir / tag, last_save - t0)

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step applies: engine.step() moves the scheduler on
        micro_batches = [to_device(host_layout(next(stream)), device) for _ in range(accumulation)]
        denominators = global_denominators(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        num_non_finite = torch.zeros((), dtype=torch.float64, device=device)  # micro-batches with a non-finite loss
        for batch in micro_batches:
            if (seed := batch.pop("dropout_seed", None)) is not None:
                torch.manual_seed(seed)  # dropout follows the data position, not the rank (see ds_kd.data.reader)
            loss, terms = step_fn(engine, batch, denominators)
            num_non_finite += (~torch.isfinite(loss.detach())).any()
            engine.backward(loss)
            engine.step()
            for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() / accumulation
        names = sorted(sums)
        sizes = [sum(b["counts"]["tokens"] for b in micro_batches),  # real tokens, tokens of the rows, sentences
                 sum(b["attention_mask"].numel() for b in micro_batches),
                 sum(b["counts"]["sentences"] for b in micro_batches)]
        reduced = dist.all_reduce(torch.cat([torch.stack([num_non_finite] + [sums[n] for n in names]),
                                             torch.tensor(sizes, dtype=torch.float64).to(device)])).tolist()
        _check_finite(reduced[0], reduced[1 + names.index("loss")] / dist.world_size(), step + 1, uses_loss_scaler)
        real, row_tokens, sentences = reduced[-3:]
        sentences_seen += int(sentences)  # a skipped step read its sentences too
        if not engine.was_step_applied():
            skipped_in_a_row = _count_skip(engine, step + 1, skipped_in_a_row)
            continue
        skipped_in_a_row = 0
        step += 1
        metrics = {n: v / dist.world_size() for n, v in zip(names, reduced[1:-3])}
        result.losses.append(metrics["loss"])
        result.tokens += int(real)
        result.row_tokens += int(row_tokens)
        metrics["packing_efficiency"] = real / max(1.0, row_tokens)
        window.add(metrics, real, sentences, time.perf_counter() - t0)
        _log_step(engine, logbook, cfg, step, window, lr, sentences_seen)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            result.val = _validate(evaluate, logbook, step)
        if step < cfg.max_steps and _save_due(cfg, step, time.perf_counter() - last_save):
            save()
    result.steps = step
    result.val = _validate(evaluate, logbook, step)
    if step > start_step:
        save()
    result.seconds = time.perf_counter() - started
    return result


class _Window:
    """Training metrics summed over the steps since the last log, and their real tokens, sentences and seconds."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps, self.tokens, self.sentences, self.seconds = 0, 0.0, 0.0, 0.0

    def add(self, metrics: dict[str, float], tokens: float, sentences: float, seconds: float) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds
        self.sentences += sentences

    def take(self) -> dict[str, float]:
        """The window's means and throughput (real tokens/s, sentences/s, seconds per step); the window starts
        again empty."""
        means = {name: value / self.steps for name, value in self.sums.items()}
        seconds = max(self.seconds, 1e-9)
        means.update(tokens_per_s=self.tokens / seconds, sentences_per_s=self.sentences / seconds,
                     seconds_per_step=self.seconds / self.steps)
        self.__init__()
        return means


def _save_due(cfg: LoopConfig, step: int, seconds_since_save: float) -> bool:
    """Every ``save_every`` steps, or once ``save_every_minutes`` passed by rank 0's clock (an all-reduce,
    so every rank agrees)."""
    if cfg.save_every and step % cfg.save_every == 0:
        return True
    if not cfg.save_every_minutes:
        return False
    late = float(dist.is_main() and seconds_since_save >= 60 * cfg.save_every_minutes)
    return bool(dist.all_reduce(torch.tensor(late, device=dist.device()), "max").item())


def _count_skip(engine, step: int, skipped_in_a_row: int) -> int:
    """Log an fp16 overflow-skipped step; stop the run when the loss scale cannot recover."""
    skipped_in_a_row += 1
    log.warning("optimizer step %d skipped by the fp16 loss scaler (overflow; scale now %s); it does not count "
                "toward the run's steps", step, getattr(engine.optimizer, "cur_scale", "?"))
    if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteLossError(f"{skipped_in_a_row} optimizer steps in a row overflowed in fp16 before step "
                                 f"{step}; stopping. The last good checkpoint is intact: lower the learning rate, "
                                 f"use bf16, or check the data, then resume with --resume.")
    return skipped_in_a_row


def _check_finite(num_non_finite: float, loss: float, step: int, uses_loss_scaler: bool) -> None:
    """Stop on a step whose micro-batches (``num_non_finite`` of them, all ranks) had a non-finite loss, unless
    an fp16 loss scaler skips such steps."""
    if num_non_finite and not uses_loss_scaler:
        # Every rank sees the same count and stops together; no checkpoint is written, so the last good one stays.
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at optimizer step {step}; stopping. The last good checkpoint is "
            f"intact: lower the learning rate or check the data, then resume with --resume.")


def _log_step(engine, logbook: Logbook, cfg: LoopConfig, step: int, window: _Window, lr: float,
              sentences_seen: int) -> None:
    logbook.advance(step, {"loss": window.sums["loss"] / window.steps,
                           "tok/s": window.tokens / max(window.seconds, 1e-9)})
    if step % cfg.log_every and step != cfg.max_steps:
        return
    metrics = window.take()
    if "loss_mlm" in metrics:
        metrics["train_ppl"] = math.exp(min(metrics["loss_mlm"], 50.0))
    grad_norm = engine.get_global_grad_norm()
    metrics.update({
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "samples_seen": engine.global_samples,  # skipped fp16 steps consumed their samples too
        "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)) if engine.fp16_enabled() else 1.0,
        "skipped_steps": float(engine.skipped_steps),
        "sentences_seen": sentences_seen,
    })
    if cfg.sentences_per_epoch:
        metrics["epoch"] = sentences_seen / cfg.sentences_per_epoch
    if cfg.sentences_per_lang is not None:
        metrics.update({f"sentences_{code}": n for code, n in cfg.sentences_per_lang(sentences_seen).items()})
    logbook.log_train(step, metrics, engine.fp16_enabled())


def _validate(evaluate: Callable[[], dict[str, float]], logbook: Logbook, step: int) -> dict[str, float]:
    val = evaluate()
    if val:
        logbook.log(step, val)
    per_lang = " ".join(f"{k[len('val_ppl_'):]} {v:.2f}" for k, v in sorted(val.items())
                        if k.startswith("val_ppl_"))
    if "val_ppl" in val:
        log.info("validation at step %d: perplexity %.3f (%s)", step, val["val_ppl"], per_lang)
    return val


@torch.no_grad()
def mlm_perplexity(model, batches: Iterable[dict], lang_codes: Sequence[str] | None = None) -> dict[str, float]:
    """MLM perplexity overall (``val_ppl``) and per language (``val_ppl_<code>``), summed over every rank's share
    of the validation stream. A batch's ``lang_ids`` index ``lang_codes``; None: the ``lang_codes`` of
    ``batches`` (a :class:`ds_kd.data.reader.ShardReader` reads them from the shards manifest), else the paper's eight.

    Under ZeRO-3 a forward pass is a collective, so every rank runs the same number of passes: a rank whose
    share is exhausted runs a throwaway batch with weight zero until all are done."""
    device = dist.device()
    was_training = model.training
    model.eval()
    codes = tuple(lang_codes or getattr(batches, "lang_codes", None) or LANGS)
    loss_sum = torch.zeros(len(codes), device=device, dtype=torch.float64)
    count = torch.zeros(len(codes), device=device, dtype=torch.float64)
    stream = iter(batches)
    filler = None
    while True:
        batch = next(stream, None)
        if not dist.all_reduce(torch.tensor(float(batch is not None), device=device), "max").item():
            break
        real = batch is not None
        if real:
            batch = to_device(batch, device)
            filler = batch if filler is None else filler
        else:  # a repeat of an earlier batch, or a one-token stand-in if this rank never had one
            batch = filler if filler is not None else _stand_in_batch(device)
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                    position_ids=batch.get("position_ids"), sequence_ids=batch.get("sequence_ids"))
        if not real:
            continue
        labels = batch["labels"][out.predicted]
        ce = F.cross_entropy(out.logits.float(), labels, reduction="none").double()
        lang_ids = batch["lang_ids"]  # [B] per row, or [B, T] per token in packed rows
        lang = (lang_ids if lang_ids.dim() == 2 else lang_ids[:, None].expand_as(batch["labels"]))[out.predicted]
        loss_sum.index_add_(0, lang, ce)
        count.index_add_(0, lang, torch.ones_like(ce))
    dist.all_reduce(loss_sum)
    dist.all_reduce(count)
    model.train(was_training)
    metrics = {"val_ppl": math.exp(loss_sum.sum().item() / max(count.sum().item(), 1.0)),
               "val_tokens": count.sum().item()}
    for i, lang in enumerate(codes):
        if count[i] > 0:
            metrics[f"val_ppl_{lang}"] = math.exp(loss_sum[i].item() / count[i].item())
    return metrics


def _stand_in_batch(device: torch.device) -> dict:
    ids = torch.tensor([[2, 4, 3]], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([[-100, 5, -100]], device=device)}
