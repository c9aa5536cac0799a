"""TinyBERT's distillation losses as pure functions on tensors.

Nothing here knows about MLM, models or devices: the same functions serve the first-stage distillation (masked
positions of an MLM batch) and fine-tuning distillation (task logits). Every loss is computed in float32,
whatever the inputs' dtype, because a half-precision teacher's outputs meet a student of another dtype here.

Shape suffixes: B batch, T time, D width, H heads, N rows, V classes (vocabulary).

Every loss is a mean over what it counts (rows, real tokens, real attention pairs). By default the count is
this batch's own; a ``denominator`` replaces it with a count taken elsewhere. The training loop passes the
count of the whole global batch (every micro-batch of the step on every rank, divided by their number,
because DeepSpeed averages the micro-batches' gradients), so the objective is the mean over the global
batch however it is split into micro-batches and ranks (see :func:`ds_kd.train.loop.loss_denominators`).
"""
from __future__ import annotations

import torch

from ds_kd.errors import UsageError
from ds_kd.models.model import divide_by_count, same_sequence_pairs
from ds_kd.models.sentence_attention import SentenceScores


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0, student_log_probs: torch.Tensor | None = None,
                       denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over rows of ``-softmax(teacher/T) . log_softmax(student/T)``, multiplied by ``T**2``.

    ``student_logits`` and ``teacher_logits`` are ``[N, V]`` (or any ``[..., V]``; all leading dimensions are rows).
    The ``T**2`` factor (Hinton et al., 2015) keeps the gradient's size independent of the temperature: the
    gradient of the soft cross-entropy with respect to the logits shrinks as ``1/T**2``, so without the factor
    changing the temperature would silently change the term's effective weight. At the default ``T = 1`` the
    factor is 1 and the loss is exactly the paper's ``-z_t . log z_s``. The teacher's side carries no gradient.
    No rows (nothing masked in a batch) gives a zero that still belongs to the student's graph.
    ``student_log_probs``, ``log_softmax(student_logits / T)`` computed already (the MLM loss needs the same at
    ``T = 1``), saves a pass over the vocabulary forwards and backwards. ``denominator`` (rows) replaces the
    row count of the mean.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student_NV = student_logits.float().reshape(-1, student_logits.shape[-1])
    teacher_NV = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    if student_NV.shape[0] == 0:
        return student_NV.sum() * 0.0
    target_NV = torch.softmax(teacher_NV / temperature, dim=-1)
    if student_log_probs is None:
        student_log_probs = torch.log_softmax(student_NV / temperature, dim=-1)
    per_row_N = -(target_NV * student_log_probs.reshape(student_NV.shape)).sum(dim=-1)
    return _mean(per_row_N.sum(), per_row_N.shape[0], denominator) * temperature ** 2


def hidden_mse(student_BTD: torch.Tensor, teacher_BTD: torch.Tensor, attention_mask: torch.Tensor,
               denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean squared error over the real tokens only (``attention_mask`` ``[B, T]``, nonzero = real token).

    The mean runs over real tokens times width, so padding neither adds error nor dilutes the mean. The
    difference is masked before it is squared, so values at padded positions (even inf or NaN) reach neither
    the loss nor the gradient. ``denominator`` (real tokens; the width is multiplied in here) replaces the
    batch's own token count.
    """
    _check_same_shape("hidden states", student_BTD, teacher_BTD)
    real_BT = attention_mask.bool()
    if real_BT.shape != student_BTD.shape[:2]:
        raise ValueError(f"attention_mask {tuple(real_BT.shape)} does not match hidden states "
                         f"{tuple(student_BTD.shape)}")
    diff_BTD = student_BTD.float() - teacher_BTD.detach().float()
    diff_BTD = torch.where(real_BT[..., None], diff_BTD, torch.zeros_like(diff_BTD))
    width = student_BTD.shape[-1]
    return _mean(diff_BTD.square().sum(), real_BT.sum(), denominator) / width


def attention_mse(student_BHTT: torch.Tensor | SentenceScores, teacher_BHTT: torch.Tensor | SentenceScores,
                  attention_mask: torch.Tensor, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean squared error of pre-softmax attention scores over (real query, real key) pairs of one sentence.

    ``attention_mask`` [B, T] is a 0/1 mask of real tokens (one sentence per row) or, for packed rows, the
    sequence ids (1, 2, ... per sentence of the row, 0 at padding): a pair counts when query and key belong to
    the same sentence, which is all that attention computes in either layout. The scores come without the
    mask added (adding the dtype's minimum would swamp the loss), so it is applied here, to the difference
    before it is squared: other pairs contribute nothing to the loss or the gradient (even where a score is inf
    or NaN) and do not count in the mean. Both sides must have the same head count: see ``match_heads``.
    ``denominator`` (pairs; the head count is multiplied in here) replaces the batch's own pair count.
    Packed rows attending per sentence give :class:`SentenceScores` on both sides (the same layout): the pairs
    are then those of each sentence's block, the same pairs as in the [B, H, T, T] form.
    """
    if isinstance(student_BHTT, SentenceScores) or isinstance(teacher_BHTT, SentenceScores):
        return _sentence_attention_mse(student_BHTT, teacher_BHTT, denominator)
    _check_same_shape("attention scores", student_BHTT, teacher_BHTT)
    if attention_mask.shape != (student_BHTT.shape[0], student_BHTT.shape[-1]):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match attention scores "
                         f"{tuple(student_BHTT.shape)}")
    pair_B1TT = same_sequence_pairs(attention_mask.long())[:, None]
    diff_BHTT = student_BHTT.float() - teacher_BHTT.detach().float()
    diff_BHTT = torch.where(pair_B1TT, diff_BHTT, torch.zeros_like(diff_BHTT))
    heads = student_BHTT.shape[1]
    return _mean(diff_BHTT.square().sum(), pair_B1TT.sum(), denominator) / heads


