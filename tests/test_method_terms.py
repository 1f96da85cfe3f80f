"""Each method's own loss, value and gradient, against a reference written here in plain torch.

The end-to-end tests ("held-out KL to the teacher drops by x %") are passed by plain SFT as well, so
they cannot show that a method optimises *its* objective. Here every registered method (and its
main options) is built on tiny float64 models, makes one micro-batch with ``method.sequences``
(samples seeded), and its terms are combined as the loop combines them,
``step_loss(terms, step_units([batch]))``. The value and the gradient w.r.t. every trained
parameter must equal a reference computed from the same batch with ``log_softmax``, ``F.kl_div``
and explicit sums over the trained positions (or the paper's formula), and SFT's loss on the same
batch must not match it (its value differs and its gradient is no multiple of the method's), so
each test pins the method's own term.

Notation: for labels L (B, T), logits position t predicts token t + 1 and is *trained* when
L[:, t + 1] != -100; n = the batch's trained positions (the loop's unit ``labels``; ``sample_labels``
etc. for prefixed sequences); s_t, q_t the student's and the teacher's next-token distributions.
The loop divides every term by its units, so a reference is ``Σ weight · (sum over units) / units``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lmdistill.config import ConfigError, MethodConfig, ModelConfig, RunConfig
from lmdistill.data import load_rows
from lmdistill.data.tokenize import IGNORE_INDEX, collate, encode_rows
from lmdistill.generation import sample_ids
from lmdistill.methods import METHODS, Method, RunContext, make_method, method_rows
from lmdistill.methods.verify import VERIFIERS, VerifierSpec
from lmdistill.models import build_char_tokenizer, load_model
from lmdistill.teachers.local import LocalTeacher
from lmdistill.train import step_loss, step_units

from conftest import tiny_run_config

B = 4
"""Rows per micro-batch."""
NEW = 6
"""New tokens per sample or teacher output."""

TOK = build_char_tokenizer()


@functools.cache
def accelerator() -> Accelerator:
    """One process, made as `fit` makes it (at first use, not at import); the tiny models stay on the CPU."""
    return Accelerator(cpu=not torch.cuda.is_available())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine threads spinning on each
    other's cores made this file ~30x slower (136 s against 4.5 s on 2 busy cores); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- set-up


@dataclass
class Case:
    """A method built on tiny float64 models, and the data micro-batch it starts from."""

    cfg: RunConfig
    method: Method
    ctx: RunContext
    student: torch.nn.Module
    teacher: torch.nn.Module
    """The teacher's raw model (the references call it directly, not through the Teacher wrapper)."""
    data: dict[str, torch.Tensor]
    rows: list[dict]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [*self.student.parameters(), *(p for m in self.ctx.modules.values() for p in m.parameters())]

    def sequences(self, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return self.method.sequences(dict(self.data))

    def loop_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss the loop back-propagates for a step of this one micro-batch, and the method's metrics."""
        terms, metrics = self.method.loss(self.student, batch)
        return step_loss(terms, step_units([batch], accelerator())), metrics

    def sft_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        terms, _ = make_method(MethodConfig(name="sft"), self.ctx).loss(self.student, batch)
        return step_loss(terms, step_units([batch], accelerator()))

    def s_logits(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        return self.student(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits

    @torch.no_grad()
    def t_logits(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        return self.teacher(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits


def make_case(data: Path, tmp_path: Path, method: dict, *, teacher_k: int = 0, teacher_width: int = 32,
              trained_teacher: Path | None = None, max_length: int = 40) -> Case:
    """Student (2 layers, width 32) and teacher (2 layers, `teacher_width`), both random but made peaked
    (final-norm gains ×4 and ×15, so that the distributions differ visibly), in float64; the first B
    training rows as the method prepares them.

    A random tied-embedding teacher decodes greedily by repeating the prompt's last token; methods that
    train on its outputs get `trained_teacher` (conftest's `teacher_dir`), whose answers vary in
    length and end in EOS.
    """
    cfg = tiny_run_config(data, tmp_path / "run", method=method, teacher={"k": teacher_k})
    cfg.data.max_length = max_length
    student = load_model(cfg.student, TOK, seed=0).double()
    if trained_teacher is None:
        spec = dataclasses.replace(cfg.student, n_embd=teacher_width, n_head=teacher_width // 16)
        teacher = load_model(spec, TOK, seed=1).double().eval()
        with torch.no_grad():
            teacher.model.norm.weight.mul_(15.0)
    else:
        teacher = load_model(ModelConfig(path=str(trained_teacher)), TOK).double().eval()
    with torch.no_grad():
        student.model.norm.weight.mul_(4.0)
    ctx = RunContext(cfg=cfg, tokenizer=TOK, accelerator=accelerator(), teacher=LocalTeacher(teacher, TOK), model=student)
    m = make_method(cfg.method, ctx)
    ctx.modules = {k: v.double() for k, v in m.extra_modules(student).items()}
    rows = method_rows(cfg)[0][:B]
    batch = collate(encode_rows(TOK, rows, max_length=max_length), TOK.pad_token_id)
    return Case(cfg, m, ctx, student, teacher, batch, rows)


def write_rows(path: Path, n: int, **extra: str) -> Path:
    """`n` rows "a+b=" → "a+b", with extra fields formatted from a, b, s (e.g. a rationale)."""
    with path.open("w") as f:
        for i in range(n):
            a, b = 3 + 7 * i % 50, 11 + 13 * i % 40
            fields = {k: v.format(a=a, b=b, s=a + b) for k, v in extra.items()}
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b), **fields}) + "\n")
    return path


# --------------------------------------------------------------------------- references (plain torch)


def trained(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits of the trained positions, row by row in order, and (N,) the tokens they predict."""
    keep = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][keep], labels[:, 1:][keep]


def n_trained(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over trained positions of −log s_t(y_{t+1})."""
    z, y = trained(logits, labels)
    return -z.log_softmax(-1).gather(-1, y[:, None]).sum()


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T): at label position t ≥ 1 with a trained label, log p(labels[t] | labels[<t]); 0 elsewhere."""
    keep = labels[:, 1:] != IGNORE_INDEX
    lp = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return F.pad(torch.where(keep, lp, 0.0), (1, 0))


def kl_sum(logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """Σ p·(log p − log r) over every position and the vocabulary (F.kl_div(input=log r, target=log p))."""
    return F.kl_div(logr, logp, log_target=True, reduction="sum")


def divergence_sum(name: str, z: torch.Tensor, zt: torch.Tensor, *, tau: float = 1.0, beta: float = 0.5,
                   skew: float = 0.1) -> torch.Tensor:
    """A divergence between student logits z and teacher logits zt (N, V), summed over the N positions.

    m mixes in probability space (not log space): jsd m = β·q + (1−β)·s; skl KL(q ‖ a·q + (1−a)·s);
    srkl KL(s ‖ a·s + (1−a)·q).
    """
    s, q = (z / tau).log_softmax(-1), (zt / tau).log_softmax(-1)
    if name == "fkl":
        return kl_sum(q, s)
    if name == "rkl":
        return kl_sum(s, q)
    if name == "jsd":
        m = (beta * q.exp() + (1 - beta) * s.exp()).log()
        return beta * kl_sum(q, m) + (1 - beta) * kl_sum(s, m)
    if name == "skl":
        return kl_sum(q, (skew * q.exp() + (1 - skew) * s.exp()).log())
    if name == "srkl":
        return kl_sum(s, (skew * s.exp() + (1 - skew) * q.exp()).log())
    raise ValueError(name)


def topk_fkl_sum(z: torch.Tensor, zt: torch.Tensor, k: int) -> torch.Tensor:
    """KL between the two (k+1)-point distributions: the teacher's top-k ids plus one tail bucket each.

    Σ_{v ∈ top-k} q_v·log(q_v/s_v) + Q·log(Q/S), Q = 1 − Σ_k q_v, S = 1 − Σ_k s_v.
    """
    s, q = z.softmax(-1), zt.softmax(-1)
    ids = q.topk(k, dim=-1).indices
    qk, sk = q.gather(-1, ids), s.gather(-1, ids)
    Q, S = 1 - qk.sum(-1), 1 - sk.sum(-1)
    return (qk * (qk.log() - sk.log())).sum() + (Q * (Q.log() - S.log())).sum()


def akl_sum(z: torch.Tensor, zt: torch.Tensor, mu: float) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024) with detached weights: w_h·KL(q‖s) + (1 − w_h)·KL(s‖q) per position.

    Head = the tokens by q descending whose cumulative q (itself included) is ≤ μ, the top token
    always; g_h = Σ_head |q − s|, g_t = Σ_tail |q − s|, w_h = g_h / (g_h + g_t).
    """
    s, q = z.log_softmax(-1), zt.log_softmax(-1)
    with torch.no_grad():
        p_s, p_q = s.exp(), q.exp()
        q_sorted, order = p_q.sort(-1, descending=True)
        head_sorted = q_sorted.cumsum(-1) <= mu
        head_sorted[:, 0] = True
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p_q - p_s).abs()
        g_h, g_t = (gap * head).sum(-1), (gap * ~head).sum(-1)
        w_h = g_h / (g_h + g_t)
    fkl = (q.exp() * (q - s)).sum(-1)
    rkl = (s.exp() * (s - q)).sum(-1)
    return (w_h * fkl + (1 - w_h) * rkl).sum()


def prompts_of(batch: dict[str, torch.Tensor], prefix: str = "") -> list[list[int]]:
    """Each row's tokens before its first trained label."""
    out = []
    for ids, lab in zip(batch[prefix + "input_ids"], batch[prefix + "labels"]):
        out.append(ids[: int((lab != IGNORE_INDEX).nonzero()[0])].tolist())
    return out


def responses_of(batch: dict[str, torch.Tensor], prefix: str = "") -> list[list[int]]:
    """Each row's trained tokens."""
    return [lab[lab != IGNORE_INDEX].tolist() for lab in batch[prefix + "labels"]]


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Arg-max decoding without a cache: up to n tokens, stopping after EOS."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == TOK.eos_token_id:
            break
    return out


# --------------------------------------------------------------------------- the check


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def assert_pins(case: Case, got: torch.Tensor, ref: torch.Tensor, sft: torch.Tensor, *,
                ref_value: torch.Tensor | None = None, rtol: float = 1e-5) -> None:
    """`got` (the loop's loss) has the value (`ref_value`, else `ref`'s) and gradient of `ref`; SFT's does not.

    SFT fails on both counts: its value differs by more than 1 %, and its gradient's cosine with the
    reference is below 0.99, so no rescaling of SFT's gradient (a weight) matches either.
    """
    params = case.params
    value = (ref if ref_value is None else ref_value).detach().double()
    g, g_ref, g_sft = flat_grad(got, params), flat_grad(ref, params), flat_grad(sft, params)
    torch.testing.assert_close(got.detach().double(), value, rtol=rtol, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=rtol, atol=rtol * float(g_ref.abs().max()))
    assert abs(float(sft.detach()) - float(value)) > 0.01 * abs(float(value)), (float(sft.detach()), float(value))
    cos = float(F.cosine_similarity(g_sft, g_ref, dim=0))
    assert cos < 0.99, f"SFT's gradient is parallel to the method's (cos {cos:.4f}): the test would not pin the term"


# --------------------------------------------------------------------------- sft and the sequence-level methods


def test_sft_is_the_mean_response_cross_entropy(data, tmp_path):
    """The baseline the others are told apart from: Σ_trained −log s_t(y_{t+1}) / n."""
    case = make_case(data, tmp_path, {"name": "sft"})
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    ref = ce_sum(case.s_logits(batch), batch["labels"]) / n_trained(batch["labels"])
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)
    g_ref = flat_grad(ref, case.params)
    torch.testing.assert_close(flat_grad(got, case.params), g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))


