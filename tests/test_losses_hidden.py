"""Hidden-state distances (``losses.hidden``): closed forms, zero at equality, masks, pairs, reductions."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.losses import HIDDEN_DISTANCES, cosine_distance, hidden_state_distance, mse_distance


def test_registry_names_both_distances():
    assert HIDDEN_DISTANCES == {"mse": mse_distance, "cosine": cosine_distance}


def test_mse_closed_form():
    """x = (1, 2, 3), y = (1, 0, −1): ((0)² + 2² + 4²) / 3 = 20/3 — the mean over the teacher's dimensions."""
    x, y = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[1.0, 0.0, -1.0]]])
    assert mse_distance(x, y).shape == (1, 1)
    assert mse_distance(x, y).item() == pytest.approx(20 / 3)


@pytest.mark.parametrize(
    "x, y, want",
    [
        ([1.0, 0.0], [0.0, 1.0], 1.0),  # orthogonal: cos 0
        ([1.0, 1.0], [2.0, 2.0], 0.0),  # same direction, any scale
        ([1.0, 0.0], [-3.0, 0.0], 2.0),  # opposite
        ([1.0, 0.0], [1.0, 1.0], 1.0 - 1.0 / math.sqrt(2.0)),  # 45°
    ],
)
def test_cosine_closed_form(x, y, want):
    assert cosine_distance(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("name", sorted(HIDDEN_DISTANCES))
def test_zero_at_equality_and_positive_elsewhere(name):
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    d = HIDDEN_DISTANCES[name](h, h.clone())
    assert d.shape == (2, 5)
    torch.testing.assert_close(d, torch.zeros(2, 5), atol=1e-6, rtol=0)
    assert (HIDDEN_DISTANCES[name](h, h.flip(-1)) > 0).all()


@pytest.mark.parametrize("name", sorted(HIDDEN_DISTANCES))
def test_masked_positions_do_not_matter(name):
    """Replace the masked positions of both inputs by garbage: same value, same gradient (0 there)."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True], [False, False, False, True]])
    garbage = 1e4 * torch.randn(3, 4, 6, generator=gen)
    s_bad = torch.where(mask[..., None], s, garbage).requires_grad_()
    t_bad = torch.where(mask[..., None], t, -garbage)
    s = s.requires_grad_()
    a = hidden_state_distance([s], [t], mask, distance=name)
    b = hidden_state_distance([s_bad], [t_bad], mask, distance=name)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (ga,), (gb,) = torch.autograd.grad(a, s), torch.autograd.grad(b, s_bad)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert (ga[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(HIDDEN_DISTANCES))
def test_pairs_are_averaged_and_reductions_agree(name):
    """h_t = mean over the P pairs of d(s_p, t_p) at t; "sum" = "mean" × the masked positions; "none" is h_t·m_t."""
    gen = torch.Generator().manual_seed(2)
    students = [torch.randn(2, 3, 4, generator=gen) for _ in range(2)]
    teachers = [torch.randn(2, 3, 4, generator=gen) for _ in range(2)]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    fn = HIDDEN_DISTANCES[name]
    per_token = (fn(students[0], teachers[0]) + fn(students[1], teachers[1])) / 2
    none = hidden_state_distance(students, teachers, mask, distance=name, reduction="none")
    torch.testing.assert_close(none, torch.where(mask, per_token, 0.0))
    total = hidden_state_distance(students, teachers, mask, distance=name, reduction="sum")
    mean = hidden_state_distance(students, teachers, mask, distance=name)
    torch.testing.assert_close(total, per_token[mask].sum())
    torch.testing.assert_close(total, mean * mask.sum())


def test_all_masked_is_zero_and_low_precision_is_upcast():
    s, t = torch.randn(1, 2, 4).bfloat16(), torch.randn(1, 2, 4).bfloat16()
    none_counted = torch.zeros(1, 2, dtype=torch.bool)
    assert hidden_state_distance([s], [t], none_counted).item() == 0.0
    for name in HIDDEN_DISTANCES:
        assert hidden_state_distance([s], [t], ~none_counted, distance=name).dtype == torch.float32


def test_bad_arguments_are_named():
    h, mask = torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown hidden distance 'l1'"):
        hidden_state_distance([h], [h], mask, distance="l1")
    with pytest.raises(ValueError, match="as many student as teacher layers"):
        hidden_state_distance([h, h], [h], mask)
    with pytest.raises(ValueError, match="differ"):
        mse_distance(h, h[..., :3])
