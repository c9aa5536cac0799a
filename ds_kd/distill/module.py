"""The distillation module: a frozen teacher, the student and the projections, in one ``nn.Module``.

One module means one DeepSpeed engine: under ZeRO-3 the teacher is partitioned and gathered like any other
submodule, but it never requires gradients and its parameters are kept out of the optimizer (build the
optimizer from ``trainable_parameters()``). The losses themselves are the pure functions of ``losses.py``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from ds_kd.distill.bistil import FixedProjection, attention_probabilities
from ds_kd.distill.losses import attention_mse, hidden_mse, layer_map, match_heads, soft_cross_entropy
from ds_kd.errors import UsageError
from ds_kd.train.loop import masked_positions
from ds_kd.models.model import BertForMaskedLM, EncoderOutput, MLMOutput, gather_predicted, masked_lm_loss
from ds_kd.models.sentence_attention import SentenceBuckets

log = logging.getLogger(__name__)

TERMS = ("mlm", "output", "embedding", "hidden", "attention")
LAYER_REDUCTIONS = ("sum", "mean")
ATTENTION_TARGETS = ("scores", "probabilities")


@dataclass
class DistillConfig:
    """Weights of the student's loss terms, the temperature and the layer map.

    The loss is the weighted sum of the terms; a zero weight skips the term entirely (the tensors it needs
    are not even asked of the models, and the teacher is not run when no term needs it).
    """

    mlm_weight: float = 1.0
    """MLM cross-entropy of the student on the labels."""
    output_weight: float = 1.0
    """Soft cross-entropy of the student's predictions against the teacher's, at the masked positions."""
    embedding_weight: float = 1.0
    """MSE between the projected student embeddings (layer 0 output) and the teacher's, over real tokens."""
    hidden_weight: float = 1.0
    """MSE between projected student layer outputs and the mapped teacher layers', summed over the map."""
    attention_weight: float = 1.0
    """MSE of pre-softmax attention scores of mapped layers over real (query, key) pairs, summed over the map."""
    temperature: float = 1.0
    """Temperature of the output loss (the loss is multiplied by its square; 1 is the paper's setting)."""
    layer_map: list[int] | None = None
    """Teacher layer (1-based) for each student layer; None: uniform, every L_teacher / L_student layers."""
    layer_reduction: str = "sum"
    """How the per-layer hidden-state and attention terms combine over the layer map: ``sum`` (TinyBERT's
    L_model = sum over layers, the paper's setting) or ``mean`` (each term weighs 1/L_student as much)."""
    attention_target: str = "scores"
    """What the attention term compares: ``scores`` (pre-softmax, TinyBERT) or ``probabilities`` (after the
    softmax over real keys, BiStil; :func:`ds_kd.distill.bistil.attention_probabilities`)."""
    embeddings_in_hidden: bool = False
    """Count the embeddings (hidden state 0) as one more layer of the hidden-state term, which then averages or
    sums over L_student + 1 states (BiStil); the separate embedding term must then be off."""

    def __post_init__(self) -> None:
        for name in TERMS:
            if getattr(self, f"{name}_weight") < 0:
                raise UsageError(f"{name}_weight must be >= 0, got {getattr(self, f'{name}_weight')}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be positive, got {self.temperature}")
        if not any(getattr(self, f"{name}_weight") > 0 for name in TERMS):
            raise UsageError("every loss weight is zero: nothing to train on")
        if self.layer_reduction not in LAYER_REDUCTIONS:
            raise UsageError(f"layer_reduction must be one of {', '.join(LAYER_REDUCTIONS)}, "
                             f"got {self.layer_reduction!r}")
        if self.attention_target not in ATTENTION_TARGETS:
            raise UsageError(f"--attention-target must be one of {', '.join(ATTENTION_TARGETS)}, "
                             f"got {self.attention_target!r}")
        if self.embeddings_in_hidden and self.embedding_weight > 0:
            raise UsageError("--embeddings-in-hidden counts the embeddings in the hidden-state term: set "
                             "--embedding-weight 0 (else they would be distilled twice)")

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")


