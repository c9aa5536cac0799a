"""XtremeDistil's recipe pieces (Mukherjee & Hassan Awadallah, ACL 2020; code: microsoft/xtreme-distil-transformers).

A teacher fine-tuned on a task labels unlabelled transfer text; a student of any shape learns from it in stages:

1. **representation transfer** (``represent``): MSE between the teacher's hidden states and the student's, each
   student hidden state through its own learned projection where widths differ; the student's L_S + 1 hidden
   states (embeddings and every layer) matched to the teacher's top L_S + 1 (``layer_map(..., "top")``, as
   XtremeDistilTransformers) or to every k-th (``"uniform"``); attention-score MSE optional;
2. **logit distillation** (``logits``): MSE on the teacher's raw task logits over real tokens (soft
   cross-entropy at a temperature as an option), first with only the task head trainable, then unfreezing one
   group at a time top-down (the top encoder layer first, the embeddings last unless frozen);
3. **hard labels** (``labels``): the task's cross-entropy on the English training set, with the same schedule.

The student's word embeddings are the teacher's compressed to the student's width by PCA (``pca_embeddings``),
optionally frozen. Everything here is pure (tensors and modules in, tensors out); the run is
``ds_kd.finetune.xtremedistil_run``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ds_kd.distill.losses import attention_mse, hidden_mse, match_heads, soft_cross_entropy
from ds_kd.errors import UsageError
from ds_kd.finetune.config import LAYER_MAPS, STAGES
from ds_kd.finetune.heads import TaskModel
from ds_kd.models.sentence_attention import SentenceScores



def pca_embeddings(weight_VD: torch.Tensor, width: int) -> torch.Tensor:
    """The rows of ``weight_VD`` [V, D] projected on their ``width`` leading principal components: [V, width].

    XtremeDistil compresses the teacher's word-embedding matrix this way to initialise a narrower student. The
    rows are centred (the mean row subtracted), the components are the right singular vectors of the centred
    matrix (``torch.linalg.svd``, exact, deterministic on the CPU), and each component's sign is fixed so that
    its largest-magnitude entry is positive (SVD's sign is arbitrary). Computed in float64 and returned in the
    input's dtype. Raises UsageError when ``width`` exceeds ``min(V, D)``."""
    rows, dims = weight_VD.shape
    if not 1 <= width <= min(rows, dims):
        raise UsageError(f"cannot compress a {rows} x {dims} embedding matrix to width {width} by PCA: the width must "
                         f"lie in 1..{min(rows, dims)}")
    centred = weight_VD.double() - weight_VD.double().mean(dim=0, keepdim=True)
    _, _, vh_KD = torch.linalg.svd(centred, full_matrices=False)
    components_WD = vh_KD[:width]
    signs = torch.sign(components_WD.gather(1, components_WD.abs().argmax(dim=1, keepdim=True)))
    return (centred @ (components_WD * signs).T).to(weight_VD.dtype)


def layer_map(num_teacher_layers: int, num_student_layers: int, kind: str = "top") -> list[int]:
    """Teacher hidden state (0 = embeddings, i = layer i) for each student hidden state 0..L_S.

    ``top`` (XtremeDistilTransformers): the teacher's top L_S + 1 hidden states, in order: 12 -> 4 gives
    [8, 9, 10, 11, 12]. ``uniform``: every k-th, k = L_T / L_S: 12 -> 4 gives [0, 3, 6, 9, 12]. A teacher
    shallower than the student, an unknown kind or a uniform map that does not divide is refused (UsageError)."""
    if kind not in LAYER_MAPS:
        raise UsageError(f"--layer-map must be one of {', '.join(LAYER_MAPS)}, got {kind!r}")
    if num_teacher_layers < num_student_layers:
        raise UsageError(f"the teacher has {num_teacher_layers} layers, fewer than the student's {num_student_layers}:"
                         f" a student learns from a deeper (or equally deep) teacher; choose a shallower student")
    if kind == "top":
        return list(range(num_teacher_layers - num_student_layers, num_teacher_layers + 1))
    if num_teacher_layers % num_student_layers:
        raise UsageError(f"--layer-map uniform: the teacher's {num_teacher_layers} layers are not a multiple of the "
                         f"student's {num_student_layers}; use --layer-map top")
    step = num_teacher_layers // num_student_layers
    return [m * step for m in range(num_student_layers + 1)]


@dataclass(frozen=True)
class SubStage:
    """One step of the schedule: the stage and the parameter groups that train in it."""

    stage: str
    """``represent``, ``logits`` or ``labels``."""
    groups: tuple[str, ...]
    """Trainable groups (``parameter_groups`` names); ``represent`` also trains the projections."""

    @property
    def name(self) -> str:
        return f"{self.stage}:{'+'.join(self.groups)}"


def parameter_groups(model: TaskModel) -> dict[str, list[nn.Parameter]]:
    """The student's groups, in unfreezing order: ``head`` (every parameter outside the encoder), ``layer_L``
    .. ``layer_1`` (each encoder layer), ``embeddings`` (word, position, token type, their LayerNorm)."""
    layers = model.encoder.encoder.layer
    groups = {"head": [p for _, p in model.head_parameters()]}
    for i in range(len(layers), 0, -1):
        groups[f"layer_{i}"] = list(layers[i - 1].parameters())
    groups["embeddings"] = list(model.encoder.embeddings.parameters())
    return groups


def schedule(num_layers: int, freeze_embeddings: bool, stages: tuple[str, ...] = STAGES) -> list[SubStage]:
    """XtremeDistil's sub-stages: ``represent`` with every group (the embeddings unless frozen), then for
    ``logits`` and ``labels`` each: the head alone, then one more group at a time top-down (layer L first, the
    embeddings last unless frozen), as in the official code's gradual unfreezing."""
    order = ["head", *(f"layer_{i}" for i in range(num_layers, 0, -1))] + ([] if freeze_embeddings else ["embeddings"])
    plan = []
    for stage in stages:
        if stage == "represent":
            plan.append(SubStage(stage, tuple(g for g in order if g != "head")))
        else:
            plan.extend(SubStage(stage, tuple(order[: n + 1])) for n in range(len(order)))
    return plan


def set_trainable(model: TaskModel, groups: tuple[str, ...]) -> list[nn.Parameter]:
    """Make exactly ``groups`` require gradients (every other student parameter frozen); returns them."""
    named = parameter_groups(model)
    unknown = [g for g in groups if g not in named]
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown}; known: {list(named)}")
    model.requires_grad_(False)
    trainable = [p for g in groups for p in named[g]]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def build_projections(student_width: int, teacher_width: int, num_states: int, init_std: float) -> nn.ModuleList:
    """One ``Linear(student_width -> teacher_width)`` per student hidden state (empty when widths are equal)."""
    if student_width == teacher_width:
        return nn.ModuleList()
    projections = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(num_states))
    for linear in projections:
        nn.init.normal_(linear.weight, std=init_std)
        nn.init.zeros_(linear.bias)
    return projections


