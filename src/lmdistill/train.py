"""The one training loop. Every method runs on it; a method supplies sequences and loss terms.

Read `fit` top to bottom: set-up (:func:`setup`), resume, then per optimizer step: take the step's
global batch, split it into accumulation micro-batches and processes, let the method make its
sequences, count every term's units over the whole step (:func:`step_units`: all micro-batches, all
processes), back-propagate each micro-batch's terms divided by those counts (:func:`step_loss`, the
one normalisation), clip, step, log (:func:`log_step`), evaluate, checkpoint. Compute is counted by
the FLOP meter hooked into every model (lmdistill.flops), never by hand.
"""

from __future__ import annotations

import atexit
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmdistill import checkpoint, rundir
from lmdistill.config import ConfigError, RunConfig, save_config, to_dict
from lmdistill.data import collate, encode_rows
from lmdistill.data.tokenize import Encoded, add_teacher_tokens
from lmdistill.evaluate.answers import answer_accuracy_counts
from lmdistill.flops import count_parameters
from lmdistill.heldout import TokenStats, heldout_stats
from lmdistill.io import UserError, atomic_write_json
from lmdistill.methods import METHODS, Method, RunContext, make_method, method_rows
from lmdistill.methods.base import ROWS, Batch, Term, term_units
from lmdistill.models import inner_model, is_lora, load_model, load_tokenizer, save_lora
from lmdistill.prune import student_init
from lmdistill.teachers import check_needs
from lmdistill.teachers.cache import HOW_TO_BUILD, CachedTeacher, CacheMiss
from lmdistill.teachers.engine import shard_teacher, teacher_sharding
from lmdistill.teachers.load import load_teacher


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss or the gradient norm of a step is not finite (the run diverged); the message names the step,
    the last finite loss and the train.* keys that help. Nothing is saved from that state."""


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
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if choice == "auto":
        return "bf16" if bf16 else "no"
    if choice != "no" and not (bf16 if choice == "bf16" else torch.cuda.is_available()):
        raise ConfigError(f"train.mixed_precision={choice}: this machine has no GPU that supports {choice}; "
                          "set train.mixed_precision=auto (or no)")
    return choice


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything `fit` sets up: the prepared models, optimizer and method, the data, where to write."""

    cfg: RunConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    train_set: list[Encoded]
    eval_set: list[Encoded]
    eval_rows: list[dict]
    model: torch.nn.Module
    method: Method
    ctx: RunContext
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trained: list[torch.nn.Parameter]
    n_params: int


