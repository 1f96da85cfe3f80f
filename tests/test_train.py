"""The training loop: learning, accumulation, exact resume, two processes, compute accounting, saving."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmdistill.config import save_config
from lmdistill.flops import head_parameters
from lmdistill.models import count_parameters, load_model
from lmdistill.train import fit, lr_lambda, micro_batches, step_rows

from conftest import read_metrics, tiny_run_config


def final_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_loss_goes_down_and_model_loads_without_lmdistill(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run", train={"steps": 25, "eval_every": 25})
    fit(cfg, progress=False)
    rows = read_metrics(cfg.run_dir)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert rows[-1]["eval_ce"] < 0.7 * first
    # The saved directory is a plain Hugging Face model: load it in a fresh interpreter without lmdistill.
    code = (
        "import sys; sys.modules['lmdistill'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(cfg.run_dir / 'model')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(cfg.run_dir / 'model')!r})\n"
        "print(m.config.num_hidden_layers, t.decode(t('12+3')['input_ids']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "12+3"]
    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model")
    assert set(final_weights(cfg.run_dir)) <= set(model.state_dict())


def test_accumulation_matches_one_big_batch(addition_data, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same rows: same losses, gradients and weights."""
    runs = []
    for accum in (1, 2):
        cfg = tiny_run_config(addition_data, tmp_path / f"a{accum}", train={"steps": 3, "batch_size": 4, "grad_accum": accum})
        fit(cfg, progress=False)
        runs.append(cfg.run_dir)
    m1, m2 = read_metrics(runs[0]), read_metrics(runs[1])
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    w1, w2 = final_weights(runs[0]), final_weights(runs[1])
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly(addition_data, tmp_path):
    """20 steps straight == 13 steps, crash, resume from the step-10 checkpoint, 10 more."""
    straight = tiny_run_config(addition_data, tmp_path / "straight", train={"steps": 20})
    fit(straight, progress=False)
    broken = tiny_run_config(addition_data, tmp_path / "broken", train={"steps": 20, "checkpoint_every": 5})
    fit(broken, stop_after=13, progress=False)
    assert [p.name for p in sorted((broken.run_dir / "checkpoints").iterdir())] == ["step_00000010"]
    assert not (broken.run_dir / "model").exists()
    fit(broken, progress=False)
    a, b = read_metrics(straight.run_dir), read_metrics(broken.run_dir)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["flops"] for r in a] == [r["flops"] for r in b]
    wa, wb = final_weights(straight.run_dir), final_weights(broken.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_match_one(addition_data, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP) gives the single-process losses for the same global batch."""
    single = tiny_run_config(addition_data, tmp_path / "single", train={"steps": 4, "batch_size": 8})
    fit(single, progress=False)
    cfg_path = tmp_path / "two.yaml"
    save_config(tiny_run_config(addition_data, tmp_path / "two", train={"steps": 4, "batch_size": 8}), cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "lmdistill.cli", "run", str(cfg_path), "--no-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(single.run_dir), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]


def test_flops_are_six_n_tokens(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "f", train={"steps": 2})
    fit(cfg, progress=False)
    model = load_model(cfg.student, seed=0)
    n, h = count_parameters(model), head_parameters(model)
    rows = read_metrics(cfg.run_dir)
    # The body costs 6·N per token; the head only where logits are computed, the response window, which cuts
    # the prompts (the exact count per batch is tests/test_flops.py's).
    assert 6 * (n - h) * rows[-1]["tokens"] < rows[-1]["flops_train"] < 6 * n * rows[-1]["tokens"]
    assert rows[-1]["flops"] == rows[-1]["flops_train"]  # SFT runs no other forward


def test_batch_must_split_evenly(addition_data, tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=6 must be divisible"):  # refused with the config
        tiny_run_config(addition_data, tmp_path / "x", train={"batch_size": 6, "grad_accum": 4})


def test_bad_data_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    cfg = tiny_run_config(bad, tmp_path / "run")
    from lmdistill.data import DataError

    with pytest.raises(DataError, match="bad.jsonl:2: missing field 'response'"):
        fit(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_data_order_and_schedule():
    rows = [step_rows(s, 10, 4, seed=3) for s in range(5)]
    flat = sum(rows, [])
    assert sorted(flat[:10]) == list(range(10))  # one epoch is a permutation
    assert sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new order each epoch
    assert micro_batches(list(range(8)), accum=2, world=2, rank=1) == [[2, 3], [6, 7]]
    assert lr_lambda(0, warmup=4, total=10, min_ratio=0.1) == 0.25
    assert lr_lambda(4, warmup=4, total=10, min_ratio=0.1) == 1.0
    assert lr_lambda(10, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)
