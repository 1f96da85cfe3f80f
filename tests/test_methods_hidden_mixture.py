"""`hidden` (hidden-state matching through a learned projection) and teacher mixtures (p_mix = Σ w_i p_i)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmdistill.config import ConfigError, ModelConfig, RunConfig, TeacherConfig, build, save_config
from lmdistill.data import encode_rows, load_rows
from lmdistill.evaluate.divergence import teacher_divergences
from lmdistill.losses import TopK, token_logprobs
from lmdistill.losses import HIDDEN_DISTANCES
from lmdistill.methods.hidden import default_layer_map
from lmdistill.models import build_char_tokenizer, load_model, load_tokenizer, save_model
from lmdistill.teachers import Capability, CapabilityError, Teacher, TokenizerMismatch
from lmdistill.teachers.load import load_teacher
from lmdistill.teachers.mixture import MixtureTeacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config, write_addition_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """96 addition rows (seed 2); conftest's `teacher_dir` trains its teacher on them."""
    return write_addition_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 96, seed=2)


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory) -> Path:
    """A second, untrained 1-layer teacher with the same (char) tokenizer: a different distribution."""
    out = tmp_path_factory.mktemp("other") / "model"
    spec = ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=64)
    tok = load_tokenizer(spec)
    save_model(load_model(spec, tok, seed=7), tok, out)
    return out


def method_config(data: Path, out: Path, teacher: dict, method: dict, **sections) -> RunConfig:
    return tiny_run_config(data, out, teacher=teacher, method=method, **sections)


def local(path: Path) -> dict:
    return {"kind": "local", "model": {"path": str(path)}}


def mixture(*members: tuple[Path, float]) -> dict:
    return {"kind": "mixture", "mixture": [{"path": str(p), "weight": w} for p, w in members]}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def probe_batch() -> dict[str, torch.Tensor]:
    tok = build_char_tokenizer()
    rows = [tok("What is 12 + 30? 42")["input_ids"], tok("What is 7 + 5? 12")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.pad_token_id)
    am = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], am[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": am}


# --------------------------------------------------------------------------- mixture: closed form


class FixedTeacher(Teacher):
    """A teacher whose next-token distribution is `probs` (T, V) at every row, whatever the input."""

    def __init__(self, probs: list[list[float]], capability: Capability = Capability.FULL, name: str = "fixed") -> None:
        self.log_probs = torch.tensor(probs, dtype=torch.float64).log()
        self.capability = capability
        self.name = name

    def logits(self, input_ids, attention_mask, window=None):
        assert self.capability >= Capability.FULL
        out = self.log_probs.expand(input_ids.shape[0], -1, -1).float() + 3.0  # unnormalised on purpose
        return out if window is None else out[:, window]

    def topk(self, input_ids, attention_mask, k, window=None):
        values, ids = self.log_probs.float().topk(k, dim=-1)
        b = input_ids.shape[0]
        top = TopK(ids=ids.expand(b, -1, -1), logprobs=values.expand(b, -1, -1))
        return top if window is None else top.select((slice(None), window))

    def score(self, input_ids, attention_mask):
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return token_logprobs(self.log_probs.expand(input_ids.shape[0], -1, -1).float(), labels)


P1 = [[0.5, 0.25, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]]
P2 = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]


def test_mixture_closed_form_on_tiny_distributions():
    """Weights (1, 3) → (1/4, 3/4). Position 0: p_mix = ¼·(.5, .25, .125, .125) + ¾·(.1, .2, .3, .4)
    = (.2, .2125, .25625, .33125); position 1: ¼·(.7, .1, .1, .1) + ¾·(.25, .25, .25, .25) = (.3625, .2125, .2125, .2125).
    Scoring tokens (0, 3): position 1 holds log p_mix(3 | position 0) = log .33125; position 0 is 0."""
    mix = MixtureTeacher([FixedTeacher(P1), FixedTeacher(P2)], [1.0, 3.0])
    assert mix.mix_weights == [0.25, 0.75] and mix.capability == Capability.FULL
    ids, am = torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.long)
    expected = torch.tensor([[[0.2, 0.2125, 0.25625, 0.33125], [0.3625, 0.2125, 0.2125, 0.2125]]])
    logits = mix.logits(ids, am)
    torch.testing.assert_close(logits.exp().double(), expected.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.log_softmax(logits, -1), logits, rtol=0, atol=1e-6)  # normalised: valid as logits
    top = mix.topk(ids, am, 2)
    assert top.ids[0, 0].tolist() == [3, 2] and top.ids[0, 1, 0].item() == 0
    torch.testing.assert_close(top.logprobs[0, 0].exp(), torch.tensor([0.33125, 0.25625]), rtol=1e-6, atol=0)
    score = mix.score(ids, am)
    assert score[0, 0].item() == 0.0
    assert score[0, 1].item() == pytest.approx(math.log(0.33125), rel=1e-6)


