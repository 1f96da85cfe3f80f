"""The teacher under the engine: sharded by FSDP2 across 2 processes (gloo, CPU), or placed by `teacher.device`.

accelerate runs an FSDP launch on CPU as DDP (tests/test_checkpoint.py says why), so the 2-process test
sets on the accelerator's state what accelerate sets for an FSDP launch on GPUs (distributed_type FSDP,
an FSDP2 plugin) and then shards the teacher with lmdistill's own code (teachers/engine.py), which reads nothing else.
(A whole `fit` with that state patched in is no test: accelerate's own checkpoint and save paths read
what its Accelerator decided at construction.) Each
process must hold half of the teacher's parameters, and the sharded teacher's logits (every position,
and a window), top-k, scores and the KD loss on them must equal the unsharded teacher's in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmdistill.config import ConfigError, ModelConfig, build, save_config
from lmdistill.data import collate, encode_rows
from lmdistill.losses import LOSSES, prediction_mask
from lmdistill.methods import method_rows
from lmdistill.models import load_model, load_tokenizer, save_model
from lmdistill.teachers import CapabilityError, Needs, Capability, check_needs
from lmdistill.teachers.engine import zero3_shard
from lmdistill.teachers.load import load_teacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

TEACHER = ModelConfig(tokenizer="char", n_layer=2, n_embd=32, n_head=2, max_position=64)
STUDENT_SEED = 7

SHARD_SCRIPT = """\
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from lmdistill.methods import load_config
from lmdistill.models import load_tokenizer
from lmdistill.teachers.engine import shard_teacher, teacher_sharding
from lmdistill.teachers.load import load_teacher
sys.path.insert(0, sys.argv[3])
from test_teacher_engine import batch_of, outputs

cfg, out, from_first = load_config(sys.argv[1]), Path(sys.argv[2]), sys.argv[4] == "1"
acc = Accelerator(cpu=True)
assert acc.distributed_type == DistributedType.MULTI_CPU and acc.num_processes == 2
# What AcceleratorState sets for an FSDP launch on GPUs (and skips on CPU); the variables are what
# `accelerate launch` exports for fsdp_cpu_ram_efficient_loading: true (transformers reads them).
acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=from_first)
if from_first:
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
tok = load_tokenizer(cfg.student)
teacher = load_teacher(cfg.teacher, tok, torch.device("cpu"))
if from_first and acc.process_index == 1:  # only process 0's weights count: the others' may be placeholders
    with torch.no_grad():
        for p in teacher.weights.parameters():
            p.zero_()
shard_teacher(teacher, acc, teacher_sharding(acc))
params = list(teacher.weights.parameters())
info = {"sharded": teacher.sharded, "dtensors": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() for p in params), "global": sum(p.numel() for p in params)}
save_file(outputs(teacher, cfg, batch_of(cfg, tok)), str(out / f"rank{acc.process_index}.safetensors"))
(out / f"rank{acc.process_index}.json").write_text(json.dumps(info))
"""


def batch_of(cfg, tok) -> dict[str, torch.Tensor]:
    """The first 4 training rows of the run, collated as the loop collates them."""
    rows, _ = method_rows(cfg)
    return collate(encode_rows(tok, rows[:4], max_length=cfg.data.max_length), tok.pad_token_id)


def outputs(teacher, cfg, batch) -> dict[str, torch.Tensor]:
    """What a method asks of a teacher, on `batch`: logits (all positions and the last 6), top-5, scores,
    and the forward KL of a fixed student (seed 7) to it."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = teacher.logits(ids, am)
    top = teacher.topk(ids, am, 5)
    student = load_model(cfg.student, seed=STUDENT_SEED).eval()
    with torch.no_grad():
        student_logits = student(input_ids=ids, attention_mask=am).logits
    kd = LOSSES["fkl"](student_logits, logits, prediction_mask(batch["labels"]))
    return {"logits": logits.contiguous(), "window": teacher.logits(ids, am, slice(-6, None)).contiguous(),
            "topk_ids": top.ids.contiguous(), "topk_logprobs": top.logprobs.contiguous(),
            "score": teacher.score(ids, am).contiguous(), "kd": kd.reshape(1)}


@pytest.fixture
def teacher_dir(tmp_path) -> Path:
    """A random 2-layer, 32-wide Llama with the character tokenizer, saved as a Hugging Face directory."""
    tok = load_tokenizer(TEACHER)
    save_model(load_model(TEACHER, tok, seed=11), tok, tmp_path / "teacher")
    return tmp_path / "teacher"


def kd_config(data, out, teacher_dir, **teacher):
    return tiny_run_config(data, out, method={"name": "kd"},
                           teacher={"kind": "local", "model": {"path": str(teacher_dir)}, **teacher})


