"""Reference-based rewards: sacrebleu chrF and BLEU (rescaled to [0, 1]) and exact match."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from rest_jax.errors import RestJaxError


def _require_references(name: str, hypotheses: Sequence[str],
                        references: Sequence[str] | None) -> Sequence[str]:
  if references is None:
    raise RestJaxError(f"reward {name!r} compares against references, but none were given; use "
                       "a task with targets or a reference-free reward.")
  if len(references) != len(hypotheses):
    raise ValueError(f"{name}: {len(hypotheses)} hypotheses but {len(references)} references")
  return references


class _SentenceMetric:
  """A sacrebleu sentence-level metric scaled from [0, 100] to [0, 1]."""

  name = ""

  def __init__(self, metric):
    self._metric = metric

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float32 `[n]` in [0, 1] (sacrebleu can return 100 + 1e-14, hence the clip)."""
    del sources
    references = _require_references(self.name, hypotheses, references)
    scores = [self._metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    return np.clip(np.asarray(scores, dtype=np.float64) / 100.0, 0.0, 1.0).astype(np.float32)


class ChrF(_SentenceMetric):
  """Sentence-level chrF (sacrebleu defaults: character 6-grams, beta 2) / 100."""

  name = "chrf"

  def __init__(self):
    super().__init__(CHRF())


class Bleu(_SentenceMetric):
  """Sentence-level BLEU with effective order (short sentences are not zeroed) / 100."""

  name = "bleu"

  def __init__(self):
    super().__init__(BLEU(effective_order=True))


class ExactMatch:
  """1.0 where the stripped hypothesis equals the stripped reference, else 0.0 (ReST-EM)."""

  name = "exact_match"

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float32 `[n]` in {0, 1}."""
    del sources
    references = _require_references(self.name, hypotheses, references)
    return np.asarray([float(h.strip() == r.strip()) for h, r in zip(hypotheses, references)],
                      dtype=np.float32)
