"""The k-mer baseline every fine-tuning result is read against: k-mer frequencies, standardised, then
L2-regularised logistic regression (classification) or ridge regression (regression), the strength
chosen on dev, metrics on test: the same splits and metrics as `vqdna finetune`."""

from __future__ import annotations

import logging

import numpy as np

from vqdna.data.alphabet import BYTE_TO_ID, SKIP, STRANDS, reverse_complement

log = logging.getLogger(__name__)

# The strengths both linear fits choose among on dev, this baseline and the probe head of finetune.py: C of
# logistic regression = 1 / alpha of ridge, decades 1e-6..1e3. Thousands of standardised k-mer frequencies over a
# few thousand sequences need strong regularisation: on both GUE tasks and the species example dev chose C 1e-5 to
# 1e-3, and the earlier grid 0.01..100 chose its edge 0.01 on all three, understating the baseline's test MCC by
# 0.02 to 0.08 (examples/RESULTS.md). The probe's choices there lie inside 0.1..100.
REGULARIZATION = tuple(10.0**e for e in range(-6, 4))

# Both logistic fits solve to a gradient tolerance of 1e-6, not sklearn's default 1e-4, which stops short of the
# optimum: there the features' last float bits decide the side of the examples near the boundary. On the GUE mouse 0
# probe (2,048 features, C 10), scaling every feature by 1 + 1e-6 noise flipped 4 dev and 6 test predictions at 1e-4
# (test MCC 0.5435 against 0.5484) and none at 1e-6 or 1e-8 (test 0.5583; 1,171 lbfgs iterations, 12 s). At 1e-4 the
# same model's probe moved by 0.007 test MCC with the batch shapes of its feature passes (examples/RESULTS.md).
LOGISTIC_TOL = 1e-6
# The solver is Newton-CG (Hessian-free Newton): lbfgs stops short of the optimum at the grid's weak strengths. On a
# regenerated GUE mouse 0 model its probe fit at C 1e3 (nearly unregularised, ill-conditioned pooled features) hit
# scipy's cap of 15,000 function evaluations (a ConvergenceWarning in the log; max_iter does not lift that cap), and on
# test_baseline.py's collinear features at C 1e3 it ends 1.6 % (two classes) and 4 % (three) off the optimum. Newton-CG
# converged there: 56 iterations, 249 s for mouse's hardest probe fit (scale 0.5), same dev and test MCC as an exact
# Newton solve; the 6-mer baselines of tata and mouse are unchanged (C 1e-4 / 1e-3, test 0.4718 / 0.5514). Exact
# Newton ("newton-cholesky") is faster on two classes, but it falls back to lbfgs, with a warning, on the singular
# Hessian of both-strand k-mer frequencies (a k-mer and its reverse complement count the same), and its Hessian has
# [K (F + 1)]^2 entries for K > 2 classes (species' probe: 840 MB).
LOGISTIC_MAX_ITER = 1_000  # Newton iterations (mouse's hardest fit took 56)


