"""The gate's statistics: paired intervals, so no check decides on a difference inside its noise.

Every comparison is paired (the same held-out votes, prompts and questions for both models) and
resampled with a fixed seed, so a rerun of the gate on the same numbers gives the same verdict.

- `auc_difference`: bootstrap interval of AUC(candidate) - AUC(current) on the same votes,
  resampled within each label so every resample has the liked/disliked counts of the data.
- `auc_interval`: the same for one ranking (is a reward model better than chance?).
- `paired_mean`: bootstrap interval of the mean of per-item scores (a per-question accuracy
  difference in {-1, 0, 1}).
- `platt`, `approval_difference`: a judge's scores made the chance a user likes a reply
  (Platt scaling on held-out votes), and the approval it expects of one model's replies minus
  another's, with an interval that resamples the prompts and refits the calibration.
- `sign_test`: exact one-sided binomial (McNemar) test on discordant pairs, for counts too small
  for an interval ("3 looping replies vs 1" is 4 discordant pairs: p = 0.31, not evidence).
- `share_interval`: a share of yes/no items (the disliked share of a version's votes), Wilson's
  score interval: a round trains only while users may still dislike enough of what serves.
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


def win_share(candidate, current, *, confidence: float, samples: int, seed: int = 0) -> Interval:
    """The share of items where `candidate` scores above `current` (ties half), with its
    bootstrap interval; `p_better`: its confidence that the share is above one half. An item
    may be a list of scores (a prompt's sampled replies): their means are compared."""
    candidate, current = (np.asarray(x, float) for x in (candidate, current))
    candidate, current = (x.mean(axis=1) if x.ndim == 2 else x for x in (candidate, current))
    return paired_mean([(c > o) + 0.5 * (c == o) for c, o in zip(candidate, current)],
                       confidence=confidence, samples=samples, seed=seed, null=0.5)


def share_interval(k: int, n: int, *, confidence: float) -> Interval:
    """`k` of `n` as a share with Wilson's score interval (two-sided at `confidence`): exact
    enough at the edges, where 0 of 40 is a share of at most 8.8% (95%), not of exactly 0."""
    assert 0 <= k <= n and n > 0, "a share of nothing"
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = k / n, z * z / n
    centre, half = (p + z2 / 2) / (1 + z2), z * sqrt(p * (1 - p) / n + z2 / (4 * n)) / (1 + z2)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), confidence)


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


@dataclass(frozen=True)
class Calibration:
    """A judge's scores of held-out votes it never trained on, and those votes' labels: what
    turns its scores into the chance that a user likes a reply (`platt`); and how well the
    scores rank those votes (`auc`, with its interval): a judge is trusted (its synthetic pairs
    used, its direction counted by the gate's (b)) only when that interval is above chance.
    Made by `of`, which computes the interval once for the round and its gate."""
    scores: tuple[float, ...]
    labels: tuple[bool, ...]
    auc: Interval

    def __post_init__(self) -> None:
        self.check(self.scores, self.labels)

    @staticmethod
    def check(scores: tuple, labels: tuple) -> None:
        if len(scores) != len(labels) or len(set(labels)) != 2:
            raise ValueError("a calibration needs scored votes of both labels")

    @classmethod
    def of(cls, scores, labels, *, confidence: float, samples: int,
           seed: int = 0) -> "Calibration":
        scores, labels = tuple(float(s) for s in scores), tuple(bool(y) for y in labels)
        cls.check(scores, labels)  # before the bootstrap, which needs both labels
        return cls(scores, labels, auc_interval(scores, labels, confidence=confidence,
                                                samples=samples, seed=seed))

    @property
    def trusted(self) -> bool:
        return self.auc.low > 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def platt(scores, labels, iterations: int = 50) -> tuple[float, float]:
    """Platt scaling: P(liked | score) = sigmoid(slope * score + intercept), fitted by Newton's
    method to Platt's smoothed targets ((liked + 1) / (liked + 2) for a liked vote, 1 /
    (disliked + 2) for a disliked one), whose optimum is finite even when the scores separate
    the labels. Vectorized: `scores` and `labels` may be (resamples, votes) arrays, each row its
    own fit; returns arrays then."""
    x, y = np.asarray(scores, float), np.asarray(labels, bool)
    single = x.ndim == 1
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    liked = y.sum(axis=1, keepdims=True)
    disliked = y.shape[1] - liked
    target = np.where(y, (liked + 1) / (liked + 2), 1 / (disliked + 2))
    mean, sd = x.mean(axis=1, keepdims=True), x.std(axis=1, keepdims=True)
    sd = np.where(sd > 0, sd, 1.0)
    z = (x - mean) / sd  # fitted on standardized scores, then mapped back
    a = np.zeros(len(x))
    b = np.log((liked[:, 0] + 1) / (disliked[:, 0] + 1))
    for _ in range(iterations):
        p = _sigmoid(a[:, None] * z + b[:, None])
        r, w = p - target, p * (1 - p) + 1e-9
        ga, gb = (r * z).sum(1) + 1e-6 * a, r.sum(1)  # a whisker of ridge: constant scores
        haa, hab, hbb = (w * z * z).sum(1) + 1e-6, (w * z).sum(1), w.sum(1)
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        step = np.maximum(1.0, np.hypot(da, db) / 4)  # no step longer than 4: no overshoot
        a, b = a - da / step, b - db / step
    slope = a / sd[:, 0]
    intercept = b - slope * mean[:, 0]
    return (float(slope[0]), float(intercept[0])) if single else (slope, intercept)