def end_processes() -> None:
    """Tear down the process group of a multi-process launch (torch.distributed), if there is one. Left to the
    interpreter's exit, its threads can outlive it and abort a finished process ("terminate called without an
    active exception", exit code -6): :func:`setup` registers this to run at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def setup(cfg: RunConfig) -> Run:
    """Data, teacher (checked against the method before anything is written), run directory, student,
    method, optimizer and schedule, all prepared by accelerate; every model's forwards metered. Under
    FSDP / ZeRO-3 the teacher is sharded by the same engine (teachers/engine.py)."""
    t = cfg.train
    # cpu=True when there is no GPU lets a launch of several processes run DDP on gloo.
    accelerator = Accelerator(mixed_precision=_mixed_precision(t.mixed_precision), cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:
        atexit.register(end_processes)
    if accelerator.is_main_process:
        rundir.claim(cfg)  # another process's directory, or another config's, is refused before anything is written
    if cfg.student.lora.rank and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"student.lora under {accelerator.distributed_type.value} is not supported (its checkpoints "
                          "and merged save are untested there): launch LoRA runs on one process or with DDP")
    if cfg.student.lora.rank and not METHODS[cfg.method.name].supports_lora:
        raise ConfigError(f"student.lora: method.name={cfg.method.name} does not train LoRA students (its model is "
                          "saved its own way; untested with adapters): set student.lora.rank=0")
    if t.batch_size % (accelerator.num_processes * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes "
                          f"({accelerator.num_processes}) x train.grad_accum ({t.grad_accum})")
    seed_everything(t.seed)
    # Data first: a bad row stops the run before anything is written.
    tokenizer = load_tokenizer(cfg.student)
    train_rows, eval_rows = method_rows(cfg)
    enc_kw = dict(max_length=cfg.data.max_length, truncation=cfg.data.truncation, system_prompt=cfg.data.system_prompt)
    train_set = encode_rows(tokenizer, train_rows, **enc_kw)
    eval_set = encode_rows(tokenizer, eval_rows[: cfg.eval.max_eval_rows], **enc_kw)
    sharding = teacher_sharding(accelerator)
    if sharding and cfg.teacher.device:
        raise ConfigError(f"teacher.device={cfg.teacher.device}: under {sharding} the teacher is sharded across the "
                          "processes' devices; leave teacher.device empty, or launch with DDP to place it")
    method_cls = METHODS[cfg.method.name]
    needs = method_cls.teacher_needs(cfg.method)
    # A teacher to shard waits on the CPU: fully_shard moves it to each process's device one layer at a time.
    teacher = load_teacher(cfg.teacher, tokenizer, torch.device("cpu") if sharding else accelerator.device,
                           own_vocabulary=needs.vocabulary != "shared")
    check_needs(cfg.method.name, needs, teacher, sharded=sharding is not None)
    if needs.teacher_tokens(teacher):  # the teacher reads the same rows in its own tokens
        train_set = add_teacher_tokens(train_set, train_rows, tokenizer, teacher.tokenizer,
                                       system_prompt=cfg.data.system_prompt)
    if isinstance(teacher, CachedTeacher):
        check_cache_holds(teacher, train_set, train_rows)
    # The student too, when it needs nothing written first: a bad student.lora key stops the run here.
    model = None if cfg.student.init_from else load_model(cfg.student, tokenizer, seed=t.seed)
    if accelerator.is_main_process:
        rundir.claim(cfg, create=True)
        if not t.resume:
            set_aside_previous_run(cfg.run_dir)
        save_config(cfg, cfg.run_dir / "config.yaml")
        if cfg.student.init_from == "teacher":
            student_init(cfg)
    accelerator.wait_for_everyone()

    if model is None:
        model = load_model(replace(cfg.student, path=str(cfg.run_dir / "student_init")), tokenizer, seed=t.seed)
    model.train()
    ctx = RunContext(cfg=cfg, tokenizer=tokenizer, accelerator=accelerator, teacher=teacher)
    for module in [inner_model(model), *(teacher.modules() if teacher is not None else [])]:
        ctx.flops.attach(module)
    method = make_method(cfg.method, ctx)
    extras = method.extra_modules(model)  # trained with the student, checkpointed, not saved with it
    optimizer = torch.optim.AdamW(optimizer_groups(torch.nn.ModuleList([model, *extras.values()]), t.weight_decay),
                                  lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio))
    n_params = count_parameters(model)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *extras.values())
    shard_teacher(teacher, accelerator, sharding)  # not prepared: not trained, not in the checkpoints
    ctx.model, ctx.modules = model, dict(zip(extras, prepared))
    trained = [*model.parameters(), *(p for m in prepared for p in m.parameters())]
    return Run(cfg, accelerator, tokenizer, train_set, eval_set, eval_rows, model, method, ctx, optimizer, scheduler,
               trained, n_params)


def check_cache_holds(teacher: CachedTeacher, train_set: list[Encoded], train_rows: list[dict]) -> None:
    """Refuse, before step 1, training rows that a top-k cache teacher does not hold (:class:`CacheMiss`
    naming the cache, how many rows and the first one's file:line)."""
    missing = [i for i, e in enumerate(train_set) if e.input_ids not in teacher]
    if missing:
        row = train_rows[missing[0]]
        where = row.get("_where") or f"row {row.get('id', missing[0])!r}"
        more = "" if teacher.complete else " The cache is incomplete: rerun `lmdistill cache-teacher` to finish it."
        raise CacheMiss(f"{len(missing)} of the {len(train_set)} training rows are not in the top-k cache "
                        f"{teacher.directory} (first: {where}); {HOW_TO_BUILD}.{more}")


PREVIOUS = "previous"
"""Where train.resume=false moves a run directory's earlier run (a run directory of its own)."""


def set_aside_previous_run(run_dir: Path) -> None:
    """train.resume=false: move what an earlier run left in `run_dir` (checkpoints, model, log, summary,
    evaluation) into ``run_dir/previous/``, replacing an older one there, so that the new run neither
    resumes nor prunes the old run's checkpoints. Says so when there was something to move."""
    names = [checkpoint.CHECKPOINTS, rundir.MODEL, rundir.ADAPTER, rundir.METRICS, rundir.SUMMARY, rundir.EVAL,
             "tensorboard"]
    found = [n for n in names if (run_dir / n).exists()]
    if not found:
        return
    dest = run_dir / PREVIOUS
    replaced = dest.exists()
    if replaced:
        shutil.rmtree(dest)
    dest.mkdir()
    if (run_dir / rundir.CONFIG).exists():
        shutil.copy2(run_dir / rundir.CONFIG, dest / rundir.CONFIG)
    for name in found:
        (run_dir / name).rename(dest / name)
    print(f"train.resume=false: the previous run's {', '.join(found)} moved to {dest}"
          + (" (replacing the one there before)" if replaced else "") + "; delete it when it is no longer needed")


def nonfinite(loss: float, grad_norm: float | None, accelerator: Accelerator) -> bool:
    """Whether the step's loss (this process's) or gradient norm is not finite on any process.

    Under fp16 a non-finite gradient norm is the GradScaler's to handle (it skips the step and lowers
    its scale), so only the loss counts there."""
    bad = not math.isfinite(loss)
    if grad_norm is not None and accelerator.scaler is None:
        bad = bad or not math.isfinite(float(grad_norm))
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=accelerator.device)
        bad = bool(accelerator.reduce(flag, "sum").item() > 0)
    return bad