def test_mixture_topk_with_a_topk_only_member():
    """Member 2 gives only its top k. k = 2: its ids (3, 2) with p (.4, .3); candidates (0, 1) ∪ (3, 2); where both
    members know the token the value is exact: p(3) = ¼·.125 + ¾·.4 = .33125, p(2) = .25625. k = 3: member 2 adds id 1
    (p .2), so p(1) = ¼·.25 + ¾·.2 = .2125 exactly, and no id is listed twice although (3, 2, 1) come from both."""
    mix = MixtureTeacher([FixedTeacher(P1), FixedTeacher(P2, Capability.TOPK, "topk-only")], [1.0, 3.0])
    assert mix.capability == Capability.TOPK
    ids, am = torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.long)
    top = mix.topk(ids, am, 2)
    assert top.ids[0, 0].tolist() == [3, 2]
    torch.testing.assert_close(top.logprobs[0, 0].exp(), torch.tensor([0.33125, 0.25625]), rtol=1e-6, atol=0)
    top3 = mix.topk(ids, am, 3)
    assert top3.ids[0, 0].tolist() == [3, 2, 1]
    torch.testing.assert_close(top3.logprobs[0, 0].exp(), torch.tensor([0.33125, 0.25625, 0.2125]), rtol=1e-6, atol=0)


def test_mixture_topk_lower_bound_outside_a_members_topk():
    """Member 1 puts .9 on token 0, which is outside member 2's top 2 (ids 3, 2). Weights (½, ½): p_mix(0) is taken
    as ½·.9 = .45 (member 2's share unknown → 0; the true value is .5), p(3) = ½·.02 + ½·.4 = .21 exactly."""
    p3 = [[0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]]
    mix = MixtureTeacher([FixedTeacher(p3), FixedTeacher(P2, Capability.TOPK, "topk-only")], [1.0, 1.0])
    ids, am = torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.long)
    top = mix.topk(ids, am, 2)
    assert top.ids[0, 0].tolist() == [0, 3]
    torch.testing.assert_close(top.logprobs[0, 0].exp(), torch.tensor([0.45, 0.21]), rtol=1e-6, atol=0)
    with pytest.raises(CapabilityError, match="topk-only gives only topk"):
        mix.logits(ids, am)
    with pytest.raises(CapabilityError, match="kd or gkd"):
        mix.generate(["What is 1 + 1?"], max_new_tokens=4)


def test_mixture_weights_are_checked():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        MixtureTeacher([FixedTeacher(P1), FixedTeacher(P2)], [1.0, -1.0])
    with pytest.raises(ConfigError, match=r"teacher.mixture\[1\]: weight must be >= 0"):
        build(TeacherConfig, {"kind": "mixture", "mixture": [{"path": "a"}, {"path": "b", "weight": -0.5}]},
              prefix="teacher.")
    with pytest.raises(ConfigError, match="teacher.kind=mixture needs teacher.mixture"):
        build(TeacherConfig, {"kind": "mixture", "mixture": [{"path": "a", "weight": 0}]}, prefix="teacher.")
    with pytest.raises(ConfigError, match="set teacher.kind=mixture"):
        build(TeacherConfig, {"mixture": [{"path": "a"}]}, prefix="teacher.")
    with pytest.raises(ConfigError, match=r"teacher.mixture\[0\]: path is required"):
        build(TeacherConfig, {"kind": "mixture", "mixture": [{"weight": 1}]}, prefix="teacher.")


