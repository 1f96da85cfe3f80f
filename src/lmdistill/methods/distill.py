"""Token-level distillation methods on the one loop: kd, akl, gkd, feedback-kl (METHODS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lmdistill.config import ConfigError, MethodConfig
from lmdistill.data.align import vocabulary_map
from lmdistill.flops import head_parameters, train_cost
from lmdistill.losses import (
    LOSSES,
    TopK,
    chunked_divergence,
    chunked_divergence_and_ce,
    prediction_mask,
    response_ce_sum,
    score_function_rkl,
    span_divergence,
    token_logprobs,
    uld,
)
from lmdistill.methods.base import Batch, Loss, Method, Metrics, Term, register, term_units
from lmdistill.methods.common import sample_responses, student_logits, teacher_signal, trained, with_prefix
from lmdistill.teachers import Capability, Needs


CHUNKED_MIN_VOCAB = 32768
"""Vocabulary size from which `method.chunked=auto` takes the chunked loss (where it was measured to pay)."""


def divergence_params(name: str, *, beta: float, skew: float, mu: float) -> dict[str, float]:
    """The keyword each divergence takes, from a method's options."""
    return {"jsd": {"beta": beta}, "skl": {"alpha": skew}, "srkl": {"alpha": skew}, "akl": {"mu": mu}}.get(name, {})


@dataclass
class KDConfig(MethodConfig):
    """Word-level KD: (1 − alpha)·CE(data) + alpha·divergence(student ‖ teacher) on the data's responses."""

    alpha: float = 1.0
    """Weight of the divergence; 1 − alpha goes to cross-entropy on the data."""
    divergence: str = "fkl"
    """Divergence from the loss library: fkl, rkl, jsd, skl, srkl, tvd, akl."""
    temperature: float = 1.0
    """Softmax temperature applied to both models."""
    beta: float = 0.5
    """jsd's beta (0 = fkl, 1 = rkl)."""
    skew: float = 0.1
    """skl / srkl skew alpha."""
    mu: float = 0.5
    """akl's head mass."""
    chunked: bool | Literal["auto"] = "auto"
    """Fused head + divergence over chunks of positions (`losses.chunked_divergence`): no (B, T, V) student
    logits are kept. With alpha < 1 the cross-entropy comes from the same chunks' logits
    (`losses.chunked_divergence_and_ce`). Same loss and gradients as chunked=false, at a fraction of the memory
    (0.06x at V = 32k) and less time on a CPU (0.66x of the dense loss's forward + backward at V = 32k).
    `auto`: chunked when the student's vocabulary has at least 32,768 entries and its logits are its head
    applied to its last hidden state (checked on the first batch; a model with logit soft-capping or scaling
    falls back to dense); dense below, where the logits are small and chunking gains nothing."""
    chunk_size: int = 0
    """Positions per chunk with chunked=true (0: max(64, 2**21 // V))."""
    align: str = "none"
    """A teacher with another tokenizer (cross-tokenizer KD, math in `losses/cross_tokenizer.py`). `none`: the
    teacher shares the student's tokenizer and sees its ids. `uld`: ULD (Boizard et al. 2024) in place of the
    divergence, Σ_i |sort(s)_i − sort(q)_i| between the i-th response position of the student and the i-th of
    the teacher. `span`: both tokenizations of the response aligned by character offsets; `divergence` on the
    tokens that map one to one (both distributions renormalised over the tokens both vocabularies hold), on merged
    spans between the two-point distributions (P, 1 − P) of the span's probability (the sum of its tokens'
    log-probs). The local teacher scores the response re-encoded with its own tokenizer, after the prompt in
    its own chat template. Needs full teacher logits (a local teacher); the loss is dense (`chunked` unused)."""

    # Whether the method can take `align`: not one that trains on the student's own samples.
    aligns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.divergence not in LOSSES:
            raise ValueError(f"method.divergence: unknown {self.divergence!r}; known: {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha must be in [0, 1], got {self.alpha}")
        if self.align not in ALIGNS:
            raise ValueError(f"method.align must be one of {', '.join(ALIGNS)}, got {self.align!r}")
        if self.align != "none" and not self.aligns:
            raise ValueError(f"method.align={self.align}: this method trains on the student's own samples, which "
                             "the teacher's tokenizer never encoded; use method.name=kd (or akl) for cross-tokenizer "
                             "KD")


