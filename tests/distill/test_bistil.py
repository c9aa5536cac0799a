"""BiStil's phase 1 pieces in-process: layer maps, attention-probability loss, SVD embeddings, the fixed projection,
the recipe's flags."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.distill.bistil import FixedProjection, attention_probabilities, bistil_layer_maps, svd_embeddings
from ds_kd.distill.losses import attention_mse
from ds_kd.distill.module import intermediate_terms
from ds_kd.errors import UsageError
from ds_kd.models.model import BertForMaskedLM, make_config
from tests.distill.test_distiller import _batch, _model

BISTIL = DistillConfig(mlm_weight=0, output_weight=0, embedding_weight=0, hidden_weight=1, attention_weight=1,
                       layer_reduction="mean", attention_target="probabilities", embeddings_in_hidden=True)


def test_layer_maps_12_to_6_and_refusals():
    hidden, attention = bistil_layer_maps(12, 6)
    assert hidden == [0, 2, 4, 6, 8, 10, 12]  # student hidden state i (0 = embeddings) against teacher k*i
    assert attention == [1, 3, 5, 7, 9, 11]  # student layer i (0-based) against teacher k*(i+1)-1
    with pytest.raises(UsageError, match="not divisible"):
        bistil_layer_maps(12, 5)
    assert bistil_layer_maps(12, 5, [2, 4, 6, 9, 12]) == ([0, 2, 4, 6, 9, 12], [1, 3, 5, 8, 11])
    with pytest.raises(UsageError, match="embedding-weight 0"):
        DistillConfig(embedding_weight=1.0, embeddings_in_hidden=True)


def test_attention_probability_loss_of_a_padded_batch_equals_the_unpadded_sentences():
    teacher, student = _model("tiny-large", 0), _model("tiny-base", 1)
    lengths = [5, 9]
    g = torch.Generator().manual_seed(3)
    sentences = [torch.randint(5, 101, (1, n), generator=g) for n in lengths]
    padded = torch.zeros(2, 12, dtype=torch.long)  # three more padded columns than the longest sentence
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, s in enumerate(sentences):
        padded[row, :s.shape[1]], mask[row, :s.shape[1]] = s[0], 1

    def loss(ids, attention_mask):
        t = teacher.bert(ids, attention_mask, output_attention_scores=True)
        s = student.bert(ids, attention_mask, output_attention_scores=True)
        return intermediate_terms(s, t, attention_mask, [2, 4, 6, 8, 10, 12], torch.nn.ModuleDict(),
                                  DistillConfig(mlm_weight=0, output_weight=0, embedding_weight=0, hidden_weight=0,
                                                attention_target="probabilities"))["attention"]

    with torch.no_grad():
        batch = loss(padded, mask)
        alone = [loss(s, torch.ones_like(s)) for s in sentences]
    pairs = [n * n for n in lengths]  # real (query, key) pairs; the mean over the batch weighs sentences by them
    expected = sum(a * p for a, p in zip(alone, pairs)) / sum(pairs)
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-7)
    scores = torch.randn(1, 2, 4, 4)
    probs = attention_probabilities(scores, torch.tensor([[1, 1, 1, 0]]))
    assert torch.all(probs[..., 3] == 0) and torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))
    garbage = scores.clone()
    garbage[..., 3] = float("nan")  # what a padded key holds never reaches the probabilities or the loss
    torch.testing.assert_close(attention_mse(attention_probabilities(garbage, torch.tensor([[1, 1, 1, 0]])), probs,
                                             torch.tensor([[1, 1, 1, 0]])), torch.tensor(0.0))


def test_svd_embeddings_are_orthonormal_top_singular_vectors():
    teacher_VD = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    u = svd_embeddings(teacher_VD, 16)
    assert u.shape == (500, 16)
    torch.testing.assert_close(u.T @ u, torch.eye(16), atol=1e-5, rtol=0)
    # each column is a left singular vector: |E^T u_i| is the i-th largest singular value
    torch.testing.assert_close((teacher_VD.T @ u).norm(dim=0), torch.linalg.svdvals(teacher_VD)[:16], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(UsageError, match="at most the teacher's 32 singular vectors"):
        svd_embeddings(teacher_VD, 48)


def test_svd_embeddings_form_no_vocabulary_square_matrix():
    # 15,000 x 8: a full SVD's U is 15,000 x 15,000 floats (0.9 GB measured); the economy SVD's ~0.5 MB
    code = ("import resource, torch; from ds_kd.distill.bistil import svd_embeddings; "
            "e = torch.randn(15000, 8); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "svd_embeddings(e, 8); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    grown_kb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  timeout=120).stdout)
    assert grown_kb < 200_000, f"peak memory grew by {grown_kb} kB"


def test_fixed_projection_is_not_trained_and_round_trips(tmp_path):
    teacher, student = _model("tiny-large", 0), _model("tiny-base", 1)
    batches = [_batch(seed=s) for s in range(3)]
    projection = FixedProjection.fit(teacher, batches, [0, 2, 4, 6, 8, 10, 12], width=48, num_sentences=8)
    p = projection.p_4
    assert p.shape == (64, 48)
    torch.testing.assert_close(p.T @ p, torch.eye(48), atol=1e-5, rtol=0)  # orthonormal directions
    distiller = Distiller(teacher, student, BISTIL, teacher_projection=projection)
    assert len(distiller.projections) == 0  # no learned projection beside it
    trainable = {id(t) for t in distiller.trainable_parameters()}
    assert not any(id(getattr(projection, f"p_{g}")) in trainable for g in projection.indices)
    assert not any(k.startswith("teacher_projection") for k in distiller.state_dict())  # kept in its own file
    out = distiller(batches[0])
    out.loss.backward()
    assert set(out.terms) == {"hidden", "attention", "total"}
    assert all(getattr(projection, f"p_{g}").grad is None for g in projection.indices)
    projection.save(tmp_path / "p.safetensors")
    loaded = FixedProjection.load(tmp_path / "p.safetensors")
    assert loaded.indices == projection.indices and loaded.digest() == projection.digest()
    for g in projection.indices:
        assert torch.equal(getattr(loaded, f"p_{g}"), getattr(projection, f"p_{g}"))
    with pytest.raises(UsageError, match="at least 48 held-out teacher states"):
        FixedProjection.fit(teacher, [_batch(t=10)], [0], width=48, num_sentences=4)  # 36 real tokens < 48


def test_hidden_term_averages_the_embeddings_with_the_mapped_layers():
    teacher, student = _model("tiny-large", 0), _model("tiny-large", 1)  # same width: no projection
    student = BertForMaskedLM(make_config("tiny-large", vocab_size=101, num_hidden_layers=6))
    batch = _batch()
    with torch.no_grad():
        t = teacher.bert(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
        s = student.bert(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
        config = DistillConfig(mlm_weight=0, output_weight=0, embedding_weight=0, attention_weight=0,
                               layer_reduction="mean", embeddings_in_hidden=True)
        hidden = intermediate_terms(s, t, batch["attention_mask"], [2, 4, 6, 8, 10, 12], torch.nn.ModuleDict(),
                                    config)["hidden"]
    real = batch["attention_mask"].bool()
    per_state = [(s.hidden_states[i][real] - t.hidden_states[2 * i][real]).square().mean() for i in range(7)]
    torch.testing.assert_close(hidden, torch.stack(per_state).mean())
