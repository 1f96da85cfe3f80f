"""Write the prompts of seed003_methods' instruction task: short, answerable instructions from templates.

The teacher (SmolLM2-135M-Instruct, offline) then answers them with `lmdistill elicit label`; see
configs/experiments/elicit_instructions.yaml. Deterministic: the same file on every run.

    python scripts/make_instruction_prompts.py configs/experiments/data/instruction_prompts.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

WORDS = ["happy", "fast", "cold", "bright", "quiet", "strong", "small", "angry", "brave", "clean", "old", "rich",
         "early", "soft", "heavy", "simple", "loud", "warm", "empty", "wise"]
COUNTRIES = ["France", "Japan", "Italy", "Canada", "Egypt", "Brazil", "Spain", "Germany", "India", "Mexico", "Kenya",
             "Norway", "Greece", "Peru", "China", "Turkey", "Chile", "Ireland", "Sweden", "Australia"]
THINGS = ["fruits", "vegetables", "birds", "sports", "colors", "flowers", "trees", "insects", "tools", "planets",
          "musical instruments", "board games", "kitchen utensils", "sea animals", "breakfast foods", "vehicles"]
TOPICS = ["the ocean", "autumn", "a city at night", "coffee", "friendship", "a thunderstorm", "the moon", "mountains",
          "a library", "snow", "the desert", "a garden", "trains", "music", "the sun", "a forest"]
PHRASES = ["good morning", "thank you", "see you tomorrow", "I am hungry", "where is the station", "happy birthday",
           "good night", "how are you"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
NOUNS = ["mouse", "child", "leaf", "tooth", "city", "box", "person", "knife", "goose", "wolf", "story", "woman"]
ANIMALS = ["cow", "owl", "dolphin", "horse", "bee", "frog", "lion", "penguin", "rabbit", "snake", "duck", "whale",
           "camel", "eagle", "bear", "goat"]
TEMPLATES = [
    ("Give a synonym for the word '{w}'.", "w", WORDS),
    ("What is the opposite of '{w}'?", "w", WORDS),
    ("What is the capital of {c}?", "c", COUNTRIES),
    ("Name three {t}.", "t", THINGS),
    ("Write one sentence about {p}.", "p", TOPICS),
    ("Translate '{x}' into {lang}.", "x,lang", list(itertools.product(PHRASES, LANGUAGES))),
    ("What is the plural of '{n}'?", "n", NOUNS),
    ("Write a short title for a story about {p}.", "p", TOPICS),
    ("Use the word '{w}' in a sentence.", "w", WORDS),
    ("What language is spoken in {c}?", "c", COUNTRIES),
    ("Give one fact about {p}.", "p", TOPICS),
    ("Name a famous food from {c}.", "c", COUNTRIES),
    ("What does a {a} eat?", "a", ANIMALS),
    ("Where does a {a} live?", "a", ANIMALS),
    ("What sound does a {a} make?", "a", ANIMALS),
    ("Describe {c} in one sentence.", "c", COUNTRIES),
    ("Name a word that rhymes with '{w}'.", "w", WORDS),
]


def prompts() -> list[dict]:
    """Every template filled with every value, shuffled with a fixed seed; ids name the template."""
    rows = []
    for i, (template, keys, values) in enumerate(TEMPLATES):
        names = keys.split(",")
        for j, v in enumerate(values):
            fill = dict(zip(names, v if isinstance(v, tuple) else (v,)))
            rows.append({"id": f"t{i:02d}-{j:02d}", "prompt": template.format(**fill)})
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    rows = prompts()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
