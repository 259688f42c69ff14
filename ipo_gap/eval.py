"""Evaluation of a policy checkpoint: KL budget, win rate, classifier accuracy, winner drift.

Evaluation reads a policy and never touches training state (DESIGN.md). The `Evaluator` holds
what is fixed for a study: the reference (SFT) policy, the golden PM, the evaluation prompts
with the golden baseline's samples on them, the KL prompts, and labelled pairs for the
classifier accuracy (in a study: the valid split relabelled by the golden PM, the held-out
counterpart of D_golden, which is the train split relabelled by it).

- KL (App. D): one sample y ~ pi_theta per KL prompt (the sampler at temperature 1, no
  truncation), summing the exact full-vocabulary KL of the next-token distributions along y;
  the mean over prompts with a normal 95% interval, kl_lo, kl_hi = mean -/+ 1.96 standard errors
  (std(ddof=1) / sqrt(n); `Interval.of`).
- Win rate: one sample of the policy per evaluation prompt against the golden baseline's
  sample, judged by the de-biased golden PM (A.2): win 1, loss 0, tie 1/2. The 95% interval is
  Wilson's score interval for a proportion at n = the number of prompts (inside [0, 1] and
  never of zero width, also at 0/n or n/n; a tie's variance, at most that of a coin with the
  same mean, makes it slightly conservative when ties occur). Each prompt's outcome is kept,
  in prompt order, as a string of W (the policy's sample preferred), L and T (tie):
  `win_outcomes`. Every checkpoint is judged on the same prompts against the same baseline
  samples, so two checkpoints compare prompt by prompt (`paired_difference`).
- Hidden win rate (the embedded task only: `Evaluator.hidden`): the same win-rate samples
  judged by the task's hidden humans, past both PMs: per prompt their probability of
  preferring the policy's sample to the baseline's, sigmoid((R(x, y) - R(x, y_base)) / T),
  kept per prompt (`hidden_p`) and averaged with a normal 95% interval (`Interval.of`): the
  share of human raters who would prefer it. The golden PM's win rate estimates another
  quantity, the humans' majority verdict on each prompt (R(x, y) > R(x, y_base): win; equal:
  tie), which a golden PM that always sided with the humans would give; it is derived from
  `hidden_p` by `hidden_majority` (p > 1/2 exactly when R(x, y) > R(x, y_base)).
- Accuracy (App. E): the policy as a classifier, f = log pi(y_w)/pi(y_l) - log
  pi_sft(y_w)/pi_sft(y_l) > 0 (a zero margin scores 1/2), on pairs of the valid split
  relabelled by the golden PM (y_w = the golden PM's winner); drift (Fig. 8):
  mean of log pi(y_w|x) - log pi_sft(y_w|x) on the same pairs. Where the evaluator is also
  given training pairs (in a study: the pairs of D_golden that the offline runs read first,
  the set the paper's Fig. 8 reads), the same two on them: `train_accuracy`,
  `train_drift`, with per-pair results `train_accuracy_outcomes`.

All loops run fixed-size batches (the last one edge-padded, padding dropped), so each
quantity compiles once per study. Every checkpoint is measured with the evaluator's one key
(in a study, its "eval" purpose key), not one per step, so every checkpoint is measured on the
same prompts with the same random stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ipo_gap import classify, kl, sampling
from ipo_gap.data import ref_cache
from ipo_gap.data.sources import padded_batches
from ipo_gap.sharding import to_device, to_host
from ipo_gap.t5 import model as t5
from ipo_gap.train.trainers import judge_rows


@eqx.filter_jit
def _sample(policy, x, xm, key, max_len):
    s = sampling.sample(policy, x, xm, key=key, max_len=max_len)
    return s.tokens, s.mask


def sample_rows(policy, x, xm, *, key, max_len: int, batch_size: int = 256):
    """One sample per prompt row (batch b uses fold_in(key, b)): (tokens, mask) numpy."""
    toks, masks = [], []
    for b, (idx, keep) in enumerate(padded_batches(len(x), batch_size)):
        t, m = _sample(
            policy, to_device(x[idx]), to_device(xm[idx]), jax.random.fold_in(key, b), max_len
        )
        toks.append(to_host(t)[:keep])
        masks.append(to_host(m)[:keep])
    return np.concatenate(toks), np.concatenate(masks)


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    @staticmethod
    def of(values: np.ndarray) -> Interval:
        """Mean +- 1.96 * std(ddof=1) / sqrt(n): the normal approximation (for the KL)."""
        v = np.asarray(values, np.float64)
        half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), len(v))

    @staticmethod
    def of_judgements(values: np.ndarray) -> Interval:
        """Mean of judgements in [0, 1] (win 1, tie 1/2, loss 0) and Wilson's 95% score
        interval at n = len(values): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
        v = np.asarray(values, np.float64)
        n, p, z = len(v), float(v.mean()), 1.96
        if n == 0 or not np.all(np.isfinite(v)) or np.any((v < 0) | (v > 1)):
            raise ValueError(f"judgements must be a non-empty array of values in [0, 1]; got {v}")
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


