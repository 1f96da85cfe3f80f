"""Checkpoints: everything needed to continue a run exactly, on any process layout accelerate runs.

A checkpoint is a directory ``<run_dir>/checkpoints/step_<8 digits>/`` holding

- what ``Accelerator.save_state`` writes for the prepared models (the student, then the method's
  extra modules in the order they were prepared), the optimizer and every process's RNG:
  ``model.safetensors``, ``model_1.safetensors``, ``optimizer.bin``, ``random_states_<rank>.pkl``
  on one process or DDP; ``pytorch_model_fsdp.bin`` and ``optimizer.bin`` under FSDP with
  FULL_STATE_DICT (configs/accelerate/fsdp.yaml), ``pytorch_model_fsdp_<i>/`` directories with
  SHARDED_STATE_DICT; DeepSpeed's own ``pytorch_model/`` under ZeRO;
- ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors) for each object handed in by
  name (the LR schedule, the method's state): written here, not by ``register_for_checkpointing``,
  whose loader (``load_custom_state``) unpickles them in full, able to run code;
- ``state.json``: the loop's counters (step, tokens, flops_*, skipped_nonfinite), written last.

A prepared model's frozen parameters (a LoRA student's base) are left out of its weights file: they are
what the run loads at its start, and a checkpoint of a LoRA run holds its adapters, modules_to_save and
their optimizer state only. Loading such a file checks that it holds every other key of the model.
The teacher is in none of them (frozen, it is not prepared by accelerate even where FSDP shards it;
teachers/engine.py): a resumed run loads it again from `teacher.model`.

Loading executes no code from the files: safetensors and JSON are data, and accelerate (1.15)
reads the optimizer, RNG and GradScaler files, and a ``pytorch_model.bin`` in place of the
safetensors, with ``accelerate.utils.load``: ``torch.load(weights_only=True)`` plus numpy's array
reconstruction for the RNG states; FSDP's full state dicts with ``torch.load(weights_only=True)``.
It unpickles in full only ``custom_checkpoint_<i>.pkl`` of registered objects: none is registered,
and one planted in a checkpoint makes ``load_state`` refuse it (a count mismatch) before reading it.
Outside this module's reach: FSDP's SHARDED_STATE_DICT (DCP reads its ``.metadata`` with plain
``pickle.load``) and DeepSpeed's own loader. tests/test_faults_training.py plants a pickle that runs
code in every file a resume reads.

It is written into a hidden temporary sibling by every process and renamed into place by the
main one, so a crash leaves either the previous checkpoints or the new one complete. Only
``step_<8 digits>`` directories are checkpoints (not ``.tmp_step_*``, ``step_*.old``, ``step_*.corrupt``).
:func:`resume` restores the newest one that loads; one that does not (a truncated file, a bad
``state.json``, a file missing, a pickle refused) is named in a warning and renamed
``step_<N>.corrupt``, and the previous one is tried. A run directory whose every checkpoint is
unreadable is a :class:`CheckpointError` (nothing renamed).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import RNG_STATE_NAME, SAFE_MODEL_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from lmdistill.io import UserError, atomic_replace_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
"""The run directory's subdirectory that holds its checkpoints."""
_NAME = re.compile(r"step_(\d{8})")
# Names accelerate's save_state gives its files, and ours: an object's state may not take them.
_RESERVED = ("state", "model", "pytorch_model", "optimizer", "scheduler", "random_states", "custom_checkpoint",
             "sampler", "scaler", "dl_state_dict")
_MARKERS = ("__tensor__", "__tuple__", "__items__")
CORRUPT = ".corrupt"
"""Suffix a checkpoint that does not load is renamed with (kept for inspection, never picked again)."""
# What reading a damaged checkpoint raises (a truncated or missing file, bad JSON, a refused pickle, a
# state that does not fit); anything else (e.g. out of memory) is not the checkpoint's fault and propagates.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError,
               SafetensorError)


class CheckpointError(UserError, ValueError):
    """No checkpoint of a run directory loads (or one cannot be read); the message names them and how to start over."""


