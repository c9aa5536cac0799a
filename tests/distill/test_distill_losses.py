"""The distillation losses against plain loop-based references, on random tensors."""
import math

import pytest
import torch

from ds_kd.distill.losses import attention_mse, hidden_mse, layer_map, match_heads, soft_cross_entropy


def _mask(b=3, t=7):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[b - 1, t - 1:] = 0
    return mask


def _ref_soft_ce(s, t, temp):
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zt = [math.exp(v / temp) for v in row_t]
        p = [v / sum(zt) for v in zt]
        log_norm = math.log(sum(math.exp(v / temp) for v in row_s))
        total += -sum(pi * (v / temp - log_norm) for pi, v in zip(p, row_s))
    return total / len(s) * temp ** 2


def _ref_hidden(s, t, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                for d in range(s.shape[2]):
                    total += (s[b, i, d].item() - t[b, i, d].item()) ** 2
                    count += 1
    return total / count


def _ref_attention(s, t, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            for i in range(s.shape[2]):
                for j in range(s.shape[3]):
                    if mask[b, i] and mask[b, j]:
                        total += (s[b, h, i, j].item() - t[b, h, i, j].item()) ** 2
                        count += 1
    return total / count


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_soft_cross_entropy_matches_reference(temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    assert soft_cross_entropy(s, t, temp).item() == pytest.approx(_ref_soft_ce(s.double(), t.double(), temp),
                                                                   rel=1e-5)


def test_soft_cross_entropy_minimum_at_teacher_and_grad_only_to_student():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 9, generator=g)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    loss = soft_cross_entropy(s, teacher)
    loss.backward()
    assert s.grad is not None and teacher.grad is None
    # cross-entropy is smallest (= the teacher's entropy) when the student equals the teacher
    entropy = -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1).mean()
    assert soft_cross_entropy(t, t).item() == pytest.approx(entropy.item(), rel=1e-6)
    assert loss.item() > entropy.item()


def test_temperature_scales_gradient_by_t_squared():
    """With the T^2 factor, the gradient at high T approaches the logit-matching gradient (s - t) / V, whose
    size does not depend on T (Hinton et al.): without the factor it would shrink as 1/T^2."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, generator=g)
    s = torch.randn(3, 6, generator=g)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)  # zero-mean logits
    grads = {}
    for temp in (1.0, 20.0, 200.0):
        x = s.clone().requires_grad_(True)
        soft_cross_entropy(x, t, temp).backward()
        grads[temp] = x.grad
    limit = (s - t) / 6 / 3  # 1/V per logit, 1/N for the mean over rows
    torch.testing.assert_close(grads[200.0], limit, rtol=2e-2, atol=1e-4)
    assert (grads[200.0] - limit).abs().max() < (grads[20.0] - limit).abs().max()
    # and the targets flatten: at high T the teacher's distribution tends to uniform
    hot = soft_cross_entropy(s, t, 1000.0) / 1000.0 ** 2
    assert hot.item() == pytest.approx(math.log(6), rel=1e-3)


def test_soft_cross_entropy_no_rows_and_bad_input():
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = soft_cross_entropy(empty, torch.zeros(0, 5))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(2, 5), torch.zeros(2, 5), 0.0)


def test_hidden_mse_matches_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(3)
    mask = _mask()
    s, t = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    value = hidden_mse(s, t, mask)
    assert value.item() == pytest.approx(_ref_hidden(s, t, mask), rel=1e-5)
    pad = ~mask.bool()
    s2, t2 = s.clone(), t.clone()
    s2[pad] = 1e6
    t2[pad] = float("inf")
    assert hidden_mse(s2, t2, mask).item() == value.item()


def test_hidden_mse_in_half_precision_is_float32():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.ones(2, 4)
    out = hidden_mse(s, t.bfloat16(), mask)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(hidden_mse(s, t.bfloat16().float(), mask).item(), rel=1e-6)


def test_attention_mse_matches_reference_and_padding_contributes_nothing():
    g = torch.Generator().manual_seed(5)
    mask = _mask()
    s, t = torch.randn(3, 2, 7, 7, generator=g), torch.randn(3, 2, 7, 7, generator=g)
    value = attention_mse(s, t, mask)
    assert value.item() == pytest.approx(_ref_attention(s, t, mask), rel=1e-5)
    # scores of padded keys and of padded queries changed wildly (as without an additive mask): same loss
    s2, t2 = s.clone(), t.clone()
    for b in range(3):
        pad = ~mask[b].bool()
        s2[b, :, :, pad] = 1e4
        t2[b, :, pad, :] = float("-inf")
        t2[b, :, :, pad] = -3e4
    assert attention_mse(s2, t2, mask).item() == value.item()
    # while a change at a real pair does count
    s2[0, 1, 2, 3] += 1.0
    assert attention_mse(s2, t2, mask).item() > value.item()


def test_match_heads_equal_counts_unchanged():
    t, s = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    mt, ms = match_heads(t, s)
    assert mt is t and ms is s


def test_match_heads_different_counts_compares_head_averages():
    """16 teacher heads vs 12 student heads (here 4 vs 3): both sides become head-averaged [B, 1, T, T] maps."""
    g = torch.Generator().manual_seed(6)
    mask = _mask(2, 5)
    t, s = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    mt, ms = match_heads(t, s)
    assert mt.shape == ms.shape == (2, 1, 5, 5)
    avg_t = sum(t[:, h] for h in range(4)) / 4
    avg_s = sum(s[:, h] for h in range(3)) / 3
    torch.testing.assert_close(mt[:, 0], avg_t)
    torch.testing.assert_close(ms[:, 0], avg_s)
    # a student whose heads split the teacher's average pattern differently has zero loss
    split = avg_t[:, None].repeat(1, 3, 1, 1) + torch.tensor([1.0, -2.0, 1.0])[None, :, None, None]
    assert attention_mse(*reversed(match_heads(t, split)), mask).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_mse(s, t, mask)


def test_layer_maps():
    assert layer_map(12, 4) == [3, 6, 9, 12]
    assert layer_map(24, 4) == [6, 12, 18, 24]
    assert layer_map(12, 2) == [6, 12] and layer_map(6, 2) == [3, 6]  # the tiny twins
    assert layer_map(4, 4) == [1, 2, 3, 4]
    assert layer_map(16, 4, explicit=[2, 5, 11, 16]) == [2, 5, 11, 16]
    assert layer_map(10, 4, explicit=[1, 4, 7, 10]) == [1, 4, 7, 10]


def test_layer_map_errors():
    with pytest.raises(ValueError, match="not divisible"):
        layer_map(10, 4)
    with pytest.raises(ValueError, match="has 3 entries"):
        layer_map(12, 4, explicit=[3, 6, 9])
    with pytest.raises(ValueError, match=r"\[0\] are not teacher layers"):
        layer_map(12, 4, explicit=[0, 6, 9, 12])
    with pytest.raises(ValueError, match=r"\[13\] are not teacher layers"):
        layer_map(12, 4, explicit=[3, 6, 9, 13])
    with pytest.raises(ValueError, match="positive"):
        layer_map(12, 0)


def test_non_finite_values_at_padding_poison_neither_loss_nor_gradient():
    """The difference is masked before it is squared: inf/NaN at a padded position gives a finite gradient."""
    g = torch.Generator().manual_seed(6)
    mask = _mask()
    pad = ~mask.bool()
    s = torch.randn(3, 7, 5, generator=g)
    t = torch.randn(3, 7, 5, generator=g)
    t[pad] = float("inf")
    t[0, -1, 0] = float("nan") if pad[0, -1] else t[0, -1, 0]
    s = s.requires_grad_()
    loss = hidden_mse(s, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert (s.grad[pad] == 0).all()
    assert loss.item() == pytest.approx(_ref_hidden(s.detach(), torch.where(pad[..., None], 0.0, t), mask), rel=1e-5)

    sa = torch.randn(3, 2, 7, 7, generator=g)
    ta = torch.randn(3, 2, 7, 7, generator=g)
    for b in range(3):
        ta[b, :, :, pad[b]] = float("-inf")
        ta[b, :, pad[b], :] = float("nan")
    sa = sa.requires_grad_()
    loss = attention_mse(sa, ta, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sa.grad).all()


def test_a_given_denominator_replaces_the_batch_count():
    """Sum over the batch divided by the given count: the per-micro-batch share of a global-batch mean."""
    g = torch.Generator().manual_seed(7)
    mask = _mask()
    s, t = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    tokens = mask.sum()
    assert hidden_mse(s, t, mask, denominator=2 * tokens).item() == pytest.approx(hidden_mse(s, t, mask).item() / 2)
    sa, ta = torch.randn(3, 2, 7, 7, generator=g), torch.randn(3, 2, 7, 7, generator=g)
    pairs = (mask.sum(1) ** 2).sum()
    assert attention_mse(sa, ta, mask, denominator=pairs / 4).item() == pytest.approx(
        attention_mse(sa, ta, mask).item() * 4, rel=1e-6)
    sl, tl = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    assert soft_cross_entropy(sl, tl, denominator=12.0).item() == pytest.approx(
        soft_cross_entropy(sl, tl).item() / 2, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_intermediate_terms_sum_over_the_layer_map_as_tinybert(reduction):
    from ds_kd.distill.module import DistillConfig, intermediate_terms
    from ds_kd.models.model import EncoderOutput

    g = torch.Generator().manual_seed(8)
    mask = _mask()
    student = EncoderOutput(torch.zeros(1), tuple(torch.randn(3, 7, 4, generator=g) for _ in range(3)),
                            tuple(torch.randn(3, 2, 7, 7, generator=g) for _ in range(2)))
    teacher = EncoderOutput(torch.zeros(1), tuple(torch.randn(3, 7, 4, generator=g) for _ in range(5)),
                            tuple(torch.randn(3, 2, 7, 7, generator=g) for _ in range(4)))
    cfg = DistillConfig(layer_reduction=reduction)
    terms = intermediate_terms(student, teacher, mask, [2, 4], torch.nn.ModuleDict(), cfg)
    hidden = [hidden_mse(student.hidden_states[m], teacher.hidden_states[t], mask) for m, t in ((1, 2), (2, 4))]
    attention = [attention_mse(student.attention_scores[m], teacher.attention_scores[t], mask)
                 for m, t in ((0, 1), (1, 3))]
    combine = sum if reduction == "sum" else (lambda xs: sum(xs) / len(xs))
    assert terms["hidden"].item() == pytest.approx(combine(hidden).item(), rel=1e-6)
    assert terms["attention"].item() == pytest.approx(combine(attention).item(), rel=1e-6)
    assert DistillConfig().layer_reduction == "sum"  # the paper follows TinyBERT
    with pytest.raises(ValueError, match="layer_reduction"):
        DistillConfig(layer_reduction="max")
