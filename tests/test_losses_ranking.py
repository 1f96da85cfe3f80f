"""Bradley–Terry, Plackett–Luce and PRO (losses.preference) on hand-computed scores, and RLOO (losses.policy)
exact by enumeration: its expected gradient is the true gradient of the expected KL-penalised reward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmdistill.losses import LISTWISE_FORMS, bradley_terry, dpo, plackett_luce, pro, simpo
from lmdistill.losses.policy import rloo_loss

E = math.e


# --------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_closed_form():
    """r_w = (1, 0), r_l = (0, 2): −log σ(1) = log(1 + e⁻¹) = 0.31326, −log σ(−2) = log(1 + e²) = 2.12693."""
    loss, m = bradley_terry(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((math.log1p(E**-1) + math.log1p(E**2)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((0.31326 + 2.12693) / 2, abs=1e-5)
    assert m["reward_accuracy"].item() == 0.5 and m["reward_margin"].item() == pytest.approx(-0.5)
    total, _ = bradley_terry(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), reduction="sum")
    assert total.item() == pytest.approx(2 * loss.item())
    assert bradley_terry(torch.zeros(3), torch.zeros(3))[0].item() == pytest.approx(math.log(2))


def test_dpo_is_bradley_terry_on_its_implicit_rewards():
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-2.0, -6.0]), torch.tensor([-4.5, -2.0])
    want, _ = bradley_terry(0.5 * (pc - rc), 0.5 * (pr - rr))
    got, _ = dpo(pc, pr, rc, rr, beta=0.5)
    assert got.item() == pytest.approx(want.item(), abs=1e-7)


# --------------------------------------------------------------------------- Plackett–Luce and PRO


def test_plackett_luce_closed_form():
    """Scores (2, 1, 0) best first: −[2 − log(e² + e + 1)] − [1 − log(e + 1)] = 0.40761 + 0.31326 = 0.72087."""
    loss = plackett_luce(torch.tensor([[2.0, 1.0, 0.0]]))
    want = (math.log(E**2 + E + 1) - 2) + (math.log(E + 1) - 1)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(0.72087, abs=1e-5)
    # The reverse ranking is less likely: (0, 1, 2) → −[0 − log(1 + e + e²)] − [1 − log(e + e²)] = 3.72087.
    assert plackett_luce(torch.tensor([[0.0, 1.0, 2.0]])).item() == pytest.approx(
        math.log(1 + E + E**2) + math.log(E + E**2) - 1, abs=1e-6)
    # Equal scores: every one of the K! orders is equally likely.
    assert plackett_luce(torch.zeros(1, 4)).item() == pytest.approx(math.log(24), abs=1e-6)


def test_plackett_luce_of_two_is_bradley_terry_and_masks_shorter_rankings():
    s = torch.tensor([[0.3, -1.2], [2.0, 2.5]])
    assert plackett_luce(s).item() == pytest.approx(bradley_terry(s[:, 0], s[:, 1])[0].item(), abs=1e-6)
    # A row ranking 2 of 3 (the third column is filler, even NaN) is the pair's loss; a row of one is 0.
    scores = torch.tensor([[2.0, 1.0, float("nan")], [2.0, 1.0, 0.0], [5.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    loss = plackett_luce(scores, mask, reduction="sum")
    want = math.log1p(E**-1) + (math.log(E**2 + E + 1) - 2) + (math.log(E + 1) - 1)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all() and (grad[2] == 0).all()
    with pytest.raises(ValueError, match="prefix"):
        plackett_luce(scores.detach(), torch.tensor([[True, False, True]] * 3))


def test_pro_closed_form_and_its_pair_is_simpo_without_margin():
    """log-probs (−2, −6, −3) over lengths (2, 3, 1): mean log-probs (−1, −2, −3) = (2, 1, 0) − 3, so with β = 1
    the loss is PL(2, 1, 0) = 0.72087 (Plackett–Luce does not move under a shift)."""
    loss, m = pro(torch.tensor([[-2.0, -6.0, -3.0]]), torch.tensor([[2, 3, 1]]), beta=1.0)
    assert loss.item() == pytest.approx(0.72087, abs=1e-5)
    assert m["reward_chosen"].item() == pytest.approx(-1.0) and m["reward_rejected"].item() == pytest.approx(-3.0)
    pc, pr, lc, lr = torch.tensor([-3.0, -8.0]), torch.tensor([-5.0, -2.0]), torch.tensor([3, 4]), torch.tensor([2, 5])
    got, _ = pro(torch.stack([pc, pr], 1), torch.stack([lc, lr], 1), beta=2.0)
    want, _ = simpo(pc, pr, lc, lr, beta=2.0, gamma=0.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    # Without length normalisation the raw sums are scored: (−2, −6, −3) → PL(1, −3, 0) with β = 0.5.
    raw, _ = pro(torch.tensor([[-2.0, -6.0, -3.0]]), torch.tensor([[2, 3, 1]]), beta=0.5, length_normalize=False)
    assert raw.item() == pytest.approx(plackett_luce(torch.tensor([[-1.0, -3.0, -1.5]])).item(), abs=1e-6)
    assert set(LISTWISE_FORMS) == {"pro"}


# --------------------------------------------------------------------------- RLOO, exact by enumeration

S, K, BETA = 4, 3, 0.3
GEN = torch.Generator().manual_seed(0)
THETA = torch.randn(S, generator=GEN, dtype=torch.float64)
SCORE = 3 * torch.randn(S, generator=GEN, dtype=torch.float64)
REF = torch.log_softmax(torch.randn(S, generator=GEN, dtype=torch.float64), 0)


def expected_rloo_gradient(score: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """E over every one of the S^k draws of k samples (weighted by its probability) of ∇ rloo_loss."""
    total = torch.zeros(S, dtype=torch.float64)
    for draw in itertools.product(range(S), repeat=K):
        theta = THETA.clone().requires_grad_()
        logp = torch.log_softmax(theta, 0)
        idx = torch.tensor(draw)
        loss, _ = rloo_loss(logp[idx][None], score[idx][None], REF[idx][None], kl_coef=kl_coef)
        (grad,) = torch.autograd.grad(loss, theta)
        total += logp.detach()[idx].sum().exp() * grad
    return total


@pytest.mark.parametrize("kl_coef", [0.0, BETA])
def test_rloo_expected_gradient_is_the_exact_gradient_of_the_expected_reward(kl_coef):
    """A categorical policy p = softmax(θ) over S = 4 sequences, k = 3 samples: Σ over the 64 draws of
    P(draw)·∇loss equals −∇ Σ_s p_s (score_s − β·log(p_s / p_ref,s)), the KL penalty's own dependence on θ included."""
    theta = THETA.clone().requires_grad_()
    p = torch.softmax(theta, 0)
    objective = (p * (SCORE - kl_coef * (torch.log(p) - REF))).sum()
    (want,) = torch.autograd.grad(-objective, theta)
    torch.testing.assert_close(expected_rloo_gradient(SCORE, kl_coef), want, rtol=1e-10, atol=1e-12)


