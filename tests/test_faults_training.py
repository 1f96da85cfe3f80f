"""Training under faults (issue 14): a diverged run stops, checkpoints load no code, resume picks the
right checkpoint, and a resumed run does not redo (or count twice) work it kept."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmdistill import checkpoint
from lmdistill import train as train_module
from lmdistill.io import UserError
from lmdistill.methods.sft import SFT

from conftest import read_metrics, tiny_run_config

CKPT = Path("checkpoints")


def strict_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: NaN / Infinity (not JSON) raise."""
    def refuse(name: str):
        raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


# --------------------------------------------------------------------------- fault 1: non-finite loss or gradient


def test_diverged_run_stops_at_the_step_and_saves_nothing_from_it(addition_data, tmp_path):
    """train.lr=1e10: the loss is NaN from step 2. The run stops there, naming the step and the last
    finite loss; no checkpoint or model is written from that state; metrics.jsonl is valid JSON."""
    cfg = tiny_run_config(addition_data, tmp_path / "run", train={"steps": 6, "lr": 1e10, "checkpoint_every": 1,
                                                                  "keep_checkpoints": 5})
    with pytest.raises(train_module.NonFiniteLoss, match=r"step (\d+): the loss is (nan|inf|-inf).*last finite loss") as e:
        train_module.fit(cfg, progress=False)
    bad = int(e.value.args[0].split("step ")[1].split(":")[0])
    assert "train.skip_nonfinite" in str(e.value) and "train.lr" in str(e.value)
    assert isinstance(e.value, UserError)  # the CLI's one line, exit 2
    saved = [int(p.name.split("_")[1]) for p in checkpoint.checkpoints(cfg.run_dir)]
    assert saved == list(range(1, bad)), saved
    for step in saved:
        assert all_finite(cfg.run_dir / CKPT / f"step_{step:08d}" / "model.safetensors")
    assert not (cfg.run_dir / "model").exists() and not (cfg.run_dir / "train_summary.json").exists()
    rows = strict_rows(cfg.run_dir)
    assert rows[-1]["step"] == bad and rows[-1]["loss"] is None
    # A rerun resumes the last finite checkpoint and stops at the same step again.
    with pytest.raises(train_module.NonFiniteLoss, match=rf"step {bad}:"):
        train_module.fit(cfg, progress=False)


