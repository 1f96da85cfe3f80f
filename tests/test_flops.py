"""Compute accounting: one rule for every method (DESIGN.md, "Compute accounting").

6·N_student per token the student is trained on, whichever batch it sits in (data, its own samples,
chosen / rejected sequences); 2·N per token of every other forward (teacher, frozen reference,
sampling, evaluation); generation = its prefill (the prompts' real tokens) plus one position per row
and decoding step after the first. The output head's share of N counts only where logits are computed:
a loss's response window, a prefill's last position. Each test runs one real optimizer step of a method and checks
the logged FLOPs against that closed form, computed from the batch the method made (recorded) and
the widths the decoder produced (recorded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmdistill.generation as generation
from lmdistill.data import collate, encode_rows, load_rows
from lmdistill.flops import FlopMeter, count_parameters, computed_tokens, head_parameters
from lmdistill.losses import prediction_mask, trained_window
from lmdistill.methods import METHODS
from lmdistill.models import build_char_tokenizer, causal_logits, load_model, load_tokenizer
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config


def tokens(batch: dict, prefix: str = "") -> int:
    return int(batch[prefix + "attention_mask"].sum())


def window_tokens(batch: dict, prefix: str = "") -> int:
    """Real tokens in the response window of the (prefixed) labels: where a loss computes logits."""
    return int(batch[prefix + "attention_mask"][:, trained_window(batch[prefix + "labels"])].sum())


def forward_cost(batch: dict, spec: str, n: int, h: int, factor: int) -> float:
    """FLOPs of one forward of a model (N = n, head h) on the batch's `spec` sequences: a prefix, then
    "*" where the forward computes every position's logits (a teacher's `score`) or "1" where only the
    last column's; else the response window's."""
    prefix, kind = spec.rstrip("*1"), spec[len(spec.rstrip("*1")):]
    if kind == "*":
        heads = tokens(batch, prefix)
    elif kind == "1":
        heads = int(batch[prefix + "attention_mask"][:, -1].sum())
    else:
        heads = window_tokens(batch, prefix)
    return factor * ((n - h) * tokens(batch, prefix) + h * heads)


def test_meter_counts_trained_and_frozen_forwards_and_cached_generation():
    """A forward with gradient: 6·N per real token; under no_grad: 2·N; `generate` with a KV cache:
    prefill (real prompt tokens) + B per later step."""
    tok = build_char_tokenizer()
    spec = tiny_run_config(Path("x"), Path("y")).student
    model = load_model(spec, tok, seed=0)
    n = count_parameters(model)
    meter = FlopMeter()
    meter.attach(model)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model(input_ids=ids, attention_mask=am).logits.sum().backward()
    assert meter.train == 6 * n * 6 and meter.other == 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert meter.other == 2 * n * 6
    meter.other = 0.0
    generation.sample_ids(model, [[5, 6, 7], [9]], pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=5)
    h = head_parameters(model)
    assert 0 < h < n
    # 4 prompt tokens, then 2 rows x 4 steps; the prefill computes logits at each row's last position only
    assert meter.other == 2 * (n - h) * (4 + 2 * 4) + 2 * h * (2 + 2 * 4)
    frozen = load_model(spec, tok, seed=1).requires_grad_(False)
    meter.attach(frozen)
    before = meter.train
    frozen(input_ids=ids, attention_mask=am)  # gradient mode on, but nothing to train
    generated = 2 * (n - h) * (4 + 2 * 4) + 2 * h * (2 + 2 * 4)
    assert meter.train == before and meter.other == generated + 2 * n * 6
    assert computed_tokens((), {"input_ids": ids[:, -1:], "attention_mask": am}) == 1


def test_the_head_counts_only_where_logits_are_computed():
    """logits_to_keep (an index tensor; generation's prefill passes an int, the last n) cuts the head's share
    to those positions' real tokens; the loss window's logits equal the full forward's there."""
    tok = build_char_tokenizer()
    model = load_model(tiny_run_config(Path("x"), Path("y")).student, tok, seed=0)
    n, h = count_parameters(model), head_parameters(model)
    meter = FlopMeter()
    meter.attach(model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=am).logits
        meter.other = 0.0
        last3 = causal_logits(model, ids, am, slice(2, 5))  # the last 3 positions
        assert meter.other == 2 * (n - h) * 8 + 2 * h * (3 + 1)
        meter.other = 0.0
        middle = causal_logits(model, ids, am, slice(1, 3))
        assert meter.other == 2 * (n - h) * 8 + 2 * h * (2 + 2)
        meter.other = 0.0
        model(input_ids=ids, attention_mask=am, logits_to_keep=3)  # an int, as generate's prefill passes
        assert meter.other == 2 * (n - h) * 8 + 2 * h * (3 + 1)
    torch.testing.assert_close(last3, full[:, 2:5])
    torch.testing.assert_close(middle, full[:, 1:3])


@pytest.mark.parametrize("window", [slice(2, 5), slice(1, 3)])
def test_a_frozen_head_gets_its_window_contiguous(window):
    """The output head of a frozen model (a teacher) gets the window's hidden states as one contiguous (B, W, H)
    tensor: on a strided view torch.matmul broadcasts the frozen (V, H) weight to every row and copies it
    (3x the whole bfloat16 forward of SmolLM2 on a CPU, bench/teacher_bf16.py)."""
    tok = build_char_tokenizer()
    model = load_model(tiny_run_config(Path("x"), Path("y")).student, tok, seed=0).requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    with torch.no_grad():
        causal_logits(model, ids, torch.ones_like(ids), window)
    assert len(seen) == 1 and seen[0].shape[1] == window.stop - window.start and seen[0].is_contiguous()


# name -> (method options, teacher options, student-trained prefixes, teacher-forward prefixes)
CASES = {
    "sft": ({"name": "sft"}, None, [""], []),
    "kd": ({"name": "kd"}, {}, [""], [""]),
    "kd-topk-chunked": ({"name": "kd", "chunked": True}, {"k": 4}, [""], [""]),
    "gkd-on-policy": ({"name": "gkd", "lam": 1.0, "max_new_tokens": 4}, {}, [""], [""]),
    "feedback-kl": ({"name": "feedback-kl", "max_new_tokens": 4}, {}, ["", "sample_"], ["*", "sample_"]),
    "feedback-kl-no-onpolicy": ({"name": "feedback-kl", "lam_prime": 0.0}, {}, [""], ["*"]),
    "feedback-kl-score": ({"name": "feedback-kl", "max_new_tokens": 4, "estimator": "score"}, {},
                          ["", "sample_"], ["*", "sample_*"]),
    "dpkd": ({"name": "dpkd", "max_new_tokens": 4}, {}, ["", "chosen_", "rejected_"], ["chosen_", "rejected_*"]),
    "dpo": ({"name": "dpkd", "form": "dpo", "max_new_tokens": 4}, {}, ["", "chosen_", "rejected_"], ["chosen_"]),
    "simpo": ({"name": "dpkd", "form": "simpo", "chosen": "data", "max_new_tokens": 4}, {},
              ["", "chosen_", "rejected_"], ["chosen_"]),
    "minillm": ({"name": "minillm", "max_new_tokens": 4}, {}, ["", "sample_"], ["sample_"]),
    "distillm-fresh": ({"name": "distillm", "init_prob": 1.0, "max_new_tokens": 4}, {}, [""], [""]),
    "seqkd": ({"name": "seqkd", "max_new_tokens": 4}, {}, [""], []),
    "hidden": ({"name": "hidden"}, {}, [""], ["1"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_costs_the_closed_form(case, data, teacher_dir, tmp_path, monkeypatch):
    method, teacher_opts, trained, teacher_fwd = CASES[case]
    teacher = None if teacher_opts is None else {"kind": "local", "model": {"path": str(teacher_dir)}, **teacher_opts}
    cfg = tiny_run_config(data, tmp_path / case, teacher=teacher or {}, method=method,
                          train={"steps": 1, "batch_size": 4, "log_every": 1})
    cls = METHODS[method["name"]]
    made: list[dict] = []
    decoded: list[tuple[torch.nn.Module, int, int, int]] = []  # (decoding model, real prompt tokens, rows, rows x (width - 1))
    sequences, decode = cls.sequences, generation._decode_batch
    monkeypatch.setattr(cls, "sequences", lambda self, b: made.append(sequences(self, b)) or made[-1])

    def recording_decode(model, prompts, **kw):
        new = decode(model, prompts, **kw)
        decoded.append((model, sum(map(len, prompts)), len(prompts), len(prompts) * (new.shape[1] - 1)))
        mixing = kw.get("logits_processor")
        if mixing:  # MiniLLM's sampler runs the teacher alongside, step by step, with its own KV cache
            decoded.append((mixing[0].teacher, sum(map(len, prompts)), len(prompts), len(prompts) * (new.shape[1] - 1)))
        return new

    monkeypatch.setattr(generation, "_decode_batch", recording_decode)
    fit(cfg, progress=False)

    tok = load_tokenizer(cfg.student)
    student = load_model(cfg.student, tok, seed=0)
    n_s, h_s = count_parameters(student), head_parameters(student)
    n_t = h_t = 0
    if teacher:
        teacher_model = load_model(type(cfg.student)(path=str(teacher_dir)), tok)
        n_t, h_t = count_parameters(teacher_model), head_parameters(teacher_model)
    (b,) = made
    if method.get("chunked"):  # one position's logits in the forward; the loss applies the head to the rest
        expected_train = 6 * ((n_s - h_s) * tokens(b) + h_s * len(b["labels"]))
        expected_train += 6 * h_s * int(prediction_mask(b["labels"]).sum())
    else:
        expected_train = sum(forward_cost(b, p, n_s, h_s, 6) for p in trained)
    expected_other = sum(forward_cost(b, p, n_t, h_t, 2) for p in teacher_fwd)
    for model, prefill, rows, steps in decoded:
        n, h = count_parameters(model), head_parameters(model)
        expected_other += 2 * ((n - h) * (prefill + steps) + h * (rows + steps))
    if method.get("form") == "dpo":  # the frozen step-0 copy of the student scores chosen and rejected
        expected_other += forward_cost(b, "chosen_", n_s, h_s, 2) + forward_cost(b, "rejected_", n_s, h_s, 2)
    if method["name"] == "distillm":  # the validation before step 1, on the first val_rows held-out rows
        held = load_rows(cfg.data)[1][: cfg.method.val_rows]
        val = collate(encode_rows(tok, held, max_length=cfg.data.max_length, truncation=cfg.data.truncation),
                      tok.pad_token_id)
        expected_other += forward_cost(val, "", n_s, h_s, 2)
    row = read_metrics(cfg.run_dir)[0]
    assert row["flops_train"] == pytest.approx(expected_train, rel=1e-9)
    assert row["flops_other"] == pytest.approx(expected_other, rel=1e-9)
    assert row["flops"] == pytest.approx(expected_train + expected_other, rel=1e-9)
    assert window_tokens(b) < tokens(b)  # the prompts are cut: the head's share is really smaller
    if trained != [""]:  # the fault this pins: samples / pairs were not counted as trained compute
        assert row["flops_train"] > 6 * n_s * tokens(b)


def test_the_on_policy_term_costs_trained_compute(data, teacher_dir, tmp_path):
    """The issue's reproduction: feedback-kl with lam_prime=1 trains on its samples too, so its
    flops_train exceeds lam_prime=0's on the same data (they were equal)."""
    rows = []
    for lam_prime in (0.0, 1.0):
        cfg = tiny_run_config(data, tmp_path / str(lam_prime), method={"name": "feedback-kl", "lam_prime": lam_prime,
                                                                       "max_new_tokens": 4},
                              teacher={"kind": "local", "model": {"path": str(teacher_dir)}}, train={"steps": 2})
        fit(cfg, progress=False)
        rows.append(read_metrics(cfg.run_dir)[-1])
    assert rows[1]["flops_train"] > rows[0]["flops_train"] and rows[1]["flops_other"] > rows[0]["flops_other"]
