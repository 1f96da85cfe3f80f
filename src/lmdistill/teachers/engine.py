"""The teacher under the training engine: placed on a device of its own, or sharded as the student is.

- **Placed** (`teacher.device`, e.g. ``cuda:1`` or ``cpu``): a local teacher's model lives on that
  device; an accelerate ``AlignDevicesHook`` moves every forward's inputs there and its outputs back
  to the inputs' device, so every caller (the teacher's own methods, a method reading its hidden
  states, teacher-mixed sampling) works unchanged. KV caches (``past_key_values``) stay on the teacher.
- **Sharded** (an `accelerate launch` with configs/accelerate/fsdp.yaml): every local teacher model is
  split with FSDP2's ``fully_shard`` over the processes of the run, each decoder layer a unit and the
  rest (embeddings, final norm, head) the root. Each process keeps 1/world of every parameter; a
  forward all-gathers one unit at a time and frees it after (``reshard_after_forward`` everywhere,
  the root too: a frozen teacher has no backward, where FSDP would otherwise free the root's
  gathered parameters). The plugin's CPU offload and mixed-precision policy apply as they do to the
  student. Under DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml) ``deepspeed.initialize``
  partitions it instead, as TRL prepares its reference and teacher models (not run here: it needs
  deepspeed and GPUs).

Every forward of a sharded teacher is a collective: each process must run the same number of them.
A training step does (one teacher forward per micro-batch on every process); a generation loop does
not (each process decodes its own number of steps), so methods that generate with the teacher's model
refuse a sharded teacher before step 1 (:attr:`~lmdistill.teachers.base.Needs.generates`).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from accelerate import Accelerator
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
from transformers import PreTrainedModel

from lmdistill.config import ConfigError
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.mixture import MixtureTeacher

FSDP, ZERO3 = "fsdp", "zero3"


def placement(device: str | None, default: torch.device) -> torch.device:
    """The device `teacher.device` names (`default` when empty), checked to exist on this machine."""
    if not device:
        return default
    placed = torch.device(device)
    if placed.type == "cuda":
        count = torch.cuda.device_count()
        index = placed.index or 0
        if index >= count:
            have = f"GPUs cuda:0..cuda:{count - 1}" if count > 1 else ("one GPU (cuda:0)" if count else "no GPU")
            raise ConfigError(f"teacher.device={device}: this machine has {have}")
    elif placed.type != "cpu":
        raise ConfigError(f"teacher.device={device}: expected cpu, cuda or cuda:N")
    return placed


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` moved to `device`; its forward then takes inputs on any device and returns its outputs on the
    inputs' device (a KV cache excepted: it stays on `device`). In place; returns `model`."""
    model.to(device)
    add_hook_to_module(model, AlignDevicesHook(execution_device=device, io_same_device=True,
                                               skip_keys="past_key_values"))
    return model


def teacher_sharding(accelerator: Accelerator) -> str | None:
    """How the run's engine shards a local teacher: ``"fsdp"`` (FSDP2), ``"zero3"`` (DeepSpeed ZeRO-3), or None
    (one process, DDP, ZeRO-1/2: every process holds the whole teacher, on its device or `teacher.device`)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("the teacher is sharded with FSDP2 (fully_shard); set fsdp_version: 2 in the accelerate "
                              "config, as configs/accelerate/fsdp.yaml does")
        return FSDP
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return ZERO3
    return None


def shard_teacher(teacher: Teacher | None, accelerator: Accelerator, how: str | None) -> Teacher | None:
    """`teacher` with every local model sharded across the processes as `how` says (:func:`teacher_sharding`'s
    answer, asked once per run); unchanged for None, or where nothing of the teacher runs here (a cache, a server).

    Call on every process, after the student is prepared (DeepSpeed's configuration is complete only then),
    with the teacher's models still on the CPU: ``fully_shard`` moves each unit to the process's device as it
    shards it, so no process ever holds the whole teacher on its GPU.
    """
    if teacher is None or how is None:
        return teacher
    members = teacher.members if isinstance(teacher, MixtureTeacher) else [teacher]
    for local in members:
        if isinstance(local, LocalTeacher):
            if how == FSDP:
                fsdp2_shard(local.weights, accelerator)
            else:
                local.engine = zero3_shard(local.weights, accelerator)
            local.sharded = True
    return teacher


def fsdp2_shard(model: PreTrainedModel, accelerator: Accelerator) -> PreTrainedModel:
    """`model` (frozen) sharded in place with FSDP2 over the accelerator's processes: each class its
    ``_no_split_modules`` names (the decoder layers) a unit, the root holding the rest; returns `model`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    # fsdp_cpu_ram_efficient_loading: only process 0's weights count (accelerate's loading of the student; the
    # others' may be placeholders). Shard on the meta device, then send process 0's weights, each process keeping
    # its shard. Non-persistent buffers (rotary frequencies) are in no state dict: each process keeps its own.
    from_first = plugin.cpu_ram_efficient_loading
    if from_first:
        full = model.state_dict()
        buffers = {name: b for name, b in model.named_buffers() if name not in full}
        model.to("meta")
    mesh = accelerator.torch_device_mesh
    kwargs = {
        "reshard_after_forward": True,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    layers = set(model._no_split_modules or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if from_first:
        fsdp2_load_full_state_dict(accelerator, model, full, cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy))
        for name, b in buffers.items():
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(leaf, b.to(accelerator.device), persistent=False)
        model.tie_weights()  # loading assigned the tied head and embedding one by one
    return model


def zero3_shard(model: PreTrainedModel, accelerator: Accelerator) -> torch.nn.Module:
    """`model` (frozen) partitioned in place by DeepSpeed ZeRO-3 with the run's DeepSpeed configuration, without
    optimizer; returns DeepSpeed's engine, which holds the partitioning (keep it as long as the model).
    Unverified here: it needs deepspeed and GPUs."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config asks for DeepSpeed ZeRO-3, and deepspeed is not installed: "
                          "pip install deepspeed (GPUs only), or launch with configs/accelerate/fsdp.yaml")
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.eval()