OUTCOME_CHARS = {1.0: "W", 0.5: "T", 0.0: "L"}
OUTCOME_VALUES = {c: v for v, c in OUTCOME_CHARS.items()}


def outcomes(judged: np.ndarray) -> str:
    """De-biased judgements in {0, 1/2, 1} as a string of L, T, W (one per prompt)."""
    try:
        return "".join(OUTCOME_CHARS[float(j)] for j in np.asarray(judged))
    except KeyError as e:
        raise ValueError(f"a judgement is not 0, 1/2 or 1: {e}") from None


def outcome_values(text: str) -> np.ndarray:
    """The inverse of `outcomes`: float64 judgements in {0, 1/2, 1}."""
    bad = set(text) - set(OUTCOME_VALUES)
    if bad:
        raise ValueError(f"win outcomes may hold only W, T, L; found {sorted(bad)}")
    return np.array([OUTCOME_VALUES[c] for c in text], np.float64)


# Below this many prompts on which two checkpoints differ, the normal interval of the paired
# mean is unreliable (4 of 4 differing prompts in one direction would count as separated);
# `paired_difference` then uses an exact interval on the signs.
EXACT_BELOW = 30


def clopper_pearson(k: int, m: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper and Pearson's exact interval for a binomial proportion, k successes of m
    trials: the q at which P(X >= k) and P(X <= k) are each (1 - level) / 2 (bisection on the
    binomial tail sums; 0 and 1 at the edges)."""
    if not 0 <= k <= m or m == 0:
        raise ValueError(f"need 0 <= k <= m and m > 0, got k={k}, m={m}")
    alpha = (1 - level) / 2

    def at_least(j0, q):  # P(X >= j0) for X ~ Binomial(m, q), increasing in q
        return sum(math.comb(m, j) * q**j * (1 - q) ** (m - j) for j in range(j0, m + 1))

    def solve(f, target):  # f increasing in q on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda q: at_least(k, q), alpha)
    # P(X <= k) = 1 - P(X >= k + 1) = alpha, i.e. P(X >= k + 1) = 1 - alpha.
    upper = 1.0 if k == m else solve(lambda q: at_least(k + 1, q), 1 - alpha)
    return lower, upper


def paired_difference(a: str, b: str) -> Interval:
    """Mean over prompts of judgement(a) - judgement(b), two checkpoints' `win_outcomes` on
    the same prompts and baseline samples, with a 95% interval (`paired_interval`)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes must cover the same prompts: {len(a)} vs {len(b)}")
    return paired_interval(outcome_values(a) - outcome_values(b))


def paired_interval(d: np.ndarray) -> Interval:
    """The mean of per-prompt differences d with a 95% interval.

    With `EXACT_BELOW` or more prompts on which d is not 0: the normal interval of a paired
    mean. With fewer (close checkpoints sample alike from the same key), an exact one on the
    signs: of the m differing prompts k favour the first; Clopper-Pearson's interval
    [q_lo, q_hi] for the chance q that a differing prompt does gives the lower end
    (m / n) * (q_lo * a_pos - (1 - q_lo) * a_max) and the upper (m / n) * (q_hi * a_max -
    (1 - q_hi) * a_neg), a_pos and a_neg the mean size of the positive and of the negative
    differences and a_max the largest: the side against a bound counts at its worst, so a
    tiny difference against a claim never strengthens it (at its mean size, one of -1e-6
    beside one of +1 made the pair separated). With equal sizes (W against L, or ties: 1 or
    1/2) it is (m / n) * |d| * (2 q - 1), which excludes 0 about when the exact sign test
    rejects (never for 5 of 5 or fewer in one direction). None differing: [0, 0].

    The exact branch is conditional on m: it treats the share of differing prompts m / n as
    fixed, so where all m differences go one way its far end is the mean itself; it is a
    sign test's interval more than a 95% interval of the mean, and reports say so
    (`exact_branch_note`).
    """
    d = np.asarray(d, np.float64)
    if d.ndim != 1 or not len(d) or not np.all(np.isfinite(d)):
        raise ValueError(f"paired differences must be a non-empty finite 1-D array; got {d}")
    n, differ = len(d), d[d != 0]
    m = len(differ)
    mean = float(d.mean())
    if m >= EXACT_BELOW:
        return Interval.of(d)
    if m == 0:
        return Interval(0.0, 0.0, 0.0, n)
    pos, neg = differ[differ > 0], -differ[differ < 0]
    a_max = float(np.abs(differ).max())
    a_pos = float(pos.mean()) if len(pos) else a_max
    a_neg = float(neg.mean()) if len(neg) else a_max
    q_lo, q_hi = clopper_pearson(len(pos), m)
    lo = m / n * (q_lo * a_pos - (1 - q_lo) * a_max)
    hi = m / n * (q_hi * a_max - (1 - q_hi) * a_neg)
    return Interval(mean, lo, hi, n)


def exact_branch_note(d) -> str:
    """Words for an interval from `paired_interval`'s exact branch ("" otherwise): it bounds
    the mean given how many prompts differ, m of n, as if m were fixed, although another
    evaluation could make more or fewer differ; so where all m go one way its far end is
    the mean itself. Its sign is the exact sign test's."""
    d = np.asarray(d, np.float64)
    m = int(np.count_nonzero(d))
    if not 0 < m < EXACT_BELOW:
        return ""
    return (
        f"; only {m} of the {len(d)} differ: exact on their signs, given that {m} differ, "
        "not counting the chance of more or fewer"
    )


def hidden_judgements(hidden, y, ym) -> dict:
    """`Evaluator`'s fields of a hidden judge (see its `hidden`) of the samples y: the
    per-prompt probabilities that it prefers them to the baseline's, their mean with the
    normal 95% interval, and the samples' mean hidden reward."""
    p, r = (np.asarray(v, np.float64) for v in hidden(y, ym))
    if p.shape != (len(y),) or r.shape != (len(y),) or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(
            f"a hidden judge must give, per prompt ({len(y)}), a probability in [0, 1] and a "
            f"reward; got shapes {p.shape} and {r.shape}, p in [{p.min()}, {p.max()}]"
        )
    h = Interval.of(p)
    return {
        "hidden_win_rate": h.mean,
        "hidden_win_lo": h.lo,
        "hidden_win_hi": h.hi,
        "hidden_reward": float(r.mean()),
        "hidden_p": [round(float(v), 6) for v in p],
    }


def hidden_majority(p) -> np.ndarray:
    """The hidden humans' majority verdict per prompt from their probabilities p of preferring
    the policy's sample (`hidden_p`): 1 where p > 1/2, 1/2 where p = 1/2 (equal hidden
    rewards: sigmoid(0) is exactly 1/2), 0 below: the judgements a golden PM that always
    sided with the humans would give, on the golden PM's own scale."""
    p = np.asarray(p, np.float64)
    return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))