# --------------------------------------------------------------------------- mixture: real teachers


def test_mixture_one_zero_is_the_single_teacher(teacher_dir, other_teacher_dir):
    """Weights (1, 0): logits (up to log-softmax), top-k and scores of the first teacher alone."""
    tok = build_char_tokenizer()
    single = load_teacher(build(TeacherConfig, local(teacher_dir)), tok, CPU)
    mix = load_teacher(build(TeacherConfig, mixture((teacher_dir, 1.0), (other_teacher_dir, 0.0))), tok, CPU)
    assert isinstance(mix, MixtureTeacher) and mix.capability == Capability.FULL
    b = probe_batch()
    ids, am = b["input_ids"], b["attention_mask"]
    torch.testing.assert_close(mix.logits(ids, am), torch.log_softmax(single.logits(ids, am).float(), -1),
                               rtol=0, atol=1e-6)
    t_mix, t_single = mix.topk(ids, am, 5), single.topk(ids, am, 5)
    assert torch.equal(t_mix.ids, t_single.ids)
    torch.testing.assert_close(t_mix.logprobs, t_single.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix.score(ids, am), single.score(ids, am), rtol=0, atol=1e-6)


def test_mixture_of_equal_teachers_is_each(teacher_dir):
    tok = build_char_tokenizer()
    single = load_teacher(build(TeacherConfig, local(teacher_dir)), tok, CPU)
    mix = load_teacher(build(TeacherConfig, mixture((teacher_dir, 1.0), (teacher_dir, 2.0))), tok, CPU)
    assert mix.mix_weights == pytest.approx([1 / 3, 2 / 3])
    b = probe_batch()
    ids, am = b["input_ids"], b["attention_mask"]
    torch.testing.assert_close(mix.logits(ids, am), torch.log_softmax(single.logits(ids, am).float(), -1),
                               rtol=0, atol=1e-5)
    assert torch.equal(mix.topk(ids, am, 5).ids, single.topk(ids, am, 5).ids)
    torch.testing.assert_close(mix.score(ids, am), single.score(ids, am), rtol=0, atol=1e-5)


def test_kd_on_mixture_one_zero_matches_single_teacher(data, teacher_dir, other_teacher_dir, tmp_path):
    """kd, 4 steps: the same losses from the (1, 0) mixture as from its first teacher; FLOPs count both members."""
    kd = {"name": "kd", "alpha": 0.5}
    single = method_config(data, tmp_path / "single", local(teacher_dir), kd, train={"steps": 4})
    mixed = method_config(data, tmp_path / "mixed", mixture((teacher_dir, 1.0), (other_teacher_dir, 0.0)), kd,
                          train={"steps": 4})
    fit(single, progress=False)
    fit(mixed, progress=False)
    assert losses(mixed.run_dir) == pytest.approx(losses(single.run_dir), rel=1e-5)
    fkl = [r["fkl"] for r in read_metrics(mixed.run_dir)]
    assert fkl == pytest.approx([r["fkl"] for r in read_metrics(single.run_dir)], rel=1e-5)
    a, b = read_metrics(single.run_dir)[-1], read_metrics(mixed.run_dir)[-1]
    assert b["flops"] - b["flops_train"] > a["flops"] - a["flops_train"]


def test_gkd_runs_on_a_mixture(data, teacher_dir, other_teacher_dir, tmp_path):
    cfg = method_config(data, tmp_path / "gkd", mixture((teacher_dir, 0.7), (other_teacher_dir, 0.3)),
                        {"name": "gkd", "lam": 1.0, "max_new_tokens": 4}, train={"steps": 2})
    fit(cfg, progress=False)
    rows = read_metrics(cfg.run_dir)
    assert len(rows) == 2 and all(math.isfinite(r["jsd"]) and r["jsd"] >= 0 for r in rows)


