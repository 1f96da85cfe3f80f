"""Shared fixtures: tiny data and tiny configs, all built locally (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from lmdistill.config import RunConfig, build, to_dict
from lmdistill.methods import METHOD_CONFIGS


def write_addition_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """`n` rows of 'What is a + b?' → 'a+b', as prompt/response JSONL."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": str(a + b)}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def addition_data(tmp_path: Path) -> Path:
    return write_addition_jsonl(tmp_path / "train.jsonl", 64)


def tiny_run_config(data: Path, out: Path, **sections) -> RunConfig:
    """A run of a 2-layer, 32-wide Llama with the character tokenizer on a JSONL file."""
    base = {
        "name": "tiny",
        "output_dir": str(out),
        "student": {"tokenizer": "char", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_position": 64},
        "data": {"source": "jsonl", "train_path": str(data), "max_length": 40, "eval_fraction": 0.125},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0},
        "eval": {"batch_size": 16, "n_generate": 0},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return build(RunConfig, base, method_configs=METHOD_CONFIGS)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """96 addition rows (seed 1) shared by a test module's runs."""
    return write_addition_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 96, seed=1)


@pytest.fixture(scope="module")
def teacher_dir(data, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide teacher trained by SFT for 60 steps on `data`; its saved model directory."""
    from lmdistill.train import fit

    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_run_config(data, out / "run", student={"n_embd": 64, "n_head": 4},
                          train={"steps": 60, "lr": 5e-3, "warmup_steps": 5, "log_every": 20})
    fit(cfg, progress=False)
    return cfg.run_dir / "model"


def heldout_kls(cfg: RunConfig, model_dir: Path | None, teacher_dir: Path) -> tuple[float, float]:
    """Mean (KL(teacher‖student), KL(student‖teacher)) per response token on the run's held-out rows.

    `model_dir=None` measures the student at step 0, built from the run's seed as `fit` builds it.
    """
    import torch

    from lmdistill.data.tokenize import collate, encode_rows
    from lmdistill.losses import LOSSES, prediction_mask
    from lmdistill.methods import method_rows
    from lmdistill.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.student)
    if model_dir is None:
        student = load_model(cfg.student, tok, seed=cfg.train.seed)
    else:
        student = load_model(build(type(cfg.student), {"path": str(model_dir)}), tok)
    teacher = load_model(build(type(cfg.student), {"path": str(teacher_dir)}), tok)
    _, held = method_rows(cfg)
    batch = collate(encode_rows(tok, held, max_length=cfg.data.max_length), tok.pad_token_id)
    mask = prediction_mask(batch["labels"])
    with torch.no_grad():
        s = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return LOSSES["fkl"](s, t, mask).item(), LOSSES["rkl"](s, t, mask).item()


def write_run(root: Path, name: str, *, seed: int = 0, method: dict | None = None, data: str = "dolly.jsonl",
              teacher: str | None = None, metrics: list[dict] | None = None, ev: dict | None = None,
              math_task: bool = False) -> Path:
    """A run directory as `fit` + `lmdistill eval` leave it (config.yaml, metrics.jsonl, eval.json), written by
    hand for report and summary tests; without `metrics`, an evaluation-only directory."""
    sections = {"train": {"seed": seed}, "method": method or {"name": "sft"}}
    if teacher:
        sections["teacher"] = {"kind": "local", "model": {"path": teacher}}
    cfg = tiny_run_config(Path(data), root / name, **sections)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    d = to_dict(cfg)
    d["name"] = name
    if math_task:
        d["data"].update(source="math", train_path=None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(d))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if ev is not None:
        (run_dir / "eval.json").write_text(json.dumps(ev))
    return run_dir