ALIGNS = ("none", "uld", "span")


def aligned_terms(cfg: KDConfig, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  teacher_labels: torch.Tensor, student_groups: torch.Tensor, teacher_groups: torch.Tensor,
                  vocab: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict[str, Term], Metrics]:
    """Cross-tokenizer KD terms of one batch (`cfg.align` uld or span), each summed, per the student's trained tokens.

    logits (B, W, V_S) and labels (B, W) at the student's window; teacher_logits (B, W', V_T) and teacher_labels
    (B, W') at the teacher's (its own tokens of the same rows); student_groups (B, W), teacher_groups (B, W'):
    the alignment group of the token in each column (-1: none; ``data.align``); vocab: (student ids, teacher
    ids), (M,) each, of the tokens both vocabularies hold (span). Terms: `uld`, or `aligned_<div>` (one-to-one
    tokens) and `span_<div>` (merged spans); plus `ce` at weight 1 − α when α < 1. Metrics: the share of the
    student's trained tokens each term covers.
    """
    s_pred, t_pred = prediction_mask(labels), prediction_mask(teacher_labels)
    n_tokens = float(s_pred.sum())
    terms: dict[str, Term] = {}
    if cfg.align == "uld":
        # Row by row, the i-th trained position of the student against the teacher's i-th, up to the shorter.
        n = torch.minimum(s_pred.sum(1), t_pred.sum(1))[:, None]
        s_keep, t_keep = s_pred & (s_pred.cumsum(1) <= n), t_pred & (t_pred.cumsum(1) <= n)
        student, teacher = logits[s_keep], teacher_logits[t_keep]  # (N, V_S), (N, V_T), in the same order
        value = uld(student, teacher, s_keep.new_ones(student.shape[:1]), temperature=cfg.temperature, reduction="sum")
        terms["uld"] = Term(value, "labels", cfg.alpha)
        metrics = {"aligned_share": (float(s_keep.sum()), n_tokens)}
    else:
        assert vocab is not None
        params = divergence_params(cfg.divergence, beta=cfg.beta, skew=cfg.skew, mu=cfg.mu)
        groups = int(max(student_groups.max(), teacher_groups.max(), 0)) + 1
        s_count, t_count = _group_sums(student_groups, None, groups), _group_sums(teacher_groups, None, groups)
        one = (s_count == 1) & (t_count == 1)  # (B, G)
        merged = (s_count > 0) & (t_count > 0) & ~one
        # The position predicting a one-to-one token (column t predicts column t + 1); both sides list the
        # one-to-one groups of a row in text order, so the selections pair up.
        s_one, t_one = _predicting(student_groups, one) & s_pred, _predicting(teacher_groups, one) & t_pred
        student = logits[s_one][:, vocab[0]].unsqueeze(0)  # (1, N, M): both on the shared tokens, renormalised
        teacher = teacher_logits[t_one][:, vocab[1]].unsqueeze(0)
        div = LOSSES[cfg.divergence](student, teacher, s_one.new_ones(student.shape[:2]), temperature=cfg.temperature,
                                     reduction="sum", **params)
        s_lp = token_logprobs(logits / cfg.temperature, labels)  # (B, W): log-prob of the token in each column
        with torch.no_grad():
            t_lp = token_logprobs(teacher_logits / cfg.temperature, teacher_labels)
        span = span_divergence(cfg.divergence, _group_sums(student_groups, s_lp, groups),
                               _group_sums(teacher_groups, t_lp, groups), merged, reduction="sum", **params)
        terms[f"aligned_{cfg.divergence}"] = Term(div, "labels", cfg.alpha)
        terms[f"span_{cfg.divergence}"] = Term(span, "labels", cfg.alpha)
        metrics = {"one_to_one_share": (float(s_one.sum()), n_tokens),
                   "merged_share": (float(s_count[merged].sum()), n_tokens)}
    if cfg.alpha < 1:
        terms["ce"] = Term(response_ce_sum(logits, labels), "labels", 1 - cfg.alpha)
    return terms, metrics


