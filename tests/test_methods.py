"""Distillation methods on the one loop: special cases agree, each lowers KL to the teacher, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmdistill.config import RunConfig
from lmdistill.data.rows import DataError
from lmdistill.data.tokenize import collate
from lmdistill.methods import METHODS
from lmdistill.models import load_tokenizer
from lmdistill.losses import prediction_mask
from lmdistill.teachers import Capability, CapabilityError, Teacher, check_needs
from lmdistill.methods import method_rows
from lmdistill.train import encode_rows, fit

from conftest import heldout_kls, read_metrics, tiny_run_config


def method_config(data: Path, out: Path, teacher: Path | None, method: dict, k: int = 0, **sections) -> RunConfig:
    teacher_section = {"kind": "local", "model": {"path": str(teacher)}, "k": k} if teacher else {}
    return tiny_run_config(data, out, teacher=teacher_section, method=method, **sections)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_feedback_kl_without_onpolicy_term_is_sft(data, teacher_dir, tmp_path):
    """feedback-kl with lam=1, lam_prime=0 optimises CE_data − CE_data(teacher): same losses and weights as sft."""
    sft = method_config(data, tmp_path / "sft", None, {"name": "sft"}, train={"steps": 4})
    fb = method_config(data, tmp_path / "fb", teacher_dir, {"name": "feedback-kl", "lam": 1.0, "lam_prime": 0.0},
                       train={"steps": 4})
    fit(sft, progress=False)
    fit(fb, progress=False)
    assert losses(sft.run_dir) == pytest.approx(losses(fb.run_dir), rel=1e-6)
    rows = read_metrics(fb.run_dir)
    assert all("excess_ce" in r for r in rows if "loss" in r)


def test_gkd_off_policy_with_beta_zero_is_kd_forward_kl(data, teacher_dir, tmp_path):
    gkd = method_config(data, tmp_path / "gkd", teacher_dir, {"name": "gkd", "lam": 0.0, "beta": 0.0}, train={"steps": 4})
    kd = method_config(data, tmp_path / "kd", teacher_dir, {"name": "kd", "alpha": 1.0, "divergence": "fkl"},
                       train={"steps": 4})
    fit(gkd, progress=False)
    fit(kd, progress=False)
    assert losses(gkd.run_dir) == pytest.approx(losses(kd.run_dir), rel=1e-6)


@pytest.mark.parametrize("k", [0, 8])
def test_kd_chunked_equals_kd_dense(data, teacher_dir, tmp_path, k):
    """The fused chunked path (no (B, T, V) student logits) trains exactly like the dense one."""
    runs = []
    for chunked in (False, True):
        cfg = method_config(data, tmp_path / f"c{chunked}{k}", teacher_dir,
                            {"name": "kd", "divergence": "jsd", "chunked": chunked, "chunk_size": 7}, k=k,
                            train={"steps": 4})
        fit(cfg, progress=False)
        runs.append([v for r in read_metrics(cfg.run_dir) if "loss" in r for v in (r["loss"], r["jsd"])])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


METHOD_RUNS = {
    "kd": {"name": "kd"},
    "kd-topk": {"name": "kd", "divergence": "rkl"},
    "akl": {"name": "akl"},
    "gkd": {"name": "gkd", "lam": 0.5, "max_new_tokens": 6},
    "feedback-kl": {"name": "feedback-kl", "max_new_tokens": 6},
    "feedback-kl-score": {"name": "feedback-kl", "max_new_tokens": 6, "estimator": "score"},
    "dpkd": {"name": "dpkd", "max_new_tokens": 6},
    "dpo": {"name": "dpkd", "form": "dpo", "max_new_tokens": 6},
    "simpo": {"name": "dpkd", "form": "simpo", "max_new_tokens": 6, "chosen": "data"},
    "seqkd": {"name": "seqkd", "max_new_tokens": 6},
}


@pytest.mark.parametrize("label", sorted(METHOD_RUNS))
def test_method_lowers_heldout_kl_to_teacher(label, data, teacher_dir, tmp_path):
    """From a random student, 30 steps of each method cut the held-out KL(teacher‖student) by at least 25 %."""
    cfg = method_config(data, tmp_path / label, teacher_dir, METHOD_RUNS[label], k=8 if label == "kd-topk" else 0,
                        train={"steps": 30, "lr": 5e-3, "warmup_steps": 3})
    before = heldout_kls(cfg, None, teacher_dir)[0]
    fit(cfg, progress=False)
    after = heldout_kls(cfg, cfg.run_dir / "model", teacher_dir)[0]
    assert after < 0.75 * before, (before, after)


def test_dpkd_logs_rewards_and_first_token_divergences(data, teacher_dir, tmp_path):
    cfg = method_config(data, tmp_path / "dpkd", teacher_dir, {"name": "dpkd", "max_new_tokens": 4}, train={"steps": 2})
    fit(cfg, progress=False)
    row = [r for r in read_metrics(cfg.run_dir) if "loss" in r][-1]
    for key in ("reward_chosen", "reward_rejected", "reward_accuracy", "first_token_kl", "first_token_rkl"):
        assert key in row, key
    assert row["first_token_kl"] >= 0 and row["first_token_rkl"] >= 0


def test_dpo_form_resumes_exactly(data, teacher_dir, tmp_path):
    """The frozen reference of form=dpo is the step-0 student, kept in checkpoints."""
    method = {"name": "dpkd", "form": "dpo", "max_new_tokens": 4}
    straight = method_config(data, tmp_path / "a", teacher_dir, method, train={"steps": 4, "checkpoint_every": 2})
    fit(straight, progress=False)
    resumed = method_config(data, tmp_path / "b", teacher_dir, method, train={"steps": 4, "checkpoint_every": 2})
    fit(resumed, stop_after=2, progress=False)
    fit(resumed, progress=False)
    assert losses(straight.run_dir) == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


class _TokenOnly(Teacher):
    """A teacher that can only score given tokens (like a served model with echo), with no weights here."""

    capability = Capability.TOKEN
    name = "served:test"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_teacher_needs_are_refused_clearly(name):
    method = METHODS[name]
    needs = method.teacher_needs(method.config_class(name=name))
    if needs.capability is None:
        check_needs(name, needs, None)
        return
    with pytest.raises(CapabilityError, match=f"method {name!r} needs a teacher"):
        check_needs(name, needs, None)
    if needs.capability > Capability.TOKEN:
        with pytest.raises(CapabilityError, match=f"{name}.*{needs.capability}"):
            check_needs(name, needs, _TokenOnly())
    elif needs.weights:
        with pytest.raises(CapabilityError, match=f"{name}.*no weights here"):
            check_needs(name, needs, _TokenOnly())
    else:
        check_needs(name, needs, _TokenOnly())


def test_kd_without_teacher_stops_before_writing(data, tmp_path):
    cfg = method_config(data, tmp_path / "kd", None, {"name": "kd"})
    with pytest.raises(CapabilityError, match="teacher.kind=local"):
        fit(cfg, progress=False)
    assert not (tmp_path / "kd").exists()


def test_bad_method_options_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match="method.divergence"):
        method_config(data, tmp_path / "x", None, {"name": "kd", "divergence": "kl"})
    with pytest.raises(ValueError, match="method.form"):
        method_config(data, tmp_path / "x", None, {"name": "dpkd", "form": "orpo"})
    with pytest.raises(ValueError, match="method.estimator"):
        method_config(data, tmp_path / "x", None, {"name": "feedback-kl", "estimator": "mc"})


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def addition_rows(n: int, **extra) -> list[dict]:
    out = []
    for i in range(n):
        a, b = (7 * i) % 50, (13 * i) % 50
        out.append({"prompt": f"What is {a} + {b}?", "response": str(a + b),
                    **{k: v.format(a=a, b=b, s=a + b) for k, v in extra.items()}})
    return out


def test_seqkd_on_data_needs_teacher_labelled_rows(data, tmp_path):
    cfg = method_config(data, tmp_path / "s", None, {"name": "seqkd", "source": "data"})
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*elicit label"):
        fit(cfg, progress=False)
    assert not (tmp_path / "s").exists()


def test_seqkd_on_elicited_rows_trains_like_sft(tmp_path):
    rows = [{**r, "provenance": {"task": "label", "teacher": "local:t"}} for r in addition_rows(32)]
    path = write_rows(tmp_path / "labelled.jsonl", rows)
    seqkd = method_config(path, tmp_path / "seqkd", None, {"name": "seqkd", "source": "data"}, train={"steps": 3})
    sft = method_config(path, tmp_path / "sft", None, {"name": "sft"}, train={"steps": 3})
    fit(seqkd, progress=False)
    fit(sft, progress=False)
    assert losses(seqkd.run_dir) == pytest.approx(losses(sft.run_dir), rel=1e-6)


def test_seqkd_from_the_teacher_needs_its_weights(data, tmp_path):
    cfg = method_config(data, tmp_path / "s", None, {"name": "seqkd"})
    with pytest.raises(ValueError, match="method.source=teacher generates with a local teacher"):
        fit(cfg, progress=False)


def test_step_by_step_needs_rationales(data, tmp_path):
    cfg = method_config(data, tmp_path / "sbs", None, {"name": "step-by-step"})
    with pytest.raises(DataError, match=r"train\.jsonl:1: method 'step-by-step' needs field 'rationale'.*elicit rationales"):
        fit(cfg, progress=False)
    assert not (tmp_path / "sbs").exists()


def test_step_by_step_trains_label_and_rationale_and_evaluates_label_only(tmp_path):
    path = write_rows(tmp_path / "r.jsonl", addition_rows(64, rationale="{a} plus {b} makes {s}"))
    cfg = method_config(path, tmp_path / "sbs", None, {"name": "step-by-step"}, train={"steps": 20, "lr": 5e-3})
    train, held = method_rows(cfg)
    assert len(train) == 2 * 56 and len(held) == 8
    assert train[0]["prompt"].startswith("[label] ") and train[1]["prompt"].startswith("[rationale] ")
    assert train[1]["response"].endswith("makes " + train[0]["response"])
    assert all(r["prompt"].startswith("[label] ") for r in held)
    fit(cfg, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]


def test_context_rows_align_teacher_and_student_responses(tmp_path):
    path = write_rows(tmp_path / "c.jsonl", addition_rows(16, context="Answer with digits only. {a}+{b}={s}."))
    cfg = method_config(path, tmp_path / "ctx", None, {"name": "context"})
    train, _ = method_rows(cfg)
    tok = load_tokenizer(cfg.student)
    batch = collate(encode_rows(tok, train[:4], max_length=cfg.data.max_length), tok.pad_token_id)
    s_mask, t_mask = prediction_mask(batch["labels"]), prediction_mask(batch["teacher_labels"])
    assert torch.equal(s_mask.sum(1), t_mask.sum(1))
    assert (batch["teacher_attention_mask"].sum(1) > batch["attention_mask"].sum(1)).all()
    # The tokens predicted at the gathered positions are the same on both sides.
    s_next = batch["labels"][:, 1:][s_mask[:, :-1]]
    t_next = batch["teacher_labels"][:, 1:][t_mask[:, :-1]]
    assert torch.equal(s_next, t_next)


def test_context_needs_a_context_field(data, teacher_dir, tmp_path):
    cfg = method_config(data, tmp_path / "ctx", teacher_dir, {"name": "context"})
    with pytest.raises(DataError, match="needs field 'context'.*elicit context"):
        fit(cfg, progress=False)


@pytest.mark.parametrize("k", [0, 8])
def test_context_distillation_lowers_its_divergence(teacher_dir, tmp_path, k):
    """The student without the context approaches the teacher with it (full logits, or its top 8):
    fkl over 25 steps falls by half."""
    path = write_rows(tmp_path / "c.jsonl", addition_rows(64, context="Sum: {a}+{b}"))
    cfg = method_config(path, tmp_path / "ctx", teacher_dir, {"name": "context"}, k=k,
                        train={"steps": 25, "lr": 5e-3})
    fit(cfg, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "fkl" in r]
    assert rows[-1]["fkl"] < 0.5 * rows[0]["fkl"], (rows[0]["fkl"], rows[-1]["fkl"])
