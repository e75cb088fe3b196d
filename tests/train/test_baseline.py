"""The built-in k-mer baseline (vqdna/train/baseline.py): frequencies counted right, the strength chosen on
dev, far above chance on the learnable GC task, regression through ridge."""

import numpy as np
import pytest

from tests.train import _mlm
import vqdna.train.baseline as baseline
from vqdna.train.baseline import (REGULARIZATION, both_strands_kmer_features, kmer_baseline, kmer_features,
                                  logistic_regression, warn_at_grid_edge)
from vqdna.train.finetune import classification_metrics, load_task


def test_kmer_features_count_frequencies():
    x = kmer_features(["ACGTA", "acgta", "ACNGT", "A", "NNNN"], k=2)
    index = {"AC": 1, "CG": 6, "GT": 11, "TA": 12}  # A=0 C=1 G=2 T=3, first base most significant
    expected = np.zeros(16, np.float32)
    expected[list(index.values())] = 0.25
    assert x.shape == (5, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], expected)
    np.testing.assert_array_equal(x[1], expected)  # lower case counts the same
    assert x[2, 1] == x[2, 11] == 0.5 and x[2].sum() == 1.0  # k-mers over N are skipped: AC, GT
    assert not x[3].any() and not x[4].any()  # shorter than k / no clean k-mer: zeros
    # read as the tokenizer reads bases: U is T, whitespace is skipped, another letter breaks k-mers as N does
    np.testing.assert_array_equal(kmer_features(["ACGUA", "AC G\nTA", "ACRGT", "AC-GT"], k=2),
                                  kmer_features(["ACGTA", "ACGTA", "ACNGT", "ACNGT"], k=2))
    with pytest.raises(ValueError, match="k must be"):
        kmer_features(["ACGT"], k=0)


def test_kmer_baseline_classification_chooses_on_dev(tmp_path, monkeypatch):
    from sklearn.preprocessing import StandardScaler

    splits, task = load_task(_mlm.write_gue(tmp_path / "task", sizes=(200, 80, 80)))
    fitted = []  # every strength is fitted by the shared, converged estimator
    linear_model = baseline.linear_model
    monkeypatch.setattr(baseline, "linear_model", lambda t, c: fitted.append((t, c)) or linear_model(t, c))
    res = kmer_baseline(splits, task, k=2)
    assert fitted == [("classification", c) for c in REGULARIZATION]
    assert res["k"] == 2 and res["regularization"] in REGULARIZATION
    assert res["test"]["mcc"] > 0.5 and set(res["test"]) == {"mcc", "f1", "accuracy"}  # chance is 0
    # the chosen strength is the best on dev: refit every strength by hand
    scaler = StandardScaler().fit(kmer_features(splits["train"][0], 2))
    x = {s: scaler.transform(kmer_features(q, 2)) for s, (q, _) in splits.items()}
    y = {s: np.asarray(v) for s, (_, v) in splits.items()}
    dev = {c: classification_metrics(np.eye(2)[logistic_regression(c).fit(x["train"], y["train"])
                                               .predict(x["dev"])], y["dev"])["mcc"] for c in REGULARIZATION}
    assert res["dev"]["mcc"] == pytest.approx(max(dev.values()))
    assert dev[res["regularization"]] == pytest.approx(max(dev.values()))