def json_row(row: dict) -> str:
    """A metrics line as strict JSON: a non-finite number is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def step_units(batches: list[Batch], accelerator: Accelerator) -> dict[str, float]:
    """Units of every kind a term may be normalised by (each label key's trained tokens, rows), and
    `tokens` (non-padded tokens of the data micro-batches), summed over the step's micro-batches and processes."""
    kinds = sorted({k for b in batches for k in b if k.endswith("labels")} | {ROWS})
    local = [sum(term_units(b, kind) for b in batches if kind == ROWS or kind in b) for kind in kinds]
    local.append(sum(float(b["attention_mask"].sum()) for b in batches))
    total = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return {**dict(zip(kinds, total[:-1])), "tokens": total[-1]}


def step_loss(terms: dict[str, Term], units: dict[str, float]) -> torch.Tensor:
    """Σ_terms weight · value / (the term's units over the whole step): the one normalisation of every method."""
    loss = torch.zeros((), device=next(iter(terms.values())).value.device)
    for term in terms.values():
        if term.weight != 0:
            loss = loss + term.weight * term.value / max(units[term.per], 1.0)
    return loss


def log_step(run: Run, sums: dict[str, list[float]], units: dict[str, float], objective: float, done: int,
             tokens_seen: int, t0: float) -> dict:
    """The step's logged numbers, summed over processes: objective, each term (Σ value / Σ units) and metric
    (Σ / Σ), learning rate, cumulative tokens and FLOPs."""
    keys = sorted(sums)
    flops = run.ctx.flops
    local = [objective, flops.train, flops.other] + [x for k in keys for x in sums[k]]
    reduced = run.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=run.accelerator.device), "sum")
    reduced = reduced.tolist()
    out = {"step": done, "loss": reduced[0], "lr": run.scheduler.get_last_lr()[0], "tokens": tokens_seen,
           "flops": reduced[1] + reduced[2], "flops_train": reduced[1], "flops_other": reduced[2],
           "time": time.perf_counter() - t0}
    out.update({k: reduced[3 + 2 * j] / max(reduced[4 + 2 * j], 1e-12) for j, k in enumerate(keys)})
    return out


