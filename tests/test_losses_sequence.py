"""Per-token / per-sequence log-probs of given labels, and the preference losses on them."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.losses import (cpo, dpkd, dpo, ipo, response_ce_sum, sequence_logprobs, simpo, token_logprobs,
                              trained_window)
from lmdistill.losses import sequence as sequence_module

IGNORE = -100


def reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain loop: out[b, t] = log_softmax(logits[b, t−1])[labels[b, t]] for t ≥ 1, 0 elsewhere."""
    out = torch.zeros(labels.shape, dtype=torch.float64)
    logp = logits.double().log_softmax(-1)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE:
                out[b, t] = logp[b, t - 1, labels[b, t]]
    return out


def test_token_logprobs_shift_by_hand():
    """V = 3, one sequence of labels [2, 0, 1]; logits at t = 0 are log[.2, .3, .5] and at t = 1
    are log[.6, .3, .1] (t = 2 predicts past the end and is unused).
    t = 0 has no prediction → 0; t = 1: label 0 under position 0's distribution → log .2 = −1.609438;
    t = 2: label 1 under position 1's distribution → log .3 = −1.203973."""
    logits = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]]).log()
    labels = torch.tensor([[2, 0, 1]])
    out = token_logprobs(logits, labels)
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.2), math.log(0.3)]]))
    total, n = sequence_logprobs(logits, labels)
    torch.testing.assert_close(total, torch.tensor([math.log(0.2) + math.log(0.3)]))
    assert n.tolist() == [2]


def test_token_logprobs_ignore_index_and_random_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = IGNORE  # prompt
    labels[2, 4:] = IGNORE  # padding
    out = token_logprobs(logits, labels)
    torch.testing.assert_close(out.double(), reference_token_logprobs(logits, labels), rtol=1e-6, atol=1e-6)
    assert (out[labels == IGNORE] == 0).all() and (out[:, 0] == 0).all()
    total, n = sequence_logprobs(logits, labels)
    torch.testing.assert_close(total, out.sum(1))
    assert n.tolist() == [3, 5, 3]


def test_token_logprobs_in_chunks_and_gradcheck(monkeypatch):
    """Force 2 rows per chunk (logits have 5 columns) so that forward and backward loop over chunks."""
    monkeypatch.setattr(sequence_module, "_CHUNK_ELEMENTS", 10)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 5, (2, 4), generator=g)
    labels[1, 2] = IGNORE
    torch.testing.assert_close(token_logprobs(logits, labels), reference_token_logprobs(logits.detach(), labels))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels), (logits,))


def test_token_logprobs_upcasts_bf16():
    logits = torch.randn(2, 4, 9).bfloat16()
    labels = torch.randint(0, 9, (2, 4))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, token_logprobs(logits.float(), labels), rtol=0, atol=0)


# --- preference losses ----------------------------------------------------------------------------

# One pair: log p_θ(y_w) = −10, log p_θ(y_l) = −12, log p_ref(y_w) = log p_ref(y_l) = −11.
PC, PR, RC, RR = (torch.tensor([x]) for x in (-10.0, -12.0, -11.0, -11.0))


def test_dpo_closed_form():
    """h = (−10 + 11) − (−12 + 11) = 1 − (−1) = 2; β = .1: loss = −log σ(.2) = log(1 + e^−0.2) = 0.598139.
    Rewards: β·1 = .1 and β·(−1) = −.1; margin .2; accuracy 1."""
    loss, metrics = dpo(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert metrics["reward_chosen"].item() == pytest.approx(0.1)
    assert metrics["reward_rejected"].item() == pytest.approx(-0.1)
    assert metrics["reward_margin"].item() == pytest.approx(0.2)
    assert metrics["reward_accuracy"].item() == 1.0
    assert all(not v.requires_grad for v in metrics.values())


def test_dpkd_is_dpo_with_the_teacher_as_reference():
    loss, _ = dpkd(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_dpkd_length_normalised():
    """|y_w| = 2, |y_l| = 4: h = 1/2 − (−1)/4 = .75; loss = log(1 + e^−0.075) = 0.656350; rewards .05, −.025."""
    loss, metrics = dpkd(
        PC, PR, RC, RR, beta=0.1, chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]), length_normalize=True
    )
    assert loss.item() == pytest.approx(0.656350, abs=1e-6)
    assert metrics["reward_chosen"].item() == pytest.approx(0.05)
    assert metrics["reward_rejected"].item() == pytest.approx(-0.025)
    with pytest.raises(ValueError, match="chosen_len"):
        dpkd(PC, PR, RC, RR, length_normalize=True)


