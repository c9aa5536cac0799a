"""The attention part of ``gpu_check.py``: the model's packed-row attention paths under each SDPA backend and
FlexAttention with a document mask, compared with the fp32 math result (see ``gpu_check.py``'s text)."""
from __future__ import annotations

import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ds_kd.models.model import PACKED_ATTENTION, BertForMaskedLM, BertModel, attention_keep, make_config
from ds_kd.data.packing import best_fit, packed_batch

BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp16": 2e-2, "bf16": 8e-2}
"""Largest relative L2 error (||x - ref|| / ||ref||) against the fp32 math reference, per dtype (unit roundoff
2^-11 and 2^-8, grown through the layers and the backward pass)."""


def make_batch(rows: int, max_len: int, vocab_size: int, device: torch.device, seed: int = 0) -> dict:
    """Packed rows (:func:`ds_kd.data.packing.packed_batch`, [rows, <= max_len] each) of synthetic sentences: lengths
    log-normal around 24 tokens (4..max_len), random ids, 15% of the tokens predicted (``labels``)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(24), 0.6, rows * max_len // 8), 4, max_len).astype(int)
    packed = best_fit(lengths.tolist(), max_len)
    chosen = sorted(rng.choice(len(packed), rows, replace=False))
    ids = [rng.integers(5, vocab_size, n) for n in lengths]
    labels = [np.where(rng.random(n) < 0.15, x, -100) for n, x in zip(lengths, ids)]
    batch = packed_batch(ids, labels, [0] * len(ids), [packed[i] for i in chosen], pad_id=0)
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call, the device synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attempt(fn):
    """``(fn(), None)``, or ``(None, reason)`` when torch refuses (RuntimeError, NotImplementedError): the error's
    first line and torch's warnings (e.g. why each SDPA backend declined)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except (RuntimeError, NotImplementedError) as e:
            notes = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught)
            return None, "; ".join([f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", *notes])[:600]


def compare(got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor], tolerance: float) -> dict:
    """Finiteness and, per name, the relative L2 error ``||got - ref|| / ||ref||`` (key ``<name>_rel_err``; None
    when not finite, or when ``got`` holds None: not computed); ``ok`` when every value is finite and every error
    is within ``tolerance``."""
    result, ok = {}, True
    for name, x in got.items():
        error = None
        if x is not None:
            ok &= bool(x.isfinite().all())
            error = float((x.float() - ref[name]).norm() / ref[name].norm().clamp_min(1e-30))
            ok &= error <= tolerance
        result[f"{name}_rel_err"] = error if error is None or math.isfinite(error) else None
    finite = all(bool(x.isfinite().all()) for x in got.values() if x is not None)
    return {"ok": ok, "finite": finite, **result, "tolerance": tolerance}


def encoder_run(encoder: BertModel, batch: dict, probe_BTD: torch.Tensor, path: str, backend: SDPBackend):
    """A forward + backward closure of ``encoder`` on ``batch`` with ``path`` attention under ``backend`` (loss:
    sum of outputs x ``probe_BTD``, zero at padding). It returns the outputs [B, T, D] and every layer's attention
    context [L, B, T, D]: the output of ``attention.self``, before the projection, residual and LayerNorm that
    would hide much of an attention fault."""
    contexts = []

    def keep(module, inputs, output) -> None:
        contexts.append(output[0].detach())

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        contexts.clear()
        encoder.zero_grad(set_to_none=True)
        encoder.packed_attention = path
        hooks = [layer.attention.self.register_forward_hook(keep) for layer in encoder.encoder.layer]
        try:
            with sdpa_kernel(backend):
                out = encoder(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
                              sequence_ids=batch["sequence_ids"]).last_hidden_state
                out.backward(probe_BTD.to(out.dtype))
        finally:
            for hook in hooks:
                hook.remove()
        return out.detach(), torch.stack(contexts)
    return run


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                      for p in module.parameters()])