class Stateful(Protocol):
    """What a checkpoint keeps of an object: a `state_dict` of plain data and tensors, and its inverse."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temporary and half-replaced directories excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if _NAME.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save(
    run_dir: Path, step: int, accelerator: Accelerator, state: dict, *, objects: dict[str, Stateful], keep: int
) -> Path:
    """Write the checkpoint of `step` and keep the newest `keep` (all when `keep` <= 0); returns its path.

    Call on every process (FSDP and ZeRO-3 gather or write shards collectively). `state` is the
    loop's JSON counters (saved with `step` added). Every process calls each object's `state_dict`
    (an object may gather from the other processes there); the main process's is saved, so with
    several processes a checkpoint keeps process 0's method state, which every process restores.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    handle = accelerator.register_save_state_pre_hook(_drop_frozen)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        handle.remove()
    trees = {name: obj.state_dict() for name, obj in objects.items()}
    if accelerator.is_main_process:
        for name, tree in trees.items():
            write_tree(tmp, name, tree)
        atomic_write_json(tmp / "state.json", {**state, "step": step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_replace_dir(tmp, final)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(path: Path, accelerator: Accelerator, *, objects: dict[str, Stateful]) -> dict:
    """Restore a checkpoint written by :func:`save` into the prepared models, optimizer, RNG and
    `objects` (the same names as saved); returns its `state` (with `step`). Call on every process.

    A damaged file raises what reading it raised (a note on the exception names the file); what was
    loaded before it is left in place (load another checkpoint over it, as :func:`resume` does).
    """
    path = Path(path)
    state = _noting(path / "state.json", _read_state, path)  # first: cheap, and a bad one fails here
    # accelerate passes over an RNG file it cannot read with a log line only, and the resumed run
    # would then silently diverge: read it once here (weights_only, as accelerate does) so that it raises.
    rng = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    _noting(rng, accelerate_load, rng)
    handle = accelerator.register_load_state_pre_hook(_load_without_frozen)
    try:
        _noting(path, accelerator.load_state, str(path))
    finally:
        handle.remove()
    for name, obj in objects.items():
        _noting(path / f"{name}.json", lambda: obj.load_state_dict(read_tree(path, name)))
    return state


def _frozen(model: torch.nn.Module) -> set[str]:
    """State-dict names of `model`'s parameters that require no gradient (tied names each)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen(models: list[torch.nn.Module], weights: list[dict], _output_dir: str) -> None:
    """accelerate's save pre-hook: leave each model's frozen parameters out of the weights it writes (none are
    listed under FSDP / DeepSpeed, which write their own files)."""
    for model, state in zip(models, weights):
        for name in _frozen(model) & state.keys():
            del state[name]


def _load_without_frozen(models: list[torch.nn.Module], input_dir: str) -> None:
    """accelerate's load pre-hook: when a model has frozen parameters, load the models' weights files here,
    requiring every key but the frozen ones, and take them off accelerate's list (which would require all).
    Models without frozen parameters, or files other than safetensors, are left to accelerate."""
    files = [Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors" for i in range(len(models))]
    if not any(_frozen(m) for m in models) or not all(f.exists() for f in files):
        return
    for model, file in zip(models, files):
        missing, unexpected = load_model(model, file, strict=False)
        wrong = sorted(set(missing) - _frozen(model)) + sorted(unexpected)
        if wrong:
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            raise RuntimeError(f"{file.name} does not fit the model: {', '.join(wrong[:3])}{more} missing or "
                               "unexpected")
    models.clear()


def resume(run_dir: Path, accelerator: Accelerator, *, objects: dict[str, Stateful]) -> dict | None:
    """Restore the newest checkpoint of `run_dir` that loads (see :func:`load`); its state, or None when
    the run has none. Call on every process: they agree on the checkpoint.

    A newer one that does not load on some process (a truncated or missing file, bad JSON, a pickle
    refused by weights-only loading) is named in a warning and renamed ``step_<N>.corrupt`` once an
    older one has loaded; when none loads, :class:`CheckpointError` names them all and nothing is renamed.
    """
    failed: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(run_dir)):
        try:
            state, why = load(path, accelerator, objects=objects), ""
        except _UNREADABLE as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            state, why = None, f"{_where(e, path)}: {_reason(e)}"
        if _on_any_process(accelerator, state is None):
            failed.append((path, why or f"{path.name}: not readable on another process"))
            continue
        if accelerator.is_main_process:
            for bad, reason in failed:
                os.replace(bad, bad.with_name(bad.name + CORRUPT))
                log.warning("checkpoint %s; resuming from %s instead (the damaged one is renamed %s)", reason,
                            path.name, bad.name + CORRUPT)
        accelerator.wait_for_everyone()
        return state
    if failed:
        raise CheckpointError(
            f"no readable checkpoint in {Path(run_dir) / CHECKPOINTS} ({'; '.join(why for _, why in failed)}): "
            "remove the damaged ones to resume from an older one, or set train.resume=false to start over")
    return None


_NOTE = "reading the checkpoint file "


def _noting(where: Path, fn, *args):
    """`fn(*args)`; an exception of a damaged file gets a note naming `where`."""
    try:
        return fn(*args)
    except _UNREADABLE as e:
        e.add_note(f"{_NOTE}{where}")
        raise


def _read_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or state.get("step") != int(_NAME.fullmatch(path.name).group(1)):
        raise ValueError(f"its step is not {int(_NAME.fullmatch(path.name).group(1))}, the directory's")
    return state


def _where(e: BaseException, path: Path) -> str:
    """The checkpoint (and the file of it, when known) an exception of :func:`load` is about."""
    for note in getattr(e, "__notes__", []):
        if note.startswith(_NOTE):
            return str(Path(path.name) / Path(note[len(_NOTE):]).relative_to(path))
    return path.name


def _reason(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):
        # torch's message goes on to say how to load the file without the check: not advice to give here.
        return "holds a pickle with objects other than tensors and plain data, refused (loading it could run code)"
    if isinstance(e, FileNotFoundError):
        return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}, line {e.lineno})"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200].rstrip(':')}" if lines else type(e).__name__


def _on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (every process gets the same answer)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics lines logged past `step` (a resumed run logs them again)."""
    path = Path(path)
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


# --------------------------------------------------------------------------- object states as JSON + safetensors
# A state is a tree of dicts, lists, tuples, str/int/float/bool/None and tensors. Tensors go to
# `<name>.safetensors` under their path in the tree; the JSON holds {"__tensor__": path} in their
# place, {"__tuple__": [...]} for tuples and {"__items__": [[key, value], ...]} for a dict whose
# keys are not all plain strings, so that reading gives back the same types.


def write_tree(directory: Path, name: str, tree: Any) -> None:
    """Write `tree` as `<name>.json` (+ `<name>.safetensors` when it holds tensors) in `directory`."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name.startswith(_RESERVED):
        raise ValueError(f"checkpoint object name {name!r}: an identifier not starting with {', '.join(_RESERVED)}")
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, name)
    if tensors:
        save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    atomic_write_text(Path(directory) / f"{name}.json", json.dumps(encoded) + "\n")


def read_tree(directory: Path, name: str) -> Any:
    """Read back what :func:`write_tree` wrote (tensors on the CPU)."""
    directory = Path(directory)
    blob = directory / f"{name}.safetensors"
    tensors = load_file(str(blob)) if blob.exists() else {}
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def _encode(x: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(x, torch.Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint state: two tensors at {path!r}")
        # A fresh contiguous CPU copy: safetensors refuses tensors that share storage (tied weights).
        tensors[path] = x.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not any(k in _MARKERS for k in x):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in x.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}/key{i}"), _encode(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(x.items())]}
    raise TypeError(f"checkpoint state at {path!r}: cannot store a {type(x).__name__} "
                    "(use dicts, lists, tuples, str/int/float/bool/None and tensors)")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1 and "__tensor__" in x:
        return tensors[x["__tensor__"]]
    if len(x) == 1 and "__tuple__" in x:
        return tuple(_decode(v, tensors) for v in x["__tuple__"])
    if len(x) == 1 and "__items__" in x:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["__items__"]}
    return {k: _decode(v, tensors) for k, v in x.items()}