def _poison(monkeypatch, steps: set[int], where: str) -> None:
    """Make SFT's loss non-finite (`where="loss"`) or its gradient non-finite with a finite loss
    (`where="grad"`: d sqrt(x)/dx at 0 is inf, times 0 is NaN) at the given 0-based steps."""
    original = SFT.loss

    def loss(self, model, batch):
        terms, metrics = original(self, model, batch)
        if self.ctx.step in steps:
            term = terms["ce"]
            if where == "loss":
                term.value = term.value * float("nan")
            else:
                p = next(model.parameters())
                term.value = term.value + torch.sqrt(p.sum() * 0.0)
        return terms, metrics

    monkeypatch.setattr(SFT, "loss", loss)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skip_nonfinite_skips_counts_and_logs_bad_steps(where, addition_data, tmp_path, monkeypatch):
    """train.skip_nonfinite=2: two bad steps are skipped (no update), counted and logged; the model stays
    finite. A third bad step stops the run; skip_nonfinite=0 stops at the first."""
    _poison(monkeypatch, {1, 3}, where)
    cfg = tiny_run_config(addition_data, tmp_path / "skip", train={"steps": 6, "skip_nonfinite": 2})
    train_module.fit(cfg, progress=False)
    rows = strict_rows(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["skipped_nonfinite"] for r in rows] == [0, 1, 1, 2, 2, 2]
    if where == "loss":
        assert rows[1]["loss"] is None and rows[3]["loss"] is None
    else:
        assert rows[1]["grad_norm"] is None and rows[1]["loss"] is not None
    assert all(r["loss"] is not None for i, r in enumerate(rows) if i not in (1, 3))
    assert all_finite(cfg.run_dir / "model" / "model.safetensors")
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert summary["final"]["skipped_nonfinite"] == 2

    # A skipped step makes no update: the weights after step 2 are those after step 1.
    one = tiny_run_config(addition_data, tmp_path / "one", train={"steps": 6, "skip_nonfinite": 2, "checkpoint_every": 1,
                                                                  "keep_checkpoints": 3})
    train_module.fit(one, stop_after=3, progress=False)
    w1, w2, w3 = (load_file(str(one.run_dir / CKPT / f"step_{s:08d}" / "model.safetensors")) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and not all(torch.equal(w2[k], w3[k]) for k in w2)

    _poison(monkeypatch, {1, 2, 3}, where)
    three = tiny_run_config(addition_data, tmp_path / "three", train={"steps": 6, "skip_nonfinite": 2})
    with pytest.raises(train_module.NonFiniteLoss, match=r"step 4: .*3 non-finite steps.*train.skip_nonfinite=2"):
        train_module.fit(three, progress=False)
    none = tiny_run_config(addition_data, tmp_path / "none", train={"steps": 6})
    with pytest.raises(train_module.NonFiniteLoss, match=r"step 2: .*last finite loss [0-9.]+ at step 1"):
        train_module.fit(none, progress=False)


def test_skip_nonfinite_is_a_documented_key():
    from lmdistill.config import describe

    doc = {key: text for key, _, text in describe()}
    assert "train.skip_nonfinite" in doc and "non-finite" in doc["train.skip_nonfinite"]
    from lmdistill.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train.skip_nonfinite"):
        tiny_run_config(Path("x.jsonl"), Path("out"), train={"skip_nonfinite": -1})


# --------------------------------------------------------------------------- fault 2: loading runs no code


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


# Every file a resume reads, and files accelerate would read if they were there (another layout, a
# registered object, a GradScaler), and the old loader's method.pt.
PLANTED = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "lr_schedule.json", "method.json",
           "state.json", "pytorch_model.bin", "custom_checkpoint_0.pkl", "scheduler.bin", "scaler.pt", "method.pt",
           "sampler.bin", "method.safetensors"]


@pytest.mark.parametrize("victim", PLANTED)
def test_a_planted_pickle_never_runs_on_resume(victim, addition_data, tmp_path):
    """A pickle whose loading runs code, planted in a checkpoint, is refused (the run stops with a
    clear error, nothing resumed from it) or never read; its code does not run."""
    cfg = tiny_run_config(addition_data, tmp_path / "run", train={"steps": 4, "checkpoint_every": 2})
    train_module.fit(cfg, stop_after=2, progress=False)
    ckpt = cfg.run_dir / CKPT / "step_00000002"
    marker = tmp_path / "ran"
    if victim == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()  # accelerate then reads the .bin instead
    torch.save({"state": Payload(marker)}, ckpt / victim)
    try:
        train_module.fit(cfg, progress=False)
    except Exception as e:  # refused: must say which checkpoint and why, in one line
        assert "step_00000002" in str(e) and "\n" not in str(e), e
    else:  # ignored: the run went on from the checkpoint
        assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2, 3, 4]
    assert not marker.exists()


# --------------------------------------------------------------------------- fault 4: the right checkpoint