def test_mixture_member_with_another_tokenizer_is_named(teacher_dir, tmp_path):
    spec = ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=64)
    tok = load_tokenizer(spec)
    tok.add_tokens(["<extra>"])
    save_model(load_model(spec, tok), tok, tmp_path / "odd")
    cfg = build(TeacherConfig, mixture((teacher_dir, 1.0), (tmp_path / "odd", 1.0)))
    with pytest.raises(TokenizerMismatch, match=r"teacher.mixture\[1\]"):
        load_teacher(cfg, build_char_tokenizer(), CPU)


def test_hidden_refuses_a_mixture(data, teacher_dir, tmp_path):
    cfg = method_config(data, tmp_path / "h", mixture((teacher_dir, 1.0), (teacher_dir, 1.0)), {"name": "hidden"})
    with pytest.raises(CapabilityError, match="hidden states"):
        fit(cfg, progress=False)


# --------------------------------------------------------------------------- hidden


def test_default_layer_map_and_distances():
    assert default_layer_map(2, 4) == [[1, 2], [2, 4]]
    assert default_layer_map(2, 2) == [[1, 1], [2, 2]]
    assert default_layer_map(3, 2) == [[1, 1], [2, 1], [3, 2]]
    assert default_layer_map(1, 3) == [[1, 3]]
    s = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # mse: ((1)² + (1)²)/2 = 1 and ((1)² + (1)²)/2 = 1; cosine: orthogonal → 1, parallel → 0.
    torch.testing.assert_close(HIDDEN_DISTANCES["mse"](s, t), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(HIDDEN_DISTANCES["cosine"](s, t), torch.tensor([[1.0, 0.0]]), rtol=0, atol=1e-6)


@torch.no_grad()
def heldout(cfg: RunConfig, model_dir: Path | None, teacher_dir: Path) -> tuple[float, float]:
    """(KL(teacher ‖ student), student CE) per response token on the run's held-out rows."""
    from lmdistill.heldout import heldout_stats

    tok = load_tokenizer(cfg.student)
    spec = cfg.student if model_dir is None else ModelConfig(path=str(model_dir))
    student = load_model(spec, tok, seed=cfg.train.seed)  # at step 0: built from the run's seed as fit builds it
    teacher = load_teacher(build(TeacherConfig, local(teacher_dir)), tok, CPU)
    _, held = load_rows(cfg.data)
    enc = encode_rows(tok, held, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    kl = teacher_divergences(student, teacher, enc, tok.pad_token_id)["fkl_all"]
    return kl, heldout_stats(student.eval(), enc, tok.pad_token_id).metrics()["ce"]


@pytest.fixture(scope="module")
def hidden_run(data, teacher_dir, tmp_path_factory) -> RunConfig:
    """30 steps of `hidden` (mse, default map 2 → 2 layers, student 32 wide → teacher 64 wide)."""
    cfg = method_config(data, tmp_path_factory.mktemp("hidden") / "run", local(teacher_dir), {"name": "hidden"},
                        train={"steps": 30, "lr": 5e-3, "warmup_steps": 3})
    fit(cfg, progress=False)
    return cfg


def test_hidden_lowers_its_loss_and_heldout_kl(hidden_run, teacher_dir):
    rows = [r for r in read_metrics(hidden_run.run_dir) if "loss" in r]
    first, last = rows[0], rows[-1]
    assert last["hidden_mse"] < 0.5 * first["hidden_mse"], (first["hidden_mse"], last["hidden_mse"])
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    kl0, ce0 = heldout(hidden_run, None, teacher_dir)
    kl1, ce1 = heldout(hidden_run, hidden_run.run_dir / "model", teacher_dir)
    assert kl1 < 0.75 * kl0, (kl0, kl1)
    assert ce1 < 0.75 * ce0, (ce0, ce1)


def test_hidden_term_alone_moves_the_student_towards_the_teacher(data, teacher_dir, tmp_path):
    """ce_weight=0: only the matched hidden states train the student (and projection), yet held-out KL falls.

    Measured: 2.76 → 2.53 nats (−8 %) after 30 steps, against −84 % for the default (CE + hidden)."""
    cfg = method_config(data, tmp_path / "run", local(teacher_dir), {"name": "hidden", "ce_weight": 0.0},
                        train={"steps": 30, "lr": 5e-3, "warmup_steps": 3})
    fit(cfg, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["hidden_mse"]) and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    kl0, _ = heldout(cfg, None, teacher_dir)
    kl1, _ = heldout(cfg, cfg.run_dir / "model", teacher_dir)
    assert kl1 < 0.96 * kl0, (kl0, kl1)


def test_hidden_two_processes_match_one(data, teacher_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP, the projection wrapped too) and 2 accumulation steps gives
    the single-process losses and the same trained projection."""
    kw = {"teacher": local(teacher_dir), "method": {"name": "hidden"},
          "train": {"steps": 3, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 3}}
    single = method_config(data, tmp_path / "single", **kw)
    fit(single, progress=False)
    save_config(method_config(data, tmp_path / "two", **kw), tmp_path / "two.yaml")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "lmdistill.cli", "run", str(tmp_path / "two.yaml"), "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(single.run_dir), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-5)
    ckpt = Path("checkpoints") / "step_00000003" / "model_1.safetensors"
    a, b = load_file(str(single.run_dir / ckpt)), load_file(str(tmp_path / "two" / ckpt))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_hidden_saves_a_plain_student(hidden_run):
    model_dir = hidden_run.run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    keys = set(load_file(str(model_dir / "model.safetensors")))
    assert keys <= set(model.state_dict())
    assert not any("map" in k or "projection" in k for k in keys)
    assert model.config.hidden_size == 32


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_resumes_exactly_with_its_projection(loss, data, teacher_dir, tmp_path):
    """4 steps straight == 2 steps, stop, resume: the projection (weights and optimizer state) is in the checkpoint."""
    method = {"name": "hidden", "loss": loss, "layer_map": [[1, 1], [2, 2], [0, 0]]}
    train = {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}
    straight = method_config(data, tmp_path / "a", local(teacher_dir), method, train=train)
    fit(straight, progress=False)
    resumed = method_config(data, tmp_path / "b", local(teacher_dir), method, train=train)
    fit(resumed, stop_after=2, progress=False)
    fit(resumed, progress=False)
    assert losses(straight.run_dir) == losses(resumed.run_dir)
    assert [r[f"hidden_{loss}"] for r in read_metrics(straight.run_dir)] == [
        r[f"hidden_{loss}"] for r in read_metrics(resumed.run_dir)
    ]
    ckpts = sorted((straight.run_dir / "checkpoints").iterdir())
    w2, w4 = (load_file(str(c / "model_1.safetensors")) for c in ckpts)
    assert set(w2) == {f"maps.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert w2["maps.0.weight"].shape == (64, 32)
    assert not torch.equal(w2["maps.0.weight"], w4["maps.0.weight"])  # optimised with the student


def test_bad_layer_map_names_the_field(data, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"method.layer_map\[1\] = \[2\]: expected a pair"):
        method_config(data, tmp_path / "x", local(teacher_dir), {"name": "hidden", "layer_map": [[1, 1], [2]]})
    with pytest.raises(ConfigError, match=r"method.layer_map\[0\] = \[1, -1\]"):
        method_config(data, tmp_path / "x", local(teacher_dir), {"name": "hidden", "layer_map": [[1, -1]]})
    with pytest.raises(ConfigError, match="method.loss"):
        method_config(data, tmp_path / "x", local(teacher_dir), {"name": "hidden", "loss": "l1"})
    cfg = method_config(data, tmp_path / "x", local(teacher_dir), {"name": "hidden", "layer_map": [[3, 1]]})
    with pytest.raises(ConfigError, match=r"method.layer_map\[0\] = \[3, 1\]: the student has no layer 3; its layers "
                                          r"are 0 \(embeddings\) to 2"):
        fit(cfg, progress=False)
    cfg = method_config(data, tmp_path / "y", local(teacher_dir), {"name": "hidden", "layer_map": [[2, 5]]})
    with pytest.raises(ConfigError, match=r"method.layer_map\[0\] = \[2, 5\]: the teacher has no layer 5"):
        fit(cfg, progress=False)
