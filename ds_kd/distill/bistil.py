"""BiStil's general bilingual distillation (phase 1): what differs from TinyBERT's first stage.

BiStil (Ansell et al., Findings of ACL 2023; code: AlanAnsell/bistil, ``src/sft/distil.py``) distils a
multilingual teacher into a student for one (source, target) pair, on the pair's text mixed 50/50
(:mod:`ds_kd.data.lang_mix`) and the pair's vocabulary (``python -m data_prep trim_vocab --min-freq``). The
rest of the run is ``launch/distill.py``'s (:mod:`ds_kd.distill.run`); this module holds the pieces it adds:

- **the layer maps** (:func:`bistil_layer_maps`): with ``k = L_teacher / L_student``, hidden state ``i`` of the
  student (0 = the embeddings) against the teacher's ``k*i``, attention of student layer ``i`` (0-based)
  against the teacher's ``k*(i+1)-1``; both are the uniform map of :func:`ds_kd.distill.losses.layer_map`, the
  hidden term counting the embeddings as one more layer of its mean;
- **attention probabilities** (:func:`attention_probabilities`), not TinyBERT's pre-softmax scores, compared
  over (real query, real key) pairs so padding changes nothing (the official code drops the entries where the
  teacher's probability is 0, i.e. padded keys, but keeps padded queries: the paper's loss has none);
- **word embeddings from an SVD of the teacher's** (:func:`svd_embeddings`): the first ``d`` left singular
  vectors, as the official ``factorize_embeddings`` (without the singular values);
- **a fixed projection** of the teacher's states where the widths differ (:class:`FixedProjection`): per
  teacher hidden state, the top ``d_student`` right singular vectors of held-out teacher states (official
  ``compute_per_layer_representation_mappings``), computed once, saved in the run and reloaded on a resume; the
  learned student-side projections of TinyBERT remain the other choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ds_kd.distill.losses import layer_map
from ds_kd.errors import UsageError

PROJECTION_FILE = "fixed_projection.safetensors"
"""The fixed projection of a run, in its run directory (``p_<teacher hidden state>``: [D_teacher, D_student])."""


def bistil_layer_maps(num_teacher_layers: int, num_student_layers: int,
                      explicit: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(teacher hidden-state index for each student hidden state 0..L_s, 0-based teacher attention layer for each
    student layer 0..L_s-1). 12 -> 6: ([0, 2, 4, ..., 12], [1, 3, ..., 11]). ``explicit`` (1-based teacher
    layer per student layer, as ``--layer-map``) replaces the uniform map; without it a teacher depth that the
    student's does not divide is refused (UsageError, from :func:`ds_kd.distill.losses.layer_map`)."""
    mapped = layer_map(num_teacher_layers, num_student_layers, explicit)
    return [0, *mapped], [g - 1 for g in mapped]


def attention_probabilities(scores_BHTT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Softmax over the real keys of pre-softmax attention scores ``[B, H, T, T]`` (as the models return them,
    without the padding mask), in float32: what each query attends to. ``attention_mask_BT`` is 1 at real
    tokens. A real query's row equals the row of the unpadded sentence; rows of padded queries are left to the
    loss's mask (:func:`ds_kd.distill.losses.attention_mse` counts real pairs only)."""
    key_B11T = attention_mask_BT.bool()[:, None, None, :]
    return torch.softmax(scores_BHTT.float().masked_fill(~key_B11T, float("-inf")), dim=-1)


def svd_embeddings(teacher_VD: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` left singular vectors of the teacher's word embeddings ``[V, D]``: ``[V, width]`` with
    orthonormal columns, from the economy SVD (``U`` is ``[V, D]``; no ``V x V`` matrix is formed). Raises
    UsageError when ``width`` exceeds ``min(V, D)``."""
    rows, dim = teacher_VD.shape
    if width > min(rows, dim):
        raise UsageError(f"--embedding-init svd: a student width of {width} needs at most the teacher's "
                         f"{min(rows, dim)} singular vectors (teacher embeddings {rows} x {dim})")
    u_VD, _, _ = torch.linalg.svd(teacher_VD.detach().float(), full_matrices=False)
    return u_VD[:, :width].contiguous()


def top_right_singular_vectors(states_ND: torch.Tensor, width: int) -> torch.Tensor:
    """``[D, width]``: the top ``width`` right singular vectors of ``states_ND`` (economy SVD), the columns of the
    map ``x -> x @ P`` onto the directions the states vary most along. Raises UsageError for fewer states than
    ``width``."""
    if states_ND.shape[0] < width:
        raise UsageError(f"the fixed projection needs at least {width} held-out teacher states (the student's "
                         f"width), got {states_ND.shape[0]}: raise --projection-sentences")
    _, _, vh_DD = torch.linalg.svd(states_ND.float(), full_matrices=False)
    return vh_DD[:width].T.contiguous()


class FixedProjection(nn.Module):
    """Teacher hidden states projected to the student's width by fixed matrices, one per teacher hidden state.

    The matrices are buffers, not parameters: no optimizer sees them and no gradient reaches them. They are
    not part of the module's state dict either: the run keeps them in its own file (:meth:`save`), read back on
    a resume (:meth:`load`), so a resume projects exactly as the first start did."""

    def __init__(self, matrices: dict[int, torch.Tensor]):
        super().__init__()
        self.indices = sorted(matrices)
        for g in self.indices:
            self.register_buffer(f"p_{g}", matrices[g].float(), persistent=False)

    def forward(self, g: int, teacher_BTD: torch.Tensor) -> torch.Tensor:
        """Teacher hidden state ``g`` ``[B, T, D_teacher]`` -> ``[B, T, D_student]``, in float32 whatever precision
        the engine cast the teacher and the buffers to."""
        return teacher_BTD.float() @ getattr(self, f"p_{g}").float()

    def digest(self) -> str:
        """sha256 of the matrices (what the manifest records)."""
        import hashlib

        h = hashlib.sha256()
        for g in self.indices:
            h.update(getattr(self, f"p_{g}").float().cpu().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def fit(cls, teacher: nn.Module, batches: Iterable[dict], indices: list[int], width: int,
            num_sentences: int) -> "FixedProjection":
        """From the teacher's states on the real tokens of the first ``num_sentences`` sentences of ``batches``
        (held-out MLM batches: ``input_ids``, ``attention_mask``), one matrix per hidden-state index in
        ``indices``. Every token of a sentence counts (the official code takes one random token per sentence:
        all of them need fewer sentences for the same number of states and no random draw)."""
        states: dict[int, list[torch.Tensor]] = {g: [] for g in indices}
        seen = 0
        with torch.no_grad():
            for batch in batches:
                mask_BT = batch["attention_mask"].bool()
                out = teacher.bert(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
                mask_BT = mask_BT.to(out.hidden_states[0].device)
                for g in indices:
                    states[g].append(out.hidden_states[g][mask_BT].float())
                seen += len(batch["input_ids"])
                if seen >= num_sentences:
                    break
        return cls({g: top_right_singular_vectors(torch.cat(states[g]), width) for g in indices})

    def save(self, path: Path) -> None:
        """Write the matrices to ``path`` (safetensors, float32)."""
        from safetensors.torch import save_file

        save_file({f"p_{g}": getattr(self, f"p_{g}").contiguous() for g in self.indices}, str(path))

    @classmethod
    def load(cls, path: Path) -> "FixedProjection":
        """The projection :meth:`save` wrote to ``path``."""
        from safetensors.torch import load_file

        return cls({int(name[2:]): t for name, t in load_file(str(path)).items()})
