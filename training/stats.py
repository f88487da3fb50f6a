"""The gate's statistics: paired intervals, so no check decides on a difference inside its noise.

Every comparison is paired (the same held-out votes, prompts and questions for both models) and
resampled with a fixed seed, so a rerun of the gate on the same numbers gives the same verdict.

- `auc_difference`: bootstrap interval of AUC(candidate) - AUC(current) on the same votes,
  resampled within each label so every resample has the liked/disliked counts of the data.
- `auc_interval`: the same for one ranking (is a reward model better than chance?).
- `paired_mean`: bootstrap interval of the mean of per-item scores (a win rate with ties as
  0.5, or a per-question accuracy difference in {-1, 0, 1}).
- `sign_test`: exact one-sided binomial (McNemar) test on discordant pairs, for counts too small
  for an interval ("3 looping replies vs 1" is 4 discordant pairs: p = 0.31, not evidence).
- `pooled`: two checks' one-sided evidence combined (Stouffer's z). Each interval also carries
  `p_better`, the share of its resamples on the candidate's side of no difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb, sqrt
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float
    # the share of resamples above the null (ties half): the bootstrap's one-sided confidence
    # that the true value lies above it
    p_better: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def auc(scores, labels) -> float:
    """P(score of a liked reply > score of a disliked one), ties counting half."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    assert len(pos) and len(neg), "AUC needs both labels"
    return float(_auc_sorted(pos, np.sort(neg)))


def _auc_sorted(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    below = np.searchsorted(neg_sorted, pos, side="left")
    at_or_below = np.searchsorted(neg_sorted, pos, side="right")
    return (below.sum() + 0.5 * (at_or_below - below).sum()) / (len(pos) * len(neg_sorted))


def _above(samples: np.ndarray, null: float) -> float:
    return float(np.mean(samples > null) + 0.5 * np.mean(samples == null))


def _bounds(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def auc_difference(candidate, current, labels, *, confidence: float, samples: int,
                   seed: int = 0) -> Interval:
    """AUC(candidate) - AUC(current) with a paired, label-stratified bootstrap interval."""
    cand, cur = np.asarray(candidate, float), np.asarray(current, float)
    labels = np.asarray(labels, bool)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for i in range(samples):
        p = pos[rng.integers(0, len(pos), len(pos))]
        n = neg[rng.integers(0, len(neg), len(neg))]
        diffs[i] = (_auc_sorted(cand[p], np.sort(cand[n]))
                    - _auc_sorted(cur[p], np.sort(cur[n])))
    low, high = _bounds(diffs, confidence)
    return Interval(auc(cand, labels) - auc(cur, labels), low, high, confidence,
                    _above(diffs, 0.0))


def auc_interval(scores, labels, *, confidence: float, samples: int, seed: int = 0) -> Interval:
    """AUC of one ranking with its label-stratified bootstrap interval (chance is 0.5)."""
    flat = [0.0] * len(scores)  # a constant ranking has AUC 0.5 in every resample
    d = auc_difference(scores, flat, labels, confidence=confidence, samples=samples, seed=seed)
    return Interval(d.estimate + 0.5, d.low + 0.5, d.high + 0.5, confidence, d.p_better)


def paired_mean(values, *, confidence: float, samples: int, seed: int = 0,
                null: float = 0.0) -> Interval:
    """The mean of per-item values with a bootstrap interval (items resampled); `p_better` is
    the share of resampled means above `null` (0.5 for a win rate)."""
    values = np.asarray(values, float)
    assert len(values), "no items"
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    low, high = _bounds(means, confidence)
    return Interval(float(values.mean()), low, high, confidence, _above(means, null))


def pooled(p_better: list[float], floor: float = 1e-4) -> float:
    """Independent checks' one-sided confidences combined by Stouffer's z: each becomes a normal
    quantile, their sum over sqrt(k) the pooled one. Two checks at 0.87 and 0.84, neither
    conclusive alone, pool to 0.93; one at 0.9 and one at 0.1 pool to 0.5."""
    assert p_better, "nothing to pool"
    unit = NormalDist()
    z = sum(unit.inv_cdf(min(max(p, floor), 1 - floor)) for p in p_better) / sqrt(len(p_better))
    return unit.cdf(z)


def sign_test(worse: int, better: int) -> float:
    """One-sided p-value that `worse` discordant pairs out of `worse + better` is chance
    (each pair equally likely to go either way): P(Binomial(n, 1/2) >= worse)."""
    n = worse + better
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(worse, n + 1)) / 2 ** n
