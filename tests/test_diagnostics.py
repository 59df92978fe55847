"""R̂, bulk ESS and MCSE against ArviZ 0.23.4 (reference numbers computed once with
``arviz.rhat(x, method="rank")``, ``arviz.ess(x, method="bulk")``, ``arviz.mcse(x, method="mean")`` on the
chains ``synthetic()`` makes; ArviZ is not a test dependency) and against the AR(1) closed form."""
import math

import numpy as np
import pytest

from flatcli.measure import diagnostics as dg

ARVIZ = {  # name: (rhat, ess, mcse)
    "white": (1.000725731909953, 861.6825629359549, 0.034135125985965444),
    "ar1": (1.025421908406483, 244.8319457282709, 0.1402684290213803),
    "shifted": (1.0925382394422898, 33.828357623322326, 0.19618759633227525),
    "odd": (1.0252710043344875, 151.241597213026, 0.09672649121831496),
}


def ar1(rng, phi, chains, draws):
    x, e = np.zeros((chains, draws)), rng.standard_normal((chains, draws))
    x[:, 0] = e[:, 0] / math.sqrt(1 - phi ** 2)  # stationary from the start
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


def synthetic():
    """White noise, AR(1) with φ = 0.9, one chain of four shifted by 1 sd, and an odd length of skewed draws."""
    g = np.random.default_rng(20211)
    return {"white": g.standard_normal((4, 200)), "ar1": ar1(g, 0.9, 4, 1000),
            "shifted": g.standard_normal((4, 100)) + np.array([0, 0, 0, 1.0])[:, None],
            "odd": g.standard_normal((3, 51)) ** 2}


@pytest.mark.parametrize("name", list(ARVIZ))
def test_matches_arviz(name):
    x = synthetic()[name]
    rhat, ess, mcse = ARVIZ[name]
    d = dg.summary(x)
    assert d.rhat == pytest.approx(rhat, rel=1e-10)
    assert d.ess == pytest.approx(ess, rel=1e-8)
    assert d.mcse == pytest.approx(mcse, rel=1e-8)


def test_verdicts():
    chains = synthetic()
    assert dg.summary(chains["white"]).converged
    assert not dg.summary(chains["shifted"]).converged  # R̂ 1.09
    assert not dg.summary(chains["ar1"]).converged  # R̂ 1.025 from only 4 × 1000 strongly correlated draws


def test_ar1_ess_matches_the_closed_form():
    """AR(1) with coefficient φ: integrated autocorrelation time τ = (1 + φ)/(1 − φ), ESS = C S / τ."""
    g = np.random.default_rng(5)
    for phi in (0.0, 0.5, 0.8):
        x = ar1(g, phi, 8, 4000)
        expected = x.size * (1 - phi) / (1 + phi)
        assert dg.ess(x) == pytest.approx(expected, rel=0.1), phi
        assert dg.mcse(x) == pytest.approx(math.sqrt(1 / (1 - phi ** 2) / expected), rel=0.1)
        assert dg.rhat(x) < 1.01


def test_degenerate_inputs():
    assert math.isnan(dg.rhat(np.zeros((1, 100))))  # one chain: no R̂
    assert math.isnan(dg.ess(np.ones((4, 3))))  # too few draws
    assert dg.ess(np.ones((4, 10))) == 40  # constant chains: every draw counts
    assert math.isnan(dg.rhat(np.array([[1.0, np.nan, 2, 3], [1, 2, 3, 4]])))
    assert not dg.summary(np.full((2, 3), 1.0)).converged
