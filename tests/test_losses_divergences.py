"""Token divergences: closed forms worked out by hand, and properties of every registered divergence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import (
    LOSSES,
    TopK,
    akl,
    akl_weights,
    divergence_from_logprobs,
    fkl,
    jsd,
    log_distributions,
    masked_reduce,
    rkl,
    sample_tail,
    skl,
    srkl,
    tvd,
)

NAMES = sorted(LOSSES)


def logits_of(*probs: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(1, 1, V) logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=dtype).log().view(1, 1, -1)


ONE = torch.ones(1, 1, dtype=torch.bool)
Q2, S2 = logits_of(0.9, 0.1), logits_of(0.5, 0.5)  # teacher q, student s


def rand(b: int = 2, t: int = 4, v: int = 6, *, dtype: torch.dtype = torch.float64, seed: int = 0):
    """student logits, teacher logits (B, T, V), and a mask with a few positions off."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -1] = mask[1, 0] = False
    return student, teacher, mask


def topk_of(teacher_logits: torch.Tensor, k: int) -> TopK:
    logprobs = teacher_logits.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return TopK(top.indices, top.values)


# --- closed forms -------------------------------------------------------------------------------


def test_fkl_closed_form():
    """KL([.9,.1]‖[.5,.5]) = .9·ln(.9/.5) + .1·ln(.1/.5) = .9·0.5877867 + .1·(−1.6094379)
    = 0.5290080 − 0.1609438 = 0.368064."""
    assert fkl(S2, Q2, ONE).item() == pytest.approx(0.368064, abs=1e-6)


def test_rkl_closed_form():
    """KL([.5,.5]‖[.9,.1]) = .5·ln(.5/.9) + .5·ln(.5/.1) = .5·(−0.5877867) + .5·1.6094379 = 0.510826."""
    assert rkl(S2, Q2, ONE).item() == pytest.approx(0.510826, abs=1e-6)


def test_jsd_closed_form():
    """β = .5: m = .5·[.9,.1] + .5·[.5,.5] = [.7,.3].
    KL(q‖m) = .9·ln(.9/.7) + .1·ln(.1/.3) = .9·0.2513144 − .1·1.0986123 = 0.1163218;
    KL(s‖m) = .5·ln(.5/.7) + .5·ln(.5/.3) = .5·(−0.3364722) + .5·0.5108256 = 0.0871767;
    JSD = .5·0.1163218 + .5·0.0871767 = 0.101749."""
    assert jsd(S2, Q2, ONE, beta=0.5).item() == pytest.approx(0.101749, abs=1e-6)


def test_skl_closed_form():
    """α = .1: m = .1·q + .9·s = [.09+.45, .01+.45] = [.54,.46].
    KL(q‖m) = .9·ln(.9/.54) + .1·ln(.1/.46) = .9·0.5108256 − .1·1.5260563 = 0.307137."""
    assert skl(S2, Q2, ONE, alpha=0.1).item() == pytest.approx(0.307137, abs=1e-6)


def test_srkl_closed_form():
    """α = .1: m = .1·s + .9·q = [.05+.81, .05+.09] = [.86,.14].
    KL(s‖m) = .5·ln(.5/.86) + .5·ln(.5/.14) = .5·(−0.5423243) + .5·1.2729657 = 0.365321."""
    assert srkl(S2, Q2, ONE, alpha=0.1).item() == pytest.approx(0.365321, abs=1e-6)


def test_tvd_closed_form():
    """½·(|.9 − .5| + |.1 − .5|) = ½·(.4 + .4) = 0.4."""
    assert tvd(S2, Q2, ONE).item() == pytest.approx(0.4, abs=1e-12)


