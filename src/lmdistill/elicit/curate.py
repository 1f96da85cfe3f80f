"""``curate`` (UltraChat, Phi's "textbooks"): instructions written from meta-information, then answered.

A meta file (``elicit.meta_path``, YAML) lists ``topics``, ``skills`` and ``formats``; every
combination fills ``elicit.curate_template`` once, in an order drawn with ``elicit.seed``. The
teacher writes one instruction per combination, which is screened as ``expand`` screens its own
(:func:`lmdistill.elicit.expand.screen`: 3 to 150 words, ROUGE-L F1 below
``elicit.rouge_threshold`` to every instruction kept before and to the prompts of
``elicit.input_path``, if given), then answers it. Row: ``prompt``, ``response``, ``topic``,
``skill``, ``format`` (the combination; the id holds its index in the product), ``rouge_l_max``,
``most_similar``, ``raw``; the provenance names the meta file and its digest. Batches run until ``elicit.num_instructions`` are kept or every
combination was asked; progress is the next combination, committed with each batch (with the
meta file's digest: a resumed run refuses a changed file).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from pathlib import Path

from lmdistill.config import ConfigError
from lmdistill.elicit.expand import RougeL, answer, screen
from lmdistill.elicit.session import Session, batch_seed, fill
from lmdistill.elicit.store import ElicitStore
from lmdistill.io import read_yaml_mapping

log = logging.getLogger(__name__)

META_KEYS = ("topics", "skills", "formats")


def load_meta(path: str | Path | None) -> dict[str, list[str]]:
    """The ``topics``, ``skills`` and ``formats`` of a meta file: non-empty lists of distinct, non-empty strings."""
    if not path:
        raise ConfigError("elicit curate needs a meta file: set elicit.meta_path=... (YAML with lists `topics`, "
                          "`skills`, `formats`; example: configs/curate_meta.yaml)")
    data = read_yaml_mapping(Path(path), ConfigError, missing="no such meta file (elicit.meta_path)")
    unknown = sorted(set(data) - set(META_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a meta file has {', '.join(META_KEYS)}")
    meta: dict[str, list[str]] = {}
    for key in META_KEYS:
        values = data.get(key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: `{key}` must be a non-empty list of strings")
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{path}: {key}[{i}] must be a non-empty string, got {v!r}")
        if len(set(values)) != len(values):
            twice = next(v for v in values if values.count(v) > 1)
            raise ConfigError(f"{path}: {key} lists {twice!r} twice")
        meta[key] = [v.strip() for v in values]
    return meta


def combinations(meta: dict[str, list[str]], seed: int) -> list[tuple[int, str, str, str]]:
    """(index in the product, topic, skill, format) of every combination, shuffled by `seed`."""
    product = [(i, *c) for i, c in enumerate(itertools.product(*(meta[k] for k in META_KEYS)))]
    random.Random(batch_seed(seed, "curate-order")).shuffle(product)
    return product


def elicit_curate(s: Session, meta: dict[str, list[str]], existing: list[dict], store: ElicitStore) -> tuple[int, int]:
    """Batches of combinations asked and answered until `num_instructions` are kept; (kept, rejected) new.

    `existing`: rows whose prompts the new instructions must differ from (``elicit.input_path``).
    """
    e = s.e
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    if store.progress.get("meta_sha256", digest) != digest:
        raise ConfigError(f"elicit.meta_path: {e.meta_path} changed since {store.path} was started (the order of the "
                          "combinations depends on it); restore it, or set elicit.output to another file")
    combos = combinations(meta, e.seed)
    rouge = RougeL()
    pool = [r["prompt"] for r in existing] + [r["prompt"] for r in store.kept_rows]
    start = int(store.progress.get("next", 0))
    new_kept = new_rejected = 0
    while len(store.kept_rows) < e.num_instructions and start < len(combos):
        chunk = combos[start : start + e.batch_size]
        asked = [fill(e.curate_template, "curate_template", topic=t, skill=sk, format=f) for _, t, sk, f in chunk]
        instruction_seed = batch_seed(e.seed, "curate-instructions", start)
        candidates = [({"id": f"curate-{i:05d}", "topic": t, "skill": sk, "format": f}, out)
                      for (i, t, sk, f), out in zip(chunk, s.generate(asked, instruction_seed))]
        accepted, rejected = screen(rouge, pool, candidates, e.rouge_threshold,
                                    need=e.num_instructions - len(store.kept_rows))
        answer_seed = batch_seed(e.seed, "curate-answers", start)
        where = {"meta_file": str(e.meta_path), "meta_sha256": digest}
        kept = answer(s, accepted, answer_seed, rejected, instruction_seed=instruction_seed, **where)
        for row in rejected:
            row.setdefault("provenance", s.provenance(instruction_seed, **where))
        start += len(chunk)
        done = len(store.kept_rows) + len(kept) >= e.num_instructions or start >= len(combos)
        store.flush(kept, rejected, progress={"next": start, "meta_sha256": digest}, complete=done)
        pool += [r["prompt"] for r in kept]
        new_kept, new_rejected = new_kept + len(kept), new_rejected + len(rejected)
        log.info("curate: %d/%d combinations asked, %d/%d instructions kept", start, len(combos),
                 len(store.kept_rows), e.num_instructions)
    if len(store.kept_rows) < e.num_instructions:
        log.warning("curate: every one of the %d combinations was asked; %d of %d instructions kept (add topics, "
                    "skills or formats to %s for more)", len(combos), len(store.kept_rows), e.num_instructions,
                    e.meta_path)
    return new_kept, new_rejected