@pytest.mark.parametrize("from_first", [False, True], ids=["each-loads", "cpu-ram-efficient"])
def test_fsdp_shards_the_teacher_across_two_processes(from_first, addition_data, teacher_dir, tmp_path):
    """With fsdp_cpu_ram_efficient_loading the shards are sent from process 0's weights (the other's are zeroed)."""
    cfg = kd_config(addition_data, tmp_path / "run", teacher_dir)
    save_config(cfg, tmp_path / "run.yaml")
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), str(tmp_path / "run.yaml"), str(tmp_path), str(Path(__file__).parent),
           str(int(from_first))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    tok = load_tokenizer(cfg.student)
    reference = outputs(load_teacher(cfg.teacher, tok, torch.device("cpu")), cfg, batch_of(cfg, tok))
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = sum(p.numel() for p in load_model(build(ModelConfig, {"path": str(teacher_dir)})).parameters())
    for info in infos:
        assert info["sharded"] and info["dtensors"] and info["global"] == total
        assert abs(info["local"] - total / 2) <= 0.02 * total, (info, total)  # dim-0 halves of odd sizes differ by a row
    assert sum(i["local"] for i in infos) == total
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert got.keys() == reference.keys()
        for key, want in reference.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {key}")
    assert reference["kd"].item() > 1e-3  # a student that differs from the teacher: the comparison is not of zeros


def test_teacher_device_cpu_equals_the_default(addition_data, teacher_dir, tmp_path):
    """teacher.device=cpu places the teacher through accelerate's device hook: the same KD run, loss for loss."""
    runs = {}
    for name, extra in (("default", {}), ("placed", {"device": "cpu"})):
        cfg = kd_config(addition_data, tmp_path / name, teacher_dir, **extra)
        fit(cfg, progress=False)
        runs[name] = read_metrics(cfg.run_dir)
    assert [r["loss"] for r in runs["default"]] == [r["loss"] for r in runs["placed"]]
    assert [r["flops"] for r in runs["default"]] == [r["flops"] for r in runs["placed"]]
    placed = load_teacher(kd_config(addition_data, tmp_path / "x", teacher_dir, device="cpu").teacher,
                          load_tokenizer(TEACHER), torch.device("cpu"))
    assert placed.weights._hf_hook.execution_device == torch.device("cpu")
    # Generation (the teacher's own device, a KV cache on it) goes through the hooked forward too.
    assert placed.generate(["1+1"], max_new_tokens=4) == load_teacher(
        kd_config(addition_data, tmp_path / "y", teacher_dir).teacher, load_tokenizer(TEACHER),
        torch.device("cpu")).generate(["1+1"], max_new_tokens=4)


def test_teacher_device_places_every_mixture_member(addition_data, teacher_dir, tmp_path):
    mixture = {"kind": "mixture", "mixture": [{"path": str(teacher_dir), "weight": 1.0},
                                              {"path": str(teacher_dir), "weight": 3.0}]}
    tok = load_tokenizer(TEACHER)
    plain, placed = (load_teacher(tiny_run_config(addition_data, tmp_path / n, teacher={**mixture, **extra}).teacher,
                                  tok, torch.device("cpu")) for n, extra in (("a", {}), ("b", {"device": "cpu"})))
    assert all(m.weights._hf_hook.execution_device == torch.device("cpu") for m in placed.members)
    batch = batch_of(tiny_run_config(addition_data, tmp_path / "c"), tok)
    torch.testing.assert_close(placed.logits(batch["input_ids"], batch["attention_mask"]),
                               plain.logits(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)


def test_teacher_device_refusals(addition_data, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="teacher.device places a local teacher .* not teacher.kind=server"):
        tiny_run_config(addition_data, tmp_path / "s", teacher={"kind": "server", "base_url": "http://127.0.0.1:1/v1",
                                                                "device": "cpu"})
    with pytest.raises(ConfigError, match="teacher.device='gpu one': expected a device such as cpu, cuda or cuda:1"):
        kd_config(addition_data, tmp_path / "g", teacher_dir, device="gpu one")
    missing = f"cuda:{torch.cuda.device_count()}"
    cfg = kd_config(addition_data, tmp_path / "m", teacher_dir, device=missing)
    with pytest.raises(ConfigError, match=f"teacher.device={missing}: this machine has"):
        fit(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_a_sharded_teacher_refuses_methods_that_generate_with_it(addition_data, teacher_dir, tmp_path):
    teacher = load_teacher(kd_config(addition_data, tmp_path / "r", teacher_dir).teacher, load_tokenizer(TEACHER),
                           torch.device("cpu"))
    generates = Needs(Capability.TEXT, weights="method.source=teacher generates with a local teacher", generates=True)
    check_needs("seqkd", generates, teacher)  # replicated: fine
    check_needs("kd", Needs(Capability.FULL), teacher, sharded=True)  # forwards only: fine
    with pytest.raises(CapabilityError, match="'seqkd' generates with the teacher's model .* sharded across the "
                                              "processes"):
        check_needs("seqkd", generates, teacher, sharded=True)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_zero3_without_deepspeed_is_a_clear_error(teacher_dir):
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3, and deepspeed is not installed"):
        zero3_shard(load_model(build(ModelConfig, {"path": str(teacher_dir)})), accelerator=None)