def kl_rows(policy, ref, x, xm, *, key, max_len: int, batch_size: int = 256) -> np.ndarray:
    """Per-prompt exact KL(pi_theta || pi_ref) along one sample each (App. D)."""
    out = []
    for b, (idx, keep) in enumerate(padded_batches(len(x), batch_size)):
        s = kl.sampled_kl(
            policy,
            ref,
            to_device(x[idx]),
            to_device(xm[idx]),
            key=jax.random.fold_in(key, b),
            max_len=max_len,
        )
        out.append(to_host(s.exact)[:keep])
    return np.concatenate(out)


def margins_and_drift(
    policy, ref, pairs: dict[str, np.ndarray], *, batch_size: int = 256, ref_logps=None
):
    """Per pair: the policy's classifier margin f(x, y_w, y_l) (App. E) and the drift
    log pi(y_w|x) - log pi_ref(y_w|x), numpy [N] each. `ref_logps`: the reference's
    `ref_cache.compute_reference_logprobs` on these pairs when already known (the same bits:
    each model's log-probs are one jitted program either way)."""
    logp_w, logp_l = ref_cache.compute_reference_logprobs(policy, pairs, batch_size=batch_size)
    if ref_logps is None:
        ref_logps = ref_cache.compute_reference_logprobs(ref, pairs, batch_size=batch_size)
    ref_w, ref_l = ref_logps
    margin = classify.policy_margin(logp_w, logp_l, ref_w, ref_l)
    return np.asarray(margin), logp_w - ref_w


