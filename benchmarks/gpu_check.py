"""One-shot check of the GPU path: attention backends, the fp16 teacher, host syncs, packed pretraining speed.

    make gpu-check                                   # python benchmarks/gpu_check.py --out out/gpu_check.json
    python benchmarks/gpu_check.py --device cpu      # the tiny CPU twin of every check (what the tests run)

On one CUDA GPU, in a few minutes (no data or checkpoint needed: random weights and synthetic packed rows of
sentences of log-normal lengths around 24 tokens, 15% of them predicted):

1. ``attention``: the model's two ways for packed rows to attend (``sentences``: per sentence, the default;
   ``masked``: one T x T product with the block-diagonal mask), forward and backward in fp16 and bf16 under each
   SDPA backend (math, flash, efficient, cudnn, forced with ``torch.nn.attention.sdpa_kernel``), against the fp32
   math run of the masked path: relative L2 error of the encoder outputs and of every layer's attention context
   (the output of ``attention.self``, before LayerNorm hides part of a fault) at real tokens and of all parameter
   gradients, finiteness, median time of forward + backward. A backend that refuses the inputs (flash with an
   attention mask, a backend missing on this device) is reported unavailable with torch's reason.
2. ``flex``: FlexAttention with a document mask (``create_block_mask`` over the sequence ids; compiled on GPU,
   torch's maintained route for packed rows) at the attention op, against fp32 math SDPA with the additive
   block-diagonal mask, beside SDPA with that mask in the same dtype.
3. ``distillation``: a few steps of the paper's shape (mbert8-large teacher in fp16, leanbert student): every loss
   term finite, time per step, host syncs per step.
4. ``pretraining``: packed mbert8-base MLM steps at --max-len 128: real tokens/s, MFU, host syncs per step.

Host syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")`` over one step, by call site. MFU is the
model FLOPs of a step over (step seconds x peak), with

    FLOPs = 6 P N + 12 L D sum_s len_s^2 + 6 (D^2 + D V) M

(P: parameters of the L transformer layers, N: real tokens, len_s: sentence lengths (attention within a sentence
only), D: width, V: vocabulary, M: masked tokens, whose MLM head alone runs) and the peak the device's name gives
in :data:`PEAK_TFLOPS` (dense fp16/bf16 tensor-core FLOP/s of NVIDIA's datasheets) or ``--peak-tflops``.
Training steps run in plain PyTorch (fp32 weights under ``torch.autocast``, a gradient scaler in fp16, AdamW), not
through the DeepSpeed engine, so they time the model, not ZeRO's communication.

Exits 1 when a check that ran gave a non-finite value or an error above its tolerance (the JSON is written
first); without CUDA (and no ``--device cpu``) it says so and exits 0 without writing anything.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_attention import attention_checks, flex_checks, make_batch, median_seconds  # noqa: E402
from ds_kd.distill import DistillConfig, Distiller  # noqa: E402
from ds_kd.cli.flags import HelpFormatter  # noqa: E402
from ds_kd.train.loop import loss_denominators  # noqa: E402
from ds_kd.manifest import atomic_write_text  # noqa: E402
from ds_kd.models.model import BertForMaskedLM, make_config  # noqa: E402
from ds_kd.train.pretrain import mlm_step  # noqa: E402

PEAK_TFLOPS = {"H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "H200 NVL": 835, "H200": 989, "A100": 312}
"""Dense fp16/bf16 tensor-core TFLOP/s by a part of the device name, most specific first (NVIDIA datasheets: half
the figures "with sparsity"; the SXM parts are named e.g. "NVIDIA H100 80GB HBM3")."""


@dataclass(frozen=True)
class Sizes:
    """The models and shapes of one run."""

    attention_model: str
    """Preset of the attention checks' encoder."""
    pretrain_model: str
    """Preset of the pretraining throughput steps."""
    teacher: str
    """Preset of the distillation teacher (cast to fp16 on GPU)."""
    student: str
    """Preset of the distillation student."""
    rows: int
    """Packed rows per batch (the shipped DeepSpeed configs' micro batch on GPU)."""
    max_len: int
    """Tokens per packed row (training's --max-len)."""
    repeats: int
    """Timed calls per attention case and timed training steps (median reported)."""


SIZES = {"cuda": Sizes("mbert8-base", "mbert8-base", "mbert8-large", "leanbert", rows=32, max_len=128, repeats=10),
         "cpu": Sizes("tiny-base", "tiny-base", "tiny-large", "tiny-leanbert", rows=4, max_len=64, repeats=2)}


