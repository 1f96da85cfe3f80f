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
- ``state.json``: the loop's counters (step, tokens, flops_*), written last.

Loading executes no code from the files: safetensors and JSON are data, and accelerate reads the
optimizer and RNG files with ``torch.load(weights_only=True)`` (its ``accelerate.utils.load``), as
it does FSDP's full state dicts. Outside this module's reach: FSDP's SHARDED_STATE_DICT (DCP reads
its ``.metadata`` with plain ``pickle.load``) and DeepSpeed's own loader.

It is written into a hidden temporary sibling by every process and renamed into place by the
main one, so a crash leaves either the previous checkpoints or the new one complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import RNG_STATE_NAME
from safetensors.torch import load_file, save_file

from lmdistill.io import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text

_NAME = re.compile(r"step_(\d{8})")
# Names accelerate's save_state gives its files, and ours: an object's state may not take them.
_RESERVED = ("state", "model", "pytorch_model", "optimizer", "scheduler", "random_states", "custom_checkpoint",
             "sampler", "scaler", "dl_state_dict")
_MARKERS = ("__tensor__", "__tuple__", "__items__")


class Stateful(Protocol):
    """What a checkpoint keeps of an object: a `state_dict` of plain data and tensors, and its inverse."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temporary and half-replaced directories excluded)."""
    root = Path(run_dir) / "checkpoints"
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
    loop's JSON counters (saved with `step` added); `objects` are saved from the main process,
    so with several processes a checkpoint keeps process 0's method state, which every process
    restores.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, obj in objects.items():
            write_tree(tmp, name, obj.state_dict())
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
    `objects` (the same names as saved); returns its `state` (with `step`). Call on every process."""
    path = Path(path)
    # accelerate passes over an RNG file it cannot read with a log line only, and the resumed run
    # would then silently diverge: read it once here (weights_only, as accelerate does) so that it raises.
    accelerate_load(path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")
    accelerator.load_state(str(path))
    for name, obj in objects.items():
        obj.load_state_dict(read_tree(path, name))
    return json.loads((path / "state.json").read_text())


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