class DistillOutput(NamedTuple):
    """One step's loss and its parts (a named tuple: DeepSpeed ZeRO-3 looks for tensors inside tuples and
    dicts, not inside dataclasses, when it hooks a module's outputs)."""

    loss: torch.Tensor
    """The total, sum of weight * term over the terms computed (carries the student's graph)."""
    terms: dict[str, torch.Tensor]
    """Unweighted, detached values of the terms computed (``mlm``, ``output``, ``embedding``, ``hidden``,
    ``attention``) plus ``total`` (the detached loss), for logging each next to the total."""


def build_projections(student_width: int, teacher_width: int, num_student_layers: int, config: DistillConfig,
                      init_std: float = 0.02) -> nn.ModuleDict:
    """A ``Linear(student_width -> teacher_width)`` per distilled representation; empty when widths are equal.

    One projection per mapped layer (keys ``layer_1`` .. ``layer_L``) and one for the embeddings (``embeddings``)
    rather than one shared: teacher layers differ in scale and subspace, and a separate map per pair lets each
    fit without trading off against the others, for little cost (5 x 768 x 1024 = 3.9M parameters for
    LeanBERT from mBERT8-Large, all dropped at export). Only the projections a nonzero weight uses exist, so
    the optimizer sees no parameter that never gets a gradient.
    """
    projections = nn.ModuleDict()
    if student_width == teacher_width:
        return projections
    embeddings = config.embedding_weight > 0 or (config.hidden_weight > 0 and config.embeddings_in_hidden)
    names = (["embeddings"] if embeddings else []) + (
        [f"layer_{m}" for m in range(1, num_student_layers + 1)] if config.hidden_weight > 0 else [])
    for name in names:
        linear = nn.Linear(student_width, teacher_width)
        nn.init.normal_(linear.weight, std=init_std)
        nn.init.zeros_(linear.bias)
        projections[name] = linear
    return projections


def intermediate_terms(student: EncoderOutput, teacher: EncoderOutput, attention_mask: torch.Tensor,
                       mapped_layers: list[int], projections: nn.ModuleDict,
                       config: DistillConfig, denominators: Mapping[str, float] | None = None,
                       sequence_ids: torch.Tensor | None = None,
                       teacher_projection: FixedProjection | None = None) -> dict[str, torch.Tensor]:
    """Embedding, hidden-state and attention MSE terms (unweighted) for the terms with nonzero weight.

    ``mapped_layers[m - 1]`` is the teacher layer (1-based) for student layer m; ``hidden_states[0]`` is the
    embeddings on both sides, ``attention_scores[l - 1]`` belongs to layer l. Any encoder pair with the
    ``EncoderOutput`` fields works (MLM pretraining or a fine-tuning task model). The hidden and attention
    terms combine their layers by ``config.layer_reduction`` (TinyBERT sums them); with
    ``config.embeddings_in_hidden`` the hidden term counts the embeddings as one more layer (BiStil), and with
    ``config.attention_target == "probabilities"`` the attention term compares probabilities (BiStil).
    ``denominators`` (``tokens``, ``pairs``; see :func:`ds_kd.train.loop.global_denominators`) replace the
    batch's own counts. Packed rows pass ``sequence_ids`` [B, T]: attention pairs then count within one sentence
    only (scores only: UsageError for probabilities). ``teacher_projection`` maps the teacher's states to the
    student's width (BiStil's fixed projection) where ``projections`` would map the student's to the teacher's.
    """
    denominators = denominators or {}
    combine = torch.sum if config.layer_reduction == "sum" else torch.mean
    def project(name: str, x_BTD: torch.Tensor) -> torch.Tensor:
        return projections[name](x_BTD) if name in projections else x_BTD

    def target(g: int) -> torch.Tensor:
        t_BTD = teacher.hidden_states[g]
        return t_BTD if teacher_projection is None else teacher_projection(g, t_BTD)

    def hidden(m: int, g: int) -> torch.Tensor:
        return hidden_mse(project("embeddings" if m == 0 else f"layer_{m}", student.hidden_states[m]), target(g),
                          attention_mask, denominators.get("tokens"))

    terms = {}
    if config.embedding_weight > 0:
        terms["embedding"] = hidden(0, 0)
    if config.hidden_weight > 0:
        pairs = [*([(0, 0)] if config.embeddings_in_hidden else []), *enumerate(mapped_layers, start=1)]
        terms["hidden"] = combine(torch.stack([hidden(m, g) for m, g in pairs]), 0)
    if config.attention_weight > 0:
        per_layer = []
        for m, g in enumerate(mapped_layers, start=1):
            teacher_BHTT, student_BHTT = teacher.attention_scores[g - 1], student.attention_scores[m - 1]
            if config.attention_target == "probabilities":
                if sequence_ids is not None:
                    raise UsageError("--attention-target probabilities compares one sentence per row: use "
                                     "--packing off")
                teacher_BHTT = attention_probabilities(teacher_BHTT, attention_mask)
                student_BHTT = attention_probabilities(student_BHTT, attention_mask)
            teacher_BHTT, student_BHTT = match_heads(teacher_BHTT, student_BHTT)
            per_layer.append(attention_mse(student_BHTT, teacher_BHTT,
                                           attention_mask if sequence_ids is None else sequence_ids,
                                           denominators.get("pairs")))
        terms["attention"] = combine(torch.stack(per_layer), 0)
    return terms