def call_site(filename: str) -> str:
    """``filename`` relative to the repository when inside it."""
    path = Path(filename).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else filename


def count_syncs(fn, device: torch.device) -> dict:
    """Device-to-host synchronisations of one call of ``fn``, in all and by call site (file:line), from
    ``torch.cuda.set_sync_debug_mode("warn")``; off CUDA, the reason it was not counted."""
    if device.type != "cuda":
        fn()
        return {"count": None, "unavailable": "counted on CUDA only (torch.cuda.set_sync_debug_mode)"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{call_site(w.filename)}:{w.lineno}" for w in caught if "synchronizing" in str(w.message))
    return {"count": sum(sites.values()), "sites": dict(sites.most_common())}


def training_step(model: torch.nn.Module, params: list, loss_of, device: torch.device, dtype: torch.dtype):
    """A closure of one optimizer step: ``loss_of()`` under autocast in ``dtype`` (a gradient scaler in fp16),
    backward, AdamW (fused on CUDA)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype):
            loss = loss_of()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    model.train()
    return step


def distillation_check(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """A few distillation steps with the teacher cast to ``dtype`` (fp16 on GPU; bf16 on CPU, where fp16 is slow or
    missing): every loss term finite, median seconds per step, host syncs of one step."""
    teacher = BertForMaskedLM(make_config(sizes.teacher))
    distiller = Distiller(teacher, BertForMaskedLM(make_config(sizes.student)), DistillConfig(),
                          teacher_dtype=dtype).to(device)
    batch = make_batch(sizes.rows, sizes.max_len, teacher.config.vocab_size, device)
    terms = []

    def loss_of() -> torch.Tensor:
        out = distiller(batch, loss_denominators(batch))
        terms.append(out.terms)
        return out.loss
    step = training_step(distiller, distiller.trainable_parameters(), loss_of, device, dtype)
    seconds = median_seconds(step, sizes.repeats, device)
    syncs = count_syncs(step, device)
    values = {name: [float(t[name]) for t in terms] for name in terms[0]}
    finite = all(math.isfinite(x) for xs in values.values() for x in xs)
    values = {name: [x if math.isfinite(x) else None for x in xs] for name, xs in values.items()}  # strict JSON
    return {"ok": finite, "finite": finite, "teacher": sizes.teacher, "student": sizes.student,
            "teacher_dtype": str(next(distiller.teacher.parameters()).dtype).replace("torch.", ""),
            "steps": len(terms), "terms": values, "seconds_per_step": seconds, "host_syncs_per_step": syncs}


def training_flops(model: BertForMaskedLM, batch: dict) -> float:
    """Model FLOPs of one MLM training step on ``batch`` (forward + backward = 3 x forward; see the module text)."""
    cfg = model.config
    layers = sum(p.numel() for p in model.bert.encoder.parameters())
    counts = loss_denominators(batch)  # real tokens, masked tokens, sum of squared sentence lengths
    return (6 * layers * float(counts["tokens"]) + 12 * cfg.num_hidden_layers * cfg.hidden_size * float(counts["pairs"])
            + 6 * (cfg.hidden_size ** 2 + cfg.hidden_size * cfg.vocab_size) * float(counts["masked"]))


def peak_tflops(device_name: str | None, given: float | None) -> float | None:
    """``given``, else the datasheet peak of a CUDA device's name (:data:`PEAK_TFLOPS`), else None."""
    if given is not None or device_name is None:
        return given
    return next((tflops for part, tflops in PEAK_TFLOPS.items() if part in device_name), None)


def pretraining_check(sizes: Sizes, device: torch.device, dtype: torch.dtype, peak: float | None) -> dict:
    """Packed MLM pretraining steps of ``sizes.pretrain_model``: real tokens/s, MFU (None without a peak), syncs."""
    model = BertForMaskedLM(make_config(sizes.pretrain_model)).to(device)
    batch = make_batch(sizes.rows, sizes.max_len, model.config.vocab_size, device)
    losses = []

    def loss_of() -> torch.Tensor:
        loss = mlm_step(model, batch, loss_denominators(batch))[0]
        losses.append(loss.detach())
        return loss
    step = training_step(model, list(model.parameters()), loss_of, device, dtype)
    seconds = median_seconds(step, sizes.repeats, device)
    syncs = count_syncs(step, device)
    flops = training_flops(model, batch)
    tokens = int(batch["attention_mask"].sum())
    finite = all(math.isfinite(float(x)) for x in losses)
    return {"ok": finite, "finite": finite, "model": sizes.pretrain_model, "rows": sizes.rows,
            "max_len": sizes.max_len, "autocast": str(dtype).replace("torch.", ""), "real_tokens_per_step": tokens,
            "packing_efficiency": tokens / batch["attention_mask"].numel(), "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "flops_per_step": flops, "peak_tflops": peak,
            "mfu": flops / seconds / (peak * 1e12) if peak else None, "host_syncs_per_step": syncs}


def device_facts(device: torch.device) -> dict:
    facts = {"device": device.type, "torch": torch.__version__, "machine": platform.machine()}
    if device.type == "cuda":
        facts.update(name=torch.cuda.get_device_name(device), capability=".".join(
            map(str, torch.cuda.get_device_capability(device))), cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version())
    return facts


def run(device: torch.device, peak: float | None = None) -> dict:
    """Every check on ``device`` with its :data:`SIZES`; the result that the JSON holds."""
    sizes = SIZES[device.type]
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and spinning ones crawl on a busy machine
    torch.manual_seed(0)
    start = time.perf_counter()
    facts = device_facts(device)
    shape = (sizes.attention_model, sizes.rows, sizes.max_len, sizes.repeats)
    result = {**facts, "sizes": asdict(sizes), "attention": attention_checks(*shape, device),
              "flex": flex_checks(*shape, device), "distillation": distillation_check(sizes, device, dtype),
              "pretraining": pretraining_check(sizes, device, dtype, peak_tflops(facts.get("name"), peak))}
    result["wall_s"] = time.perf_counter() - start
    return result


def failures(result: dict) -> list[str]:
    """One line per check that ran and failed (ok False)."""
    cases = [*result["attention"], *result["flex"], result["distillation"], result["pretraining"]]
    return [json.dumps({k: v for k, v in c.items() if k not in ("terms", "host_syncs_per_step")}) for c in cases
            if c["ok"] is False]


def summary(result: dict) -> str:
    """The human-readable lines of the result."""
    def err(x):
        return "-" if x is None else f"{x:.1e}"

    lines = [f"gpu-check on {result.get('name', result['device'])}, torch {result['torch']}"]
    for c in [*result["attention"], *result["flex"]]:
        what = f"{c.get('path', c.get('attention'))} {c['dtype']} {c.get('backend', '')}".strip()
        state = {True: "ok", False: "FAIL", None: "unavailable"}[c["ok"]]
        if "unavailable" in c:
            lines.append(f"  {what:34s} {state}: {c['unavailable']}")
        else:
            errors = " ".join(f"{k[:-len('_rel_err')]} {err(v)}" for k, v in c.items() if k.endswith("_rel_err"))
            lines.append(f"  {what:34s} {state:4s} {c['ms']:8.2f} ms  rel. err. {errors}"
                         + (" (forward only)" if "backward_unavailable" in c else ""))
    d, p = result["distillation"], result["pretraining"]
    lines.append(f"  distillation ({d['teacher']} in {d['teacher_dtype']} -> {d['student']}): "
                 f"{'finite' if d['finite'] else 'NON-FINITE'} losses, {1000 * d['seconds_per_step']:.1f} ms/step, "
                 f"host syncs/step {d['host_syncs_per_step']['count']}")
    mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
    lines.append(f"  pretraining {p['model']} packed --max-len {p['max_len']}: {p['tokens_per_s']:.0f} real tokens/s, "
                 f"MFU {mfu} (peak {p['peak_tflops']} TFLOP/s), host syncs/step {p['host_syncs_per_step']['count']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the check on the first GPU; cpu: its tiny twin (tiny models, a few steps)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_check.json"), help="the JSON of the results")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense fp16/bf16 TFLOP/s for the MFU (default: from the device name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU found (torch.cuda.is_available() is False); nothing checked, no JSON written. "
              "Run it on a machine with one, or `--device cpu` for the tiny CPU twin.")
        return 0
    result = run(torch.device(args.device), args.peak_tflops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"gpu-check: {args.out} written in {result['wall_s']:.0f} s")
    failed = failures(result)
    for line in failed:
        print(f"gpu-check FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