def representation_loss(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                        real_BT: torch.Tensor, mapped: list[int], projections: nn.ModuleList,
                        denominator: float | None = None) -> torch.Tensor:
    """Stage 1: the sum over student hidden states m of the MSE between projected state m and the teacher's
    ``mapped[m]``, over real tokens (``real_BT`` [B, T]; ``denominator``: the global batch's real tokens)."""
    terms = [hidden_mse(projections[m](s) if len(projections) else s, teacher_states[g], real_BT, denominator)
             for m, (s, g) in enumerate(zip(student_states, mapped))]
    return torch.stack(terms).sum()


def attention_loss(student_scores: tuple, teacher_scores: tuple, keep_BT: torch.Tensor, mapped: list[int],
                   denominator: float | None = None) -> torch.Tensor:
    """Optional stage-1 term: attention-score MSE of student layer m against teacher layer ``mapped[m]`` (m >= 1),
    heads averaged where the counts differ (``ds_kd.distill.losses.match_heads``), summed over the layers.
    Teacher scores given dense ([B, H, T, T], the teacher cache's) where the student's are per sentence (packed
    rows) are brought to the student's layout first."""
    terms = []
    for m in range(1, len(mapped)):
        teacher = teacher_scores[mapped[m] - 1]
        if isinstance(student_scores[m - 1], SentenceScores) and isinstance(teacher, torch.Tensor):
            teacher = SentenceScores.from_dense(teacher, student_scores[m - 1].buckets)
        teacher, student = match_heads(teacher, student_scores[m - 1])
        terms.append(attention_mse(student, teacher, keep_BT, denominator))
    return torch.stack(terms).sum()


def logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, real: torch.Tensor,
               temperature: float | None = None, denominator: float | None = None) -> torch.Tensor:
    """Stage 2: distance of the student's task logits from the teacher's raw logits where ``real`` holds.

    ``student_logits``/``teacher_logits``: [B, T, C] (per token) or [B, C] (per example); ``real``: [B, T] or [B]
    bool (real tokens: padding and a packed row's free tail never count). ``temperature`` None: XtremeDistil's MSE,
    the mean over real rows of the mean squared difference over the C logits; else the soft cross-entropy at that
    temperature (times T^2). ``denominator``: the global batch's real rows, replacing this batch's own count."""
    if student_logits.dim() == 2:
        student_logits, teacher_logits, real = student_logits[:, None], teacher_logits[:, None], real[:, None]
    if temperature is None:
        return hidden_mse(student_logits, teacher_logits, real, denominator)
    return soft_cross_entropy(student_logits[real.bool()], teacher_logits[real.bool()], temperature,
                              denominator=denominator)
