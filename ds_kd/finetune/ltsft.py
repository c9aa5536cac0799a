"""Lottery-ticket sparse fine-tuning (LT-SFT): BiStil's second phase (Ansell et al., 2022 and 2023; code:
AlanAnsell/bistil ``src/sft/lt_sft.py``, cambridgeltl/composable-sft).

1. phase A: fine-tune the whole model (``full_epochs``);
2. keep the ``K = floor(density x N_body)`` body weights whose values moved most (|after - before|);
3. reset every weight to its value before phase A, and fine-tune again with only those ``K`` body weights
   trainable (phase B), the head dense, LayerNorm frozen.

The body is the encoder's trainable weights other than LayerNorm (the embeddings join when they are trained);
the head is everything outside the encoder. Entries outside the mask are put back to their start after every
optimizer step (:meth:`SparseMask.restore`): a zero gradient does not keep AdamW's weight decay from moving
them, and a restore is exact where gradient masking is not. The result is a sparse difference from the start
(:func:`sparse_difference`: indices and values per tensor) beside the merged model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ds_kd.distill.module import DistillConfig
from ds_kd.errors import UsageError
from ds_kd.finetune import state
from ds_kd.finetune.distill import distill_settings, prepare_ft_distill, run_ft_distill, teacher_model_dir
from ds_kd.finetune.heads import load_task_model
from ds_kd.finetune.config import FinetuneConfig
from ds_kd.finetune.job import FinetuneResult, fit, prepare, result_from_dict, run, run_name, test_and_write
from ds_kd.finetune.loop import task_loss

PHASE_A = "full"
"""Phase A's job directory inside the LT-SFT job's."""
PHASE_A_SUFFIX = ", phase A (dense)"
"""Phase A's row name is the LT-SFT job's with this suffix: its ``result.json`` (dense fine-tuning of the same
student for ``full_epochs``, BiStil's comparison when ``full_epochs`` equals the sparse epochs) is a row of the report
of its own, never taken for the LT-SFT row (a job stopped in phase B has only phase A's result)."""
MASK_FILE = "sparse_mask.safetensors"
"""The chosen weights (uint8 per body tensor), kept so a resumed phase B trains the same ones."""
DIFF_FILE = "sparse_diff.safetensors"
"""The sparse difference from the start (:meth:`SparseMask.difference`)."""


def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The encoder's parameters LT-SFT may make sparse: those that require gradients, LayerNorm excluded."""
    return {name: p for name, p in model.named_parameters()
            if name.startswith("encoder.") and p.requires_grad and "LayerNorm" not in name}


def select_top_k(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                 density: float) -> dict[str, torch.Tensor]:
    """Boolean masks (one per tensor of ``start``) selecting exactly ``K = floor(density x N)`` entries, N the
    entries of all tensors together: those with the largest ``|tuned - start|``. Ties at the K-th value are
    broken by position (the tensors in sorted-name order, entries in flat order), so K is exact and the choice
    deterministic. Raises ValueError for a density outside (0, 1]."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = sorted(start)
    moved = torch.cat([(tuned[n].detach().float() - start[n].detach().float()).abs().flatten().cpu()
                       for n in names])
    k = math.floor(density * moved.numel())
    order = torch.sort(moved, descending=True, stable=True).indices[:k]
    flat = torch.zeros(moved.numel(), dtype=torch.bool)
    flat[order] = True
    masks, at = {}, 0
    for n in names:
        size = start[n].numel()
        masks[n] = flat[at:at + size].view(start[n].shape)
        at += size
    return masks


class SparseMask:
    """The phase-B constraint: after every optimizer step, the body entries outside ``masks`` are put back to
    ``start`` (bit-identical, whatever the optimizer and its weight decay did to them); LayerNorm is frozen."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        freeze_layer_norms(model)
        self.params = body_parameters(model)
        if set(self.params) != set(masks):
            raise UsageError(f"the sparse mask names other tensors than the model's body (mask file of another "
                             f"model or settings?): {sorted(set(masks) ^ set(self.params))[:3]}")
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the entries outside the mask after each of ``optimizer``'s steps."""
        optimizer.register_step_post_hook(lambda *_: self.restore())

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(torch.where(self.masks[name], p, self.start[name]))

    @torch.no_grad()
    def difference(self) -> dict[str, torch.Tensor]:
        """The sparse difference from the start: ``<name>.indices`` (flat, int64) and ``<name>.values`` (value now
        minus start) of every body entry that differs."""
        out = {}
        for name, p in self.params.items():
            delta = (p.detach() - self.start[name]).flatten().cpu()
            changed = torch.nonzero(p.detach().flatten().cpu() != self.start[name].flatten().cpu()).flatten()
            out[f"{name}.indices"], out[f"{name}.values"] = changed, delta[changed].contiguous()
        return out


def freeze_layer_norms(model: nn.Module) -> None:
    """LT-SFT trains no LayerNorm of the encoder."""
    for name, p in model.named_parameters():
        if name.startswith("encoder.") and "LayerNorm" in name:
            p.requires_grad_(False)


def apply_difference(model: nn.Module, difference: dict[str, torch.Tensor]) -> None:
    """Add a sparse difference (:meth:`SparseMask.difference`) to ``model``'s parameters in place: the start plus
    the difference is the sparsely fine-tuned body."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, indices in difference.items():
            if key.endswith(".indices"):
                name = key[:-len(".indices")]
                flat = params[name].view(-1)
                flat[indices] += difference[f"{name}.values"].to(flat.dtype)


@dataclass
class SparseConfig:
    """Lottery-ticket sparse fine-tuning settings (BiStil: density 0.08, 3 full + 10 sparse epochs for NER)."""

    density: float = 0.08
    """Share of the body's weights that phase B trains (K = floor(density x body weights))."""
    full_epochs: int = 3
    """Epochs of phase A (full fine-tuning that chooses the weights); phase B runs the job's ``epochs``."""

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise UsageError(f"--sparse-density must be in (0, 1], got {self.density}")
        if self.full_epochs < 1:
            raise UsageError(f"--full-epochs must be at least 1, got {self.full_epochs}")


def bistil_task_losses(task_weight: float = 0.0, temperature: float = 2.0) -> DistillConfig:
    """BiStil's task distillation loss: soft cross-entropy against the task teacher at ``temperature`` (at the
    word starts for tagging), hidden-state MSE with the embeddings in its mean and attention-probability MSE,
    averaged over layers; the hard-label task loss at ``task_weight`` (0: off)."""
    return DistillConfig(mlm_weight=task_weight, output_weight=1.0, embedding_weight=0.0, hidden_weight=1.0,
                         attention_weight=1.0, temperature=temperature, layer_reduction="mean",
                         attention_target="probabilities", embeddings_in_hidden=True)


def run_ltsft(cfg: FinetuneConfig, sparse: SparseConfig, teacher: str | Path | None = None,
              distill_cfg: DistillConfig | None = None) -> FinetuneResult:
    """LT-SFT of ``cfg.model`` on the task (with ft-distill from ``teacher`` when given, in both phases): phase A in
    ``<out>/full`` (a job of its own, its row name suffixed :data:`PHASE_A_SUFFIX`: skipped when done,
    resumable), the mask in ``<out>/sparse_mask.safetensors`` (kept for a resume of phase B), phase B in
    ``<out>`` with ``result.json``'s ``sparse`` facts and the sparse difference
    ``<out>/sparse_diff.safetensors`` beside the merged model (``<out>/model`` with ``save_model``)."""
    from safetensors.torch import load_file, save_file

    out = Path(cfg.out)
    directory = teacher_model_dir(teacher) if teacher is not None else None
    distill_cfg = distill_cfg or DistillConfig()
    extra = {"sparse": asdict(sparse), **(distill_settings(directory, distill_cfg) if directory else {})}
    settings = state.job_settings(cfg, extra)
    if (saved := state.check_out(cfg, settings, "LT-SFT job")) is not None:
        return result_from_dict(saved)
    phase_a = replace(cfg, out=str(out / PHASE_A), epochs=sparse.full_epochs, save_model=True,
                      name=(cfg.name or run_name(cfg.model)) + PHASE_A_SUFFIX)
    run_ft_distill(phase_a, directory, distill_cfg) if directory else run(phase_a)
    if directory:
        job, loss_fn, extra_params = prepare_ft_distill(cfg, settings, directory, distill_cfg)
    else:
        job, loss_fn, extra_params = prepare(cfg, settings), task_loss, []
    mask_file = out / MASK_FILE
    freeze_layer_norms(job.model)
    if cfg.resume and mask_file.is_file():
        masks = {n: m.bool() for n, m in load_file(str(mask_file)).items()}
    else:
        tuned, _ = load_task_model(Path(phase_a.out) / "model")
        start = body_parameters(job.model)
        masks = select_top_k(start, {n: p for n, p in tuned.named_parameters() if n in start}, sparse.density)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: m.to(torch.uint8) for n, m in masks.items()}, str(mask_file))
    constraint = SparseMask(job.model, masks)
    print(f"[ltsft] phase B: {sum(int(m.sum()) for m in masks.values())} of "
          f"{sum(m.numel() for m in masks.values())} body weights trainable (density {sparse.density:g})", flush=True)
    best_epoch, dev_best, history = fit(job, loss_fn, extra_params, constraint.attach)
    difference = constraint.difference()
    save_file(difference, str(out / DIFF_FILE))
    facts = {**asdict(sparse), "k": sum(int(m.sum()) for m in masks.values()),
             "num_body_weights": sum(m.numel() for m in masks.values()),
             "num_changed_body_weights": sum(int(v.numel()) for k, v in difference.items() if k.endswith(".values")),
             "mask_file": MASK_FILE, "difference_file": DIFF_FILE}
    return test_and_write(job, best_epoch, dev_best, history, facts)
