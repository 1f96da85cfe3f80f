"""The one training loop. Every method runs on it; a method supplies sequences and a loss.

Read top to bottom: set-up, resume, then per optimizer step: take the step's global batch, split
it into accumulation micro-batches and processes, let the method make its sequences, count the
trained tokens of the whole step (all micro-batches, all processes), back-propagate each
micro-batch's summed loss divided by that count, clip, step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from lmdistill import checkpoint
from lmdistill.config import RunConfig, save_config, to_dict
from lmdistill.data import collate, encode_rows
from lmdistill.data.tokenize import Encoded, response_token_count
from lmdistill.evaluate import answer_accuracy_counts, heldout_stats
from lmdistill.evaluate.metrics import TokenStats
from lmdistill.io import atomic_write_json
from lmdistill.methods import METHODS, FlopCounter, RunContext, make_method, method_rows
from lmdistill.teachers.load import check_method_teacher, load_teacher
from lmdistill.models import count_parameters, load_model, load_tokenizer, save_model


@dataclass
class FitResult:
    """What `fit` leaves behind: the run directory and the last logged numbers."""

    run_dir: Path
    step: int
    metrics: dict


# --------------------------------------------------------------------------- schedule and data order


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_rows(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`'s global batch: epochs of seeded permutations, back to back.

    A pure function of (step, seed), so a resumed run sees exactly the rows it would have seen.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


def micro_batches(rows: list[int], *, accum: int, world: int, rank: int) -> list[list[int]]:
    """This process's share of each accumulation micro-step of a global batch."""
    per = len(rows) // (accum * world)
    return [rows[(a * world + rank) * per : (a * world + rank + 1) * per] for a in range(accum)]


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- evaluation inside the loop