def attention_checks(preset: str, rows: int, max_len: int, repeats: int, device: torch.device) -> list[dict]:
    """Per path x dtype x backend, an encoder of ``preset`` on ``rows`` packed rows of ``max_len`` tokens: errors
    of the outputs and of every layer's attention context at real tokens and of all parameter gradients against
    the fp32 math run of the masked path, finiteness, median ms of forward + backward over ``repeats``."""
    reference = BertForMaskedLM(make_config(preset)).bert.to(device).eval()
    batch = make_batch(rows, max_len, reference.config.vocab_size, device)
    real = batch["attention_mask"].bool()
    probe = torch.randn(*real.shape, reference.config.hidden_size,
                        generator=torch.Generator().manual_seed(1)).to(device) * real[..., None]

    def measured(run, encoder) -> dict[str, torch.Tensor]:
        out, contexts = run()
        return {"output": out[real], "attention": contexts[:, real], "grad": flat_grads(encoder)}

    ref = {k: v.float() for k, v in measured(encoder_run(reference, batch, probe, "masked", SDPBackend.MATH),
                                             reference).items()}
    results = []
    for dtype_name, dtype in DTYPES.items():
        encoder = BertForMaskedLM(reference.config).bert.to(device).eval()
        encoder.load_state_dict(reference.state_dict())
        encoder.to(dtype)
        for path in PACKED_ATTENTION:
            for name, backend in BACKENDS.items():
                run = encoder_run(encoder, batch, probe, path, backend)
                entry = {"path": path, "dtype": dtype_name, "backend": name}
                got, reason = attempt(lambda: measured(run, encoder))
                if got is None:  # the math backend always exists: its refusal is a fault
                    entry.update(ok=False if name == "math" else None, unavailable=reason)
                else:
                    entry.update(compare(got, ref, TOLERANCE[dtype_name]))
                    entry["ms"] = 1000 * median_seconds(run, repeats, device)
                results.append(entry)
    return results


def flex_checks(preset: str, rows: int, max_len: int, repeats: int, device: torch.device) -> list[dict]:
    """FlexAttention with a document mask vs fp32 math SDPA with the additive block-diagonal mask, at the
    attention op ([rows, H, T, Dh] of ``preset``'s heads), beside SDPA with that mask, in each dtype."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cfg = make_config(preset)
    batch = make_batch(rows, max_len, cfg.vocab_size, device)
    seq_BT = batch["sequence_ids"]
    rows, width = seq_BT.shape
    gen = torch.Generator().manual_seed(2)
    q, k, v, probe = (torch.randn(rows, cfg.num_attention_heads, width, cfg.head_dim, generator=gen).to(device)
                      for _ in range(4))
    real = batch["attention_mask"].bool()[:, None, :, None]  # real query rows
    probe = probe * real
    keep = attention_keep(batch["attention_mask"], seq_BT)  # boolean: what SDPA takes in every dtype

    def document(b, h, q_idx, kv_idx):
        return (seq_BT[b, q_idx] == seq_BT[b, kv_idx]) & (seq_BT[b, kv_idx] > 0)

    block_mask = create_block_mask(document, rows, None, width, width, device=str(device))
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention

    def case(attend, dtype: torch.dtype, backward: bool = True):
        leaves = [x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v)]

        def run() -> torch.Tensor:
            out = attend(*leaves)
            if backward:
                out.backward(probe.to(out.dtype))
            return out
        return run, leaves

    def outcome(run, leaves) -> dict[str, torch.Tensor | None]:
        out = run().detach().float() * real
        grads = torch.cat([x.grad.float().flatten() for x in leaves]) if leaves[0].requires_grad else None
        return {"output": out, "grad": grads}

    with sdpa_kernel(SDPBackend.MATH):
        ref = outcome(*case(lambda *x: F.scaled_dot_product_attention(*x, attn_mask=keep), torch.float32))
    results = []
    for dtype_name, dtype in DTYPES.items():
        for name, attend in (("flex document mask", lambda *x: flex(*x, block_mask=block_mask)),
                             ("sdpa block-diagonal mask", lambda *x: F.scaled_dot_product_attention(
                                 *x, attn_mask=keep))):
            entry = {"attention": name, "dtype": dtype_name}
            run, leaves = case(attend, dtype)
            start = time.perf_counter()
            got, reason = attempt(lambda: outcome(run, leaves))
            if got is None:  # FlexAttention has no backward on CPU: compare the forward alone
                entry["backward_unavailable"] = reason
                run, leaves = case(attend, dtype, backward=False)
                got, reason = attempt(lambda: outcome(run, leaves))
            if got is None:
                entry.update(ok=None, unavailable=reason)
            else:
                entry["first_call_s"] = time.perf_counter() - start  # includes compilation on GPU
                entry.update(compare(got, ref, TOLERANCE[dtype_name]))
                entry["ms"] = 1000 * median_seconds(run, repeats, device)
            results.append(entry)
    return results