def test_akl_closed_form():
    """q = [.6,.3,.1], s = [.5,.1,.4]; |q − s| = [.1,.2,.3]; cumulative q = [.6,.9,1.0].
    fkl = .6·ln(1.2) + .3·ln(3) + .1·ln(.25) = 0.1093929 + 0.3295837 − 0.1386294 = 0.3003472;
    rkl = .5·ln(.5/.6) + .1·ln(.1/.3) + .4·ln(4) = −0.0911608 − 0.1098612 + 0.5545177 = 0.3534957.
    μ = .7: head = {top} (.6 ≤ .7 < .9), g_h = .1, g_t = .2 + .3 = .5 → w = (1/6, 5/6),
      akl = 0.3003472/6 + 5·0.3534957/6 = 0.344638.
    μ = .3: no cumulative q is ≤ .3, but the top token is always in the head: same as μ = .7.
    μ = .95: head = {0, 1}, g_h = .3, g_t = .3 → w = (½, ½), akl = (0.3003472 + 0.3534957)/2 = 0.326921."""
    q, s = logits_of(0.6, 0.3, 0.1), logits_of(0.5, 0.1, 0.4)
    assert akl(s, q, ONE, mu=0.7).item() == pytest.approx(0.344638, abs=1e-6)
    assert akl(s, q, ONE, mu=0.3).item() == pytest.approx(0.344638, abs=1e-6)
    assert akl(s, q, ONE, mu=0.95).item() == pytest.approx(0.326921, abs=1e-6)
    w_head, w_tail = akl_weights(s, q, mu=0.7)
    assert (w_head.item(), w_tail.item()) == pytest.approx((1 / 6, 5 / 6), abs=1e-12)


def test_fkl_equals_torch_kl_div_summed_over_vocab():
    student, teacher, mask = rand(dtype=torch.float32)
    ref = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(fkl(student, teacher, mask, per_token=True), torch.where(mask, ref, 0.0))
    torch.testing.assert_close(fkl(student, teacher, mask), ref[mask].mean())


def test_temperature_divides_both_sides():
    student, teacher, mask = rand()
    for fn in LOSSES.values():
        torch.testing.assert_close(fn(student, teacher, mask, temperature=2.0), fn(student / 2, teacher / 2, mask))


def test_fkl_is_not_cross_entropy():
    """torchtune's ForwardKLLoss returns −Σ q log s; ours is the KL, which is 0 on identical inputs."""
    student, _, mask = rand()
    assert fkl(student, student, mask).item() == 0.0


# --- properties of every registered divergence --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    student, _, mask = rand()
    fn = LOSSES[name]
    assert fn(student, student.clone(), mask).item() == pytest.approx(0.0, abs=1e-12)
    assert fn(student, topk_of(student, 3), mask).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative(name):
    for seed in range(3):
        student, teacher, mask = rand(seed=seed, dtype=torch.float32)
        assert (LOSSES[name](student, teacher, mask, per_token=True) >= 0).all()
        assert (LOSSES[name](student, topk_of(teacher, 2), mask, per_token=True) >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_change_nothing(name):
    student, teacher, mask = rand()
    student = student.requires_grad_()
    fn = LOSSES[name]
    base = fn(student, teacher, mask)
    (grad,) = torch.autograd.grad(base, student)
    assert (grad[~mask] == 0).all()
    noisy_student, noisy_teacher = student.detach().clone(), teacher.clone()
    noisy_student[~mask] = 1e3
    noisy_teacher[~mask] = float("nan")
    torch.testing.assert_close(fn(noisy_student, noisy_teacher, mask), base.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero(name):
    student, teacher, mask = rand()
    student = student.requires_grad_()
    none = torch.zeros_like(mask)
    for teach in (teacher, topk_of(teacher, 3)):
        out = LOSSES[name](student, teach, none)
        assert out.item() == 0.0 and not out.isnan()
        (grad,) = torch.autograd.grad(out, student)
        assert (grad == 0).all()
        assert LOSSES[name](student, teach, none, reduction="sum").item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_reductions_agree(name):
    student, teacher, mask = rand()
    fn = LOSSES[name]
    per_token = fn(student, teacher, mask, per_token=True)
    assert per_token.shape == mask.shape and (per_token[~mask] == 0).all()
    torch.testing.assert_close(fn(student, teacher, mask, reduction="sum"), per_token.sum())
    torch.testing.assert_close(fn(student, teacher, mask), per_token.sum() / mask.sum())
    torch.testing.assert_close(fn(student, teacher, mask, reduction="none"), per_token)
    with pytest.raises(ValueError):
        fn(student, teacher, mask, per_token=True, reduction="sum")


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"akl"}))
def test_gradcheck(name):
    """float64 gradcheck w.r.t. both logits (dense teacher), and w.r.t. the student (top-k teacher)."""
    student, teacher, mask = rand(2, 3, 5)
    student.requires_grad_()
    fn = LOSSES[name]
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t, mask), (student, teacher.requires_grad_()))
    top = topk_of(teacher.detach(), 3)
    assert torch.autograd.gradcheck(lambda s: fn(s, top, mask), (student,))
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher.detach(), mask, per_token=True, temperature=1.7), (student,))