def heldout_metrics(
    model: torch.nn.Module, examples: list[Encoded], rows: list[dict], tokenizer, accelerator: Accelerator, cfg: RunConfig
) -> dict[str, float]:
    """Held-out numbers that do not depend on the method's objective, shared across processes.

    eval_ce (nats per response token), eval_token_acc (next-token arg-max accuracy), eval_ece
    (expected calibration error); with eval.n_generate_train > 0 also eval_accuracy (greedy final answers).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    stats = heldout_stats(model, examples[rank::world], tokenizer.pad_token_id, batch_size=cfg.eval.batch_size,
                          n_bins=cfg.eval.ece_bins, autocast=accelerator.autocast)
    out = TokenStats.from_tensor(accelerator.reduce(stats.to_tensor(accelerator.device), "sum")).metrics("eval_")
    if cfg.eval.n_generate_train > 0:
        share = rows[: cfg.eval.n_generate_train][rank::world]
        correct, n = answer_accuracy_counts(accelerator.unwrap_model(model), tokenizer, share, cfg)
        c = accelerator.reduce(torch.tensor([correct, n], dtype=torch.float64, device=accelerator.device), "sum")
        out["eval_accuracy"] = float(c[0] / c[1].clamp(min=1))
    return out


# --------------------------------------------------------------------------- the loop


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: RunConfig, *, stop_after: int | None = None, progress: bool = True) -> FitResult:
    """Train `cfg.student` by `cfg.method`; writes the run directory and returns where it is.

    `stop_after` ends the run abruptly after that step (after its checkpoint, if one is due),
    without saving the final model: it stands for a crash in tests of resuming.
    """
    t = cfg.train
    # cpu=True when there is no GPU lets a launch of several processes run DDP on gloo.
    accelerator = Accelerator(mixed_precision=_mixed_precision(t.mixed_precision), cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by processes ({world}) x train.grad_accum ({t.grad_accum})"
        )
    seed_everything(t.seed)

    # Data first: a bad row stops the run before anything is written.
    tokenizer = load_tokenizer(cfg.student)
    train_rows, eval_rows = method_rows(cfg)
    enc_kw = dict(max_length=cfg.data.max_length, truncation=cfg.data.truncation, system_prompt=cfg.data.system_prompt)
    train_set = encode_rows(tokenizer, train_rows, **enc_kw)
    eval_set = encode_rows(tokenizer, eval_rows[: cfg.eval.max_eval_rows], **enc_kw)
    pad_id = tokenizer.pad_token_id

    # The teacher, checked against the method before anything is written.
    teacher = load_teacher(cfg.teacher, tokenizer, accelerator.device)
    check_method_teacher(cfg.method.name, METHODS[cfg.method.name].needs, teacher)

    run_dir = cfg.run_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()

    model = load_model(cfg.student, tokenizer, seed=t.seed)
    model.train()
    n_params = count_parameters(model)
    ctx = RunContext(cfg=cfg, tokenizer=tokenizer, accelerator=accelerator, student_params=n_params, teacher=teacher,
                     teacher_params=getattr(teacher, "n_params", 0))
    method = make_method(cfg.method, ctx)
    extras = method.extra_modules(model)  # trained with the student, checkpointed, not saved with it
    optimizer = torch.optim.AdamW(optimizer_groups(torch.nn.ModuleList([model, *extras.values()]), t.weight_decay),
                                  lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
    )
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *extras.values())
    ctx.model, ctx.modules = model, dict(zip(extras, prepared))

    metrics_path = run_dir / "metrics.jsonl"
    start, tokens_seen = 0, 0
    ckpt = checkpoint.latest(run_dir) if t.resume else None
    if ckpt is not None:
        state = checkpoint.load(ckpt, accelerator, objects={"lr_schedule": scheduler, "method": method})
        start, tokens_seen = state["step"], state["tokens"]
        ctx.flops = FlopCounter(train=state["flops_train"], other=state["flops_other"])
        if accelerator.is_main_process:
            checkpoint.truncate_metrics(metrics_path, start)
            print(f"resuming {run_dir} from step {start}")
    elif accelerator.is_main_process:
        metrics_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    writer = _tensorboard(run_dir) if accelerator.is_main_process else None
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=start, desc=f"{cfg.name} [{cfg.method.name}]", dynamic_ncols=True)

    last: dict = {}
    t0 = time.perf_counter()
    for step in range(start, t.steps):
        ctx.step = step
        other_before = ctx.flops.other
        rows = step_rows(step, len(train_set), t.batch_size, t.seed)
        batches = []
        for idx in micro_batches(rows, accum=t.grad_accum, world=world, rank=rank):
            b = {k: v.to(accelerator.device) for k, v in collate([train_set[i] for i in idx], pad_id).items()}
            batches.append(method.sequences(b))
        counts = torch.tensor(
            [sum(response_token_count(b["labels"]) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)],
            dtype=torch.float64,
            device=accelerator.device,
        )
        n_trained, n_tokens = accelerator.reduce(counts, reduction="sum").tolist()

        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        sums: dict[str, list[float]] = {}
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss, m = method.loss(model, b)
            # DDP averages gradients over processes; scale so that the result is the global token mean.
            accelerator.backward(loss * world / max(n_trained, 1.0))
            loss_sum += loss.detach().double()
            for k, (v, n) in m.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += n
        trained = [*model.parameters(), *(p for m in extras.values() for p in m.parameters())]
        grad_norm = accelerator.clip_grad_norm_(trained, t.max_grad_norm) if t.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)
        reduced = accelerator.reduce(
            torch.tensor([loss_sum.item(), ctx.flops.other - other_before] + [x for k in keys for x in sums[k]],
                         dtype=torch.float64, device=accelerator.device),
            reduction="sum",
        ).tolist()
        ctx.flops.other = other_before + reduced[1]
        ctx.flops.add_update(n_params, int(n_tokens))
        tokens_seen += int(n_tokens)
        done = step + 1
        last = {
            "step": done,
            "loss": reduced[0] / max(n_trained, 1.0),
            "lr": scheduler.get_last_lr()[0],
            "tokens": tokens_seen,
            "flops": ctx.flops.total,
            "flops_train": ctx.flops.train,
            "time": time.perf_counter() - t0,
        }
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        for j, k in enumerate(keys):
            last[k] = reduced[2 + 2 * j] / max(reduced[3 + 2 * j], 1e-12)
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            last.update(heldout_metrics(model, eval_set, eval_rows, tokenizer, accelerator, cfg))
        if accelerator.is_main_process and (done % t.log_every == 0 or "eval_ce" in last or done == t.steps):
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            if writer is not None:
                for k, v in last.items():
                    if k != "step":
                        writer.add_scalar(k, v, done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", **({"eval": f"{last['eval_ce']:.4f}"} if "eval_ce" in last else {}))
        if t.checkpoint_every and done % t.checkpoint_every == 0:
            state = {"tokens": tokens_seen, "flops_train": ctx.flops.train, "flops_other": ctx.flops.other}
            checkpoint.save(run_dir, done, accelerator, state, objects={"lr_schedule": scheduler, "method": method},
                            keep=t.keep_checkpoints)
        if stop_after is not None and done >= stop_after:
            if bar is not None:
                bar.close()
            return FitResult(run_dir, done, last)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, run_dir / "model")
        atomic_write_json(run_dir / "train_summary.json", {"config": to_dict(cfg), "final": last, "params": n_params})
    accelerator.wait_for_everyone()
    return FitResult(run_dir, t.steps, last)


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