def test_seqkd_trains_on_the_teachers_greedy_outputs(data, teacher_dir, tmp_path):
    """seqkd: each row becomes prompt + the teacher's arg-max continuation (decoded here without a
    cache), and the loss is the mean CE on those tokens. SFT on the data's responses differs."""
    case = make_case(data, tmp_path, {"name": "seqkd", "max_new_tokens": NEW}, trained_teacher=teacher_dir)
    batch = case.sequences()
    prompts = prompts_of(case.data)
    assert prompts_of(batch) == prompts
    outputs = [greedy(case.teacher, p, NEW) for p in prompts]
    assert responses_of(batch) == outputs and outputs != responses_of(case.data)
    assert len({len(y) for y in outputs}) > 1 or any(y[-1] == TOK.eos_token_id for y in outputs)
    got, _ = case.loop_loss(batch)
    ref = ce_sum(case.s_logits(batch), batch["labels"]) / n_trained(batch["labels"])
    assert_pins(case, got, ref, case.sft_loss(case.data))


def test_step_by_step_trains_label_and_rationale_equally(tmp_path):
    """Distilling step-by-step with λ = 1: rows "[label] x" → a and "[rationale] x" → r, one mean CE over
    the tokens of both (sequences built here from the strings: BOS, prompt, newline; response, EOS).
    SFT on the data's rows (no prefixes, no rationale) differs."""
    path = write_rows(tmp_path / "r.jsonl", 16, rationale="{a} and {b} give {s}")
    case = make_case(path, tmp_path, {"name": "step-by-step"}, max_length=64)
    raw = load_rows(case.cfg.data)[0][: B // 2]  # the data's first training rows, before the method's rewrite
    seqs = []
    for r in raw:
        for prompt, response in ((f"[label] {r['prompt']}", r["response"]), (f"[rationale] {r['prompt']}", r["rationale"])):
            p = [TOK.bos_token_id] + TOK.convert_tokens_to_ids(list(prompt + "\n"))
            seqs.append((p, TOK.convert_tokens_to_ids(list(response)) + [TOK.eos_token_id]))
    batch = case.sequences()
    assert prompts_of(batch) == [p for p, _ in seqs] and responses_of(batch) == [y for _, y in seqs]
    got, _ = case.loop_loss(batch)
    total = sum(-case.student(input_ids=torch.tensor([p + y])).logits[0, len(p) - 1 : -1].log_softmax(-1)
                .gather(-1, torch.tensor(y)[:, None]).sum() for p, y in seqs)
    ref = total / sum(len(y) for _, y in seqs)
    plain = collate(encode_rows(TOK, [{"prompt": r["prompt"], "response": r["response"]} for r in raw],
                                max_length=64), TOK.pad_token_id)
    assert_pins(case, got, ref, case.sft_loss(plain))


# --------------------------------------------------------------------------- token-level KD


KD_CASES = {
    "fkl": ({"divergence": "fkl"}, lambda z, zt: divergence_sum("fkl", z, zt), 1.0),
    "rkl": ({"divergence": "rkl"}, lambda z, zt: divergence_sum("rkl", z, zt), 1.0),
    "jsd-0.3": ({"divergence": "jsd", "beta": 0.3}, lambda z, zt: divergence_sum("jsd", z, zt, beta=0.3), 1.0),
    "fkl-alpha0.7-tau2": ({"divergence": "fkl", "alpha": 0.7, "temperature": 2.0},
                          lambda z, zt: divergence_sum("fkl", z, zt, tau=2.0), 0.7),
    "rkl-alpha0.6": ({"divergence": "rkl", "alpha": 0.6}, lambda z, zt: divergence_sum("rkl", z, zt), 0.6),
    "fkl-chunked": ({"divergence": "fkl", "chunked": True, "chunk_size": 7}, lambda z, zt: divergence_sum("fkl", z, zt), 1.0),
    "fkl-chunked-alpha0.7-tau2": ({"divergence": "fkl", "alpha": 0.7, "temperature": 2.0, "chunked": True,
                                   "chunk_size": 7}, lambda z, zt: divergence_sum("fkl", z, zt, tau=2.0), 0.7),
    "fkl-top5": ({"divergence": "fkl"}, lambda z, zt: topk_fkl_sum(z, zt, 5), 1.0),
}


@pytest.mark.parametrize("label", list(KD_CASES))
def test_kd_is_alpha_divergence_plus_rest_ce(label, data, tmp_path):
    """kd on the data: [α·Σ_trained D(s_t, q_t) + (1 − α)·Σ_trained −log s_t(y)] / n, with D as in
    `divergence_sum` at temperature τ (both logits / τ, no τ² factor; the CE at τ = 1), the chunked path
    giving the same (with and without the CE), and a top-5 teacher (`teacher.k=5`) compared on its 5 ids
    plus a tail bucket."""
    options, div, alpha = KD_CASES[label]
    case = make_case(data, tmp_path, {"name": "kd", **options}, teacher_k=5 if label == "fkl-top5" else 0)
    batch = case.sequences()
    assert batch.keys() == case.data.keys() and all(torch.equal(batch[k], case.data[k]) for k in batch)
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    ce = -z.log_softmax(-1).gather(-1, y[:, None]).sum()
    ref = (alpha * div(z, zt) + (1 - alpha) * ce) / len(y)
    assert_pins(case, got, ref, case.sft_loss(batch))


@pytest.mark.parametrize("divergence,k,tau", [("fkl", 0, 2.0), ("akl", 0, 1.0), ("rkl", 5, 1.0), ("srkl", 5, 1.0)])
def test_kd_chunked_with_ce_equals_dense(divergence, k, tau, data, tmp_path):
    """kd with α = 0.5 and chunked=true (the CE from the same chunks' logits, at temperature 1) returns the
    dense path's terms (the divergence and "ce", same values, units and weights), and the loop's loss has
    the same value and gradient; full and top-5 teachers, chunks of 7 positions."""
    options = {"name": "kd", "divergence": divergence, "alpha": 0.5, "temperature": tau, "chunk_size": 7}
    results = []
    for chunked in (False, True):
        case = make_case(data, tmp_path / str(chunked), {**options, "chunked": chunked}, teacher_k=k)
        batch = case.sequences()
        terms, _ = case.method.loss(case.student, batch)
        loss = step_loss(terms, step_units([batch], accelerator()))
        results.append((terms, loss.detach(), flat_grad(loss, case.params)))
    (dense, dense_loss, dense_grad), (chunk, chunk_loss, chunk_grad) = results
    assert list(chunk) == list(dense) == [divergence, "ce"]
    for name in dense:
        assert (chunk[name].per, chunk[name].weight) == (dense[name].per, dense[name].weight) == ("labels", 0.5)
        torch.testing.assert_close(chunk[name].value.detach().double(), dense[name].value.detach().double(),
                                   rtol=1e-6, atol=0)  # the dense CE is float32 (response_ce_sum)
    torch.testing.assert_close(chunk_loss.double(), dense_loss.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(chunk_grad, dense_grad, rtol=1e-5, atol=1e-5 * float(dense_grad.abs().max()))


def test_kd_chunked_auto_takes_the_fast_path_only_where_it_is_exact(data, tmp_path, monkeypatch):
    """method.chunked=auto (the default): dense below CHUNKED_MIN_VOCAB; chunked at or above it, with the
    dense path's loss and gradient; and back to dense (same loss) on a model whose logits are not its head
    applied to its last hidden state, which chunked=true refuses with a ConfigError."""
    import lmdistill.methods.distill as distill

    calls = []
    fused = distill.chunked_divergence
    monkeypatch.setattr(distill, "chunked_divergence", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    small = make_case(data, tmp_path / "small", {"name": "kd"})
    batch = small.sequences()
    dense_loss, _ = small.loop_loss(batch)
    dense_grad = flat_grad(dense_loss, small.params)
    assert small.method.cfg.chunked == "auto" and not calls  # a 100-token vocabulary: dense
    monkeypatch.setattr(distill, "CHUNKED_MIN_VOCAB", 1)
    big = make_case(data, tmp_path / "big", {"name": "kd"})
    loss, _ = big.loop_loss(big.sequences())
    assert calls  # chunked now
    torch.testing.assert_close(loss, dense_loss)
    torch.testing.assert_close(flat_grad(loss, big.params), dense_grad)

    def scaled(module, args, kwargs, out):  # logits x 2: no longer head(hidden)
        out.logits = out.logits * 2
        return out

    calls.clear()
    odd = make_case(data, tmp_path / "odd", {"name": "kd"})
    odd.student.register_forward_hook(scaled, with_kwargs=True)
    loss, _ = odd.loop_loss(odd.sequences())
    assert not calls and odd.method._chunked is False
    expected = make_case(data, tmp_path / "odd_dense", {"name": "kd", "chunked": False})
    expected.student.register_forward_hook(scaled, with_kwargs=True)
    torch.testing.assert_close(loss, expected.loop_loss(expected.sequences())[0])
    strict = make_case(data, tmp_path / "strict", {"name": "kd", "chunked": True})
    strict.student.register_forward_hook(scaled, with_kwargs=True)
    with pytest.raises(ConfigError, match="method.chunked=true"):
        strict.loop_loss(strict.sequences())


def test_akl_weighs_forward_and_reverse_kl_by_head_and_tail_gaps(data, tmp_path):
    """akl (μ = 0.3): Σ_trained [w_h·KL(q‖s) + (1 − w_h)·KL(s‖q)] / n with w_h = g_h/(g_h + g_t) held
    constant for the gradient (see `akl_sum`)."""
    case = make_case(data, tmp_path, {"name": "akl", "mu": 0.3})
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    assert_pins(case, got, akl_sum(z, zt, 0.3) / len(y), case.sft_loss(batch))


def test_gkd_on_policy_is_jsd_on_the_students_own_samples(data, tmp_path):
    """gkd with λ = 1: the rows' responses are replaced by the student's samples (the same as
    sampling its prompts with the same seed), and the loss is Σ_trained JSD(0.5)(s_t, q_t) / n on them.
    SFT on the same sampled batch (CE on the samples) differs."""
    case = make_case(data, tmp_path, {"name": "gkd", "lam": 1.0, "max_new_tokens": NEW})
    batch = case.sequences(seed=3)
    prompts = prompts_of(case.data)
    torch.manual_seed(3)
    samples = sample_ids(case.student, prompts, pad_id=TOK.pad_token_id, eos_id=TOK.eos_token_id, max_new_tokens=NEW)
    assert prompts_of(batch) == prompts and responses_of(batch) == samples
    assert responses_of(batch) != responses_of(case.data)
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    assert_pins(case, got, divergence_sum("jsd", z, zt, beta=0.5) / len(y), case.sft_loss(batch))


def test_gkd_off_policy_keeps_the_data(data, tmp_path):
    """gkd with λ = 0: the data as it is, Σ_trained JSD(0.5) / n on the data's responses."""
    case = make_case(data, tmp_path, {"name": "gkd", "lam": 0.0})
    batch = case.sequences()
    assert all(torch.equal(batch[k], case.data[k]) for k in case.data)
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    assert_pins(case, got, divergence_sum("jsd", z, zt) / len(y), case.sft_loss(batch))


class _KeepFirstAndLast:
    """Accepts samples 0 and 2 of every prompt's 3 (the method hands them over prompt by prompt)."""

    def accept(self, samples):
        return [i % 3 in (0, 2) for i in range(len(samples))]


def test_self_improve_trains_on_its_accepted_samples(data, tmp_path, monkeypatch):
    """self-improve with N = 3: each prompt is sampled 3 times (the same as sampling the prompts, each
    repeated 3 times, with the same seed); a verifier (registered for this test) keeps samples 0 and 2;
    the batch is exactly those (prompt, sample) rows, in order, and the loss Σ_trained −log s_t(y_{t+1}) / n
    over them. SFT on the data's responses differs."""
    monkeypatch.setitem(VERIFIERS, "first-and-last", VerifierSpec(lambda cfg, ctx: _KeepFirstAndLast()))
    case = make_case(data, tmp_path, {"name": "self-improve", "n_samples": 3, "max_new_tokens": NEW,
                                      "verifier": "first-and-last", "unique": False})
    batch = case.sequences(seed=3)
    prompts = prompts_of(case.data)
    torch.manual_seed(3)
    samples = sample_ids(case.student, [p for p in prompts for _ in range(3)], pad_id=TOK.pad_token_id,
                         eos_id=TOK.eos_token_id, max_new_tokens=NEW)
    kept = [(p, samples[3 * i + j]) for i, p in enumerate(prompts) for j in (0, 2)]
    assert prompts_of(batch) == [p for p, _ in kept] and responses_of(batch) == [y for _, y in kept]
    got, metrics = case.loop_loss(batch)
    assert metrics["accept_rate"] == (2.0 * B, 3.0 * B) and metrics["solve_rate"] == (1.0 * B, 1.0 * B)
    ref = ce_sum(case.s_logits(batch), batch["labels"]) / n_trained(batch["labels"])
    assert_pins(case, got, ref, case.sft_loss(case.data))


# --------------------------------------------------------------------------- distillm


def test_distillm_fresh_samples_are_skew_kl_and_fill_the_buffer(data, tmp_path):
    """distillm with φ = 1 at step 0 (empty buffer, so the source is fresh samples): the batch is the
    student's samples, pushed into the replay buffer, and the loss is
    [α·Σ KL(q ‖ 0.1·q + 0.9·s) + (1 − α)·CE] / n over them (α = 0.7)."""
    case = make_case(data, tmp_path, {"name": "distillm", "init_prob": 1.0, "alpha": 0.7, "max_new_tokens": NEW})
    batch = case.sequences()
    assert int(batch["distillm_source"]) == 1  # SOURCES.index("fresh")
    assert prompts_of(batch) == prompts_of(case.data)
    assert [ids for ids, _ in case.method.buffer] == [(p + y) for p, y in zip(prompts_of(batch), responses_of(batch))]
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    ce = -z.log_softmax(-1).gather(-1, y[:, None]).sum()
    ref = (0.7 * divergence_sum("skl", z, zt, skew=0.1) + 0.3 * ce) / len(y)
    assert_pins(case, got, ref, case.sft_loss(batch))


def test_distillm_on_data_is_skew_reverse_kl(data, tmp_path):
    """distillm with φ = 0 (data) and srkl(0.25): Σ_trained KL(s ‖ 0.25·s + 0.75·q) / n on the data."""
    case = make_case(data, tmp_path, {"name": "distillm", "divergence": "srkl", "skew": 0.25, "init_prob": 0.0})
    batch = case.sequences()
    assert int(batch["distillm_source"]) == 0 and len(case.method.buffer) == 0
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch), batch["labels"])
    zt, _ = trained(case.t_logits(batch), batch["labels"])
    assert_pins(case, got, divergence_sum("srkl", z, zt, skew=0.25) / len(y), case.sft_loss(batch))


# --------------------------------------------------------------------------- feedback-kl


def test_feedback_kl_exact_is_weighted_ce_plus_on_policy_reverse_kl(data, tmp_path):
    """feedback-kl, estimator=exact, λ = 0.5, λ' = 2: λ·CE_data / n + λ'·Σ_{sampled} KL(s_t ‖ q_t) / n_s,
    each term a mean over its own tokens (data responses n, sampled responses n_s). Also excess_ce =
    the student's CE minus the teacher's on the data tokens."""
    case = make_case(data, tmp_path, {"name": "feedback-kl", "lam": 0.5, "lam_prime": 2.0, "estimator": "exact",
                                      "max_new_tokens": NEW})
    batch = case.sequences()
    assert prompts_of(batch, "sample_") == prompts_of(case.data)
    got, metrics = case.loop_loss(batch)
    ce = ce_sum(case.s_logits(batch), batch["labels"])
    z, y = trained(case.s_logits(batch, "sample_"), batch["sample_labels"])
    zt, _ = trained(case.t_logits(batch, "sample_"), batch["sample_labels"])
    ref = 0.5 * ce / n_trained(batch["labels"]) + 2.0 * divergence_sum("rkl", z, zt) / len(y)
    excess = float(ce.detach()) - float(ce_sum(case.t_logits(batch), batch["labels"]))
    assert metrics["excess_ce"] == (pytest.approx(excess, rel=1e-5), n_trained(batch["labels"]))
    assert_pins(case, got, ref, case.sft_loss(batch))


def test_feedback_kl_score_estimator_value_and_surrogate_gradient(data, tmp_path):
    """feedback-kl, estimator=score (only log q of the sampled tokens), λ = 0.5, λ' = 2, on B = 4 samples.

    Value: λ·CE_data / n + λ'·Σ_{i,t} (log s_t(y_it) − log q_t(y_it)) / n_s (the sampled reverse KL).
    Gradient: that of λ·CE_data / n + λ'·Σ_{i,t} (R_it − b_it)·log s_t(y_it) / n_s with R_it the return
    Σ_{t' ≥ t} r_it' of r = log s − log q (no gradient), and b_it the mean of R_jt over the other rows
    j ≠ i that have a token at t (0 if none): the leave-one-out baseline, a constant too.
    """
    case = make_case(data, tmp_path, {"name": "feedback-kl", "lam": 0.5, "lam_prime": 2.0, "estimator": "score",
                                      "max_new_tokens": NEW})
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    n_data, labels = n_trained(batch["labels"]), batch["sample_labels"]
    ce = ce_sum(case.s_logits(batch), batch["labels"])
    log_s = label_logprobs(case.s_logits(batch, "sample_"), labels)
    log_q = label_logprobs(case.t_logits(batch, "sample_"), labels)
    mask = F.pad(labels[:, 1:] != IGNORE_INDEX, (1, 0))
    r = torch.where(mask, log_s.detach() - log_q, 0.0)
    R = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        R[:, t] = r[:, t] + (R[:, t + 1] if t + 1 < r.shape[1] else 0.0)
    R = torch.where(mask, R, 0.0)
    b = torch.zeros_like(R)
    for i in range(R.shape[0]):
        for t in range(R.shape[1]):
            others = [R[j, t] for j in range(R.shape[0]) if j != i and mask[j, t]]
            if mask[i, t] and others:
                b[i, t] = sum(others) / len(others)
    n_s = int(mask.sum())
    assert len({tuple(row) for row in responses_of(batch, "sample_")}) > 1  # distinct samples: b is not R
    value = 0.5 * ce / n_data + 2.0 * r.sum() / n_s
    surrogate = 0.5 * ce / n_data + 2.0 * ((R - b) * log_s).sum() / n_s
    assert_pins(case, got, surrogate, case.sft_loss(batch), ref_value=value)


# --------------------------------------------------------------------------- minillm


def test_minillm_single_step_part_is_the_exact_reverse_kl(data, tmp_path):
    """minillm with pg_weight = 0 on teacher-mixed samples (α = 0.2): lm_weight·CE_data / n +
    Σ_{sampled} KL(s_t ‖ q_t) / n_s, the reverse KL over the whole vocabulary at every sampled prefix."""
    case = make_case(data, tmp_path, {"name": "minillm", "pg_weight": 0.0, "lm_weight": 0.5, "max_new_tokens": NEW})
    batch = case.sequences()
    assert prompts_of(batch, "sample_") == prompts_of(case.data)
    got, _ = case.loop_loss(batch)
    z, y = trained(case.s_logits(batch, "sample_"), batch["sample_labels"])
    zt, _ = trained(case.t_logits(batch, "sample_"), batch["sample_labels"])
    ce = ce_sum(case.s_logits(batch), batch["labels"])
    ref = 0.5 * ce / n_trained(batch["labels"]) + kl_sum(z.log_softmax(-1), zt.log_softmax(-1)) / len(y)
    assert_pins(case, got, ref, case.sft_loss(batch))


@pytest.mark.parametrize("whiten", [True, False])
def test_minillm_is_single_step_kl_plus_clipped_importance_weighted_policy_gradient(whiten, data, tmp_path):
    """minillm in full (α = 0.2, ε = 0.2, length-normalised returns), per sampled token y_t of row i:

    r_t = log q_t(y_t) − log s_t(y_t);  A_t = mean of r over the row's tokens after t (0 for the last),
    whitened over the batch's sampled tokens ((A − mean)/sqrt(var + 1e-8), population variance) if asked;
    w_t = s_t(y_t) / (α·q_t(y_t) + (1 − α)·s_t(y_t)); per token max(−A·w, −A·clip(w, 1 − ε, 1 + ε)),
    whose gradient is −A·w·∇log s_t(y_t) where the unclipped side is the max, else 0 (A, w constants).
    Loss: lm_weight·CE_data / n + [Σ_t KL(s_t ‖ q_t) + Σ_t that clipped term] / n_s.
    """
    alpha, eps = 0.2, 0.2
    case = make_case(data, tmp_path, {"name": "minillm", "mix_alpha": alpha, "clip": eps, "whiten": whiten,
                                      "lm_weight": 0.5, "max_new_tokens": NEW})
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    labels = batch["sample_labels"]
    logits, t_logits = case.s_logits(batch, "sample_"), case.t_logits(batch, "sample_")
    z, y = trained(logits, labels)
    zt, _ = trained(t_logits, labels)
    single = kl_sum(z.log_softmax(-1), zt.log_softmax(-1))
    log_s, log_q = label_logprobs(logits, labels), label_logprobs(t_logits, labels)
    mask = F.pad(labels[:, 1:] != IGNORE_INDEX, (1, 0))
    r = (log_q - log_s).detach()
    A = torch.zeros_like(r)
    for i in range(r.shape[0]):
        idx = mask[i].nonzero()[:, 0].tolist()
        for j, t in enumerate(idx):
            future = idx[j + 1 :]
            A[i, t] = sum(r[i, u] for u in future) / len(future) if future else 0.0
    if whiten:
        mean, var = A[mask].mean(), A[mask].var(unbiased=False)
        A = torch.where(mask, (A - mean) / torch.sqrt(var + 1e-8), 0.0)
    s_y, q_y = log_s.detach().exp(), log_q.exp()
    w = s_y / (alpha * q_y + (1 - alpha) * s_y)
    unclipped, clipped = -A * w, -A * w.clamp(1 - eps, 1 + eps)
    active = unclipped >= clipped
    per_token = torch.maximum(unclipped, clipped) + torch.where(active, -A * w * (log_s - log_s.detach()), 0.0)
    assert bool((mask & ~active).any())  # some tokens are clipped: the clip is exercised
    pg = torch.where(mask, per_token, 0.0).sum()
    ce = ce_sum(case.s_logits(batch), batch["labels"])
    ref = 0.5 * ce / n_trained(batch["labels"]) + (single + pg) / len(y)
    assert_pins(case, got, ref, case.sft_loss(batch))


# --------------------------------------------------------------------------- dpkd and its preference forms


def _softplus_neg(x: torch.Tensor) -> torch.Tensor:
    """−log σ(x) = log(1 + e^{−x})."""
    return torch.log1p(torch.exp(-x))


PREFERENCE = {
    # (form options, per-pair loss from (policy_w, policy_l, reference_w, reference_l, |y_w|, |y_l|))
    "dpkd": ({"beta": 0.5}, lambda pw, pl, rw, rl, nw, nl: _softplus_neg(0.5 * ((pw - rw) / nw - (pl - rl) / nl))),
    "dpo": ({"beta": 0.5}, lambda pw, pl, rw, rl, nw, nl: _softplus_neg(0.5 * ((pw - rw) / nw - (pl - rl) / nl))),
    "ipo": ({"beta": 0.5}, lambda pw, pl, rw, rl, nw, nl: ((pw - rw) / nw - (pl - rl) / nl - 1 / (2 * 0.5)) ** 2),
    "cpo": ({"beta": 0.5}, lambda pw, pl, rw, rl, nw, nl: _softplus_neg(0.5 * (pw - pl)) - pw),
    "simpo": ({"beta": 0.5, "gamma": 0.3}, lambda pw, pl, rw, rl, nw, nl: _softplus_neg(0.5 * pw / nw - 0.5 * pl / nl - 0.3)),
}


@pytest.mark.parametrize("form", list(PREFERENCE))
def test_dpkd_forms_are_their_papers_formulas(form, data, teacher_dir, tmp_path):
    """dpkd and its forms with y_w = the teacher's greedy output (decoded here), y_l = a student sample,
    p(y) the summed log-prob of a response's tokens and |y| their number (length-normalised where the
    form takes it), the reference the teacher (dpkd, ipo) or the student as it is now, frozen (dpo):

    dpkd, dpo: −log σ(β·h), h = (log p_θ(y_w) − log p_ref(y_w))/|y_w| − (log p_θ(y_l) − log p_ref(y_l))/|y_l|;
    ipo: (h − 1/(2β))²; cpo: −log σ(β·(log p_θ(y_w) − log p_θ(y_l))) − log p_θ(y_w);
    simpo: −log σ(β/|y_w|·log p_θ(y_w) − β/|y_l|·log p_θ(y_l) − γ).
    Loss: λ_lm·CE_data / n + Σ_pairs loss / B (λ_lm = 0.5). At step 0 the dpo reference equals the
    student, so h = 0 (value log 2 per pair) but its gradient −β/2·∇h is not 0.
    """
    options, pair_loss = PREFERENCE[form]
    case = make_case(data, tmp_path, {"name": "dpkd", "form": form, "lm_weight": 0.5, "max_new_tokens": NEW, **options},
                     trained_teacher=teacher_dir)
    frozen = copy.deepcopy(case.student).requires_grad_(False)
    batch = case.sequences()
    prompts = prompts_of(case.data)
    assert prompts_of(batch, "chosen_") == prompts and prompts_of(batch, "rejected_") == prompts
    assert responses_of(batch, "chosen_") == [greedy(case.teacher, p, NEW) for p in prompts]
    got, metrics = case.loop_loss(batch)

    def seq(logits: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch[which + "labels"]
        return label_logprobs(logits, labels).sum(1), (labels[:, 1:] != IGNORE_INDEX).sum(1).double()

    pw, nw = seq(case.s_logits(batch, "chosen_"), "chosen_")
    pl, nl = seq(case.s_logits(batch, "rejected_"), "rejected_")
    assert bool((nw != nl).all())  # |y_w| ≠ |y_l|: each log-ratio is divided by its own length
    reference = frozen if form == "dpo" else case.teacher
    with torch.no_grad():
        rw, _ = seq(reference(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits,
                    "chosen_")
        rl, _ = seq(reference(input_ids=batch["rejected_input_ids"],
                              attention_mask=batch["rejected_attention_mask"]).logits, "rejected_")
    ce = ce_sum(case.s_logits(batch), batch["labels"])
    ref = 0.5 * ce / n_trained(batch["labels"]) + pair_loss(pw, pl, rw, rl, nw, nl).sum() / B
    assert_pins(case, got, ref, case.sft_loss(batch))
    if form in ("dpkd", "dpo", "ipo"):  # the implicit rewards β·log(p_θ/p_ref)/|y|, summed over pairs
        beta = options["beta"]
        assert metrics["reward_chosen"][0] == pytest.approx(float((beta * (pw - rw) / nw).sum()), rel=1e-5, abs=1e-9)
        assert metrics["reward_rejected"][0] == pytest.approx(float((beta * (pl - rl) / nl).sum()), rel=1e-5, abs=1e-9)


def test_dpkd_with_data_as_chosen(data, tmp_path):
    """dpkd with chosen=data: y_w is the row's own response; otherwise the dpkd formula above."""
    case = make_case(data, tmp_path, {"name": "dpkd", "chosen": "data", "beta": 0.5, "lm_weight": 0.0,
                                      "max_new_tokens": NEW})
    batch = case.sequences()
    assert responses_of(batch, "chosen_") == responses_of(case.data)
    got, _ = case.loop_loss(batch)
    lw, ll = batch["chosen_labels"], batch["rejected_labels"]
    pw, pl = (label_logprobs(case.s_logits(batch, p), lab).sum(1) for p, lab in (("chosen_", lw), ("rejected_", ll)))
    rw, rl = (label_logprobs(case.t_logits(batch, p), lab).sum(1) for p, lab in (("chosen_", lw), ("rejected_", ll)))
    nw, nl = ((lab[:, 1:] != IGNORE_INDEX).sum(1) for lab in (lw, ll))
    ref = PREFERENCE["dpkd"][1](pw, pl, rw, rl, nw, nl).sum() / B
    assert_pins(case, got, ref, case.sft_loss(batch))


def test_pro_is_plackett_luce_over_the_rows_ranking(tmp_path):
    """dpkd form=pro (β 0.7, λ_lm 0.5): each row ranks K = 3 responses best first; s_k = β·log p_θ(y^k)/|y^k|;
    loss = 0.5·CE(y¹)/n¹ + Σ_rows Σ_{k<K} [log Σ_{i≥k} exp(s_i) − s_k] / B (PRO, Song et al. 2023)."""
    path = tmp_path / "ranked.jsonl"
    with path.open("w") as f:
        for i in range(16):
            a, b = 3 + 7 * i % 50, 11 + 13 * i % 40
            ranking = [str(a + b), f"{a}{b}", f"{b}-{a}!"]
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": ranking[0], "ranking": ranking}) + "\n")
    case = make_case(path, tmp_path, {"name": "dpkd", "form": "pro", "chosen": "data", "beta": 0.7, "lm_weight": 0.5})
    batch = case.sequences()
    assert [responses_of(batch, f"rank{j}_") for j in range(3)][0] == responses_of(case.data)
    got, _ = case.loop_loss(batch)
    scores = []
    for j in range(3):
        labels = batch[f"rank{j}_labels"]
        n = (labels[:, 1:] != IGNORE_INDEX).sum(1).double()
        scores.append(0.7 * label_logprobs(case.s_logits(batch, f"rank{j}_"), labels).sum(1) / n)
    s = torch.stack(scores, 1)  # (B, 3)
    pl = sum(torch.logsumexp(s[:, k:], dim=1) - s[:, k] for k in range(2)).sum()
    ce = ce_sum(case.s_logits(batch, "rank0_"), batch["rank0_labels"])
    ref = 0.5 * ce / n_trained(batch["rank0_labels"]) + pl / B
    assert_pins(case, got, ref, case.sft_loss(batch))


def _last_hidden(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(d,) the final (normed) hidden state at the last token of one unpadded sequence."""
    return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]


def test_reward_model_is_bradley_terry_on_the_last_hidden_state(tmp_path):
    """reward-model: r(y) = w·h_last(x y) at the last token of each unpadded row (w a random head here: it starts
    at 0); loss = Σ_pairs −log σ(r(y_w) − r(y_l)) / B. The gradient reaches the head and the body."""
    path = write_rows(tmp_path / "pairs.jsonl", 16, chosen="{s}", rejected="{b}{a}")
    case = make_case(path, tmp_path, {"name": "reward-model"})
    head = case.ctx.modules["score"]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
    batch = case.sequences()
    got, metrics = case.loop_loss(batch)
    rewards = {}
    for j in (0, 1):
        seqs = [p + y for p, y in zip(prompts_of(batch, f"rank{j}_"), responses_of(batch, f"rank{j}_"))]
        rewards[j] = torch.stack([_last_hidden(case.student, q) @ head.weight[0] for q in seqs])
    ref = _softplus_neg(rewards[0] - rewards[1]).sum() / B
    assert_pins(case, got, ref, case.sft_loss(batch))
    assert metrics["reward_accuracy"][0] == float((rewards[0] > rewards[1]).sum())


def test_rlaif_is_rloo_with_a_kl_penalty(tmp_path, data):
    """rlaif (k = 2, β = 0.5): for each prompt's samples y_1, y_2 (seeded), R_j = score(y_j) − β·(log p_θ(y_j) −
    log p_ref(y_j)) with the reward model's score of the unpadded sequence and p_ref the start (the student is
    changed after the reference is taken, so the penalty is not 0); A_1 = R_1 − R_2, A_2 = −A_1; value
    −Σ R / (k·P), gradient of −Σ_j A_j·log p_θ(y_j) / (k·P)."""
    from lmdistill.models import load_reward_model, save_reward_model

    body = load_model(ModelConfig(tokenizer="char", n_layer=1, n_embd=16, n_head=2), TOK, seed=5)
    save_reward_model(body, torch.randn(1, 16, generator=torch.Generator().manual_seed(0)), TOK, tmp_path / "rm")
    case = make_case(data, tmp_path, {"name": "rlaif", "reward_model": str(tmp_path / "rm"), "num_samples": 2,
                                      "kl_coef": 0.5, "max_new_tokens": NEW})
    start = copy.deepcopy(case.student).requires_grad_(False)
    _ = case.method._reference.model  # taken now, before the student moves
    with torch.no_grad():
        case.student.model.norm.weight.mul_(1.2)
    batch = case.sequences()
    assert prompts_of(batch, "sample_") == [p for p in prompts_of(case.data) for _ in range(2)]
    got, _ = case.loop_loss(batch)
    labels = batch["sample_labels"]
    logp = label_logprobs(case.s_logits(batch, "sample_"), labels).sum(1)
    with torch.no_grad():
        ref_logp = label_logprobs(start(input_ids=batch["sample_input_ids"],
                                        attention_mask=batch["sample_attention_mask"]).logits, labels).sum(1)
        reward, _ = load_reward_model(tmp_path / "rm")
        seqs = [p + y for p, y in zip(prompts_of(batch, "sample_"), responses_of(batch, "sample_"))]
        score = torch.stack([reward(input_ids=torch.tensor([q])).logits[0, 0] for q in seqs]).double()
    R = (score - 0.5 * (logp.detach() - ref_logp)).view(B, 2)
    A = torch.stack([R[:, 0] - R[:, 1], R[:, 1] - R[:, 0]], 1)
    ref = -(A * logp.view(B, 2)).sum() / (2 * B)
    assert_pins(case, got, ref, case.sft_loss(batch), ref_value=-R.sum() / (2 * B))


# --------------------------------------------------------------------------- hidden and context


@pytest.mark.parametrize("distance,layer_map", [("mse", None), ("cosine", [[0, 1], [2, 2]])])
def test_hidden_matches_projected_states_at_trained_positions(distance, layer_map, data, tmp_path):
    """hidden (student width 32, teacher 64; weight 2, ce_weight 0.5): per trained position t,
    h_t = mean over pairs (a, b) of d(W_p·hS_a,t + c_p, hT_b,t), d = mean_j (x_j − y_j)² or
    1 − x·y/(|x|·|y|); loss = [2·Σ_t h_t + 0.5·CE] / n. Its gradient reaches the projections W_p, c_p
    (checked with the student's). The default map for 2 onto 2 layers is [[1, 1], [2, 2]]."""
    method = {"name": "hidden", "loss": distance, "weight": 2.0, "ce_weight": 0.5}
    if layer_map:
        method["layer_map"] = layer_map
    case = make_case(data, tmp_path, method, teacher_width=64)
    pairs = layer_map or [[1, 1], [2, 2]]
    assert case.method.layer_map == pairs
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = case.student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    with torch.no_grad():
        t_hidden = case.teacher(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    keep = labels[:, 1:] != IGNORE_INDEX
    maps = case.ctx.modules["projection"].maps
    per_pair = []
    for (a, b), lin in zip(pairs, maps):
        x = out.hidden_states[a][:, :-1][keep] @ lin.weight.T + lin.bias
        yt = t_hidden[b][:, :-1][keep]
        per_pair.append(((x - yt) ** 2).mean(-1) if distance == "mse"
                        else 1 - (x * yt).sum(-1) / (x.norm(dim=-1) * yt.norm(dim=-1)))
    h = torch.stack(per_pair).mean(0).sum()
    ref = (2.0 * h + 0.5 * ce_sum(out.logits, labels)) / int(keep.sum())
    assert_pins(case, got, ref, case.sft_loss(batch))


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_context_matches_the_teacher_given_the_context(divergence, tmp_path):
    """context (objective=divergence, ce_weight 0.3): the teacher reads "c\\n\\nx" and the student "x",
    both followed by the same response; at the j-th response token of each row the student's
    distribution (position |x| − 1 + j of its own sequence) is compared with the teacher's (position
    |c x| − 1 + j): [Σ D(s, q) + 0.3·CE] / n. Each row is run here on its own, unpadded."""
    path = write_rows(tmp_path / "c.jsonl", 16, context="Add: {a} plus {b} is {s}.")
    case = make_case(path, tmp_path, {"name": "context", "divergence": divergence, "ce_weight": 0.3})
    batch = case.sequences()
    got, _ = case.loop_loss(batch)
    ds, ces, n = [], [], 0
    for row in case.rows:
        bos, nl = [TOK.bos_token_id], TOK.convert_tokens_to_ids(["\n"])
        x = bos + TOK.convert_tokens_to_ids(list(row["prompt"])) + nl
        cx = bos + TOK.convert_tokens_to_ids(list(f"{row['context']}\n\n{row['prompt']}")) + nl
        y = TOK.convert_tokens_to_ids(list(row["response"])) + [TOK.eos_token_id]
        z = case.student(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1 : -1]
        with torch.no_grad():
            zt = case.teacher(input_ids=torch.tensor([cx + y])).logits[0, len(cx) - 1 : -1]
        ds.append(divergence_sum(divergence, z, zt))
        ces.append(-z.log_softmax(-1).gather(-1, torch.tensor(y)[:, None]).sum())
        n += len(y)
    ref = (sum(ds) + 0.3 * sum(ces)) / n
    assert n == n_trained(batch["labels"])
    assert_pins(case, got, ref, case.sft_loss(batch))


def test_every_registered_method_is_pinned_here():
    """A method registered later must get its test here too."""
    covered = {"sft", "seqkd", "step-by-step", "kd", "akl", "gkd", "distillm", "feedback-kl", "minillm", "dpkd",
               "hidden", "context", "self-improve", "reward-model", "rlaif"}
    assert set(METHODS) == covered
