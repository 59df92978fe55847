"""Rank agreement: scipy's τ and ρ passed through, and Jiang et al.'s Ψ on a hand-computed example."""
import math

import pytest
from scipy.stats import kendalltau, spearmanr

from flatcli.errors import FlatcliError
from flatcli.measure.rank import granulated_kendall, kendall, spearman, varying

# lr × batch size, 3 × 2 runs: (lr, batch_size, measure, target)
RUNS = [(0.1, 32, 1, 1), (0.01, 32, 2, 3), (0.001, 32, 3, 2),
        (0.1, 64, 5, 6), (0.01, 64, 4, 5), (0.001, 64, 6, 4)]
HYPERS = [{"lr": lr, "batch_size": bs, "seed": i, "momentum": 0.0} for i, (lr, bs, _, _) in enumerate(RUNS)]
MEASURE = [r[2] for r in RUNS]
TARGET = [r[3] for r in RUNS]


def test_psi_by_hand():
    """lr varies within batch size 32: pairs (1,1)-(2,3) and (1,1)-(3,2) concordant, (2,3)-(3,2) discordant:
    τ = 1/3; within 64: (5,6)-(4,5) concordant, the two pairs with (6,4) discordant: τ = −1/3; ψ_lr = 0.
    batch size varies within each lr: every pair concordant, ψ_bs = 1. Ψ = (0 + 1)/2 = 1/2."""
    g = granulated_kendall(MEASURE, TARGET, HYPERS)
    assert g.per_hyper == pytest.approx({"lr": 0.0, "batch_size": 1.0})
    assert g.groups == {"lr": 2, "batch_size": 3}
    assert g.psi == pytest.approx(0.5)


def test_varying_ignores_seed_and_constant_values():
    assert varying(HYPERS) == ["batch_size", "lr"]
    # with lr alone named, nothing is held fixed: one group of all six, Ψ = the plain τ (12 − 3)/15 = 0.6
    assert granulated_kendall(MEASURE, TARGET, HYPERS, names=["lr"]).psi == pytest.approx(0.6)
    assert kendalltau(MEASURE, TARGET).statistic == pytest.approx(0.6)


def test_psi_undefined_without_groups():
    g = granulated_kendall([1, 2], [2, 1], [{"lr": 1, "bs": 1}, {"lr": 2, "bs": 2}])  # each group of one
    assert math.isnan(g.psi) and g.per_hyper == {}


def test_kendall_and_spearman_are_scipys_with_nan_pairs_left_out():
    x, y = [0.3, 0.1, 0.5, float("nan"), 0.2, 0.9], [3, 1, 4, 1, 5, 9]
    t, r = kendall(x, y), spearman(x, y)
    kx, ky = [0.3, 0.1, 0.5, 0.2, 0.9], [3, 1, 4, 5, 9]
    assert t.n == r.n == 5
    assert (t.statistic, t.pvalue) == (kendalltau(kx, ky).statistic, kendalltau(kx, ky).pvalue)
    assert (r.statistic, r.pvalue) == (spearmanr(kx, ky).statistic, spearmanr(kx, ky).pvalue)
    assert math.isnan(kendall([1.0], [2.0]).statistic) and math.isnan(kendall([1, 1, 1], [1, 2, 3]).statistic)


def test_lengths_must_match():
    with pytest.raises(FlatcliError, match="3 measure values but 2"):
        kendall([1, 2, 3], [1, 2])


def test_without_scipy_one_line_says_how_to_install_it(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(name)
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(FlatcliError, match=r"flatcli\[stats\]"):
        kendall([1, 2, 3], [1, 2, 3])


def test_library_calls_are_exported_lazily():
    import flatcli
    from flatcli.measure.compare import compare
    from flatcli.measure.pac_bayes import pac_bayes_sigma
    from flatcli.measure.sharpness import sharpness
    assert (flatcli.sharpness, flatcli.pac_bayes_sigma, flatcli.compare) == (sharpness, pac_bayes_sigma, compare)