def test_resume_false_moves_an_older_run_out_of_the_way(addition_data, tmp_path, capsys):
    """train.resume=false in a directory holding an older run that got further (step 12): the old run is
    moved to previous/ (said so), the new run keeps its own checkpoints, and a rerun resumes the new run."""
    train = {"steps": 16, "checkpoint_every": 4, "keep_checkpoints": 1, "resume": False}
    old = tiny_run_config(addition_data, tmp_path / "run", train=train)
    train_module.fit(old, stop_after=13, progress=False)
    assert [p.name for p in checkpoint.checkpoints(old.run_dir)] == ["step_00000012"]
    capsys.readouterr()

    new = tiny_run_config(addition_data, tmp_path / "run", train=train)
    train_module.fit(new, stop_after=6, progress=False)
    out = capsys.readouterr()
    assert f"moved to {new.run_dir / 'previous'}" in out.out + out.err
    assert [p.name for p in checkpoint.checkpoints(new.run_dir)] == ["step_00000004"]
    assert [p.name for p in checkpoint.checkpoints(new.run_dir / "previous")] == ["step_00000012"]
    assert [r["step"] for r in read_metrics(new.run_dir / "previous")] == list(range(1, 14))
    assert [r["step"] for r in read_metrics(new.run_dir)] == list(range(1, 7))

    again = tiny_run_config(addition_data, tmp_path / "run", train={**train, "resume": True})
    train_module.fit(again, progress=False)
    assert [r["step"] for r in read_metrics(new.run_dir)] == list(range(1, 17))
    straight = tiny_run_config(addition_data, tmp_path / "straight", train={"steps": 16})
    train_module.fit(straight, progress=False)
    assert [r["loss"] for r in read_metrics(straight.run_dir)] == [r["loss"] for r in read_metrics(new.run_dir)]