def approval_difference(candidate, current, calibration: Calibration, *, confidence: float,
                        samples: int, seed: int = 0) -> tuple[Interval, float, float]:
    """What the judge expects users to approve of, candidate minus current, over the same
    prompts: the mean of sigmoid(slope * score + intercept) per reply, with the calibration
    fitted on `calibration`'s votes (`platt`). The bootstrap resamples the prompts (paired) and
    the calibration votes (within each label) and refits, so a judge whose scores barely tell
    the labels apart has a flat, uncertain calibration and cannot call a difference. Returns
    the interval and the two estimated approvals (current, candidate).

    The gate's (b) asks this for the size of a loss, not for the direction
    (`training.evaluate.judge_verdict`): once both versions give replies the user likes, which
    one scores higher is what the judge weighs beyond the user's rule, the same way on every
    prompt (a win rate of 25% of 24 prompts against a candidate its user rated 98% vs 89%),
    and this expects about the same approval of both.

    A prompt may have several replies (sampled): `candidate` and `current` then hold a list of
    their scores per prompt (as many for every prompt), and a prompt's approval is the mean
    chance over its replies; the bootstrap still resamples prompts."""
    cand, cur = (np.asarray(x, float) for x in (candidate, current))
    cand, cur = (x[:, None] if x.ndim == 1 else x for x in (cand, cur))  # (prompts, replies)
    cal_x, cal_y = np.asarray(calibration.scores, float), np.asarray(calibration.labels, bool)

    def approval(slope, intercept, scores):  # per resample: the mean chance of a thumbs-up
        return _sigmoid(slope[:, None, None] * scores + intercept[:, None, None]).mean(axis=(1, 2))

    fit = [np.array([v]) for v in platt(cal_x, cal_y)]
    cur_ok, cand_ok = float(approval(*fit, cur[None])[0]), float(approval(*fit, cand[None])[0])
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(cal_y), np.flatnonzero(~cal_y)
    votes = np.concatenate([pos[rng.integers(0, len(pos), (samples, len(pos)))],
                            neg[rng.integers(0, len(neg), (samples, len(neg)))]], axis=1)
    fits = platt(cal_x[votes], cal_y[votes])
    prompts = rng.integers(0, len(cand), (samples, len(cand)))
    diffs = approval(*fits, cand[prompts]) - approval(*fits, cur[prompts])
    low, high = _bounds(diffs, confidence)
    return Interval(cand_ok - cur_ok, low, high, confidence, _above(diffs, 0.0)), cur_ok, cand_ok
