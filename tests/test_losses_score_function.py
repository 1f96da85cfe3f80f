"""The score-function estimator of the sequence reverse KL (``score_function_rkl``), exact by enumeration.

The problem: a prompt, then a response of 2 tokens over 3 symbols, so 9 sequences y = (y_1, y_2).
The student is a table of free logits: θ_1 ∈ R³ for y_1 and θ_2[a] ∈ R³ for y_2 given y_1 = a, so
p_s(y) = s_1(y_1)·s_2(y_2 | y_1); the teacher q is a fixed table of the same shape. Then

    KL(θ) = Σ_y p_s(y)·(log p_s(y) − log p_q(y)) = Σ_y p_s(y)·Σ_t r_t(y),  r_t = log s_t(y_t) − log q_t(y_t)

is a finite sum, and autograd gives its exact gradient. Differentiating the product p_s(y)·Σ_t r_t:

    ∇KL = Σ_y p_s(y)·∇log p_s(y)·Σ_t r_t  +  Σ_y p_s(y)·Σ_t ∇log s_t(y_t)
        = E[Σ_t' ∇log s_t'(y_t') · Σ_t r_t]  +  0            (Σ_y ∇p_s(y) = ∇1 = 0)
        = E[Σ_t ∇log s_t(y_t) · R_t],   R_t = Σ_{t' ≥ t} r_t'

because for t < t' the pair r_t·∇log s_t'(y_t') has mean 0: given y_<t', r_t is fixed and
E[∇log s_t'(y_t') | y_<t'] = Σ_v ∇s_t'(v) = 0. That last expectation is g(y), the gradient of
``score_function_rkl`` on the one-row batch [y] (no other row, so no baseline), hence

    Σ_y sg(p_s(y))·g(y) = ∇KL   and   Σ_y sg(p_s(y))·value(y) = KL      (sg: no gradient)

exactly, with no sampling. With a baseline, a batch of B independent samples gives
g(y^1..y^B) = Σ_i Σ_t ∇log s_t(y^i_t)·(R^i_t − b^i_t), b^i_t the mean of R^j_t over j ≠ i. Its
expectation over all B-tuples, weighted by Π_i p_s(y^i), is B·∇KL − Σ_i Σ_t E[∇log s_t(y^i_t)]·E[b^i_t]
(b^i is independent of y^i) = B·∇KL. Enumerating the 9² ordered pairs and the 9³ triples makes that
exact too. Variable lengths (a symbol that ends the response) and rows whose responses start at
different positions are enumerated the same way.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmdistill.losses import leave_one_out_baseline, score_function_rkl, token_logprobs

V = 3
EOS = 2  # in the variable-length problem, y_1 = EOS ends the response


def logits_table(first: torch.Tensor, second: torch.Tensor, seqs: list[tuple[int, ...]], prompt_len: int, length: int):
    """(N, length, V) logits and (N, length) labels of the sequences [prompt] + y, right-padded.

    Position prompt_len − 1 predicts y_1 (logits ``first``), position prompt_len predicts y_2
    (logits ``second[y_1]``); the other positions predict nothing (zero logits, label −100).
    """
    logits, labels = [], []
    for y in seqs:
        rows = [torch.zeros(V, dtype=first.dtype)] * length
        rows[prompt_len - 1] = first
        rows[prompt_len] = second[y[0]]
        logits.append(torch.stack(rows))
        lab = [-100] * length
        lab[prompt_len : prompt_len + len(y)] = y
        labels.append(lab)
    return torch.stack(logits), torch.tensor(labels)


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(V, generator=gen, dtype=torch.float64).requires_grad_(),
             torch.randn(V, V, generator=gen, dtype=torch.float64).requires_grad_())
    phi = (torch.randn(V, generator=gen, dtype=torch.float64), torch.randn(V, V, generator=gen, dtype=torch.float64))
    return theta, phi


def logprobs(theta, phi, seqs, prompt_len: int, length: int):
    """Student log-probs (with gradient), teacher log-probs and mask, (N, length) each, as the method gets them."""
    logits, labels = logits_table(*theta, seqs, prompt_len, length)
    with torch.no_grad():
        teacher = token_logprobs(logits_table(*phi, seqs, prompt_len, length)[0], labels)  # Teacher.score's layout
    return token_logprobs(logits, labels), teacher, labels != -100


def exact_kl(theta, phi, seqs) -> torch.Tensor:
    """Σ_y p_s(y)·(log p_s(y) − log p_q(y)) over all sequences (they must be the whole support)."""
    s, q, _ = logprobs(theta, phi, seqs, 1, 3)
    log_ps, log_pq = s.sum(1), q.sum(1)
    torch.testing.assert_close(log_ps.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    return (log_ps.exp() * (log_ps - log_pq)).sum()


def expected_estimate(layouts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch: int, baseline: bool):
    """Σ over all ordered `batch`-tuples (y^1..y^B) of Π_i sg(p_s(y^i)) · score_function_rkl on that batch.

    layouts[k] = (s, q, mask), each (N, T) over the N sequences; batch slot i takes its row from
    layouts[i % len(layouts)] (so slots may place their responses at different positions).
    """
    s, q, mask = (torch.stack([layout[k] for layout in layouts]) for k in range(3))  # (P, N, T)
    log_p = s.detach().sum(-1)  # (P, N) log p_s(y) in each layout
    total = torch.zeros((), dtype=torch.float64)
    for combo in itertools.product(range(s.shape[1]), repeat=batch):
        idx = [(slot % len(layouts), y) for slot, y in enumerate(combo)]
        value, _ = score_function_rkl(torch.stack([s[k, y] for k, y in idx]), torch.stack([q[k, y] for k, y in idx]),
                                      torch.stack([mask[k, y] for k, y in idx]), baseline=baseline)  # fmt: skip
        total = total + sum(log_p[k, y] for k, y in idx).exp() * value
    return total


SEQS_2x3 = list(itertools.product(range(V), repeat=2))  # the 9 sequences


def test_expected_gradient_without_baseline_is_the_exact_reverse_kl_gradient():
    """No baseline (one sample per batch): Σ_y p_s(y)·g(y) = ∇KL, Σ_y p_s(y)·value(y) = KL (module docstring)."""
    theta, phi = problem()
    kl = exact_kl(theta, phi, SEQS_2x3)
    expected = expected_estimate([logprobs(theta, phi, SEQS_2x3, 1, 3)], batch=1, baseline=False)
    torch.testing.assert_close(expected, kl, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(expected, theta), torch.autograd.grad(kl, theta)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert kl.item() > 0.05  # the teacher differs from the student: the gradient is not trivially 0


@pytest.mark.parametrize("batch", [2, 3])
def test_expected_gradient_with_the_leave_one_out_baseline_is_batch_times_the_exact_gradient(batch):
    """All 9^B ordered B-tuples: E[g] = B·∇KL and E[value] = B·KL, the baseline adding 0 in expectation."""
    theta, phi = problem(1)
    kl = exact_kl(theta, phi, SEQS_2x3)
    rows = [logprobs(theta, phi, SEQS_2x3, 1, 3)]
    expected = expected_estimate(rows, batch=batch, baseline=True)
    torch.testing.assert_close(expected, batch * kl, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(expected, theta), torch.autograd.grad(kl, theta)):
        torch.testing.assert_close(got, batch * want, rtol=1e-9, atol=1e-12)


def test_the_baseline_changes_the_per_batch_gradient():
    """Not vacuous: on a batch of two different samples the baseline does change the gradient."""
    theta, phi = problem(1)
    s, q, mask = logprobs(theta, phi, [(0, 1), (2, 0)], 1, 3)
    with_b = torch.autograd.grad(score_function_rkl(s, q, mask)[0], theta, retain_graph=True)
    without = torch.autograd.grad(score_function_rkl(s, q, mask, baseline=False)[0], theta)
    assert max((a - b).abs().max().item() for a, b in zip(with_b, without)) > 1e-3


def test_variable_lengths_and_shifted_rows_stay_exact():
    """y_1 = EOS ends the response: 7 sequences, (EOS) and (a, b) for a ∈ {0, 1}. Batch slot 0 has a
    1-token prompt, slot 1 a 2-token prompt, so at a given position one row may be in its prompt, its
    response or its padding; the per-position baseline only averages rows that count there. Over all
    49 ordered pairs: E[g] = 2·∇KL, E[value] = 2·KL."""
    seqs = [(EOS,)] + [(a, b) for a in (0, 1) for b in range(V)]
    theta, phi = problem(2)
    # The student's distribution with EOS: s_1 over 3 symbols; after EOS nothing follows.
    kl = exact_kl(theta, phi, seqs)
    rows = [logprobs(theta, phi, seqs, 1, 4), logprobs(theta, phi, seqs, 2, 4)]
    expected = expected_estimate(rows, batch=2, baseline=True)
    torch.testing.assert_close(expected, 2 * kl, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(expected, theta), torch.autograd.grad(kl, theta)):
        torch.testing.assert_close(got, 2 * want, rtol=1e-9, atol=1e-12)


# --- the pieces, by hand ----------------------------------------------------------------------------


def test_value_is_the_summed_log_ratio_and_the_gradient_is_the_advantage():
    """Two rows, T = 3, mask [[F, T, T], [F, T, F]]; r = s − q = [[·, 1, 2], [·, −1, ·]].
    Returns R: row 0 [·, 3, 2], row 1 [·, −1, ·]. Leave-one-out baseline: row 0 at t=1 gets row 1's −1,
    at t=2 nobody else counts → 0; row 1 at t=1 gets row 0's 3. Advantages: [[·, 4, 2], [·, −4, ·]].
    value = 1 + 2 − 1 = 2; ∂value/∂s = the advantages; 3 tokens."""
    s = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, -2.0, -4.0], [0.0, -2.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    value, n = score_function_rkl(s, q, mask)
    assert value.item() == 2.0 and n.item() == 3 and n.dtype == torch.long
    (grad,) = torch.autograd.grad(value, s)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 4.0, 2.0], [0.0, -4.0, 0.0]]))
    value, _ = score_function_rkl(s, q, mask, baseline=False)
    (grad,) = torch.autograd.grad(value, s)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 3.0, 2.0], [0.0, -1.0, 0.0]]))


def test_baseline_ignores_rows_that_do_not_count_at_that_position():
    """Row 1 is still in its prompt at t = 1 (its return there is its whole return, 5); row 0 is trained
    at t = 1 and row 2 too. Row 0's baseline at t = 1 is row 2's value only: (7)/1, not (5 + 7)/1.
    (feedback-kl's inline estimator summed the returns of every other row but counted only the trained
    ones, so a row still in its prompt leaked its total return into the baseline.)"""
    values = torch.tensor([[0.0, 1.0, 1.0], [5.0, 5.0, 5.0], [0.0, 7.0, 3.0]])
    mask = torch.tensor([[False, True, True], [False, False, True], [False, True, True]])
    b = leave_one_out_baseline(values, mask)
    torch.testing.assert_close(b, torch.tensor([[0.0, 7.0, 4.0], [0.0, 0.0, 2.0], [0.0, 1.0, 3.0]]))


def test_masked_positions_do_not_matter_and_inputs_are_upcast():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=gen)
    q = torch.randn(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    s_bad = torch.where(mask, s, torch.tensor(math.nan))
    q_bad = torch.where(mask, q, torch.tensor(-math.inf))
    a, b = s.clone().requires_grad_(), s_bad.clone().requires_grad_()
    value_a, _ = score_function_rkl(a, q, mask)
    value_b, _ = score_function_rkl(b, q_bad, mask)
    torch.testing.assert_close(value_a, value_b, rtol=0, atol=0)
    torch.testing.assert_close(value_a, torch.where(mask, s - q, 0.0).sum())
    grad_a, grad_b = torch.autograd.grad(value_a, a)[0], torch.autograd.grad(value_b, b)[0]
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    assert (grad_a[~mask] == 0).all()
    value, _ = score_function_rkl(s.bfloat16().requires_grad_(), q.bfloat16(), mask)
    assert value.dtype == torch.float32


def test_a_single_row_has_no_baseline_and_shapes_are_checked():
    s = torch.randn(1, 5, requires_grad=True)
    q, mask = torch.randn(1, 5), torch.tensor([[False, True, True, True, False]])
    g1 = torch.autograd.grad(score_function_rkl(s, q, mask)[0], s)[0]
    g2 = torch.autograd.grad(score_function_rkl(s, q, mask, baseline=False)[0], s)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one \\(B, T\\) shape"):
        score_function_rkl(s, q[:, :4], mask)
    with pytest.raises(TypeError, match="bool"):
        score_function_rkl(s, q, mask.long())