def pair_metrics(
    policy, ref, pairs: dict[str, np.ndarray], *, batch_size: int = 256, ref_logps=None
):
    """(accuracy, drift) of the policy as a classifier on pairs whose label is y_w
    (`ref_logps`: as `margins_and_drift`'s)."""
    accuracy, drift, _ = pair_metrics_with_outcomes(
        policy, ref, pairs, batch_size=batch_size, ref_logps=ref_logps
    )
    return accuracy, drift


def pair_metrics_with_outcomes(
    policy, ref, pairs: dict[str, np.ndarray], *, batch_size: int = 256, ref_logps=None
):
    """`pair_metrics` and the per-pair results as a string (W: right, T: margin 0, L: wrong),
    so that two checkpoints' accuracies on the same pairs compare pair by pair
    (`paired_difference`)."""
    m, drift = margins_and_drift(policy, ref, pairs, batch_size=batch_size, ref_logps=ref_logps)
    right = np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))
    return float(np.mean(right)), float(np.mean(drift)), outcomes(right)


@dataclasses.dataclass
class Evaluator:
    """Everything fixed across the checkpoints of a study (see the module docstring).

    eval_x/eval_xm: win-rate prompts; base_y/base_ym: the golden baseline's samples on them;
    kl_x/kl_xm: KL prompts; pairs: labelled pairs for the classifier accuracy, y_w = the
    golden PM's winner (in a study: the valid split relabelled by the golden PM, see
    `study_runs`; D_golden itself is the train split relabelled by it); train_pairs: more
    such pairs measured the same way under "train_" names (in a study: the D_golden pairs the
    offline runs read first, `Study.train_pairs_order`; None: not measured).
    """

    ref: object
    golden_pm: object
    eval_x: np.ndarray
    eval_xm: np.ndarray
    base_y: np.ndarray
    base_ym: np.ndarray
    kl_x: np.ndarray
    kl_xm: np.ndarray
    pairs: dict[str, np.ndarray]
    max_len: int
    key: jax.Array  # win-rate samples: split(key)[0]; KL: split(key)[1]; E.1: fold_in(key, 2)
    batch_size: int = 256
    num_self: int = 64  # prompts for self-classification (E.1); 0 = not measured
    # Other judges of the same win-rate samples, e.g. {"proxy": proxy_pm}: each adds
    # "<name>_win_rate" (and its interval) judged by that PM, for over-optimisation curves.
    other_judges: dict = dataclasses.field(default_factory=dict)
    # A judge past every PM, where the task has one (the embedded task's hidden humans):
    # hidden(y, ym) -> (p, r), per prompt the probability p that it prefers the policy's
    # win-rate sample to the baseline's and the sample's hidden reward r. Adds
    # "hidden_win_rate" (the mean of p, with the normal 95% interval over prompts),
    # "hidden_p" (p, for paired comparisons) and "hidden_reward" (the mean of r).
    # None: not measured.
    hidden: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    train_pairs: dict[str, np.ndarray] | None = None
    # The reference's log-probs of `pairs` and of `train_pairs`, computed at the first
    # evaluation and reused: the reference and the pairs are fixed for the study.
    _ref_logps: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        # The reference and the judges are fixed for the study: their layers are handed to
        # every compiled program as per-layer arrays, sliced (and their attention projections
        # packed) once here (`t5.unstacked`: no copies out of the stacked weights in each call).
        self.ref, self.golden_pm = t5.unstacked(self.ref), t5.unstacked(self.golden_pm)
        self.other_judges = {k: t5.unstacked(v) for k, v in self.other_judges.items()}

    def classify_pairs(self, policy, which: str) -> tuple[float, float, str]:
        """(accuracy, drift, per-pair outcomes) on `pairs` ("pairs") or `train_pairs`."""
        pairs, policy = getattr(self, which), t5.unstacked(policy)
        if which not in self._ref_logps:
            self._ref_logps[which] = ref_cache.compute_reference_logprobs(
                self.ref, pairs, batch_size=self.batch_size
            )
        return pair_metrics_with_outcomes(
            policy, self.ref, pairs, batch_size=self.batch_size, ref_logps=self._ref_logps[which]
        )

    def __call__(self, policy) -> dict[str, float]:
        key, policy = self.key, t5.unstacked(policy)  # sliced once for every program below
        k_win, k_kl = jax.random.split(key)
        y, ym = sample_rows(
            policy,
            self.eval_x,
            self.eval_xm,
            key=k_win,
            max_len=self.max_len,
            batch_size=self.batch_size,
        )

        def judged(pm) -> np.ndarray:  # the samples against the baseline's, judged by pm
            xs = (self.eval_x, self.eval_xm, y, ym, self.base_y, self.base_ym)
            return judge_rows(pm, *xs, batch_size=self.batch_size)

        golden = judged(self.golden_pm)
        win = Interval.of_judgements(golden)
        kls = Interval.of(
            kl_rows(
                policy,
                self.ref,
                self.kl_x,
                self.kl_xm,
                key=k_kl,
                max_len=self.max_len,
                batch_size=self.batch_size,
            )
        )
        acc, drift, acc_outcomes = self.classify_pairs(policy, "pairs")
        extra = {}
        if self.train_pairs is not None:
            t_acc, t_drift, t_outcomes = self.classify_pairs(policy, "train_pairs")
            extra.update(
                train_accuracy=t_acc, train_drift=t_drift, train_accuracy_outcomes=t_outcomes
            )
        for name, pm in self.other_judges.items():
            other = Interval.of_judgements(judged(pm))
            extra.update(
                {
                    f"{name}_win_rate": other.mean,
                    f"{name}_win_lo": other.lo,
                    f"{name}_win_hi": other.hi,
                }
            )
        if self.hidden is not None:
            extra.update(hidden_judgements(self.hidden, y, ym))
        if self.num_self:
            extra["self_accuracy"] = self.self_classification(policy, y, ym, key)
        return {
            **extra,
            "win_rate": win.mean,
            "win_lo": win.lo,
            "win_hi": win.hi,
            "win_n": win.n,
            "kl": kls.mean,
            "kl_lo": kls.lo,
            "kl_hi": kls.hi,
            "accuracy": acc,
            "accuracy_outcomes": acc_outcomes,
            "drift": drift,
            "response_tokens": float(ym.sum(-1).mean()),
            "win_outcomes": outcomes(golden),
        }

    def self_classification(self, policy, y, ym, key) -> float:
        """E.1: the policy's accuracy on pairs of its own samples (the win-rate sample and a
        second one on the first `num_self` evaluation prompts), labelled by the de-biased
        golden PM (a tie labels 1/2 and scores 1/2)."""
        n = min(self.num_self, len(self.eval_x))
        x, xm = self.eval_x[:n], self.eval_xm[:n]
        k = jax.random.fold_in(key, 2)  # the win-rate and KL keys are split(key)
        y2, y2m = sample_rows(policy, x, xm, key=k, max_len=self.max_len, batch_size=n)
        labels = judge_rows(self.golden_pm, x, xm, y[:n], ym[:n], y2, y2m, batch_size=n)
        pairs = {
            "prompt": x,
            "prompt_mask": xm,
            "y_w": y[:n],
            "y_w_mask": ym[:n],
            "y_l": y2,
            "y_l_mask": y2m,
        }
        m, _ = margins_and_drift(policy, self.ref, pairs, batch_size=n)
        return float(classify.classification_accuracy(jnp.asarray(m), jnp.asarray(labels)))