def _group_sums(groups: torch.Tensor, values: torch.Tensor | None, n: int) -> torch.Tensor:
    """(B, n): per row, the sum of `values` (B, W) (None: 1, a count) over the columns of each group."""
    ones = torch.ones_like(groups, dtype=torch.float32)
    values = ones if values is None else values
    inside = groups >= 0
    out = values.new_zeros(groups.shape[0], n)
    return out.scatter_add(1, groups.clamp(min=0), torch.where(inside, values, 0.0))


def _predicting(groups: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, W) bool: the positions that predict a token of a `chosen` (B, G) group (the column before it)."""
    at = (groups >= 0) & chosen.gather(1, groups.clamp(min=0))
    out = torch.zeros_like(at)
    out[:, :-1] = at[:, 1:]
    return out


def token_distill_terms(cfg: KDConfig, logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor,
                        per: str = "labels") -> dict[str, Term]:
    """(1 − α)·CE + α·divergence over the trained tokens of one batch, as terms (`per`: the labels' key).
    At α = 1 no cross-entropy is computed (nor logged): it would cost a float32 pass over the logits and its
    backward for a term of weight 0."""
    div = LOSSES[cfg.divergence](
        logits, teacher, prediction_mask(labels), temperature=cfg.temperature, reduction="sum",
        **divergence_params(cfg.divergence, beta=cfg.beta, skew=cfg.skew, mu=cfg.mu),
    )
    terms = {cfg.divergence: Term(div, per, cfg.alpha)}
    if cfg.alpha < 1:
        terms["ce"] = Term(response_ce_sum(logits, labels), per, 1 - cfg.alpha)
    return terms


@register
class KD(Method):
    """Word-level knowledge distillation on the data's responses (Hinton et al.; any divergence)."""

    name = "kd"
    config_class = KDConfig
    needs = Needs(Capability.TOPK)

    @classmethod
    def teacher_needs(cls, cfg: KDConfig) -> Needs:
        if cfg.align != "none":
            return Needs(Capability.FULL, vocabulary="own")
        return cls.needs

    def __init__(self, cfg: KDConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        self._chunked: bool | None = None if cfg.chunked == "auto" else bool(cfg.chunked)
        """Whether the loss runs chunked; decided at the first batch under `auto`."""
        self._head_checked = False
        self._vocab: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, model, batch: Batch) -> Loss:
        if self.cfg.align != "none":
            return self._aligned_loss(model, batch)
        window, labels = trained(batch)
        teacher = teacher_signal(self.ctx, batch, window=window)
        if self._chunked is None:
            head = self.ctx.accelerator.unwrap_model(model).get_output_embeddings()
            self._chunked = head is not None and head.weight.shape[0] >= CHUNKED_MIN_VOCAB
        if self._chunked:
            terms = self._chunked_loss(model, batch, window, labels, teacher)
            if terms is not None:
                return terms, {}
        return token_distill_terms(self.cfg, student_logits(model, batch, window=window), teacher, labels), {}

    def _aligned_loss(self, model, batch: Batch) -> Loss:
        """Cross-tokenizer KD (:func:`aligned_terms`): the teacher on the rows in its own tokens (`teacher_*`)."""
        if "student_groups" not in batch:
            raise ValueError("method.align needs the rows in the teacher's tokens too (encode_rows(..., "
                             "teacher_tokenizer=...), as the training loop does for Needs.vocabulary='own')")
        window, labels = trained(batch)
        t_window, teacher_labels = trained(batch, "teacher_")
        logits = student_logits(model, batch, window=window)
        with torch.no_grad():
            teacher = self.ctx.teacher.logits(batch["teacher_input_ids"], batch["teacher_attention_mask"], t_window)
        if self.cfg.align == "span" and self._vocab is None:
            ids = vocabulary_map(self.ctx.tokenizer, self.ctx.teacher.tokenizer)
            self._vocab = tuple(torch.tensor(i, dtype=torch.long, device=logits.device) for i in ids)
        return aligned_terms(self.cfg, logits, teacher, labels, teacher_labels, batch["student_groups"][:, window],
                             batch["teacher_groups"][:, t_window], self._vocab)

    def _plain_head(self, logits: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Module) -> bool:
        """Whether the model's logits (B, 1, V) at position 0 are `head` applied to its last hidden state there
        (the chunked loss's assumption), checked once; refuses chunked=true on a model where they are not."""
        if self._head_checked:
            return True
        with torch.no_grad():
            mine = torch.nn.functional.linear(hidden[:, :1].float(), head.weight.float(),
                                              None if head.bias is None else head.bias.float())
            plain = torch.allclose(mine, logits.float(), rtol=1e-2, atol=1e-3 * float(mine.abs().max()) + 1e-6)
        if not plain and self.cfg.chunked is True:
            raise ConfigError("method.chunked=true: this model's logits are not its output head applied to its last "
                              "hidden state (logit soft-capping or scaling?): set method.chunked=false")
        self._head_checked = True
        return plain

    def _chunked_loss(self, model, batch: Batch, window: slice, labels: torch.Tensor,
                      teacher: torch.Tensor | TopK) -> dict[str, Term] | None:
        """The terms from the fused chunked path; None (dense from now on) where the model's head is not plain."""
        cfg = self.cfg
        # Through the (possibly DDP-wrapped) model, keeping the logits of one position only.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    logits_to_keep=torch.zeros(1, dtype=torch.long, device=batch["input_ids"].device))
        head = self.ctx.accelerator.unwrap_model(model).get_output_embeddings()
        if not self._plain_head(out.logits, out.hidden_states[-1], head):
            self._chunked = False
            return None
        mask = prediction_mask(labels)
        # The head runs here, outside the metered forward, on the masked positions only.
        per_token = train_cost(head_parameters(head), head_parameters(head, trainable=True))  # 6·|head| when trained
        self.ctx.flops.add("train", per_token, mask.sum())
        args = (out.hidden_states[-1][:, window], head.weight, head.bias, teacher, mask)
        options = dict(name=cfg.divergence, reduction="sum", temperature=cfg.temperature,
                       chunk_size=cfg.chunk_size or None,
                       **divergence_params(cfg.divergence, beta=cfg.beta, skew=cfg.skew, mu=cfg.mu))
        if cfg.alpha == 1:  # as token_distill_terms: no cross-entropy at weight 0
            return {cfg.divergence: Term(chunked_divergence(*args, **options), "labels", cfg.alpha)}
        # Position t predicts labels[:, t + 1] (the wrapped-around last column is never in the mask). The loop
        # weighs the two terms alpha and 1 - alpha over the same units, the ratio the fused gradient assumes.
        div, ce = chunked_divergence_and_ce(*args, labels.roll(-1, dims=1), ce_weight=1 - cfg.alpha, **options)
        return {cfg.divergence: Term(div, "labels", cfg.alpha), "ce": Term(ce, "labels", 1 - cfg.alpha)}


@dataclass
class AKLConfig(KDConfig):
    """Adaptive KL (Wu et al. 2024): KD whose divergence mixes fkl and rkl by head/tail gaps."""

    divergence: str = "akl"
    """Divergence (akl for this method)."""


@register
class AKL(KD):
    """KD with the adaptive KL divergence."""

    name = "akl"
    config_class = AKLConfig


@dataclass
class GKDConfig(KDConfig):
    """GKD (Agarwal et al.): a share `lam` of batches on the student's own samples, else data; jsd(beta)."""

    aligns: ClassVar[bool] = False
    divergence: str = "jsd"
    """Divergence (generalized JSD by default)."""
    lam: float = 0.5
    """Probability that a batch's responses are sampled from the student (on-policy)."""
    max_new_tokens: int = 32
    """Length limit of the student's samples."""
    sample_temperature: float = 1.0
    """Sampling temperature of the student's samples."""


@register
class GKD(KD):
    """Generalized knowledge distillation: on-policy student samples with probability lam."""

    name = "gkd"
    config_class = GKDConfig

    def sequences(self, batch: Batch) -> Batch:
        # A dedicated generator keeps the on-policy coin flips reproducible across resumes.
        coin = torch.Generator().manual_seed(self.ctx.cfg.train.seed * 7919 + self.ctx.step)
        if torch.rand((), generator=coin).item() < self.cfg.lam:
            return sample_responses(self.ctx.model, batch, self.ctx, max_new_tokens=self.cfg.max_new_tokens,
                                    temperature=self.cfg.sample_temperature)
        return batch


@dataclass
class FeedbackKLConfig(MethodConfig):
    """Seed 000's loss: lam·[CE_data − CE_data(teacher)] + lam_prime·E_{y~student} Σ_t KL(s_t ‖ q_t)."""

    lam: float = 1.0
    """Weight of the data term (SFT measured relative to the teacher)."""
    lam_prime: float = 1.0
    """Weight of the on-policy reverse KL along the student's own samples."""
    max_new_tokens: int = 32
    """Length limit of the student's samples."""
    sample_temperature: float = 1.0
    """Sampling temperature of the student's samples."""
    estimator: str = "auto"
    """`exact`: per-step KL over the vocabulary (full/topk teacher); `score`: score-function estimator from
    the teacher's log-probs of the sampled tokens only (token teacher); `auto`: exact when the teacher allows."""

    def __post_init__(self) -> None:
        if self.estimator not in ("auto", "exact", "score"):
            raise ValueError(f"method.estimator must be auto, exact or score, got {self.estimator!r}")


@register
class FeedbackKL(Method):
    """Seed 000's "LLM-aligned SFT": SFT relative to the teacher plus on-policy reverse KL.

    The data term's teacher part is a constant (reported as ``excess_ce``, the student's CE minus the
    teacher's on the same tokens). Each term is a mean per token: the data term over the data's
    response tokens, the on-policy term over the sampled ones.
    """

    name = "feedback-kl"
    config_class = FeedbackKLConfig
    needs = Needs(Capability.TOKEN)

    def _exact(self) -> bool:
        if self.cfg.estimator == "auto":
            return self.ctx.teacher.capability >= Capability.TOPK
        if self.cfg.estimator == "exact" and self.ctx.teacher.capability < Capability.TOPK:
            raise ValueError("method.estimator=exact needs a teacher with top-k log-probs; use estimator=score")
        return self.cfg.estimator == "exact"

    def sequences(self, batch: Batch) -> Batch:
        if self.cfg.lam_prime == 0:
            return batch
        sample = sample_responses(self.ctx.model, batch, self.ctx, max_new_tokens=self.cfg.max_new_tokens,
                                  temperature=self.cfg.sample_temperature)
        return with_prefix(batch, sample, "sample_")

    def loss(self, model, batch: Batch) -> Loss:
        window, labels = trained(batch)
        ce = response_ce_sum(student_logits(model, batch, window=window), labels)
        with torch.no_grad():
            teacher_lp = self.ctx.teacher.score(batch["input_ids"], batch["attention_mask"])
            teacher_ce = -(teacher_lp * (batch["labels"] != -100)).sum()
        terms = {"ce": Term(ce, weight=self.cfg.lam)}
        if self.cfg.lam_prime > 0:
            terms["onpolicy_rkl"] = Term(self._on_policy_rkl(model, batch), "sample_labels", self.cfg.lam_prime)
        return terms, {"excess_ce": (ce.item() - teacher_ce.item(), term_units(batch, "labels"))}

    def _on_policy_rkl(self, model, batch: Batch) -> torch.Tensor:
        """Reverse KL along the student's samples, summed over their tokens (exact, or by the score function)."""
        window, labels = trained(batch, "sample_")
        logits = student_logits(model, batch, "sample_", window)
        if self._exact():
            teacher = teacher_signal(self.ctx, batch, "sample_", window)
            return LOSSES["rkl"](logits, teacher, prediction_mask(labels), reduction="sum")
        with torch.no_grad():
            q = self.ctx.teacher.score(batch["sample_input_ids"], batch["sample_attention_mask"])[:, window]
        return score_function_rkl(token_logprobs(logits, labels), q, labels != -100)[0]