@pytest.mark.parametrize("classes,c", [(2, 10.0), (2, 1e3), (3, 1e3)])
def test_logistic_fits_are_solved_to_the_optimum(classes, c):
    """Both linear fits (this baseline and the probe head) stop at the optimum, not short of it, so float rounding
    of the features cannot move predictions, and without a warning, at every strength: on collinear, tanh-squashed
    features like pooled model features, sklearn's default tolerance (1e-4) left the coefficients 4.4 % and held-out
    decision values 0.66 away from the optimum at C 10 (two held-out predictions flipped). The optimum is an exact
    Newton solve to 1e-10 (newton-cholesky: quadratic convergence whatever the conditioning)."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((600, 20))
    x = np.tanh(latent @ rng.standard_normal((20, 400)) / 4 + 0.3 * rng.standard_normal((600, 400)))
    y = np.argmax(latent[:, :classes] + 0.5 * rng.standard_normal((600, classes)), 1)
    optimum = LogisticRegression(C=c, tol=1e-10, max_iter=1000, solver="newton-cholesky").fit(x[:400], y[:400])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning or a solver's fallback fails
        fit = logistic_regression(c).fit(x[:400], y[:400])
    assert np.abs(fit.coef_ - optimum.coef_).max() < 5e-3 * np.abs(optimum.coef_).max()
    np.testing.assert_allclose(fit.decision_function(x[400:]), optimum.decision_function(x[400:]),
                               atol=0.05 * max(1.0, np.abs(optimum.decision_function(x[400:])).max() / 10))
    np.testing.assert_array_equal(fit.predict(x[400:]), optimum.predict(x[400:]))
    assert baseline.LOGISTIC_TOL <= 1e-6 and np.max(fit.n_iter_) < baseline.LOGISTIC_MAX_ITER


def test_linear_model_is_one_strength_convention():
    """C of logistic regression and 1 / alpha of ridge are the same strength: both fits read REGULARIZATION so."""
    from sklearn.linear_model import LogisticRegression, Ridge

    logistic, ridge = baseline.linear_model("classification", 1e-3), baseline.linear_model("regression", 1e-3)
    assert isinstance(logistic, LogisticRegression) and logistic.C == 1e-3 and logistic.tol == baseline.LOGISTIC_TOL
    assert logistic.solver == "newton-cg"  # lbfgs stops short at weak strengths: test_logistic_fits_are_solved_...
    assert isinstance(ridge, Ridge) and ridge.alpha == pytest.approx(1e3)


def test_kmer_baseline_regression(tmp_path):
    gc = lambda seqs: [f"{np.mean([c in 'GC' for c in s]):.4f}" for s in seqs]  # noqa: E731
    splits, task = load_task(_mlm.write_gue(tmp_path / "task", sizes=(200, 60, 60), labels=gc))
    assert task == "regression"
    res = kmer_baseline(splits, task, k=1)  # GC content is a linear function of the 1-mer frequencies
    assert res["test"]["spearman"] > 0.99 and set(res["test"]) == {"spearman", "pearson", "mse"}


def test_kmer_baseline_class_missing_from_training(tmp_path):
    """A class present in dev/test but never in train is predicted never (no crash, right shape)."""
    labels = lambda seqs: [str(i % 2) if i < len(seqs) - 1 else "2" for i in range(len(seqs))]  # noqa: E731
    splits, task = load_task(_mlm.write_gue(tmp_path / "task", sizes=(60, 20, 20), labels=labels))
    splits["train"] = (splits["train"][0][:-1], splits["train"][1][:-1])
    res = kmer_baseline(splits, task, k=2)
    assert -1.0 <= res["test"]["mcc"] <= 1.0


def test_both_strands_kmer_features():
    """A k-mer and its reverse complement count alike; a sequence and its reverse complement get one row."""
    x = both_strands_kmer_features(["AACG", "CGTT", "ACGT"], k=2)
    index = {"AA": 0, "AC": 1, "CG": 6, "GT": 11, "TT": 15}
    np.testing.assert_array_equal(x[0], x[1])
    assert x[0, index["AA"]] == x[0, index["TT"]] == 1 / 6 and x[0, index["CG"]] == 1 / 3
    np.testing.assert_array_equal(x[2], kmer_features(["ACGT"], 2)[0])  # its own reverse complement


def test_kmer_baseline_strands(tmp_path):
    """strands="both" fits on both_strands_kmer_features (a task whose test split is the reverse complement
    of its train split scores as train does), every strength fitted without a warning though a k-mer and its
    reverse complement count the same there (duplicated features); anything else is refused."""
    import warnings

    from vqdna.data.alphabet import reverse_complement

    splits, task = load_task(_mlm.write_gue(tmp_path / "task", sizes=(200, 80, 80)))
    splits["dev"] = splits["test"] = ([reverse_complement(s) for s in splits["train"][0]], splits["train"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = kmer_baseline(splits, task, k=3, strands="both")
    assert both["strands"] == "both" and kmer_baseline(splits, task, k=3)["strands"] == "forward"
    fit = kmer_baseline({**splits, "dev": splits["train"], "test": splits["train"]}, task, k=3, strands="both")
    assert both["test"] == fit["test"]
    with pytest.raises(ValueError, match="strands"):
        kmer_baseline(splits, task, k=3, strands="reverse")


def test_a_choice_at_the_grids_edge_is_logged(caplog):
    """Dev's best at the weakest or strongest end of the grid, above its inner neighbour, is said (the best may
    lie beyond); an inner best, a flat end or a grid of one is not."""
    cases = (({1e-6: 0.9, 1e-5: 0.8, 1.0: 0.5}, True), ({1e-6: 0.5, 1.0: 0.8, 1e3: 0.9}, True),
             ({1e-6: 0.5, 1e-5: 0.9, 1.0: 0.8}, False), ({1e-6: 0.9, 1e-5: 0.9, 1.0: 0.5}, False), ({1.0: 0.9}, False))
    with caplog.at_level("WARNING", logger="vqdna.train.baseline"):
        for dev, said in cases:
            caplog.clear()
            warn_at_grid_edge("x", dev)
            assert bool(caplog.records) == said, dev


def test_many_weak_kmer_features_need_the_strong_end_of_the_grid(tmp_path, caplog):
    """GC- vs AT-rich sequences spread the signal thinly over 1,024 5-mers: dev is best below C = 0.01, which the
    default grid reaches (the GUE tasks chose 1e-5..1e-3); a grid that stops at 0.01 chooses its edge and says so."""
    splits, task = load_task(_mlm.write_gue(tmp_path / "task", sizes=(200, 200, 200), length=40))
    with caplog.at_level("WARNING", logger="vqdna.train.baseline"):
        narrow = kmer_baseline(splits, task, k=5, regularization=(0.01, 0.1, 1.0, 10.0, 100.0))
        assert narrow["regularization"] == 0.01 and "the 5-mer baseline: dev's best regularization 0.01 is the edge " \
            "of the grid 0.01..100" in caplog.text
        caplog.clear()
        wide = kmer_baseline(splits, task, k=5)
        assert not caplog.records  # inside the grid (flat at its strong end)
    assert wide["regularization"] < 0.01 and wide["dev"]["mcc"] > narrow["dev"]["mcc"] + 0.01
