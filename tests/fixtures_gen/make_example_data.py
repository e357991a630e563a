"""Writes examples/numbers/{train,eval}.jsonl: the README's "your own data" example.

German number words -> English number words (like the embedded numbers_de_en task), one
``{"prompt": ..., "reference": ...}`` object a line; numbers drawn without replacement from
[0, 999] with a fixed seed, so the files are reproducible:

  PYTHONPATH=. python tests/fixtures_gen/make_example_data.py
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "examples", "numbers")
NUM_TRAIN, NUM_EVAL = 128, 32


def main() -> int:
  from num2words import num2words  # pylint: disable=g-import-not-at-top
  from rest_jax.tasks.numbers import sample_numbers  # pylint: disable=g-import-not-at-top
  train, evaluation, _ = sample_numbers(num_train=NUM_TRAIN, num_eval=NUM_EVAL, max_number=999,
                                        seed=1)
  os.makedirs(OUT, exist_ok=True)
  for name, numbers in (("train", train), ("eval", evaluation)):
    with open(os.path.join(OUT, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      for n in numbers.tolist():
        row = {"prompt": num2words(n, lang="de"), "reference": num2words(n, lang="en")}
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(numbers)} examples to {os.path.join(OUT, name + '.jsonl')}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