@pytest.mark.parametrize("damage", ["truncated weights", "bad state.json", "missing optimizer"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(damage, addition_data, tmp_path, caplog):
    """The newest checkpoint damaged: a warning names it, it is moved aside (never picked again), the
    run resumes from the previous complete one and continues exactly; a `step_N.old` leftover is never picked."""
    train = {"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2}
    cfg = tiny_run_config(addition_data, tmp_path / "run", train=train)
    train_module.fit(cfg, stop_after=6, progress=False)
    root = cfg.run_dir / CKPT
    assert [p.name for p in checkpoint.checkpoints(cfg.run_dir)] == ["step_00000004", "step_00000006"]
    shutil.copytree(root / "step_00000004", root / "step_00000009.old")  # a leftover that sorts last
    newest = root / "step_00000006"
    if damage == "truncated weights":
        blob = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif damage == "bad state.json":
        (newest / "state.json").write_text('{"step": 6, "tok')
    else:
        (newest / "optimizer.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="lmdistill.checkpoint"):
        train_module.fit(cfg, progress=False)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "step_00000006" in warned and "step_00000004" in warned, warned
    assert (root / "step_00000006.corrupt").is_dir()
    straight = tiny_run_config(addition_data, tmp_path / "straight", train={"steps": 8})
    train_module.fit(straight, progress=False)
    a, b = read_metrics(straight.run_dir), read_metrics(cfg.run_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_no_readable_checkpoint_is_one_clear_error(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run", train={"steps": 4, "checkpoint_every": 2})
    train_module.fit(cfg, stop_after=2, progress=False)
    (cfg.run_dir / CKPT / "step_00000002" / "state.json").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in .*train.resume=false"):
        train_module.fit(cfg, progress=False)


def test_rerunning_a_finished_run_keeps_its_summary(addition_data, tmp_path):
    """A finished run run again is left as it is (its summary's final numbers are not replaced by {});
    a run whose last checkpoint is its last step but which died before its summary writes the summary
    from its logged numbers."""
    cfg = tiny_run_config(addition_data, tmp_path / "run", train={"steps": 4, "checkpoint_every": 4})
    first = train_module.fit(cfg, progress=False)
    summary = cfg.run_dir / "train_summary.json"
    before = json.loads(summary.read_text())
    assert before["final"]["step"] == 4
    weights = (cfg.run_dir / "model" / "model.safetensors").stat().st_mtime_ns
    again = train_module.fit(cfg, progress=False)
    assert json.loads(summary.read_text()) == before
    assert (cfg.run_dir / "model" / "model.safetensors").stat().st_mtime_ns == weights
    assert again.step == 4 and again.metrics == first.metrics
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2, 3, 4]

    summary.unlink()  # died between the last checkpoint and the summary
    train_module.fit(cfg, progress=False)
    assert json.loads(summary.read_text())["final"] == before["final"]


# --------------------------------------------------------------------------- fault 8: a resume does not redo kept work


@pytest.mark.parametrize("method", [{"name": "seqkd", "max_new_tokens": 6},
                                    {"name": "dpkd", "max_new_tokens": 4, "chosen": "teacher"}])
def test_teacher_outputs_survive_a_resume(method, data, teacher_dir, tmp_path):
    """84 training rows, batch 8: steps 11-14 see prompts of the first epoch again, whose teacher outputs
    a straight run kept. A run stopped after step 12 and resumed must not generate them again: the same
    FLOPs (cumulative, every step) and losses as the straight run."""
    teacher = {"kind": "local", "model": {"path": str(teacher_dir)}}
    straight = tiny_run_config(data, tmp_path / "a", teacher=teacher, method=method, train={"steps": 14})
    train_module.fit(straight, progress=False)
    broken = tiny_run_config(data, tmp_path / "b", teacher=teacher, method=method,
                             train={"steps": 14, "checkpoint_every": 12})
    train_module.fit(broken, stop_after=12, progress=False)
    train_module.fit(broken, progress=False)
    a, b = read_metrics(straight.run_dir), read_metrics(broken.run_dir)
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [r["flops_other"] for r in a] == [r["flops_other"] for r in b]
    assert [r["flops"] for r in a] == [r["flops"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


def test_kd_on_rows_the_cache_does_not_hold_stops_before_step_one(data, teacher_dir, tmp_path):
    """A top-k cache built from half the rows, a kd run on all of them: refused before anything is
    written, naming the cache, how many rows are missing and the first one."""
    from lmdistill.cache_teacher import build_cache
    from lmdistill.teachers.cache import CacheMiss

    half = tmp_path / "half.jsonl"
    half.write_text("".join(data.read_text().splitlines(keepends=True)[:48]))
    teacher = {"kind": "local", "model": {"path": str(teacher_dir)}, "cache": str(tmp_path / "cache"), "k": 4}
    build_cache(tiny_run_config(half, tmp_path / "c", teacher=teacher, method={"name": "kd"}), progress=False)
    cfg = tiny_run_config(data, tmp_path / "run", teacher={**teacher, "kind": "cache"}, method={"name": "kd"})
    with pytest.raises(CacheMiss, match=rf"of the \d+ training rows are not in the top-k cache {tmp_path / 'cache'}.*"
                                        r"first: .*train.jsonl:\d+"):
        train_module.fit(cfg, progress=False)
    assert not cfg.run_dir.exists()


FIT_SCRIPT = """\
import sys
from lmdistill.methods import load_config
from lmdistill.train import fit
fit(load_config(sys.argv[1]), stop_after=int(sys.argv[2]), progress=False)
"""


def test_two_processes_keep_every_process_teacher_outputs(data, teacher_dir, tmp_path):
    """2 processes (DDP on CPU), seqkd: each process generates the outputs of its share of the prompts, and
    the checkpoint (process 0's method state) holds both processes' outputs, so that the run resumed after
    step 12 generates nothing the straight run (same checkpoints) did not: the same FLOPs and losses."""
    import os
    import subprocess
    import sys

    from lmdistill.config import save_config

    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    teacher = {"kind": "local", "model": {"path": str(teacher_dir)}}
    runs = {}
    for name in ("straight", "broken"):
        cfg = tiny_run_config(data, tmp_path / name, teacher=teacher, method={"name": "seqkd", "max_new_tokens": 6},
                              train={"steps": 14, "checkpoint_every": 12})
        save_config(cfg, tmp_path / f"{name}.yaml")
        runs[name] = cfg.run_dir
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    for name, stop in (("straight", 14), ("broken", 12), ("broken", 14)):
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(script), str(tmp_path / f"{name}.yaml"), str(stop)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_metrics(runs["straight"]), read_metrics(runs["broken"])
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [r["flops"] for r in a] == [r["flops"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
