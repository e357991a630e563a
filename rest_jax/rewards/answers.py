"""Answer-checking rewards for ReST-EM's math tasks: 1.0 when the final answers agree, else 0.0.

* GSM8K ("gsm8k_answer"): the final answer follows the last "####" (as in GSM8K's solutions);
  without one, the last number in the text. Numbers compare numerically ("1,000" == "1000.0").
* MATH ("math_answer"): the final answer is the content of the last \\boxed{...} (or \\fbox);
  a reference without one is its whole text. Answers compare after the normalisation of
  Hendrycks et al.'s MATH evaluation (spaces, \\left/\\right, \\dfrac -> \\frac, units of degrees,
  dollars and percent, "x =" prefixes), and numerically where both sides are numbers or
  simple fractions.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from rest_jax.rewards.metrics import _require_references

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def to_number(text: str | None) -> float | None:
  """``text`` as a number ("1,000", "$5", "3.50", "-2", "50%"), or None."""
  if text is None:
    return None
  cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".").rstrip("%").strip()
  try:
    return float(cleaned)
  except ValueError:
    return None


def gsm8k_answer(text: str) -> str | None:
  """The final answer of a GSM8K-style solution: after the last "####", else the last number."""
  if "####" in text:
    answer = text.rsplit("####", 1)[1].strip().splitlines()
    return answer[0].strip() if answer else None
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def last_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} / \\fbox{...} in ``text`` (braces balanced), or None."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  brace = text.find("{", start)
  if brace < 0:
    rest = text[start:].split(None, 1)  # "\boxed 5" form.
    return rest[1].split("$")[0].strip() if len(rest) > 1 else None
  depth = 0
  for i in range(brace, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[brace + 1:i]
  return None


def normalize_math(answer: str) -> str:
  """Hendrycks et al.'s MATH answer normalisation (``strip_string``), slightly extended."""
  s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "")
  s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
  s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s.strip())  # A trailing unit: "5 \text{ cm}".
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if s.startswith("."):
    s = "0" + s
  parts = s.split("=")
  if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5" -> "5".
    s = parts[1]
  s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}.
  s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
  s = s.replace(" ", "")
  if s == "0.5":
    s = "\\frac{1}{2}"
  if re.fullmatch(r"-?\d+/\d+", s):
    num, den = s.split("/")
    s = f"\\frac{{{num}}}{{{den}}}"
  return s.rstrip(".")


def _math_value(normalized: str) -> float | None:
  match = _FRAC.match(normalized)
  if match:
    sign, num, den = match.groups()
    try:
      value = float(num) / float(den)
    except (ValueError, ZeroDivisionError):
      return None
    return -value if sign else value
  return to_number(normalized)


def answers_equal(a: str | None, b: str | None) -> bool:
  """Numeric equality (relative 1e-6) where both parse as numbers, else exact string equality."""
  if a is None or b is None:
    return False
  x, y = to_number(a), to_number(b)
  if x is not None and y is not None:
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
  return a.strip() == b.strip()


def math_equal(hypothesis: str | None, reference: str | None) -> bool:
  """MATH answers equal after ``normalize_math`` (or as equal numbers / fractions)."""
  if hypothesis is None or reference is None:
    return False
  h, r = normalize_math(hypothesis), normalize_math(reference)
  if h == r:
    return True
  x, y = _math_value(h), _math_value(r)
  return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


class Gsm8kAnswer:
  """1.0 where the hypothesis's final answer equals the reference's (GSM8K "#### N")."""

  name = "gsm8k_answer"

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float32 `[n]` in {0, 1}."""
    del sources
    references = _require_references(self.name, hypotheses, references)
    return np.asarray([float(answers_equal(gsm8k_answer(h), gsm8k_answer(r)))
                       for h, r in zip(hypotheses, references)], dtype=np.float32)


class MathAnswer:
  """1.0 where the hypothesis's last \\boxed{} answer equals the reference's (MATH)."""

  name = "math_answer"

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float32 `[n]` in {0, 1}."""
    del sources
    references = _require_references(self.name, hypotheses, references)
    out = []
    for h, r in zip(hypotheses, references):
      reference = last_boxed(r)
      out.append(float(math_equal(last_boxed(h), r.strip() if reference is None else reference)))
    return np.asarray(out, dtype=np.float32)
