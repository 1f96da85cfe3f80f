"""Checkpoints through accelerate's save_state/load_state: what is written, that loading runs no code
from the files, that partial directories are never resumed from, and exact resume on 2 processes
(DDP on CPU; FSDP and DeepSpeed ZeRO-3 where there are GPUs)."""

import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from lmdistill import checkpoint
from lmdistill.config import save_config

from conftest import read_metrics, tiny_run_config

ROOT = Path(__file__).parent.parent


class Counter:
    """A stand-in for a method's state object."""

    def __init__(self) -> None:
        self.state: dict = {"n": 0, "buffer": []}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_object_state_round_trips_as_json_and_safetensors(tmp_path):
    """DistiLLM's buffer (a list of (token ids, int)), a frozen reference model's state dict with
    tied weights, int-keyed dicts and None come back with their types, from JSON + safetensors only."""
    shared = torch.randn(4, 3)
    tree = {
        "buffer": [([1, 2, 3], 4), ([5], 0)],
        "schedule": {"prob": 0.25, "reference": None, "inf": float("inf")},
        "reference": {"embed.weight": shared, "lm_head.weight": shared, "norm": torch.ones(3, dtype=torch.bfloat16)},
        "by_id": {0: "a", 7: (True, 1.5)},
    }
    checkpoint.write_tree(tmp_path, "method", tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["method.json", "method.safetensors"]
    back = checkpoint.read_tree(tmp_path, "method")
    assert back["buffer"] == [([1, 2, 3], 4), ([5], 0)] and isinstance(back["buffer"][0], tuple)
    assert back["schedule"] == tree["schedule"] and back["by_id"] == tree["by_id"]
    for k, v in tree["reference"].items():
        assert torch.equal(back["reference"][k], v) and back["reference"][k].dtype == v.dtype


def test_unsupported_state_names_the_path(tmp_path):
    with pytest.raises(TypeError, match=r"'method/buffer/1': cannot store a set"):
        checkpoint.write_tree(tmp_path, "method", {"buffer": [1, {2}]})
    with pytest.raises(ValueError, match="checkpoint object name 'model'"):
        checkpoint.write_tree(tmp_path, "model", {})


def _tiny(accelerator: Accelerator):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> None:
    model(torch.randn(5, 3)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def test_save_then_load_restores_weights_optimizer_schedule_rng_and_objects(tmp_path):
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer, scheduler = _tiny(accelerator)
    counter = Counter()
    _train_step(model, optimizer, scheduler)
    counter.state = {"n": 3, "buffer": [([1, 2], 2)]}
    objects = {"lr_schedule": scheduler, "method": counter}
    path = checkpoint.save(tmp_path, 1, accelerator, {"tokens": 10}, objects=objects, keep=2)
    assert path == tmp_path / "checkpoints" / "step_00000001"
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "lr_schedule.json", "method.json",
            "state.json"} <= names
    assert not any(n.startswith("custom_checkpoint") or n.startswith(".") for n in names)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    after = _draws()

    _train_step(model, optimizer, scheduler)  # move everything on, then come back
    counter.state = {"n": 99, "buffer": []}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = checkpoint.load(path, accelerator, objects=objects)
    assert state == {"tokens": 10, "step": 1}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr() == [0.005]
    assert counter.state == {"n": 3, "buffer": [([1, 2], 2)]}
    assert _draws() == after


def test_loading_a_checkpoint_runs_no_code_from_it(tmp_path):
    """A pickle that would run code when unpickled is refused (accelerate reads its .bin/.pkl files
    with torch.load(weights_only=True)); the code never runs. The old loader used weights_only=False."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer, scheduler = _tiny(accelerator)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    for victim in ("optimizer.bin", "random_states_0.pkl"):
        path = checkpoint.save(tmp_path / victim, 1, accelerator, {}, objects={}, keep=1)
        torch.save({"state": Payload()}, path / victim)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            checkpoint.load(path, accelerator, objects={})
        assert not marker.exists(), victim
    for py in (ROOT / "src").rglob("*.py"):
        assert not re.search(r"weights_only\s*=\s*False", py.read_text()), py


def test_latest_skips_partial_and_half_replaced_directories(tmp_path):
    """Only `step_<8 digits>` directories count: not the temporary `.tmp_step_*` of a save cut short,
    nor the `step_*.old` that a crash in the middle of a replace leaves behind (it sorts last)."""
    root = tmp_path / "checkpoints"
    for name in ("step_00000005", "step_00000040", ".tmp_step_00000100", "step_00000040.old"):
        (root / name).mkdir(parents=True)
    (root / "step_00000200").write_text("not a directory")
    assert checkpoint.latest(tmp_path) == root / "step_00000040"
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000005", "step_00000040"]
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_keep_prunes_the_oldest(tmp_path):
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    _tiny(accelerator)
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, accelerator, {}, objects={}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + "\n")
    checkpoint.truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    checkpoint.truncate_metrics(tmp_path / "missing.jsonl", 3)  # no file, nothing to do


# --------------------------------------------------------------------------- 2 processes: straight == stopped + resumed

FIT_SCRIPT = """\
import sys
from lmdistill.methods import load_config
from lmdistill.train import fit
fit(load_config(sys.argv[1]), stop_after=int(sys.argv[2]), progress=False)
"""

# How each layout is launched, and what its checkpoint holds that no other layout writes.
LAUNCH = {
    "ddp": (["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"], "model.safetensors"),
    "fsdp": (["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")], "pytorch_model_fsdp.bin"),
    "zero3": (["--config_file", str(ROOT / "configs/accelerate/zero3.yaml")], "pytorch_model"),
}

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
# FSDP on CPU: accelerate 1.15 turns an FSDP launch into FSDP only for GPU-type process groups
# (AcceleratorState sets DistributedType.FSDP inside `if distributed_type in [MULTI_GPU, ...]`, and
# MULTI_CPU is not in it). On CPU there is no error: with Accelerator(cpu=True) the FSDP config is
# ignored and the processes run DDP on gloo (distributed_type MULTI_CPU, a DistributedDataParallel
# model); with cpu=False each process runs alone (DistributedType.NO). Hence the GPU marks, and the
# layout check below, so that a silent fallback to DDP cannot pass for FSDP.
LAYOUTS = [
    "ddp",
    pytest.param("fsdp", marks=two_gpus),
    pytest.param("zero3", marks=[two_gpus, pytest.mark.skipif(
        __import__("importlib").util.find_spec("deepspeed") is None, reason="needs deepspeed")]),
]


def _launch(layout: str, cfg_path: Path, stop_after: int, script: Path) -> None:
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", *LAUNCH[layout][0], str(script), str(cfg_path), str(stop_after)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_resume_exactly(layout, addition_data, tmp_path):
    """2 processes: 6 steps straight == 3 steps, killed, resumed from the step-2 checkpoint, to step 6.

    Both runs stop (`stop_after=6`) before the final model save, so that only checkpoints are
    compared; the checkpoint must have the layout's own files (FSDP shards, DeepSpeed's directory)."""
    script = tmp_path / "fit_stop.py"
    script.write_text(FIT_SCRIPT)
    train = {"steps": 6, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 3}
    runs = {}
    for name in ("straight", "broken"):
        cfg = tiny_run_config(addition_data, tmp_path / name, train=train)
        save_config(cfg, tmp_path / f"{name}.yaml")
        runs[name] = cfg.run_dir
    _launch(layout, tmp_path / "straight.yaml", 6, script)
    _launch(layout, tmp_path / "broken.yaml", 3, script)
    assert [p.name for p in checkpoint.checkpoints(runs["broken"])] == ["step_00000002"]
    assert (runs["broken"] / "checkpoints" / "step_00000002" / LAUNCH[layout][1]).exists()
    assert (runs["broken"] / "checkpoints" / "step_00000002" / "random_states_1.pkl").exists()
    _launch(layout, tmp_path / "broken.yaml", 6, script)

    a, b = read_metrics(runs["straight"]), read_metrics(runs["broken"])
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "grad_norm", "tokens", "flops"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    last = Path("checkpoints") / "step_00000006"
    assert json.loads((runs["straight"] / last / "state.json").read_text()) == json.loads(
        (runs["broken"] / last / "state.json").read_text())
    if layout == "ddp":
        wa, wb = (load_file(str(r / last / "model.safetensors")) for r in runs.values())
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

