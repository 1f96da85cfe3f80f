"""Cross-tokenizer KD on a real pair, offline: SmolLM2-135M-Instruct (student) ← Qwen2.5-Coder-0.5B-Instruct.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/measure_cross_tokenizer.py [--align span] [--steps 6]
        [--n-train 8] [--n-eval 8] [--lr 5e-5] [--out results/cross_tokenizer]

1. Arithmetic questions (the math generator: add/sub and mul, difficulty 0.1). The teacher answers each
   greedily in its own chat template, after ``--system-prompt``: the training rows' responses, and the
   reference on the held-out questions.
2. Before training, on the held-out questions (teacher's answers as responses) and on the training rows: the
   aligned divergences to the teacher per student response token (``methods.distill.aligned_terms``: span's
   one-to-one fkl and merged-span fkl, and ULD), and the student's greedy answers.
3. ``fit``: kd with ``method.align`` on the training rows; ``--alpha`` 1 (default): the divergence alone, no
   cross-entropy (which would pull toward the teacher's answers by itself); ULD's paper adds CE (alpha < 1).
4. The same measures with the trained student. Against the teacher's answers, on the held-out and on the
   training questions: agreement (the share whose final answer, after the math task's normalisation, is the
   teacher's), mean ROUGE-L and mean length; accuracy against the true answers as well.

Prints and writes ``result.json`` (numbers and every answer) to ``--out``, with the labelled rows (``data/``)
and the run directory (``run_<align>/``: config and metrics; the trained model is deleted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

STUDENT, TEACHER = "pypi:smollm2-135m-instruct", "pypi:qwen2.5-coder-0.5b-instruct"


def divergences(student, s_tok, teacher, rows: list[dict], system_prompt: str, teacher_logits: dict,
                batch_size: int = 4) -> dict:
    """Mean aligned divergences per student response token on `rows`: span (one-to-one, merged) and ULD.
    `teacher_logits` keeps the teacher's logits of each batch (the same before and after training)."""
    from lmdistill.data.align import vocabulary_map
    from lmdistill.data.tokenize import collate, encode_rows, response_token_count
    from lmdistill.methods.common import trained
    from lmdistill.methods.distill import KDConfig, aligned_terms
    from lmdistill.models import causal_logits

    vocab = tuple(torch.tensor(i) for i in vocabulary_map(s_tok, teacher.tokenizer))
    sums: dict[str, float] = {}
    tokens = 0
    for a in range(0, len(rows), batch_size):
        enc = encode_rows(s_tok, rows[a:a + batch_size], teacher_tokenizer=teacher.tokenizer, max_length=512,
                          system_prompt=system_prompt)
        batch = collate(enc, s_tok.pad_token_id)
        window, labels = trained(batch)
        t_window, t_labels = trained(batch, "teacher_")
        with torch.no_grad():
            logits = causal_logits(student, batch["input_ids"], batch["attention_mask"], window)
            key = tuple(r["id"] for r in rows[a:a + batch_size])
            if key not in teacher_logits:
                teacher_logits[key] = teacher.logits(batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                                     t_window)
            groups = batch["student_groups"][:, window], batch["teacher_groups"][:, t_window]
            for align in ("span", "uld"):
                terms, metrics = aligned_terms(KDConfig(align=align), logits, teacher_logits[key], labels, t_labels,
                                               *groups, vocab)
                for name, term in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(term.value)
                for name, (value, _) in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
        tokens += response_token_count(labels)
    return {name: value / tokens for name, value in sums.items()} | {"response_tokens": tokens}


def answers(model, tok, prompts: list[str], system_prompt: str, max_new_tokens: int) -> list[str]:
    from lmdistill.generation import generate

    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=8, system_prompt=system_prompt)