class Distiller(nn.Module):
    """Frozen teacher + student + projections; ``forward(batch)`` gives the student's distillation loss.

    ``teacher`` stays frozen: its parameters never require gradients, it stays in eval mode whatever
    ``.train()`` is called with (no dropout, so its targets are deterministic), and ``trainable_parameters()``
    (student and projections) is what the optimizer should get. ``teacher_dtype`` casts the teacher (fp16 on
    GPU, bf16 on CPU); its outputs are cast to float32 before the losses. A teacher with more vocabulary rows
    than the student (padded embedding rows past the tokenizer) has its logits cut to the student's ids; one
    with fewer is refused (ValueError). ``teacher_projection`` (BiStil's fixed projection of the teacher's states
    to the student's width, :class:`ds_kd.distill.bistil.FixedProjection`) replaces the learned projections.
    """

    def __init__(self, teacher: BertForMaskedLM, student: BertForMaskedLM, config: DistillConfig | None = None,
                 teacher_dtype: torch.dtype | None = None, teacher_projection: FixedProjection | None = None):
        super().__init__()
        self.config = config = config or DistillConfig()
        t_cfg, s_cfg = teacher.config, student.config
        if t_cfg.vocab_size < s_cfg.vocab_size:
            raise UsageError(f"teacher vocabulary ({t_cfg.vocab_size}) is smaller than the student's "
                             f"({s_cfg.vocab_size}): the teacher must use the shards' tokenizer")
        # A teacher embedding may have padded rows past the tokenizer (never looked up): its logits are cut.
        self.vocab_size = s_cfg.vocab_size
        self.mapped_layers = layer_map(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers, config.layer_map)
        self.output_enabled = config.output_weight > 0 and getattr(teacher, "has_mlm_head", True)
        if config.output_weight > 0 and not self.output_enabled:
            log.warning("the teacher has no MLM head (a BertModel checkpoint): the output loss is off; "
                        "training on the MLM and intermediate losses only")
        if not self.output_enabled and not any(config.weight(n) > 0 for n in TERMS if n != "output"):
            raise UsageError("the teacher has no MLM head and every other loss weight is zero: nothing to train on")
        teacher.requires_grad_(False)
        if teacher_dtype is not None:
            teacher.to(dtype=teacher_dtype)
        _untie_decoder(teacher)
        self.teacher = teacher.eval()
        self.student = student
        self.teacher_projection = teacher_projection
        self.projections = nn.ModuleDict() if teacher_projection is not None else build_projections(
            s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_hidden_layers, config, s_cfg.initializer_range)
        # The teacher is an input of the run (loaded from its directory each time, its digest recorded), not
        # state of it: no state dict of this module holds it, so no checkpoint does under any ZeRO stage.
        # DeepSpeed's exclude_frozen_parameters is not enough: it drops only the first name of a tensor
        # shared by two parameters, and the teacher's MLM decoder shares its word embeddings.
        self.register_state_dict_post_hook(_drop_teacher)

    # ---- what the engine needs -----------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # the teacher's dropout stays off during training
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and projection parameters that require gradients: what the optimizer gets."""
        return [p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad]

    def student_state_dict(self, full_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The student's weights in ``BertForMaskedLM`` naming (teacher and projections dropped), for export.

        ``full_state`` is a state dict of this whole module gathered elsewhere (under ZeRO-3 the local
        ``state_dict()`` holds only partitions); without it, this module's own ``state_dict()``."""
        state = full_state if full_state is not None else self.state_dict()
        return {name[len("student."):]: t for name, t in state.items() if name.startswith("student.")}

    def summary(self) -> dict:
        """What this distillation does, for the log and the run manifest."""
        t_cfg, s_cfg = self.teacher.config, self.student.config
        same_heads = t_cfg.num_attention_heads == s_cfg.num_attention_heads
        return {"layer_map": self.mapped_layers, "config": asdict(self.config), "output_loss": self.output_enabled,
                "projections": (sorted(self.projections.keys()) if self.teacher_projection is None else
                                [f"fixed: teacher hidden state {g}" for g in self.teacher_projection.indices]),
                "heads": f"{t_cfg.num_attention_heads} teacher vs {s_cfg.num_attention_heads} student: "
                         + ("head by head" if same_heads else "head-averaged score maps"),
                "teacher_dtype": str(next(self.teacher.parameters()).dtype).replace("torch.", "")}

    # ---- the step's loss -----------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor],
                denominators: Mapping[str, float] | None = None) -> DistillOutput:
        """``batch``: ``input_ids`` and ``labels`` ([B, T], -100 where nothing is predicted), optional
        ``attention_mask`` (1 = real token) and ``token_type_ids``; packed rows add ``position_ids`` and
        ``sequence_ids`` (see :meth:`ds_kd.models.model.BertModel.forward`); the host-built ``masked_positions`` and
        ``sentence_buckets`` of :func:`ds_kd.train.loop.host_layout` are used when present. ``denominators``
        (``masked``, ``tokens``, ``pairs``: see :func:`ds_kd.train.loop.global_denominators`) replace the batch's own
        counts in every term's mean; without them each term is the mean over this batch. Give them as Python
        numbers: under DeepSpeed's ``fp16.auto_cast`` a tensor passed to ``engine(...)`` arrives in fp16, where
        counts past 65,504 are inf."""
        cfg = self.config
        denominators = denominators or {}
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, packing = _inputs(batch)
        masked = masked_positions(batch)
        nowhere = torch.zeros(0, dtype=torch.long, device=input_ids.device)  # no logits: the head runs on no row
        want_hidden = cfg.embedding_weight > 0 or cfg.hidden_weight > 0
        want_scores = cfg.attention_weight > 0
        want_logits = cfg.mlm_weight > 0 or self.output_enabled

        student = self.student(input_ids, attention_mask, token_type_ids=batch.get("token_type_ids"),
                               predicted=masked if want_logits else nowhere,
                               output_hidden_states=want_hidden, output_attention_scores=want_scores, **packing)
        # One log-softmax over the vocabulary serves the MLM loss and, at T = 1, the output loss.
        log_probs = student.logits.float().log_softmax(-1) if want_logits else None
        terms = {}
        if cfg.mlm_weight > 0:
            terms["mlm"] = masked_lm_loss(None, gather_predicted(labels, masked), denominators.get("masked"),
                                          log_probs)
        if self.output_enabled or want_hidden or want_scores:
            teacher = self._teacher(batch, attention_mask, packing, want_hidden, want_scores)
            if self.output_enabled:
                terms["output"] = soft_cross_entropy(student.logits, teacher.logits[:, :self.vocab_size], cfg.temperature,
                                                     log_probs if cfg.temperature == 1.0 else None,
                                                     denominators.get("masked"))
            terms.update(intermediate_terms(student.encoder, teacher.encoder, attention_mask, self.mapped_layers,
                                            self.projections, cfg, denominators, packing["sequence_ids"],
                                            self.teacher_projection))
        loss = sum(cfg.weight(name) * value for name, value in terms.items())
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = loss.detach()
        return DistillOutput(loss, logged)

    @torch.no_grad()
    def _teacher(self, batch: Mapping[str, torch.Tensor], attention_mask: torch.Tensor, packing: dict,
                 hidden: bool, scores: bool) -> MLMOutput:
        """The frozen teacher on ``batch``: logits at the masked positions when the output loss is on."""
        predicted = (masked_positions(batch) if self.output_enabled
                     else torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
        return self.teacher(batch["input_ids"], attention_mask, token_type_ids=batch.get("token_type_ids"),
                            predicted=predicted, output_hidden_states=hidden, output_attention_scores=scores, **packing)

    def first_nonfinite_teacher_output(self, batch: Mapping[str, torch.Tensor]) -> str | None:
        """Where the teacher's outputs on ``batch`` (as :meth:`forward` takes it) first stop being finite:
        "embeddings", "layer <i>" or "logits"; None when every one is finite. A half-precision teacher whose
        activations leave its range (±65504 in fp16) gives inf, then NaN, and so does every loss it feeds."""
        attention_mask, packing = _inputs(batch)
        out = self._teacher(batch, attention_mask, packing, hidden=True, scores=False)
        named = [("embeddings" if i == 0 else f"layer {i}", h) for i, h in enumerate(out.encoder.hidden_states)]
        return next((name for name, t in [*named, ("logits", out.logits)] if not torch.isfinite(t).all()), None)


def _inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """(attention mask, all ones when the batch has none; the packing inputs of teacher and student, with one
    per-sentence layout built for both)."""
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(batch["input_ids"])
    packing = {"position_ids": batch.get("position_ids"), "sequence_ids": batch.get("sequence_ids"),
               "sentence_buckets": batch.get("sentence_buckets")}
    if packing["sequence_ids"] is not None and packing["sentence_buckets"] is None:
        packing["sentence_buckets"] = SentenceBuckets.build(packing["sequence_ids"])  # teacher and student's
    return attention_mask, packing


def _drop_teacher(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of :class:`Distiller`: remove every ``teacher.`` entry (tied names included)."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def _untie_decoder(teacher: BertForMaskedLM) -> None:
    """Replace the frozen teacher's tied MLM decoder by :class:`_EmbeddingDecoder`, which reads the word
    embeddings at call time. A tied pair of Parameters is what DeepSpeed records as "shared params" in every
    checkpoint (naming teacher tensors the checkpoint does not hold, which breaks its own converters), and two
    untied Parameters over one storage would be copied apart by the engine's ``.to(device)``."""
    decoder = teacher.cls.predictions.decoder
    embeddings = teacher.bert.embeddings.word_embeddings
    if isinstance(decoder, nn.Linear) and decoder.weight is embeddings.weight:
        teacher.cls.predictions.decoder = _EmbeddingDecoder(embeddings)


class _EmbeddingDecoder(nn.Module):
    """``x @ word_embeddings.weight.T`` ([N, D] -> [N, V]) with no Parameter of its own. Under ZeRO-3 the
    embedding weight is registered as an external parameter of this module, so it is gathered when it runs."""

    def __init__(self, embeddings: nn.Embedding):
        from deepspeed.runtime.zero import register_external_parameter

        super().__init__()
        self._embeddings = [embeddings]  # a list: not registered as a child module (its weight is not ours)
        register_external_parameter(self, embeddings.weight)  # only ZeRO-3 reads this

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x_ND, self._embeddings[0].weight)