def _sentence_attention_mse(student: SentenceScores, teacher: SentenceScores, denominator) -> torch.Tensor:
    if not (isinstance(student, SentenceScores) and isinstance(teacher, SentenceScores)) \
            or student.buckets.shapes != teacher.buckets.shapes:
        raise ValueError("student and teacher attention scores of packed rows must share one per-sentence layout "
                         "(both models given the same sequence_ids)")
    total, pairs = None, 0
    for s_nHww, t_nHww, keep in zip(student.scores, teacher.scores, student.buckets.keeps()):
        _check_same_shape("attention scores", s_nHww, t_nHww)
        pair_n1ww = (keep[:, :, None] & keep[:, None, :])[:, None]
        diff = s_nHww.float() - t_nHww.detach().float()
        part = torch.where(pair_n1ww, diff, torch.zeros_like(diff)).square().sum()
        total = part if total is None else total + part
        pairs = pairs + pair_n1ww.sum()
    return _mean(total, pairs, denominator) / student.num_heads


def match_heads(teacher_BHTT: torch.Tensor, student_BHTT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make teacher and student attention scores comparable when their head counts differ.

    Equal head counts: both returned unchanged, head i compared with head i (TinyBERT). Different counts (16
    teacher heads vs 12 student heads): both sides averaged over heads to ``[B, 1, T, T]`` and the averaged maps
    compared. 16 is not a multiple of 12, so no grouping of teacher heads onto student heads is exact; the
    head-average is the one map both models define, it needs no extra parameters, and it leaves the student
    free to split the teacher's attention pattern over its own heads as it likes. Packed rows' per-sentence
    scores (:class:`SentenceScores`) are matched the same way, bucket by bucket.
    """
    if isinstance(teacher_BHTT, SentenceScores) and isinstance(student_BHTT, SentenceScores):
        if teacher_BHTT.num_heads == student_BHTT.num_heads:
            return teacher_BHTT, student_BHTT
        mean = lambda x: x.mean(dim=1, keepdim=True)  # noqa: E731
        return teacher_BHTT.map(mean), student_BHTT.map(mean)
    if teacher_BHTT.dim() != 4 or student_BHTT.dim() != 4:
        raise ValueError(f"attention scores must be [B, H, T, T]; got teacher {tuple(teacher_BHTT.shape)}, "
                         f"student {tuple(student_BHTT.shape)}")
    if teacher_BHTT.shape[1] == student_BHTT.shape[1]:
        return teacher_BHTT, student_BHTT
    return teacher_BHTT.mean(dim=1, keepdim=True), student_BHTT.mean(dim=1, keepdim=True)


def layer_map(num_teacher_layers: int, num_student_layers: int, explicit: list[int] | None = None) -> list[int]:
    """Teacher layer g(m) (1-based) for each student layer m = 1..num_student_layers.

    Uniform by default: g(m) = m * k with k = num_teacher_layers / num_student_layers (12 -> 4 gives
    [3, 6, 9, 12], 24 -> 4 gives [6, 12, 18, 24]), so the last student layer learns from the last teacher
    layer. ``explicit`` overrides it: one teacher layer per student layer, each in 1..num_teacher_layers.
    Layer 0 (the embeddings) is distilled separately and never appears in the map.
    """
    if num_teacher_layers < 1 or num_student_layers < 1:
        raise ValueError(f"layer counts must be positive: teacher {num_teacher_layers}, student {num_student_layers}")
    if explicit is not None:
        explicit = list(explicit)
        if len(explicit) != num_student_layers:
            raise UsageError(f"explicit layer map {explicit} has {len(explicit)} entries; the student has "
                             f"{num_student_layers} layers (one teacher layer per student layer)")
        bad = [g for g in explicit if not isinstance(g, int) or isinstance(g, bool) or not
               1 <= g <= num_teacher_layers]
        if bad:
            raise UsageError(f"explicit layer map {explicit}: entries {bad} are not teacher layers "
                             f"1..{num_teacher_layers} (1-based; 0 is the embeddings, distilled separately)")
        return explicit
    if num_teacher_layers % num_student_layers:
        raise UsageError(f"teacher has {num_teacher_layers} layers, student {num_student_layers}: not divisible, "
                         f"so no uniform layer map; give an explicit one (e.g. --layer-map 3 6 9 12)")
    step = num_teacher_layers // num_student_layers
    return [m * step for m in range(1, num_student_layers + 1)]


def _mean(total: torch.Tensor, own_count, denominator) -> torch.Tensor:
    """``total`` over ``denominator`` when given, else over ``own_count``; a count of 0 divides by 1."""
    return divide_by_count(total, own_count if denominator is None else denominator)


def _check_same_shape(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} "
                         f"differ in shape (project widths and match heads first)")