def test_dpkd_with_teacher_equal_to_student_is_log2():
    """h = 0 whatever the log-probs: −log σ(0) = log 2, and the gradient pushes y_w up, y_l down."""
    policy_c = torch.tensor([-3.0, -7.5, -20.0], requires_grad=True)
    policy_r = torch.tensor([-4.0, -1.0, -9.0], requires_grad=True)
    loss, metrics = dpkd(policy_c, policy_r, policy_c.detach(), policy_r.detach(), beta=0.5, length_normalize=True,
                         chosen_len=torch.tensor([3, 5, 9]), rejected_len=torch.tensor([2, 2, 2]))  # fmt: skip
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["reward_margin"].item() == 0.0 and metrics["reward_accuracy"].item() == 0.0
    grad_c, grad_r = torch.autograd.grad(loss, (policy_c, policy_r))
    assert (grad_c < 0).all() and (grad_r > 0).all()


def test_ipo_closed_form():
    """h = 2 (as in dpo), β = .1: (h − 1/(2β))² = (2 − 5)² = 9."""
    loss, _ = ipo(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(9.0)


def test_cpo_closed_form():
    """−log σ(.1·(−10 + 12)) − (−10) = log(1 + e^−0.2) + 10 = 10.598139; rewards β·log p = −1, −1.2."""
    loss, metrics = cpo(PC, PR, beta=0.1)
    assert loss.item() == pytest.approx(10.598139, abs=1e-5)
    assert metrics["reward_chosen"].item() == pytest.approx(-1.0)
    assert metrics["reward_rejected"].item() == pytest.approx(-1.2)


def test_simpo_closed_form():
    """β = 2, γ = .5, |y_w| = 5, |y_l| = 4: 2·(−10/5) − 2·(−12/4) − .5 = −4 + 6 − .5 = 1.5;
    loss = log(1 + e^−1.5) = 0.201413; rewards −4, −6, margin 2."""
    loss, metrics = simpo(PC, PR, torch.tensor([5]), torch.tensor([4]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.201413, abs=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(2.0)


def test_preference_losses_average_over_the_batch_and_upcast():
    pc, pr, rc, rr = (torch.tensor([a, b], dtype=torch.bfloat16) for a, b in ((-10, -1), (-12, -2), (-11, -1), (-11, -1)))
    loss, _ = dpo(pc, pr, rc, rr, beta=0.1)
    assert loss.dtype == torch.float32
    # pair 2: h = 0 − (−1) = 1 → log(1 + e^−0.1) = 0.644397; mean with 0.598139 = 0.621268
    assert loss.item() == pytest.approx((0.598139 + 0.644397) / 2, abs=1e-5)


def test_trained_window_holds_every_trained_prediction_and_cuts_the_rest():
    """The window runs from the column before the first trained label to the last trained one; every loss
    on labels[:, window] with logits at the window equals the whole rows' (CE here, float64)."""
    labels = torch.tensor([[-100, -100, -100, 4, 5, -100, -100, -100],
                           [-100, -100, -100, -100, -100, 6, 7, -100]])
    assert trained_window(labels) == slice(2, 7)
    assert trained_window(torch.full((2, 5), -100)) == slice(0, 5)
    assert trained_window(torch.tensor([[3, 4, -100]])) == slice(0, 2)  # column 0 trained: nothing before it
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11, dtype=torch.float64, requires_grad=True)
    w = trained_window(labels)
    full = response_ce_sum(logits, labels)
    cut = response_ce_sum(logits[:, w], labels[:, w])
    torch.testing.assert_close(cut, full)
    (g_full,) = torch.autograd.grad(full, logits)
    (g_cut,) = torch.autograd.grad(cut, logits)
    torch.testing.assert_close(g_cut, g_full)
    assert g_full[:, : w.start].abs().sum() == 0 and g_full[:, w.stop :].abs().sum() == 0
