"""The judge's primitives (lmdistill.judging): parsing real-looking answers, position-swap consistency,
pointwise pairs. Pure functions on text: no model."""

from __future__ import annotations

import pytest

from lmdistill.judging import (PAIRWISE_TEMPLATE, POINTWISE_TEMPLATE, Verdict, best_and_worst, mean_scores,
                               pairwise_prompt, parse_choice, parse_score, pointwise_prompt, swap_consistent)

SCORES = [
    # (the judge's answer, the score, or the start of the reason it was refused); scale 1 to 10
    ("Score: 8", 8),
    ("Score: 7/10", 7),
    ("**Score:** 9", 9),
    ("Score: 7.5", 7.5),
    ("I would rate this response a 6 out of 10.", 6),
    ("Rating: seven out of ten", 7),
    ("I'd give it an eight.", 8),
    ("8", 8),
    ("9. The response is correct and clear.", 9),
    ("Eight.", 8),
    ("The response is accurate and well explained. 8/10", 8),
    ("On a scale of 1 to 10, I would rate it 4.", 4),
    ("Using a score of 1 to 10 as asked. Score: 5", 5),  # the scale is not the score
    ("The response deserves a score of 3 because the sum is wrong.", 3),
    ("Score - 6\nThe answer is mostly right.", 6),
    ("The answer is fine.\nScore: 4\n...on reflection, Score: 6", 6),  # the last labelled score
    ("Score: 12", "score 12 is outside 1 to 10"),
    ("Score: 4/5", "score 4/5 is not on the 1 to 10 scale"),
    ("Score: 0", "score 0 is outside"),
    ("I'm sorry, but I cannot evaluate this response.", "the judge refused"),
    ("As an AI language model, I do not have personal opinions.", "the judge refused"),
    ("The response is good and helpful.", "no score found"),
    ("2 + 2 = 4, so the response is right.", "no score found"),  # a sum, not a leading score
    ("Score: N/A", "no score found"),
    ("1. No Frying: Frying is a technique that has been used for", "no score found"),  # a list (SmolLM2-135M)
    ("1. Sun\n2. Moon\n3. Star", "no score found"),
    ("1", 1),
    ("   ", "empty answer"),
]


@pytest.mark.parametrize("raw, expected", SCORES, ids=[s[0][:40] for s in SCORES])
def test_parse_score_on_real_looking_answers(raw, expected):
    verdict = parse_score(raw, low=1, high=10)
    assert verdict.raw == raw  # the raw answer is kept
    if isinstance(expected, str):
        assert verdict.value is None and verdict.reason.startswith(expected), verdict
    else:
        assert verdict.value == expected and verdict.reason is None, verdict


def test_parse_score_on_another_scale():
    assert parse_score("Score: 4/5", low=1, high=5).value == 4
    assert parse_score("Score: 7", low=1, high=5).reason == "score 7 is outside 1 to 5"
    assert parse_score("three", low=0, high=3).value == 3


CHOICES = [
    ("Answer: B", "B"),
    ("Answer: (A)", "A"),
    ("Answer:\nB", "B"),
    ("[[A]]", "A"),
    ("Final verdict: [[B]]", "B"),
    ("A", "A"),
    ("B.", "B"),
    ("Response A.", "A"),
    ("The answer is A.", "A"),
    ("**Response B** is better.", "B"),
    ("I prefer Response A because it gives the right number.", "A"),
    ("The better response is B.", "B"),
    ("The better one is (B)", "B"),
    ("Response A is wrong, Response B is correct.", "B"),
    ("Response A is incorrect.", "B"),  # a verdict against A
    ("B. Response B gives the right number.", "B"),
    ("Assistant A's answer is more accurate than the other.", "A"),
    ("A good answer should be short, and the first one is.", "A"),  # the article, not a choice; "the first one"
    ("Answer: A. Response B is wrong too, but less so.", "A"),  # a labelled choice beats a verdict
    ("Both are good, but Response B is clearer.", "B"),
    ("Both responses are equally good.", "the judge called a tie"),
    ("It's a tie.", "the judge called a tie"),
    ("I'm sorry, but I can't decide between them.", "the judge refused"),
    ("As an AI, I cannot judge which is better.", "the judge refused"),
    ("Answer: A or Answer: B", "no choice"),  # the request echoed back
    ("Response A and Response B both have errors.", "the answer names both A and B"),
    ("Output (a) is nicer.", "no choice"),  # letters are capitals
    ("They are different.", "no choice"),
    ("", "empty answer"),
]