def compare(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Agreement (final answers equal after the math task's normalisation), mean ROUGE-L and mean length in chars."""
    from lmdistill.evaluate.metrics import answer_correct, rouge_l

    n = len(references)
    return {"agreement": sum(answer_correct(p, r) for p, r in zip(predictions, references)) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
            "chars": sum(len(p) for p in predictions) / n}


def integer_questions(n: int, seed: int) -> list[dict]:
    """`n` questions "What is a + b?" / "What is a * b?" on 1-2 digit integers, with their answers."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99 if i % 2 == 0 else 9)
        op, value = ("+", a + b) if i % 2 == 0 else ("*", a * b)
        rows.append({"id": f"int-{seed}-{i}", "prompt": f"What is {a} {op} {b}?", "response": str(value)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--align", default="span", choices=["span", "uld"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=1.0, help="method.alpha: 1 = the divergence alone, < 1 adds CE")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--system-prompt", default="Answer with the final number only.")
    parser.add_argument("--questions", default="math", choices=["math", "integers"],
                        help="math: the math generator (add/sub, mul; decimals); integers: a+b, a*b, small integers")
    parser.add_argument("--out", default="results/cross_tokenizer")
    args = parser.parse_args()

    from lmdistill.config import ModelConfig
    from lmdistill.data.math import generate_math
    from lmdistill.io import atomic_write_json, atomic_write_jsonl
    from lmdistill.methods import load_config
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.teachers.local import LocalTeacher
    from lmdistill.train import fit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.questions == "math":
        modules = ["arithmetic__add_or_sub", "arithmetic__mul"]
        train_q = generate_math(args.n_train, modules=modules, split="train", seed=0, difficulty=0.1)
        eval_q = generate_math(args.n_eval, modules=modules, split="eval", seed=0, difficulty=0.1)
    else:
        train_q, eval_q = integer_questions(args.n_train, seed=0), integer_questions(args.n_eval, seed=1)
    t_tok = load_tokenizer(ModelConfig(path=TEACHER))
    teacher = LocalTeacher(load_model(ModelConfig(path=TEACHER), t_tok), t_tok, name=f"local:{TEACHER}")
    s_tok = load_tokenizer(ModelConfig(path=STUDENT))
    student = load_model(ModelConfig(path=STUDENT), s_tok).eval()

    sp, n_new = args.system_prompt, args.max_new_tokens
    t_train = teacher.generate([r["prompt"] for r in train_q], max_new_tokens=n_new, system_prompt=sp)
    t_eval = teacher.generate([r["prompt"] for r in eval_q], max_new_tokens=n_new, system_prompt=sp)
    train_rows = [{**r, "response": a.strip()} for r, a in zip(train_q, t_train)]
    eval_rows = [{**r, "response": a.strip()} for r, a in zip(eval_q, t_eval)]
    cache: dict = {}
    before = {"heldout": divergences(student, s_tok, teacher, eval_rows, sp, cache),
              "train": divergences(student, s_tok, teacher, train_rows, sp, cache),
              "answers": answers(student, s_tok, [r["prompt"] for r in eval_q], sp, n_new),
              "train_answers": answers(student, s_tok, [r["prompt"] for r in train_q], sp, n_new)}
    t_labelled = time.perf_counter()

    data = out / "data"  # the teacher-labelled rows the run trains on (kept: the run's config names them)
    data.mkdir(exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        atomic_write_jsonl(data / f"{name}.jsonl", rows)
    overrides = [
        f"name=cross_tokenizer_{args.align}", f"output_dir={out}/run_{args.align}", f"student.path={STUDENT}",
        "teacher.kind=local", f"teacher.model.path={TEACHER}", "data.source=jsonl",
        f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl", "data.max_length=256",
        f"data.system_prompt={sp}", "method.name=kd", f"method.align={args.align}", f"method.alpha={args.alpha}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.warmup_steps=0",
        "train.min_lr_ratio=1.0", "train.eval_every=0", "train.log_every=1", "train.resume=false",
        "eval.n_generate=0",
    ]
    run = fit(load_config(None, overrides), progress=False)
    t_trained = time.perf_counter()
    trained_student = load_model(ModelConfig(path=str(run.run_dir / "model")), s_tok).eval()
    after = {"heldout": divergences(trained_student, s_tok, teacher, eval_rows, sp, cache),
             "train": divergences(trained_student, s_tok, teacher, train_rows, sp, cache),
             "answers": answers(trained_student, s_tok, [r["prompt"] for r in eval_q], sp, n_new),
             "train_answers": answers(trained_student, s_tok, [r["prompt"] for r in train_q], sp, n_new)}
    shutil.rmtree(run.run_dir / "model")  # 540 MB of float32 weights; the run's config and metrics stay
    gold = [r["response"] for r in eval_q]

    def measures(m: dict) -> dict:
        return m | {"to_teacher": compare(m["answers"], t_eval), "accuracy": compare(m["answers"], gold)["agreement"],
                    "train_to_teacher": compare(m["train_answers"], t_train)}

    result = {
        "args": vars(args),
        "teacher_accuracy": compare(t_eval, gold)["agreement"],
        "before": measures(before),
        "after": measures(after),
        "teacher_chars": compare(t_eval, t_eval)["chars"],
        "changed_answers": sum(a != b for a, b in zip(before["answers"], after["answers"])),
        "questions": [r["prompt"] for r in eval_q], "gold": gold, "teacher_answers": t_eval,
        "train_questions": [r["prompt"] for r in train_q], "train_teacher_answers": t_train,
        "train_metrics": [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()],
        "seconds": {"label_and_measure": t_labelled - t0, "train": t_trained - t_labelled,
                    "total": time.perf_counter() - t0},
    }
    atomic_write_json(out / "result.json", result)
    print(json.dumps({k: result[k] for k in ("teacher_accuracy", "changed_answers", "seconds")}, indent=1))
    for when in ("before", "after"):
        print(when, json.dumps({k: v for k, v in result[when].items() if k not in ("answers", "train_answers")}))


if __name__ == "__main__":
    main()
