"""Writes the bundled sample datasets (a learnable toy task) in the three formats.

Deterministic: re-running it gives the same files. Usage: python examples/make_sample_data.py
"""

import json
import random
from pathlib import Path

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "sky", "leaf", "sun", "night", "snow", "carrot", "plum", "grass", "coal", "milk", "lemon"]


def rows(seed: int = 7):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    rng.shuffle(pairs)
    for a, b in pairs:
        yield f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    for thing in THINGS:
        for colour in COLOURS[:4]:
            yield f"Paint the {thing} {colour}. What colour is the {thing}?", f"The {thing} is {colour}."


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    data = list(rows())
    with (out / "sample_chat.jsonl").open("w") as f:
        for q, a in data:
            msgs = [
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with (out / "sample_prompt_completion.jsonl").open("w") as f:
        for q, a in data:
            f.write(json.dumps({"prompt": f"Q: {q}\nA:", "completion": f" {a}"}) + "\n")


if __name__ == "__main__":
    main()
