"""Write the example's data: one-step word problems ("Mia has 7 apples. She buys 5 more. ...") in TRL's standard
format, one JSON object per line, with two extra columns the reward functions read.

    .venv/bin/python examples/word_problems/make_data.py        # writes data/train.jsonl and data/eval.jsonl

Columns: ``prompt`` (the problem text), ``answer`` (the reference number, as text), ``unit`` (the counted noun,
e.g. ``"apples"``: `rewards.correct` accepts ``Answer: 12 apples``) and ``op`` (``add`` / ``sub`` / ``mul``:
which template made the row, for reading per-operation rewards). Seeded: the same files every time. Held-out
rows never repeat a training prompt.

Left out on purpose: multi-step problems (not tried with SmolLM2-135M; a larger model can take them).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
         ("Ivy", "She"), ("Ben", "He"), ("Eva", "She"), ("Max", "He")]
UNITS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "balloons"]
TEMPLATES = {
    "add": "{name} has {a} {unit}. {pron} gets {b} more {unit}. How many {unit} does {name} have now?",
    "sub": "{name} has {a} {unit}. {pron} gives {b} {unit} to a friend. How many {unit} does {name} have left?",
    "mul": "{name} has {a} boxes with {b} {unit} in each box. How many {unit} does {name} have?",
}


def make_row(rng: random.Random) -> dict:
    """One problem: a template, a name, a unit and numbers drawn from ``rng`` (sums and differences of numbers
    up to 20, products of 2-5 boxes of 2-9)."""
    op = rng.choice(sorted(TEMPLATES))
    name, pron = rng.choice(NAMES)
    unit = rng.choice(UNITS)
    if op == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        value = a + b
    elif op == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        value = a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 9)
        value = a * b
    prompt = TEMPLATES[op].format(name=name, pron=pron, a=a, b=b, unit=unit)
    return {"prompt": prompt, "answer": str(value), "unit": unit, "op": op}


def make_split(rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    """``n`` rows whose prompts are not in ``taken`` (and differ from each other); adds them to ``taken``."""
    rows: list[dict] = []
    while len(rows) < n:
        row = make_row(rng)
        if row["prompt"] not in taken:
            taken.add(row["prompt"])
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--train", type=int, default=600, help="training rows")
    ap.add_argument("--eval", type=int, default=200, help="held-out rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, taken = random.Random(args.seed), set()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("eval", args.eval)):
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_split(rng, n, taken)))
        print(f"wrote {path}: {n} rows")


if __name__ == "__main__":
    main()