def fit(cfg: RunConfig, *, stop_after: int | None = None, progress: bool = True) -> FitResult:
    """Train `cfg.student` by `cfg.method`; writes the run directory and returns where it is.

    Resumes from the newest checkpoint that loads (train.resume); a finished run is left as it is.
    A step whose loss or gradient norm is not finite makes no update; more such steps than
    train.skip_nonfinite stop the run with :class:`NonFiniteLoss`, before anything is saved from them.
    `stop_after` ends the run abruptly after that step (after its checkpoint, if one is due),
    without saving the final model: it stands for a crash in tests of resuming.
    """
    run = setup(cfg)
    t, acc, model, method, ctx = cfg.train, run.accelerator, run.model, run.method, run.ctx
    world, rank = acc.num_processes, acc.process_index
    metrics_path = cfg.run_dir / rundir.METRICS
    if t.resume and rundir.is_finished(cfg.run_dir):
        final = rundir.read_summary(cfg.run_dir).get("final") or {}
        if acc.is_main_process:
            print(f"{cfg.run_dir} is finished already (train_summary.json); to train it again set train.resume=false")
        return FitResult(cfg.run_dir, final.get("step", t.steps), final)
    start, tokens_seen, skipped = 0, 0, 0
    objects = {"lr_schedule": run.scheduler, "method": method}
    state = checkpoint.resume(cfg.run_dir, acc, objects=objects) if t.resume else None
    if state is not None:
        start, tokens_seen, skipped = state["step"], state["tokens"], state.get("skipped_nonfinite", 0)
        # Every process holds the global totals after a resume: keep them on the main one only.
        ctx.flops.train, ctx.flops.other = (state["flops_train"], state["flops_other"]) if rank == 0 else (0.0, 0.0)
        if acc.is_main_process:
            checkpoint.truncate_metrics(metrics_path, start)
            print(f"resuming {cfg.run_dir} from step {start}")
    elif acc.is_main_process:
        metrics_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    logged = rundir.read_metrics(metrics_path) if state is not None else []
    writer = _tensorboard(cfg.run_dir) if acc.is_main_process else None
    bar = tqdm(total=t.steps, initial=start, desc=f"{cfg.name} [{cfg.method.name}]", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))

    # The numbers of the last step done (the last logged line when a resume starts at the end).
    last: dict = logged[-1] if logged and logged[-1].get("step") == start else {}
    finite = [r for r in logged if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    last_finite: tuple[int, float] | None = (finite[-1]["step"], finite[-1]["loss"]) if finite else None
    t0 = time.perf_counter()
    for step in range(start, t.steps):
        ctx.step = step
        rows = step_rows(step, len(run.train_set), t.batch_size, t.seed)
        batches = []
        for idx in micro_batches(rows, accum=t.grad_accum, world=world, rank=rank):
            b = {k: v.to(acc.device) for k, v in collate([run.train_set[i] for i in idx], run.tokenizer.pad_token_id).items()}
            batches.append(method.sequences(b))
        units = step_units(batches, acc)
        sums: dict[str, list[float]] = {}
        objective = 0.0
        for i, b in enumerate(batches):
            with nullcontext() if i == len(batches) - 1 else acc.no_sync(model), acc.autocast():
                terms, metrics = method.loss(model, b)
                loss = step_loss(terms, units)
            acc.backward(loss * world)  # DDP averages gradients over processes; the loss is already a global mean
            objective += float(loss.detach())
            for name, term in terms.items():
                metrics[name] = (float(term.value.detach()), term_units(b, term.per))
            for k, (v, n) in metrics.items():
                acc_k = sums.setdefault(k, [0.0, 0.0])
                acc_k[0], acc_k[1] = acc_k[0] + v, acc_k[1] + n
        # The norm is measured (clipping at infinity is none) even without clipping: a NaN gradient must not reach AdamW.
        grad_norm = acc.clip_grad_norm_(run.trained, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        bad = nonfinite(objective, grad_norm, acc)
        if bad:
            skipped += 1
        else:
            run.optimizer.step()
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        tokens_seen += int(units["tokens"])
        last = log_step(run, sums, units, objective, done, tokens_seen, t0)
        if grad_norm is not None and (t.max_grad_norm > 0 or bad):
            last["grad_norm"] = float(grad_norm)
        if t.skip_nonfinite:
            last["skipped_nonfinite"] = skipped
        stop = bad and skipped > t.skip_nonfinite
        if not bad:
            last_finite = (done, last["loss"])
        if not stop and ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
            last.update(heldout_metrics(model, run.eval_set, run.eval_rows, run.tokenizer, acc, cfg))
            last.update(method.heldout_metrics(model, run.eval_set))
        if acc.is_main_process and (done % t.log_every == 0 or "eval_ce" in last or done == t.steps or bad):
            with metrics_path.open("a") as f:
                f.write(json_row(last) + "\n")
            if writer is not None:
                for k, v in last.items():
                    if v is not None and math.isfinite(v):
                        writer.add_scalar(k, v, done)
        if stop:
            bar.close()
            raise NonFiniteLoss(_nonfinite_message(cfg, done, last, skipped, last_finite))
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", **({"eval": f"{last['eval_ce']:.4f}"} if "eval_ce" in last else {}))
        if t.checkpoint_every and done % t.checkpoint_every == 0:
            state = {"tokens": tokens_seen, "flops_train": last["flops_train"], "flops_other": last["flops_other"],
                     "skipped_nonfinite": skipped}
            checkpoint.save(cfg.run_dir, done, acc, state, objects=objects, keep=t.keep_checkpoints)
        if stop_after is not None and done >= stop_after:
            bar.close()
            return FitResult(cfg.run_dir, done, last)
    bar.close()
    if writer is not None:
        writer.close()
    student = acc.unwrap_model(model)
    lora = is_lora(student)
    weights = None if lora else acc.get_state_dict(model)  # gathered on every process under FSDP / ZeRO-3
    if acc.is_main_process:
        if lora:  # the adapter, and the merged model in model/
            save_lora(student, run.tokenizer, cfg.run_dir / rundir.MODEL, cfg.run_dir / rundir.ADAPTER)
        else:
            method.save_model(student, run.tokenizer, cfg.run_dir / rundir.MODEL, weights)
        atomic_write_json(cfg.run_dir / rundir.SUMMARY, {"config": to_dict(cfg), "final": json.loads(json_row(last)),
                                                         "params": run.n_params})
    acc.wait_for_everyone()
    return FitResult(cfg.run_dir, t.steps, last)


def _nonfinite_message(cfg: RunConfig, done: int, row: dict, skipped: int, last_finite: tuple[int, float] | None) -> str:
    t = cfg.train
    what = [f"the loss is {row['loss']}"] if not math.isfinite(row["loss"]) else [f"the loss is {row['loss']:.4g}"]
    if "grad_norm" in row:
        what.append(f"the gradient norm {row['grad_norm']}")
    before = (f"the last finite loss {last_finite[1]:.4g} at step {last_finite[0]}" if last_finite is not None
              else "no finite loss before it")
    saved = checkpoint.latest(cfg.run_dir)
    kept = f"the newest checkpoint is {saved.name}" if saved is not None else "no checkpoint"
    count = (f"{skipped} non-finite steps, more than train.skip_nonfinite={t.skip_nonfinite}; " if t.skip_nonfinite
             else "")
    return (f"step {done}: {' and '.join(what)} (the run diverged; {before}); {count}stopped without saving "
            f"this state ({kept}). Lower train.lr (now {t.lr:g}), lengthen train.warmup_steps, keep "
            "train.max_grad_norm > 0, or set train.skip_nonfinite=N to skip up to N such steps")


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