@pytest.mark.parametrize("raw, expected", CHOICES, ids=[c[0][:40] or "empty" for c in CHOICES])
def test_parse_choice_on_real_looking_answers(raw, expected):
    verdict = parse_choice(raw)
    assert verdict.raw == raw
    if expected in ("A", "B"):
        assert verdict.value == expected and verdict.reason is None, verdict
    else:
        assert verdict.value is None and verdict.reason.startswith(expected), verdict


def test_parse_choice_maps_a_quoted_response_to_its_letter():
    """SmolLM2-135M answers "The answer is 112." to which of A = 122, B = 112 is better."""
    assert parse_choice("The answer is 112.", "122", "112").value == "B"
    assert parse_choice("The answer is 112.", "112", "122").value == "A"
    assert parse_choice("The answer is 1122.", "122", "112").reason.startswith("no choice")  # not inside a number
    assert parse_choice("The answer is 12.5", "12", "13").reason.startswith("no choice")
    assert parse_choice("Both 12 and 13 are numbers", "12", "13").reason.startswith("no choice")  # both quoted
    assert parse_choice("Answer: A, not 13", "12", "13").value == "A"  # a letter first
    assert parse_choice("The answer is 112.").reason.startswith("no choice")  # without the responses


def votes(*answers: str) -> list[Verdict]:
    return [parse_choice(a) for a in answers]


def test_swap_consistent_keeps_a_pair_only_when_both_orders_agree():
    """first: x shown as A, y as B; swapped: y as A, x as B."""
    assert swap_consistent(votes("A"), votes("B")) == (0, 1.0, None)  # x both times
    assert swap_consistent(votes("B"), votes("A")) == (1, 1.0, None)  # y both times
    for letter in "AB":  # the same position both times: the judge chose a position, not a response
        pref = swap_consistent(votes(letter), votes(letter))
        assert pref.winner is None and pref.margin == 0
        assert pref.reason == f"inconsistent across orders: the judge chose {letter} in both orders (position bias)"


def test_swap_consistent_margin_counts_the_votes_of_both_orders():
    """first: A, A, B → x, x, y (x by majority); swapped: B, B, B → x, x, x. Votes for x: 5, against: 1;
    margin (5 − 1) / 6 = 2/3. An unparsed vote does not count: (2 − 0) / 2 = 1."""
    pref = swap_consistent(votes("A", "Answer: A", "B"), votes("B", "B", "(B)"))
    assert pref.winner == 0 and pref.margin == pytest.approx(2 / 3) and pref.reason is None
    assert swap_consistent(votes("A", "no idea"), votes("B")) == (0, 1.0, None)
    assert swap_consistent(votes("A", "B"), votes("B")).reason == "first order: the votes split evenly"
    assert swap_consistent(votes("A"), votes("I'm sorry, I cannot judge.")).reason.startswith(
        "swapped order: the judge refused")
    assert swap_consistent(votes("A"), []).reason == "swapped order: no answer"


def test_best_and_worst_of_pointwise_scores():
    """Scores 7, 3, 9 on 1..10: chosen 2 (9), rejected 1 (3), margin (9 − 3) / 9 = 2/3."""
    assert best_and_worst([7, 3, 9]) == (2, 1, pytest.approx(2 / 3), None)
    assert best_and_worst([9, 9, 2, 2]) == (0, 3, pytest.approx(7 / 9), None)  # first best, last worst
    assert best_and_worst([4, None, 2], low=0, high=4) == (0, 2, 0.5, None)
    assert best_and_worst([5, 5]) == (None, None, 0.0, "tie: every response scored 5")
    assert best_and_worst([None, 4])[3] == "1 of 2 responses got a score (2 needed)"
    scores = mean_scores([[parse_score("Score: 8"), parse_score("Score: 6")], [parse_score("none")], []])
    assert scores == [7.0, None, None]


def test_prompts_fill_the_templates():
    asked = pairwise_prompt("What is 2 + 2?", "4", "5")
    assert "Response A:\n4\n\nResponse B:\n5" in asked and "What is 2 + 2?" in asked and "Answer: A" in asked
    asked = pointwise_prompt("Q?", "R {with braces}", low=0, high=5)
    assert "scale of 0 to 5" in asked and "Response:\nR {with braces}" in asked
    assert "{a}" in PAIRWISE_TEMPLATE and "{response}" in POINTWISE_TEMPLATE
    with pytest.raises(KeyError):
        pairwise_prompt("q", "a", "b", template="{nope}")
