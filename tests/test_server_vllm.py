"""ServerTeacher in vLLM's dialect (``prompt_logprobs``, ids in and out), against a loopback server.

No vLLM runs here (it needs a GPU build): the loopback server below answers ``/v1/completions``
from a tiny local model in the shape vLLM's OpenAI-compatible server answers, as read in vLLM's
source (each field's origin is noted where the answer is built, in :func:`vllm_handler`). The real
check against ``vllm serve`` is for a machine with a GPU and vLLM; it has not been run.
The llama.cpp dialect (echo) runs against the real llama.cpp server in test_server_teacher.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from llama_server import Handler, ScriptedServer

from lmdistill.config import ModelConfig
from lmdistill.models import load_model, load_tokenizer, save_model
from lmdistill.teachers.base import Capability, CapabilityError
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.server import ServerError, ServerResponseError, ServerTeacher
from lmdistill.train import fit

from conftest import read_metrics, tiny_run_config

MAX_LOGPROBS = 20
"""vLLM's default ``--max-logprobs`` (vllm/config: ``ModelConfig.max_logprobs: int = 20``)."""


def vllm_handler(model, tokenizer, *, token_ids: bool = True, shift: bool = False,
                 state: dict | None = None) -> Handler:
    """``/v1/completions`` answered from a local causal LM (greedy, never a special token) in vLLM's shape.

    Read in vLLM's source: vllm/entrypoints/openai/completion/protocol.py (``CompletionRequest``:
    ``prompt`` as a list of ids, ``prompt_logprobs``, ``logprobs``, ``return_tokens_as_token_ids``,
    ``max_tokens`` default 16; ``CompletionResponseChoice``: ``prompt_logprobs`` as
    ``list[dict[int, Logprob] | None]``, ``prompt_token_ids``, ``token_ids``, ``stop_reason``;
    ``CompletionLogProbs``), completion/serving.py (``request_output_to_completion_response`` and
    ``_create_completion_logprobs``: the legacy ``logprobs`` object of the generated tokens, their
    ``top_logprobs`` holding the sampled token too), vllm/v1/engine/logprobs.py
    (``_make_logprob_dict``: the prompt token first with its vocabulary rank, then the top k ranked
    1..k; the first prompt token's entry is None), vllm/logprobs.py (``Logprob``: ``logprob``,
    ``rank``, ``decoded_token``), vllm/entrypoints/generate/base/serving.py
    (``format_token_id_placeholder``: ``"token_id:{id}"``; -inf sent as -9999.0), and the k limit
    and its message (``Requested prompt logprobs of k, which is greater than max allowed: 20``,
    vllm/v1/engine/processor.py). ``echo`` is not served (vLLM's dialect here does not use it).

    token_ids: honour ``return_tokens_as_token_ids`` (False: write tokens as strings, as a vLLM
    without the request field does). shift: give prompt token t the prediction made *at* t (for
    t + 1): a misaligned server. state["break"]: a malformation of every later answer (see :data:`BREAKS`).
    """
    special = torch.tensor(tokenizer.all_special_ids)
    state = state if state is not None else {}

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)

    def logprob_dict(row: torch.Tensor, actual: int, k: int) -> dict[str, dict]:
        entry = lambda i, rank: {"logprob": max(float(row[i]), -9999.0), "rank": rank,  # noqa: E731
                                 "decoded_token": tokenizer.decode([i])}
        out = {str(actual): entry(actual, int((row > row[actual]).sum()) + 1)}
        for rank, i in enumerate(row.topk(k).indices.tolist(), start=1):
            out[str(i)] = entry(i, rank)
        return out

    def handle(req, body):
        if req.command == "GET":
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 128}]}, {}
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        k_prompt, k_sample = body.get("prompt_logprobs"), body.get("logprobs")
        for what, k in (("prompt", k_prompt), ("sample", k_sample)):
            if k is not None and k > MAX_LOGPROBS:
                return 400, {"object": "error", "type": "BadRequestError", "code": 400, "param": f"{what}_logprobs",
                             "message": f"Requested {what} logprobs of {k}, which is greater than max allowed: "
                                        f"{MAX_LOGPROBS}"}, {}
        render = ((lambda i: f"token_id:{i}") if token_ids and body.get("return_tokens_as_token_ids")
                  else (lambda i: tokenizer.decode([i])))
        sequence, steps = list(ids), []
        for _ in range(body.get("max_tokens", 16)):
            row = log_softmax(sequence)[-1]
            allowed = row.clone()
            allowed[special] = -math.inf
            steps.append((row, int(allowed.argmax())))
            sequence.append(steps[-1][1])
        new = [i for _, i in steps]
        choice = {"index": 0, "text": "".join(tokenizer.decode([i]) for i in new), "logprobs": None,
                  "finish_reason": "length", "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                  "prompt_token_ids": None}
        if k_sample is not None:
            tokens = [render(i) for i in new]
            choice["logprobs"] = {
                "text_offset": [sum(len(t) for t in tokens[:j]) for j in range(len(tokens))],
                "token_logprobs": [max(float(row[i]), -9999.0) for row, i in steps],
                "tokens": tokens,
                "top_logprobs": [{render(int(key)): v["logprob"] for key, v in logprob_dict(row, i, k_sample).items()}
                                 for row, i in steps],
            }
        if k_prompt is not None:
            logp = log_softmax(ids)
            choice["prompt_logprobs"] = [None] + [logprob_dict(logp[t if shift else t - 1], ids[t], k_prompt)
                                                  for t in range(1, len(ids))]
        if state.get("break"):
            BREAKS[state["break"]][0](choice, ids)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
        return 200, {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": "tiny",
                     "choices": [choice], "usage": usage}, {}

    return handle


def _drop_own_token(choice: dict, ids: list[int]) -> None:
    del choice["prompt_logprobs"][1][str(ids[1])]


def _rekey(choice: dict, ids: list[int]) -> None:
    choice["prompt_logprobs"][1] = {f"token_id:{key}": v for key, v in choice["prompt_logprobs"][1].items()}


def _flatten(choice: dict, ids: list[int]) -> None:
    choice["prompt_logprobs"][1] = {key: v["logprob"] for key, v in choice["prompt_logprobs"][1].items()}


def _outside(choice: dict, ids: list[int]) -> None:
    choice["prompt_logprobs"][1]["107"] = {"logprob": -30.0, "rank": 99, "decoded_token": "?"}


BREAKS = {
    "no field": (lambda choice, ids: choice.pop("prompt_logprobs"),
                 r"without choices\[0\]\.prompt_logprobs \(a list; got NoneType\): not vLLM's dialect"),
    "short": (lambda choice, ids: choice["prompt_logprobs"].pop(),
              r"choices\[0\]\.prompt_logprobs of 5 entries for a prompt of 6 tokens"),
    "own token missing": (_drop_own_token, r"choices\[0\]\.prompt_logprobs\[1\] without the prompt's own token"),
    "keys not ids": (_rekey, r"choices\[0\]\.prompt_logprobs\[1\] keyed by 'token_id:\d+', not a token id"),
    "values flattened": (_flatten, r"choices\[0\]\.prompt_logprobs\[1\]\['\d+'\] = -?[\d.e-]+, not \{\"logprob\""),
    "id outside the vocabulary": (_outside, r"token id 107 in choices\[0\]\.prompt_logprobs\[1\], outside the "
                                            r"teacher tokenizer's 100 ids: is teacher.model the served model"),
    "generated logprobs": (lambda choice, ids: choice["logprobs"].update(top_logprobs=[["x", -1.0]]),
                           r"choices\[0\]\.logprobs = .*not the OpenAI shape"),
}
"""Malformed answers: (what the server does to its answer, the error it must give)."""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 1-layer char-level Llama with a large random head of its own (untied), saved as a directory:
    peaked predictions that do not just repeat the last character (the tied head of so small a model
    does), so that prompt log-probs shifted by one position are far from the aligned ones."""
    spec = ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=128)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0)
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(10 * torch.randn(model.lm_head.weight.shape, generator=generator))
    directory = tmp_path_factory.mktemp("teacher") / "model"
    save_model(model, tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def tiny_teacher(teacher_dir) -> LocalTeacher:
    """The model of `teacher_dir`: what the loopback serves, and the reference it is compared with."""
    spec = ModelConfig(path=str(teacher_dir))
    teacher = LocalTeacher(load_model(spec), load_tokenizer(spec))
    assert teacher.weights.lm_head.weight.abs().mean() > 5  # the saved head, not a re-tied embedding
    return teacher


def _batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of `texts` (no special tokens): rows of different lengths."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("token_ids", [True, False], ids=["token_id:N", "token-strings"])
def test_probe_finds_the_vllm_dialect_and_scores_equal_the_model(tiny_teacher, token_ids):
    """Scores and top-k (ids, log-probs) through prompt_logprobs equal the served model's own, at every
    real position (the last from the generated token's logprobs); no request echoes or sends text to score."""
    tokenizer = tiny_teacher.tokenizer
    ids, mask = _batch(tokenizer, ["12+30=42", "What is 7 * 6?", "ab"])
    with ScriptedServer(vllm_handler(tiny_teacher.weights, tokenizer, token_ids=token_ids)) as server:
        teacher = ServerTeacher(server.url, "tiny", tokenizer=tokenizer, concurrency=2)
        assert teacher.capability == Capability.TOPK
        features = teacher.features
        assert features["dialect"] == "vllm" and features["prompt_logprobs"] is True
        assert features["token_ids"] is token_ids and features["prompt_logprobs_checks"] == [True, True]
        assert features["echo"] is None and "echo_checks" not in features  # decided before the echo probe
        probed = len(server.requests)
        k = 5
        served, served_topk = teacher.score(ids, mask), teacher.topk(ids, mask, k)
        scoring = [body for _, _, _, body in server.requests[probed:]]
    assert len(scoring) == 2 * 3  # one request per row, for score and for topk
    assert all(isinstance(b["prompt"], list) and not b.get("echo") and b["max_tokens"] == 1 for b in scoring)
    assert sorted(b["prompt_logprobs"] for b in scoring) == [1] * 3 + [k] * 3
    local, ref = tiny_teacher.score(ids, mask), tiny_teacher.topk(ids, mask, k)
    real = mask.bool()
    assert not torch.isnan(served).any() and (served[~real] == 0).all() and (served[:, 0] == 0).all()
    assert torch.allclose(served, local, atol=1e-5)
    assert torch.equal(served_topk.ids[real], ref.ids[real])
    assert torch.allclose(served_topk.logprobs[real], ref.logprobs[real], atol=1e-5)
    # The tail the losses use, 1 - sum of the top k, is the model's: the k are its k best, exactly.
    tail = 1 - served_topk.logprobs.exp().sum(-1)
    assert torch.allclose(tail[real], 1 - ref.logprobs.exp().sum(-1)[real], atol=1e-5)


def test_misaligned_prompt_logprobs_are_refused(tiny_teacher):
    """A server whose prompt_logprobs are off by one position speaks the dialect but fails the alignment
    check on both probe texts; it gives text only (it does not echo either)."""
    tokenizer = tiny_teacher.tokenizer
    with ScriptedServer(vllm_handler(tiny_teacher.weights, tokenizer, shift=True)) as server:
        teacher = ServerTeacher(server.url, "tiny", tokenizer=tokenizer)
        assert teacher.capability == Capability.TEXT
        assert teacher.features["prompt_logprobs"] is True and teacher.features["dialect"] is None
        assert teacher.features["prompt_logprobs_checks"] == [False, False]
        ids, mask = _batch(tokenizer, ["12+30="])
        with pytest.raises(CapabilityError, match=r"no aligned prompt_logprobs \(vLLM\) or echo"):
            teacher.score(ids, mask)


@pytest.mark.parametrize("kind", list(BREAKS))
def test_a_malformed_answer_fails_clearly_and_is_not_retried(tiny_teacher, kind):
    tokenizer = tiny_teacher.tokenizer
    state: dict = {}
    ids, mask = _batch(tokenizer, ["12+30="])
    with ScriptedServer(vllm_handler(tiny_teacher.weights, tokenizer, state=state)) as server:
        teacher = ServerTeacher(server.url, "tiny", tokenizer=tokenizer, backoff=0.01)
        assert teacher.capability == Capability.TOPK
        state["break"] = kind
        probed = len(server.requests)
        with pytest.raises(ServerResponseError, match=f"{server.url}/completions answered .*{BREAKS[kind][1]}"):
            teacher.topk(ids, mask, 3)
        assert len(server.requests) == probed + 1


def test_k_above_the_servers_max_logprobs_names_the_flag(tiny_teacher):
    tokenizer = tiny_teacher.tokenizer
    ids, mask = _batch(tokenizer, ["12+30="])
    with ScriptedServer(vllm_handler(tiny_teacher.weights, tokenizer)) as server:
        teacher = ServerTeacher(server.url, "tiny", tokenizer=tokenizer)
        with pytest.raises(ServerError, match=r"HTTP 400.*greater than max allowed: 20.*--max-logprobs 21 or "
                                              r"lower teacher.k"):
            teacher.topk(ids, mask, MAX_LOGPROBS + 1)
        assert teacher.topk(ids, mask, MAX_LOGPROBS).ids.shape == (1, 6, MAX_LOGPROBS)


def test_kd_with_a_vllm_served_teacher_equals_kd_with_the_model_here(tiny_teacher, teacher_dir, addition_data,
                                                                      tmp_path):
    """The same kd run (teacher.k=8) with the teacher behind the vLLM loopback and loaded here: the
    same loss at every step, so the served top-k reach the loss as the local ones do."""
    common = {"method": {"name": "kd"}, "train": {"steps": 3}}
    local = tiny_run_config(addition_data, tmp_path / "local", teacher={"kind": "local", "k": 8, "model": {
        "path": str(teacher_dir)}}, **common)
    fit(local, progress=False)
    with ScriptedServer(vllm_handler(tiny_teacher.weights, tiny_teacher.tokenizer)) as server:
        served = tiny_run_config(addition_data, tmp_path / "served", teacher={
            "kind": "server", "base_url": server.url, "served_model": "tiny", "k": 8,
            "model": {"tokenizer": "char"}}, **common)
        fit(served, progress=False)
        assert any(body and body.get("prompt_logprobs") == 8 for _, _, _, body in server.requests)
    local_loss = [row["loss"] for row in read_metrics(local.run_dir) if "loss" in row]
    served_loss = [row["loss"] for row in read_metrics(served.run_dir) if "loss" in row]
    assert len(local_loss) == 3 and all(math.isfinite(v) for v in local_loss)
    assert served_loss == pytest.approx(local_loss, rel=1e-4, abs=1e-6)