def logistic_regression(c: float):
    """The estimator of both logistic fits: sklearn's L2-regularised LogisticRegression at strength C = c (two
    classes or more), solved to LOGISTIC_TOL by Newton-CG."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, tol=LOGISTIC_TOL, max_iter=LOGISTIC_MAX_ITER, solver="newton-cg")


def linear_model(task: str, strength: float):
    """The unfitted estimator of both linear fits (this baseline and the probe head) at one strength of
    REGULARIZATION: `logistic_regression(strength)` for "classification", ridge with alpha = 1 / strength for
    "regression" (the one place the C = 1 / alpha convention is written)."""
    if task == "classification":
        return logistic_regression(strength)
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0 / strength)


def warn_at_grid_edge(what: str, dev_by_strength: dict) -> None:
    """Log a warning when dev's best strength is the weakest or strongest of the grid and beats its inner neighbour:
    the best may lie beyond the grid. dev_by_strength: {strength: dev metric (higher is better)} over the grid (a
    flat end, the neighbour as good, is no warning: there the strength does not matter)."""
    grid = sorted(dev_by_strength)
    if len(grid) < 2:
        return
    best = max(dev_by_strength.values())
    for edge, inner in ((grid[0], grid[1]), (grid[-1], grid[-2])):
        if dev_by_strength[edge] == best > dev_by_strength[inner]:
            log.warning("%s: dev's best regularization %g is the edge of the grid %g..%g; the best may lie beyond it",
                        what, edge, grid[0], grid[-1])


def choose_on_dev(what: str, grid, fit):
    """fit(strength) -> (dev metric, result) for every strength of `grid`; returns (strength, result) of the first
    with the best dev metric, after warn_at_grid_edge. The one selection rule of the k-mer baseline and the probe."""
    fits = {strength: fit(strength) for strength in grid}
    warn_at_grid_edge(what, {strength: dev for strength, (dev, _) in fits.items()})
    best = max(fits, key=lambda strength: fits[strength][0])
    return best, fits[best][1]


def kmer_features(seqs, k: int = 6) -> np.ndarray:
    """Frequencies of the 4^k k-mers (A < C < G < T, first base most significant) of each sequence:
    float32 [len(seqs), 4^k], each row summing to 1 over the k-mers without N (or another letter); bases read
    as the tokenizer reads them (vqdna.data.alphabet: either case, U as T, whitespace skipped). A sequence
    with none (shorter than k, or all N) is a row of zeros."""
    if not 1 <= k <= 12:
        raise ValueError(f"k must be in 1..12, got {k}")
    x = np.zeros((len(seqs), 4**k), np.float32)
    powers = 4 ** np.arange(k - 1, -1, -1)
    for row, s in enumerate(seqs):
        ids = BYTE_TO_ID[np.frombuffer(s.encode("ascii", "replace"), np.uint8)]
        ids = ids[ids != SKIP]
        if len(ids) < k:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, k)
        windows = windows[(windows < 4).all(1)]
        if len(windows):
            x[row] = np.bincount(windows @ powers, minlength=4**k) / len(windows)
    return x


def both_strands_kmer_features(seqs, k: int = 6) -> np.ndarray:
    """kmer_features averaged over each sequence and its reverse complement (a k-mer and its reverse
    complement get the same frequency): what a strand-symmetric model is compared with."""
    return (kmer_features(seqs, k) + kmer_features([reverse_complement(s) for s in seqs], k)) / 2


def kmer_baseline(splits: dict, task: str, k: int = 6, regularization=REGULARIZATION,
                  strands: str = "forward") -> dict:
    """Fit the k-mer baseline on splits["train"], choose the strength on "dev", score "test".

    splits: {"train" | "dev" | "test": (sequences, labels)} with labels int class indices (classification)
    or floats (regression), as vqdna.train.finetune.load_task returns them. task: "classification" |
    "regression". strands: "forward" counts k-mers of each sequence, "both" averages them with its reverse
    complement's (`both_strands_kmer_features`), matching a model that reads both strands.
    Returns {"k", "strands", "regularization" (the chosen C = 1/alpha), "dev", "test"} (metric dicts).
    """
    from sklearn.preprocessing import StandardScaler

    from vqdna.train.finetune import task_metrics

    if strands not in STRANDS:
        raise ValueError(f"strands must be {'|'.join(STRANDS)}, got {strands!r}")
    features = kmer_features if strands == "forward" else both_strands_kmer_features
    metric, metrics_fn = task_metrics(task)
    scaler = StandardScaler()
    x = {"train": scaler.fit_transform(features(splits["train"][0], k))}
    for split in ("dev", "test"):
        x[split] = scaler.transform(features(splits[split][0], k))
    y = {split: np.asarray(labels) for split, (_, labels) in splits.items()}

    def scores(model, split):
        if task != "classification":
            return model.predict(x[split])
        # [n, classes] probabilities over class indices 0..max (argmax is used); a class unseen in training: never
        out = np.full((len(x[split]), int(max(y["train"].max(), y[split].max())) + 1), -1.0)
        out[:, model.classes_] = model.predict_proba(x[split])
        return out

    def fit(reg):
        model = linear_model(task, reg).fit(x["train"], y["train"])
        dev = metrics_fn(scores(model, "dev"), y["dev"])
        return dev[metric], (model, dev)

    reg, (model, dev) = choose_on_dev(f"the {k}-mer baseline", regularization, fit)
    return {"k": k, "strands": strands, "regularization": reg, "dev": dev, "test": metrics_fn(scores(model, "test"), y["test"])}
