"""Optimizers and learning-rate schedules: AdamW (torch) or LAMB, linear warmup then linear or cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn

from ds_kd.errors import UsageError


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam moments with a per-tensor trust ratio ||w|| / ||update||.

    Under ZeRO the optimizer sees flat partitions, so the trust ratio is taken per partition, not per layer."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights are not decayed (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise UsageError(f"unknown optimizer {name!r}; known: adamw, lamb")


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "constant":
        return 1.0
    raise UsageError(f"unknown decay {decay!r}; known: linear, cosine, constant")


class LRSchedule:
    """The multiplier a ``LambdaLR`` applies; the run's length can be set after the scheduler exists."""

    def __init__(self, warmup_steps: int = 0, total_steps: int = 1, decay: str = "constant"):
        self.args = (warmup_steps, total_steps, decay)

    def set(self, warmup_steps: int, total_steps: int, decay: str,
            scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Fix the run's length and re-apply step 0's learning rate to the scheduler's optimizer."""
        lr_factor(0, warmup_steps, total_steps, decay)  # validates ``decay`` now, not at the first step
        self.args = (warmup_steps, total_steps, decay)
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * self(scheduler.last_epoch)

    def __call__(self, step: int) -> float:
        return lr_factor(step, *self.args)
