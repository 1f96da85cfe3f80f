"""Measure the top-k teacher cache on a real teacher: bytes per token, and cached-vs-full fkl on held-out rows.

    python scripts/measure_teacher_cache.py --out runs/measure_cache [--teacher pypi:smollm2-135m-instruct]
        [--k 64] [--tail-samples 0] [--dtype float16|float32|uint8] [--n-train 256 --n-eval 64]

Builds the cache (k ids, log-probs in --dtype, optionally with tail samples) of the teacher over math rows
(`lmdistill cache-teacher`), then on the held-out rows compares, per student, the mean per-token
KL(teacher ‖ student) computed three ways: from the full teacher logits, from the teacher's exact top-k
(float32) plus tail bucket, and from the cache. cache − full is the cache's error; topk − full the
truncation error of the tail bucket (a lower bound), which depends on the student. With tail samples the
cache's fkl is an unbiased estimate, and cache − full is its sampling (plus rounding) error. Students: a small model built from sizes with the
teacher's tokenizer (at initialisation, and after KD steps from the cache), and the teacher itself at
temperature 1.25 and 1.5 (students close to the teacher). Also times the teacher's forward pass.
Prints one JSON object (also written to OUT/result.json); its `bytes_per_token` and
`max_abs_cache_minus_full` (over the students) are the two numbers of the README's table. One cache is
one draw of the tail samples: `--redraws R` draws them R more times (keeping the cache's top-k) and gives,
per student, the RMS of cache − full over the draws (`max_redraw_rms`: the largest over the students), the
error to expect from another cache of the same setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from lmdistill.config import RunConfig, build
from lmdistill.data import collate, encode_rows, load_rows
from lmdistill.losses import LOSSES, TopK, prediction_mask, sample_tail
from lmdistill.methods import METHOD_CONFIGS
from lmdistill.models import load_model, load_tokenizer
from lmdistill.cache_teacher import build_cache
from lmdistill.teachers.cache import CachedTeacher
from lmdistill.teachers.load import load_teacher


def heldout_batches(cfg: RunConfig, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    _, held = load_rows(cfg.data)
    enc = encode_rows(tokenizer, held[: cfg.eval.max_eval_rows], max_length=cfg.data.max_length,
                      truncation=cfg.data.truncation, system_prompt=cfg.data.system_prompt)
    return [collate(enc[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(enc), batch_size)]


@torch.no_grad()
def teacher_signals(batches, teacher, cached, k: int, redraws: int = 0) -> list[tuple]:
    """Per held-out batch: (full logits, exact top-k in float32, the cache's signal, redraws), from one forward.

    redraws: `redraws` copies of the cache's signal with its tail samples drawn again (generators seeded
    1..redraws, the cache's stored top-k kept): other equally likely caches, for the spread of its error.
    Each draw's generator runs on through the batches, as a shard's does: every position its own u (a
    generator seeded again per batch would give the positions of every batch the same u's, whose errors
    correlate, and overstate the spread).
    """
    generators = [torch.Generator().manual_seed(seed) for seed in range(1, redraws + 1)]
    out = []
    for b in batches:
        full = teacher.logits(b["input_ids"], b["attention_mask"])  # (B, T, V)
        logp = torch.log_softmax(full.float(), dim=-1)
        values, ids = logp.topk(k, dim=-1)  # as LocalTeacher.topk
        signal = cached.topk(b["input_ids"], b["attention_mask"], k)
        again = []
        if redraws and signal.sampled:
            mask = prediction_mask(b["labels"])
            for generator in generators:
                fresh = sample_tail(logp[mask], k, cached.tail_samples, generator)
                tail_ids, tail_plogp = signal.tail_ids.clone(), signal.tail_plogp.clone()
                tail_ids[mask], tail_plogp[mask] = fresh.tail_ids, fresh.tail_plogp
                again.append(signal._replace(tail_ids=tail_ids, tail_plogp=tail_plogp))
        out.append((full, TopK(ids=ids, logprobs=values), signal, again))
    return out


@torch.no_grad()
def fkl_three_ways(student_logits_fn, batches, signals) -> dict[str, float]:
    """Token-weighted mean KL(teacher ‖ student) over the held-out response positions, three ways (and
    from each redraw of the tail samples: the RMS and largest |redraw − full|)."""
    sums = {"full": 0.0, "topk_bucket": 0.0, "cache": 0.0}
    redrawn = [0.0] * len(signals[0][3])
    n = 0
    for b, (*three, again) in zip(batches, signals):
        mask = prediction_mask(b["labels"])
        s = student_logits_fn(b, three[0])  # (B, T, V); three[0]: the teacher's full logits
        for key, t in zip(("full", "topk_bucket", "cache"), three):
            sums[key] += LOSSES["fkl"](s, t, mask, reduction="sum").item()
        for r, t in enumerate(again):
            redrawn[r] += LOSSES["fkl"](s, t, mask, reduction="sum").item()
        n += int(mask.sum())
    out = {k: v / n for k, v in sums.items()}
    out["bucket_truncation_error"] = out["topk_bucket"] - out["full"]
    out["cache_minus_full"] = out["cache"] - out["full"]
    if redrawn:
        errors = [v / n - out["full"] for v in redrawn]
        out["redraw_rms"] = math.sqrt(sum(e * e for e in errors) / len(errors))
        out["redraw_max_abs"] = max(map(abs, errors))
    return out


@torch.no_grad()
def forward_speed(model, batches, repeats: int = 2) -> float:
    """Teacher forward tokens per second (attention-mask tokens), after one warm-up batch."""
    model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    tokens, t0 = 0, time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/measure_cache")
    p.add_argument("--teacher", default="pypi:smollm2-135m-instruct")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--kd-steps", type=int, default=100)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tail-samples", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8"],
                   help="teacher.cache_dtype: how the cached log-probs are stored")
    p.add_argument("--redraws", type=int, default=0,
                   help="with tail samples: also draw them this many more times (the cache's top-k kept) and "
                        "report the RMS and largest error over the draws, per student")
    args = p.parse_args()
    out = Path(args.out)
    from lmdistill.config import ModelConfig

    teacher_tok_dir = load_tokenizer(ModelConfig(path=args.teacher)).name_or_path
    cfg = build(RunConfig, {
        "name": "measure", "output_dir": str(out / "kd"),
        "student": {"tokenizer": teacher_tok_dir, "n_layer": 2, "n_embd": 64, "n_head": 4, "max_position": 192},
        "teacher": {"kind": "local", "model": {"path": args.teacher}, "k": args.k, "tail_samples": args.tail_samples,
                    "cache_dtype": args.dtype, "cache": str(out / "cache")},
        "data": {"source": "math", "n_train": args.n_train, "n_eval": args.n_eval, "max_length": 160},
        "train": {"steps": args.kd_steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "log_every": 10,
                  "eval_every": 0},
        "eval": {"n_generate": 0, "max_eval_rows": args.n_eval},
        "method": {"name": "kd", "alpha": 1.0},
    }, method_configs=METHOD_CONFIGS)
    summary = build_cache(cfg, batch_size=16)
    tok = load_tokenizer(cfg.student)
    batches = heldout_batches(cfg, tok, 16)
    teacher = load_teacher(cfg.teacher, tok, torch.device("cpu"))
    cached = CachedTeacher(cfg.teacher.cache, tokenizer=tok)
    result: dict = {"setting": {"k": args.k, "tail_samples": args.tail_samples, "dtype": args.dtype},
                    "bytes_per_token": summary.bytes_per_token, "max_abs_cache_minus_full": 0.0,
                    "max_redraw_rms": None,
                    "cache": dataclasses.asdict(summary),
                    "heldout_rows": sum(len(b["input_ids"]) for b in batches),
                    "heldout_response_tokens": sum(int(prediction_mask(b["labels"]).sum()) for b in batches),
                    "teacher_forward_tokens_per_second": forward_speed(teacher.weights, batches)}
    signals = teacher_signals(batches, teacher, cached, args.k, args.redraws)

    def record(name: str, value) -> None:  # written as it comes: a later failure keeps the numbers
        result[name] = value
        if isinstance(value, dict) and "cache_minus_full" in value:
            result["max_abs_cache_minus_full"] = max(result["max_abs_cache_minus_full"], abs(value["cache_minus_full"]))
            if "redraw_rms" in value:
                result["max_redraw_rms"] = max(result["max_redraw_rms"] or 0.0, value["redraw_rms"])
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    record("teacher_forward_tokens_per_second", result["teacher_forward_tokens_per_second"])
    init = load_model(cfg.student, tok, seed=0).eval()
    record("small_init", fkl_three_ways(
        lambda b, full: init(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, batches, signals))
    for tau in (1.25, 1.5):
        record(f"teacher_at_T{tau}", fkl_three_ways(lambda b, full, tau=tau: full / tau, batches, signals))
    if args.kd_steps:
        from lmdistill.train import fit

        run = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, kind="cache"))
        fit(run, progress=False)
        trained = load_model(build(type(cfg.student), {"path": str(run.run_dir / "model")}), tok).eval()
        record(f"small_after_{args.kd_steps}_kd_steps", fkl_three_ways(
            lambda b, full: trained(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, batches, signals))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
