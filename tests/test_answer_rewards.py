"""Answer-checking rewards of ReST-EM: GSM8K "#### N" and MATH \\boxed{} answers."""

import numpy as np
import pytest

from rest_jax import rewards
from rest_jax.errors import RestJaxError
from rest_jax.rewards import answers


def test_gsm8k_extraction():
  assert answers.gsm8k_answer("3 + 4 = 7 apples.\n#### 7") == "7"
  assert answers.gsm8k_answer("so she pays $1,250.\n#### 1,250\n") == "1,250"
  assert answers.gsm8k_answer("He has 3 then 12 left") == "12"  # No "####": the last number.
  assert answers.gsm8k_answer("no number here") is None


def test_gsm8k_reward():
  reward = rewards.get_reward("gsm8k_answer")
  refs = ["Natalia sold 48/2 = 24 clips in May.\n#### 72"] * 5
  hyps = ["48 + 24 = 72\n#### 72", "#### 72.0", "The answer is 72", "#### 71", ""]
  np.testing.assert_array_equal(reward(["q"] * 5, hyps, refs), [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(reward(["q"], ["#### 1,000"], ["1000"]), [1])  # Answer-only ref.
  with pytest.raises(RestJaxError, match="references"):
    reward(["q"], ["#### 1"], None)


def test_boxed_and_normalisation():
  assert answers.last_boxed(r"so $\boxed{\frac{1}{2}}$ and then \boxed{3}") == "3"
  assert answers.last_boxed(r"\boxed{\frac{a}{b^{2}}}") == r"\frac{a}{b^{2}}"
  assert answers.last_boxed("no box") is None
  assert answers.normalize_math(r"\dfrac12") == r"\frac{1}{2}"
  assert answers.normalize_math(r"x = 5") == "5"
  assert answers.normalize_math(r"\left( 3, 4 \right)") == "(3,4)"
  assert answers.normalize_math(r"90^\circ") == "90"


def test_math_reward():
  reward = rewards.get_reward("math_answer")
  ref = r"The total is $\boxed{\frac{1}{2}}$."
  hyps = [r"\boxed{\dfrac{1}{2}}", r"\boxed{0.5}", r"\boxed{1/2}", r"\boxed{\frac{1}{3}}",
          "1/2 (not boxed)", r"\boxed{\tfrac12}"]
  np.testing.assert_array_equal(reward([""] * 6, hyps, [ref] * 6), [1, 1, 1, 0, 0, 1])
  # A reference without \boxed is the answer itself; numbers compare numerically.
  np.testing.assert_array_equal(
      reward(["", ""], [r"\boxed{10}", r"\boxed{10.00}"], ["10", r"\$10"]), [1, 1])
