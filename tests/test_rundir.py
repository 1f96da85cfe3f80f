"""lmdistill.rundir: what makes a run directory, finished or not, and reading its files back."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmdistill.config import ConfigError, save_config, to_dict
from lmdistill.rundir import (
    LOCK,
    InUse,
    RunDirError,
    check_same_config,
    claim,
    find_runs,
    flatten,
    has_training,
    is_finished,
    is_run_dir,
    read_config,
    read_eval,
    read_metrics,
    read_summary,
    run_name,
    short_keys,
)

from lmdistill.train import fit

from conftest import tiny_run_config

SRC = str(Path(__file__).resolve().parent.parent / "src")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path → bytes): what a refused run must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class LockHolder:
    """Another process that holds `directory`'s run lock (rundir.FileLock) until stopped."""

    def __init__(self, directory: Path) -> None:
        code = ("import sys, time; from lmdistill.rundir import FileLock, LOCK; from pathlib import Path; "
                "lock = FileLock(Path(sys.argv[1]) / LOCK, busy='held'); print('locked', flush=True); time.sleep(60)")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE,
                                        text=True, env={"PYTHONPATH": SRC, "PATH": ""})

    def __enter__(self) -> "LockHolder":
        assert self.process.stdout.readline().strip() == "locked"
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def test_a_run_directory_and_its_stages(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not is_run_dir(run) and not is_finished(run) and not has_training(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": 1, "lr": 0.1}, "data": {"mods": ["a", "b"]}}))
    assert is_run_dir(run) and not has_training(run)
    assert flatten(read_config(run)) == {"train.seed": 1, "train.lr": 0.1, "data.mods": ("a", "b")}
    (run / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert has_training(run) and not is_finished(run)
    assert read_metrics(run) == read_metrics(run / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert read_eval(run) is None and read_summary(run) is None
    (run / "train_summary.json").write_text(json.dumps({"final": {"flops": 3.0}}))
    (run / "eval.json").write_text(json.dumps({"heldout_ce": 1.5}))
    assert is_finished(run) and read_summary(run)["final"]["flops"] == 3.0 and read_eval(run) == {"heldout_ce": 1.5}


def test_bad_files_are_errors_that_name_file_and_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunDirError, match="not a run directory"):
        read_config(run)
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunDirError, match="top level must be a mapping"):
        read_config(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('[1, 2]\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:1: expected a JSON object"):
        read_metrics(run)
    (run / "eval.json").write_text('{\n"a": }')
    with pytest.raises(RunDirError, match=r"eval.json:2: not valid JSON"):
        read_eval(run)


def test_find_runs_in_a_sweep_directory(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "config.yaml").write_text("{}")
    (tmp_path / "sweep" / "not_a_run").mkdir()
    runs = find_runs([tmp_path / "sweep", tmp_path / "sweep" / "a"])
    assert runs == [tmp_path / "sweep" / "a", tmp_path / "sweep" / "b"]  # sorted, each once
    with pytest.raises(RunDirError, match="holds none"):
        find_runs([tmp_path / "sweep" / "not_a_run"])


def test_names_and_short_keys():
    assert short_keys(["method.name", "train.seed", "student.n_layer", "teacher.model.n_layer"]) == {
        "method.name": "method", "train.seed": "seed", "student.n_layer": "student.n_layer",
        "teacher.model.n_layer": "teacher.model.n_layer"}
    assert run_name({"method.alpha": "0.5", "train.seed": "1"}) == "alpha=0.5__seed=1"
    assert run_name({}) == "run"


def test_check_same_config(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "run")
    check_same_config(cfg)  # no directory yet
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    check_same_config(cfg)
    other = tiny_run_config(addition_data, tmp_path / "run", train={"lr": 1e-4})
    with pytest.raises(ConfigError, match="different config.*train.lr"):
        check_same_config(other)


def test_run_refuses_another_config_before_writing_anything(addition_data, tmp_path):
    """`run` on a directory made with another config stops before anything is written, config.yaml
    included, and says how to start over (issue 14, fault 3)."""
    first = tiny_run_config(addition_data, tmp_path / "run")
    first.run_dir.mkdir()
    save_config(first, first.run_dir / "config.yaml")
    (first.run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(first.run_dir)
    other = tiny_run_config(addition_data, tmp_path / "run", train={"lr": 1e-4}, student={"n_embd": 64})
    with pytest.raises(ConfigError, match=r"different config \(.*train.lr.*\); to start over, remove it .*output_dir="):
        fit(other, progress=False)
    assert snapshot(first.run_dir) == {**before, LOCK: (first.run_dir / LOCK).read_bytes()}
    claim(tiny_run_config(addition_data, tmp_path / "run", train={"resume": False}))  # resume= is no other config


def test_a_directory_another_process_holds_is_refused_at_once(addition_data, tmp_path):
    """Two runs on one directory: the second stops at once, naming the holder (issue 14, fault 3)."""
    cfg = tiny_run_config(addition_data, tmp_path / "run")
    cfg.run_dir.mkdir()
    with LockHolder(cfg.run_dir) as holder:
        started = time.monotonic()
        with pytest.raises(InUse, match=f"{cfg.run_dir} is in use by another lmdistill run.*output_dir=DIR.*"
                                        f"process {holder.process.pid}"):
            fit(cfg, progress=False)
        assert time.monotonic() - started < 2.0  # before data, teacher or model are loaded
        assert not (cfg.run_dir / "config.yaml").exists()
    claim(cfg, create=True)  # the holder is gone: free again (a kill releases a flock)
    assert (cfg.run_dir / LOCK).read_text().strip() == str(os.getpid())


def test_this_process_keeps_its_claim_and_a_fresh_directory_is_created_only_when_asked(addition_data, tmp_path):
    cfg = tiny_run_config(addition_data, tmp_path / "new")
    claim(cfg)
    assert not cfg.run_dir.exists()  # nothing is created before the run's inputs are checked
    claim(cfg, create=True)
    claim(cfg, create=True)  # the same process again: no conflict with itself
    assert (cfg.run_dir / LOCK).exists()
    other = subprocess.run([sys.executable, "-c", "import sys; from lmdistill.rundir import FileLock; "
                            "FileLock(sys.argv[1], busy='busy')", str(cfg.run_dir / LOCK)],
                           capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": ""}, timeout=60)
    assert other.returncode == 1 and f"InUse: busy (process {os.getpid()})" in other.stderr  # held by this one
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        claim(tiny_run_config(addition_data, tmp_path / "file"), create=True)
