"""Held-out reward and KL of an `rlaif` run's student at its start and at its end, measured the same way.

The run logs eval_reward / eval_kl only at its evaluations (after training steps); this measures the
start (the student as the run built it, its own reference: KL 0) and the saved end model with the
method's own evaluation (`RLAIF.heldout_metrics`: one sample per held-out prompt, seeded by train.seed).

    python scripts/measure_rlaif.py runs/rlaif_instructions
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate import Accelerator

from lmdistill.config import ModelConfig
from lmdistill.data.tokenize import encode_rows
from lmdistill.methods import RunContext, load_config, method_rows
from lmdistill.methods.rlaif import RLAIF
from lmdistill.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished rlaif run directory (config.yaml, model/)")
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    tok = load_tokenizer(cfg.student)
    start = load_model(cfg.student, tok, seed=cfg.train.seed)
    accelerator = Accelerator(cpu=True)
    ctx = RunContext(cfg=cfg, tokenizer=tok, accelerator=accelerator, model=start)
    method = RLAIF(cfg.method, ctx)
    _, held = method_rows(cfg)
    d = cfg.data
    examples = encode_rows(tok, held, max_length=d.max_length, truncation=d.truncation, system_prompt=d.system_prompt)
    before = method.heldout_metrics(start, examples)
    after = method.heldout_metrics(load_model(ModelConfig(path=str(args.run_dir / "model"))), examples)
    print(json.dumps({"prompts": min(len(examples), cfg.method.eval_prompts), "start": before, "end": after}, indent=2))


if __name__ == "__main__":
    main()