def test_akl_gradient_treats_weights_as_constants():
    """AKL's weights are detached, so its gradient is that of w_h·fkl + w_t·rkl with w frozen at
    the current point (a numerical gradcheck of akl would differentiate the weights too)."""
    student, teacher, mask = rand(2, 3, 5)
    student.requires_grad_()
    for top in (teacher, topk_of(teacher, 3)):
        w_head, w_tail = akl_weights(student, top)
        frozen = (w_head * fkl(student, top, mask, per_token=True) + w_tail * rkl(student, top, mask, per_token=True)).sum() / mask.sum()
        torch.testing.assert_close(akl(student, top, mask), frozen)
        torch.testing.assert_close(torch.autograd.grad(akl(student, top, mask), student)[0], torch.autograd.grad(frozen, student)[0])
        assert torch.autograd.gradcheck(
            lambda s: (w_head * fkl(s, top, mask, per_token=True) + w_tail * rkl(s, top, mask, per_token=True)).sum(),
            (student,),
        )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_the_float32_answer(name, low):
    student, teacher, mask = rand(dtype=torch.float32)
    student, teacher = student.to(low), teacher.to(low)
    out = LOSSES[name](student, teacher, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LOSSES[name](student.float(), teacher.float(), mask), rtol=0, atol=0)
    top = topk_of(teacher.float(), 3)
    torch.testing.assert_close(
        LOSSES[name](student, TopK(top.ids, top.logprobs.to(low)), mask),
        LOSSES[name](student.float(), TopK(top.ids, top.logprobs.to(low).float()), mask),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("name", NAMES)
def test_float64_stays_float64(name):
    student, teacher, mask = rand(dtype=torch.float64)
    assert LOSSES[name](student, teacher, mask).dtype == torch.float64
    assert LOSSES[name](student.float(), teacher, mask).dtype == torch.float64


def test_teacher_with_minus_inf_logits_is_finite():
    """A teacher that masks part of the vocabulary (−inf logits) gives finite fkl/jsd/skl and NaN-free gradients."""
    student, teacher, mask = rand()
    teacher[..., :2] = float("-inf")
    student.requires_grad_()
    for name in ("fkl", "jsd", "skl", "tvd"):
        out = LOSSES[name](student, teacher, mask)
        (grad,) = torch.autograd.grad(out, student)
        assert out.isfinite() and grad.isfinite().all(), name


def test_rejects_bad_inputs():
    student, teacher, mask = rand()
    with pytest.raises(TypeError, match="bool"):
        fkl(student, teacher, mask.long())
    with pytest.raises(ValueError, match="mask"):
        fkl(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="beta"):
        jsd(student, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        fkl(student, topk_of(teacher, 3), mask, temperature=2.0)


# --- jsd, skew, tvd, akl specifics ----------------------------------------------------------------


def test_jsd_ends_are_exactly_fkl_and_rkl():
    student, teacher, mask = rand()
    assert torch.equal(jsd(student, teacher, mask, beta=0.0), fkl(student, teacher, mask))
    assert torch.equal(jsd(student, teacher, mask, beta=1.0), rkl(student, teacher, mask))


def test_jsd_is_numerically_sound_near_the_ends():
    """JSD(β) ≈ β·fkl as β → 0 and ≈ (1−β)·rkl as β → 1 (float64, log-space mixture): no NaN or inf."""
    student, teacher, mask = rand()
    eps = 1e-6
    near0 = jsd(student, teacher, mask, beta=eps, per_token=True)
    near1 = jsd(student, teacher, mask, beta=1 - eps, per_token=True)
    assert near0.isfinite().all() and near1.isfinite().all()
    torch.testing.assert_close(near0 / eps, fkl(student, teacher, mask, per_token=True), rtol=0, atol=1e-3)
    torch.testing.assert_close(near1 / eps, rkl(student, teacher, mask, per_token=True), rtol=0, atol=1e-3)


def test_jsd_docstring_states_the_scale_jump():
    assert "jump" in jsd.__doc__ and "β·fkl" in jsd.__doc__ and "(1−β)·rkl" in jsd.__doc__


def test_jsd_half_is_symmetric_and_at_most_log2():
    student, teacher, mask = rand()
    torch.testing.assert_close(jsd(student, teacher, mask, beta=0.5), jsd(teacher, student, mask, beta=0.5))
    disjoint_s, disjoint_t = logits_of(1.0, 1e-300), logits_of(1e-300, 1.0)
    assert jsd(disjoint_s, disjoint_t, ONE).item() == pytest.approx(math.log(2), abs=1e-9)


def test_skew_kls_at_alpha_zero_are_the_kls():
    student, teacher, mask = rand()
    assert torch.equal(skl(student, teacher, mask, alpha=0.0), fkl(student, teacher, mask))
    assert torch.equal(srkl(student, teacher, mask, alpha=0.0), rkl(student, teacher, mask))
    assert skl(student, teacher, mask, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)


def test_tvd_at_most_one():
    student, teacher, mask = rand()
    assert (tvd(student, teacher, mask, per_token=True) <= 1).all()
    far = tvd(logits_of(1.0, 1e-300), logits_of(1e-300, 1.0), ONE).item()
    assert far <= 1.0 and far == pytest.approx(1.0)


def test_akl_weights_sum_to_one_and_are_detached():
    student, teacher, _ = rand()
    student.requires_grad_()
    for top in (teacher, topk_of(teacher, 3)):
        w_head, w_tail = akl_weights(student, top)
        assert not w_head.requires_grad and not w_tail.requires_grad
        torch.testing.assert_close(w_head + w_tail, torch.ones_like(w_head))
        assert ((w_head >= 0) & (w_head <= 1)).all()
    w_head, w_tail = akl_weights(student.detach(), student.detach())  # g_h + g_t = 0 → ½, ½
    assert (w_head == 0.5).all() and (w_tail == 0.5).all()


# --- top-k teacher --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_topk_with_all_ids_equals_dense(name):
    """k = V (ids in a shuffled order): the tail buckets are empty (~eps) and the value is the dense one."""
    student, teacher, mask = rand()
    v = teacher.shape[-1]
    order = torch.randperm(v, generator=torch.Generator().manual_seed(1)).expand_as(teacher).contiguous()
    top = TopK(order, teacher.log_softmax(-1).gather(-1, order))
    torch.testing.assert_close(LOSSES[name](student, top, mask), LOSSES[name](student, teacher, mask), rtol=0, atol=1e-12)
    s32, t32 = student.float(), top.logprobs.float()
    torch.testing.assert_close(
        LOSSES[name](s32, TopK(order, t32), mask), LOSSES[name](s32, teacher.float(), mask), rtol=0, atol=2e-6
    )


@pytest.mark.parametrize("name", NAMES)
def test_topk_is_the_divergence_of_k_plus_one_buckets(name):
    """k = 2 of V = 6: the value is the divergence between the (k+1)-point distributions
    [p(id_1), p(id_2), 1 − p(id_1) − p(id_2)] of teacher and student, built here by hand."""
    student, teacher, mask = rand()
    top = topk_of(teacher, 2)
    s_prob, t_prob = student.softmax(-1).gather(-1, top.ids), top.logprobs.exp()
    s_buckets = torch.cat([s_prob, 1 - s_prob.sum(-1, keepdim=True)], -1).log()
    t_buckets = torch.cat([t_prob, 1 - t_prob.sum(-1, keepdim=True)], -1).log()
    expected = masked_reduce(divergence_from_logprobs(name, s_buckets, t_buckets), mask)
    torch.testing.assert_close(LOSSES[name](student, top, mask), expected)


def test_log_distributions_shapes():
    student, teacher, _ = rand()
    ls, lq = log_distributions(student, topk_of(teacher, 3))
    assert ls.shape == lq.shape == (2, 4, 4)
    torch.testing.assert_close(ls.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(lq.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64))


# --- top-k with tail samples (sample_tail) ------------------------------------------------------


def sampled_of(teacher_logits: torch.Tensor, k: int, n: int, generator: torch.Generator) -> TopK:
    """sample_tail over (B, T, V) teacher logits, reshaped back to (B, T, ·)."""
    B, T, V = teacher_logits.shape
    flat = sample_tail(teacher_logits.reshape(-1, V).log_softmax(-1), k, n, generator)
    return TopK(*(x.reshape(B, T, *x.shape[1:]) for x in flat))


def test_sampled_tail_fkl_is_unbiased_in_value_and_gradient():
    """Averaged over draws, fkl from top-5 + 4 tail samples equals the full-vocabulary fkl and its
    gradient (within 5 standard errors of the draws' mean); the tail bucket alone is a lower bound
    many standard errors below it."""
    student, teacher, mask = rand(2, 2, 50, dtype=torch.float32, seed=3)
    student.requires_grad_(True)
    full = fkl(student, teacher, mask)
    (g_full,) = torch.autograd.grad(full, student)
    gen = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(3000):
        v = fkl(student, sampled_of(teacher, 5, 4, gen), mask)
        (g,) = torch.autograd.grad(v, student)
        values.append(v.detach())
        grads.append(g)
    values, grads = torch.stack(values), torch.stack(grads)
    se = values.std() / len(values) ** 0.5
    assert abs(values.mean() - full.detach()) < 5 * se
    g_se = grads.std(0) / len(grads) ** 0.5
    # + 2e-5: a tail id with q ~ 1e-5 may never be drawn in 3000 draws (then its standard error is 0
    # and its mean gradient is off by ~q).
    assert ((grads.mean(0) - g_full).abs() <= 5.5 * g_se + 2e-5).all()
    bucket = fkl(student, topk_of(teacher, 5), mask)
    assert full.detach() - bucket > 50 * se


def test_sampled_tail_with_a_single_tail_id_is_exact():
    """k = V − 1: every sample is the one tail id, so value and gradient equal the dense ones."""
    student, teacher, mask = rand(2, 4, 7)
    student.requires_grad_(True)
    sampled = fkl(student, sampled_of(teacher, 6, 3, torch.Generator().manual_seed(1)), mask)
    dense = fkl(student, teacher, mask)
    torch.testing.assert_close(sampled, dense)
    g1, g2 = (torch.autograd.grad(x, student)[0] for x in (sampled, dense))
    torch.testing.assert_close(g1, g2)


def test_sample_tail_fields_and_systematic_coverage():
    """tail_plogp is Σ_tail q·log q exactly; samples lie outside the top k; systematic sampling picks every
    tail id holding at least 1/n of the tail mass in every draw."""
    logp = (torch.randn(20, 30, dtype=torch.float64) * 2).log_softmax(-1)
    top = sample_tail(logp, 4, 8, torch.Generator().manual_seed(2))
    assert top.ids.shape == (20, 4) and top.tail_ids.shape == (20, 8) and top.tail_plogp.shape == (20,)
    q = logp.exp().scatter(-1, top.ids, 0.0)
    torch.testing.assert_close(top.tail_plogp, (q * logp).sum(-1).float())
    assert not (top.tail_ids.unsqueeze(-1) == top.ids.unsqueeze(-2)).any()
    heavy = q / q.sum(-1, keepdim=True) >= 1 / 8
    for r in range(20):
        assert set(heavy[r].nonzero().flatten().tolist()) <= set(top.tail_ids[r].tolist())


def test_sampled_tail_respects_the_mask_and_only_changes_fkl():
    student, teacher, mask = rand(2, 4, 12, seed=5)
    sampled = sampled_of(teacher, 3, 5, torch.Generator().manual_seed(0))
    per_token = fkl(student, sampled, mask, per_token=True)
    assert (per_token[~mask] == 0).all()
    whole = fkl(student, sampled, torch.ones_like(mask), per_token=True)
    torch.testing.assert_close(per_token[mask], whole[mask])
    plain = TopK(sampled.ids, sampled.logprobs)
    for name in ("rkl", "jsd", "tvd"):
        torch.testing.assert_close(LOSSES[name](student, sampled, mask), LOSSES[name](student, plain, mask))
