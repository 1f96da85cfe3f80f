"""The preference forms as a registry (``PREFERENCE_FORMS``, ``NEEDS_REFERENCE``) and their summed reduction.

The closed forms of dpkd, dpo, ipo, cpo and simpo are in test_losses_sequence.py; here each registry
entry is checked against its function, and ``reduction="sum"`` against B × the mean.
"""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses import NEEDS_REFERENCE, PREFERENCE_FORMS, cpo, dpkd, dpo, ipo, simpo

B = 4
GEN = torch.Generator().manual_seed(0)
PC, PR, RC, RR = (-20 * torch.rand(B, generator=GEN, dtype=torch.float64) for _ in range(4))
LEN_C, LEN_R = torch.tensor([3, 7, 1, 12]), torch.tensor([5, 2, 9, 4])


def direct(form: str, pc, pr, rc, rr, *, beta, gamma, length_normalize, reduction="mean"):
    """The existing function of each form, called with the arguments it takes."""
    lengths = dict(chosen_len=LEN_C, rejected_len=LEN_R, length_normalize=length_normalize)
    if form in ("dpkd", "dpo", "ipo"):
        return {"dpkd": dpkd, "dpo": dpo, "ipo": ipo}[form](pc, pr, rc, rr, beta=beta, reduction=reduction, **lengths)
    if form == "cpo":
        return cpo(pc, pr, beta=beta, reduction=reduction)
    return simpo(pc, pr, LEN_C, LEN_R, beta=beta, gamma=gamma, reduction=reduction)


def test_registry_holds_the_five_forms_and_which_need_a_reference():
    assert set(PREFERENCE_FORMS) == {"dpkd", "dpo", "ipo", "cpo", "simpo"}
    assert NEEDS_REFERENCE == {"dpkd", "dpo", "ipo"}
    assert NEEDS_REFERENCE <= set(PREFERENCE_FORMS)


@pytest.mark.parametrize("form", sorted(PREFERENCE_FORMS))
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_each_entry_equals_its_function(form, length_normalize, reduction):
    """Same loss, same metrics, same gradients, through the one shared signature."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc, rr = (RC, RR) if form in NEEDS_REFERENCE else (None, None)
    loss, metrics = PREFERENCE_FORMS[form](
        pc, pr, rc, rr, chosen_len=LEN_C, rejected_len=LEN_R, beta=0.3, gamma=0.7,
        length_normalize=length_normalize, reduction=reduction,
    )  # fmt: skip
    pc2, pr2 = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    want, want_metrics = direct(form, pc2, pr2, RC, RR, beta=0.3, gamma=0.7, length_normalize=length_normalize,
                                reduction=reduction)  # fmt: skip
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=0, atol=0)
    for got, exp in zip(torch.autograd.grad(loss, (pc, pr)), torch.autograd.grad(want, (pc2, pr2))):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("form", sorted(NEEDS_REFERENCE))
def test_forms_with_a_reference_refuse_none(form):
    with pytest.raises(ValueError, match=f"{form}.*reference"):
        PREFERENCE_FORMS[form](PC, PR, None, RR, chosen_len=LEN_C, rejected_len=LEN_R, beta=0.1)
    with pytest.raises(ValueError, match="y_l"):
        PREFERENCE_FORMS[form](PC, PR, RC, None, chosen_len=LEN_C, rejected_len=LEN_R, beta=0.1)


@pytest.mark.parametrize("form", sorted(set(PREFERENCE_FORMS) - NEEDS_REFERENCE))
def test_forms_without_a_reference_ignore_it(form):
    with_ref = PREFERENCE_FORMS[form](PC, PR, RC, RR, chosen_len=LEN_C, rejected_len=LEN_R, beta=0.1)[0]
    without = PREFERENCE_FORMS[form](PC, PR, None, None, chosen_len=LEN_C, rejected_len=LEN_R, beta=0.1)[0]
    torch.testing.assert_close(with_ref, without, rtol=0, atol=0)


@pytest.mark.parametrize("form", sorted(PREFERENCE_FORMS))
def test_sum_is_the_mean_times_the_pairs(form):
    """reduction="sum": loss, every metric and the gradient are B × those of the mean (B = 4 pairs)."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    mean, m_mean = direct(form, pc, pr, RC, RR, beta=0.2, gamma=0.5, length_normalize=True)
    total, m_sum = direct(form, pc, pr, RC, RR, beta=0.2, gamma=0.5, length_normalize=True, reduction="sum")
    torch.testing.assert_close(total, B * mean)
    for key in m_mean:
        torch.testing.assert_close(m_sum[key], B * m_mean[key])
        assert not m_sum[key].requires_grad
    g_mean = torch.autograd.grad(mean, (pc, pr))
    g_sum = torch.autograd.grad(total, (pc, pr))
    for a, b in zip(g_sum, g_mean):
        torch.testing.assert_close(a, B * b)


def test_default_is_still_the_mean_and_a_bad_reduction_is_refused():
    torch.testing.assert_close(dpo(PC, PR, RC, RR)[0], dpo(PC, PR, RC, RR, reduction="sum")[0] / B)
    with pytest.raises(ValueError, match="reduction"):
        dpo(PC, PR, RC, RR, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        simpo(PC, PR, LEN_C, LEN_R, reduction="batchmean")