def test_rloo_gradient_ignores_a_constant_added_to_every_score_draw_by_draw():
    """The leave-one-out baseline removes any constant exactly, on every draw (not only in expectation)."""
    theta = THETA.clone().requires_grad_()
    logp = torch.log_softmax(theta, 0)[torch.tensor([[0, 1, 1], [3, 2, 0]])]
    scores = SCORE[torch.tensor([[0, 1, 1], [3, 2, 0]])]
    g1 = torch.autograd.grad(rloo_loss(logp, scores)[0], theta, retain_graph=True)[0]
    g2 = torch.autograd.grad(rloo_loss(logp, scores + 100.0)[0], theta)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_rloo_value_and_stats():
    """value = −(1/k) Σ R summed over prompts; stats are sums over the samples."""
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    ref = torch.tensor([[-1.5, -2.0], [-2.0, -4.0]])
    scores = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    loss, stats = rloo_loss(logp, scores, ref, kl_coef=0.5)
    kl = logp - ref  # (0.5, 0, −1, 0)
    rewards = scores - 0.5 * kl
    assert loss.item() == pytest.approx(-rewards.sum().item() / 2)
    assert stats == pytest.approx({"score": 7.0, "kl": -0.5, "reward": rewards.sum().item()})
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_loss(logp[:, :1], scores[:, :1])
    with pytest.raises(ValueError, match="reference"):
        rloo_loss(logp, scores, kl_coef=0.1)
    with pytest.raises(ValueError, match="shape"):
        rloo_loss(logp, scores[0])
