"""BP local entropy of committee machines (MATH.md §7) against the replica-symmetric formula, exhaustive
enumeration, its own free entropy, and through the CLI."""
import csv
import io
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import integrate, optimize, special

from clitools import assert_user_error, invoke
from flatcli.errors import FlatcliError
from flatcli.measure import _amp_committee as amp
from flatcli.measure.bp_committee import BPSettings, bp_local_entropy, make_problem, solve
from flatcli.models.committee import Committee

pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_task(n: int, p: int, k: int = 1, binary: bool = False, seed: int = 0):
    """A committee machine holding a random teacher W⁰, and p i.i.d. Gaussian patterns labelled by it (0/1)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(k, n, generator=g, dtype=torch.float64)
    if binary:
        w0 = torch.sign(w0)
    x = torch.randn(p, n, generator=g, dtype=torch.float64)
    labels = (torch.sign(x @ w0.T).sum(1) > 0).long()
    model = Committee(n, k, binary)
    model.weight.data = w0.float()
    return model, (x.float(), labels)


def rs_entropy(R: float, alpha: float) -> float:
    """MATH.md §7: min over q ∈ (R², 1) of ½ ln(1−q) + ½ (q−R²)/(1−q) + 2α ∫Dt H(−Rt/√(q−R²)) ln H(−√(q/(1−q)) t)."""
    def f(q):
        def integrand(t):
            return (special.ndtr(R * t / math.sqrt(q - R * R)) * special.log_ndtr(math.sqrt(q / (1 - q)) * t)
                    * math.exp(-t * t / 2) / math.sqrt(2 * math.pi))
        return 0.5 * math.log(1 - q) + 0.5 * (q - R * R) / (1 - q) + 2 * alpha * integrate.quad(integrand, -12, 12)[0]
    return optimize.minimize_scalar(f, bounds=(R * R + 1e-9, 1 - 1e-9), method="bounded",
                                    options={"xatol": 1e-10}).fun


def test_the_rs_oracle_itself():
    """Its own checks (MATH.md §7): ½ ln(1 − R²) at α = 0; at α = 1 the maximum over R lies at R* = 0.4863."""
    assert rs_entropy(0.6, 0.0) == pytest.approx(0.5 * math.log(1 - 0.36), abs=1e-7)
    grid = np.linspace(0.44, 0.53, 10)
    best = grid[np.argmax([rs_entropy(r, 1.0) for r in grid])]
    assert abs(best - 0.4863) < 0.011


@pytest.mark.parametrize("alpha, couplings", [(0.5, (0.1, 1.0, 6.0)), (1.0, (-0.2, 0.0, 1.0, 6.0)),
                                              (2.0, (-2.5, -1.0, 0.0, 1.5, 6.0))])
def test_k1_spherical_matches_the_replica_symmetric_formula(alpha, couplings):
    """N = 1000, teacher labels, w̃ = teacher: S at the reached overlap within 3% of S_RS (MATH.md §7).

    Overlaps below the equilibrium R* (0.28, 0.49, 0.73) take γ < 0; the measured gaps are 0.1-2%."""
    n = 1000
    model, data = teacher_task(n, int(alpha * n), seed=1)
    result = bp_local_entropy(model, data, couplings=couplings)
    overlaps = [p.overlap for p in result.points]
    assert min(overlaps) < 0.45 and max(overlaps) > 0.97 and all(0.3 <= r <= 0.99 for r in overlaps)
    for p in result.points:
        assert p.converged
        assert p.local_entropy == pytest.approx(rs_entropy(p.overlap, alpha), rel=0.03), p


def test_no_patterns_give_half_log_one_minus_r_squared_and_few_approach_it():
    model, data = teacher_task(1000, 0)
    for p in bp_local_entropy(model, data, couplings=(0.3, 1.0, 3.0)).points:
        assert p.local_entropy == pytest.approx(0.5 * math.log(1 - p.overlap ** 2), abs=1e-9)
    model, data = teacher_task(1000, 10)  # α = 0.01
    for p in bp_local_entropy(model, data, couplings=(0.3, 1.0, 3.0)).points:
        assert abs(p.local_entropy - 0.5 * math.log(1 - p.overlap ** 2)) < 0.01
        assert p.local_entropy < 0.5 * math.log(1 - p.overlap ** 2)  # constraints only remove weights
        assert p.local_entropy == pytest.approx(rs_entropy(p.overlap, 0.01), rel=0.03)


def exact_counts(model: Committee, data) -> torch.Tensor:
    """Number of ±1 weight vectors with zero training error, by Hamming distance from w̃: (n + 1,) float64."""
    k, n_in = model.weight.shape
    n = k * n_in
    x, labels = data[0].double(), data[1].double() * 2 - 1
    ref = torch.sign(model.weight.detach().double()).flatten()
    codes = torch.arange(2 ** n)
    counts = torch.zeros(n + 1, dtype=torch.float64)
    for chunk in codes.split(1 << 16):
        w = ((chunk[:, None] >> torch.arange(n)) & 1).double() * 2 - 1                 # (b, n)
        fields = torch.einsum("pi,bki->bpk", x, w.view(-1, k, n_in))                 # (b, P, K)
        ok = (torch.sign(torch.sign(fields).sum(2)) == labels).all(1)
        counts += torch.bincount((w != ref).sum(1)[ok], minlength=n + 1).double()
    return counts


def exact_curve(counts: torch.Tensor, gammas: np.ndarray):
    """The same Legendre transform on the exact counts: (overlap R(γ), S(γ) = ln Σ_w e^{γ w̃·w}/n − γ R)."""
    n = len(counts) - 1
    m = n - 2 * torch.arange(n + 1, dtype=torch.float64)  # w̃·w at each distance
    out = []
    for g in gammas:
        logw = counts.log() + g * m
        r = float((torch.softmax(logw, 0) * m).sum()) / n
        out.append((r, float(torch.logsumexp(logw, 0)) / n - g * r))
    return np.array(out)


@pytest.mark.parametrize("k, n, p", [(1, 20, 12), (3, 7, 6)])
def test_binary_weights_agree_in_shape_with_exhaustive_enumeration(k, n, p):
    """K·N ≤ 21: S(R) of BP against S(R) of the exact count, compared at equal overlap.

    Tolerance 0.04 per weight (ln 2 = 0.69 is the whole range): BP is exact only as N → ∞, and at n ≈ 20 its
    Gaussian cavity fields err by O(1/√N) per pattern; measured gaps are 0.01-0.03. Overlaps above 0.95 are
    left out: there the exact count is a handful of vectors a Hamming step apart, which no smooth curve fits.
    """
    model, data = teacher_task(n, p, k, binary=True, seed=3)
    counts = exact_counts(model, data)
    assert counts[0] == 1 and counts.sum() > 100  # the teacher is a solution; many others too
    result = bp_local_entropy(model, data, couplings=(0.05, 0.2, 0.4, 0.7, 1.0))
    exact = exact_curve(counts, np.linspace(-1, 8, 2000))  # R increasing in γ
    compared = [point for point in result.points if point.overlap < 0.95]
    assert len(compared) >= 4
    for point in compared:
        assert point.converged
        s_exact = np.interp(point.overlap, exact[:, 0], exact[:, 1])
        assert abs(point.local_entropy - s_exact) < 0.04, (point, s_exact)
    assert np.all(np.diff([q.local_entropy for q in result.points]) < 0)  # both fall towards the reference
    assert all(0 < q.local_entropy < math.log(2) for q in result.points)


@pytest.mark.parametrize("binary", [False, True])
def test_k3_converges_and_the_entropy_falls_towards_the_reference(binary):
    model, data = teacher_task(300, 150, 3, binary=binary, seed=2)
    result = bp_local_entropy(model, data)  # the default couplings
    assert all(p.converged for p in result.points)
    distances = [p.distance for p in result.points]       # increasing coupling: decreasing distance
    entropies = [p.local_entropy for p in result.points]
    assert np.all(np.diff(distances) < 0) and np.all(np.diff(entropies) < 0)
    assert distances[-1] < 0.02 and distances[0] > 0.25
    assert max(entropies) < (math.log(2) if binary else 0)


@pytest.mark.parametrize("k, binary", [(1, False), (3, False), (1, True), (3, True)])
def test_free_entropy_derivative_is_the_overlap_sum(k, binary):
    """dΦ/dγ by central differences (fixed points converged tightly) = Σ_ik w̃_ik ŵ_ik at the fixed point."""
    model, data = teacher_task(200, 100, k, binary=binary, seed=4)
    problem = make_problem(model, data)
    settings = BPSettings(couplings=(1.0,), tolerance=1e-12, max_iters=5000)
    gamma, eps = 0.7, 1e-4
    mid, state = solve(problem, None, gamma, settings)
    phis = [solve(problem, state, gamma + s * eps, settings)[0].free_entropy * 200 * k for s in (1, -1)]
    assert mid.converged
    assert (phis[0] - phis[1]) / (2 * eps) == pytest.approx(mid.overlap_sum, rel=1e-5)


def test_bit_reproducible_and_the_model_untouched():
    model, data = teacher_task(100, 60, 3, seed=5)
    before = model.weight.detach().clone()
    model.train()
    a = bp_local_entropy(model, data, couplings=(0.3, 3.0), seed=7).records()
    b = bp_local_entropy(model, data, couplings=(0.3, 3.0), seed=7).records()
    assert a == b and torch.equal(model.weight, before) and model.training


def test_distances_are_reached_by_bisection():
    model, data = teacher_task(200, 100, 1, seed=6)
    result = bp_local_entropy(model, data, distances=(0.02, 0.1, 0.2))
    assert [round(p.distance, 3) for p in result.points] == [0.2, 0.1, 0.02]
    assert all(abs(p.distance - d) < 1e-4 for p, d in zip(result.points, (0.2, 0.1, 0.02)))
    far = bp_local_entropy(model, data, distances=(0.45,)).points[0]  # beyond R(γ = 0): a push away, γ < 0
    assert far.coupling < 0 and abs(far.distance - 0.45) < 1e-4


def test_mistakes_are_refused():
    model, (x, labels) = teacher_task(50, 30, 3, seed=7)
    flipped = labels.clone()
    flipped[:2] = 1 - flipped[:2]
    with pytest.raises(FlatcliError, match="misclassifies 2 of its 30 examples .training error 6.67%"):
        bp_local_entropy(model, (x, flipped))
    with pytest.raises(FlatcliError, match="committee machine"):
        bp_local_entropy(torch.nn.Linear(50, 2), (x, labels))
    with pytest.raises(FlatcliError, match="couplings"):
        bp_local_entropy(model, (x, labels), couplings=(math.inf,))
    with pytest.raises(FlatcliError, match="both"):
        BPSettings(couplings=(1.0,), distances=(0.1,))
    with pytest.raises(FlatcliError, match="distances"):
        BPSettings(distances=(0.7,))


@pytest.fixture
def committee_task(tmp_path):
    """A binary task in a tensor file labelled by a K = 3 teacher, and the teacher as a bare state dict."""
    model, (x, labels) = teacher_task(40, 30, 3, seed=8)
    g = torch.Generator().manual_seed(9)
    x_test = torch.randn(20, 40, generator=g)
    y_test = (torch.sign(x_test @ model.weight.detach().T).sum(1) > 0).long()
    np.savez(tmp_path / "task.npz", x=x.numpy(), y=labels.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())
    save_file({"weight": model.weight.detach()}, str(tmp_path / "teacher.safetensors"))
    return tmp_path, model, (x, labels)


def test_cli_bp_on_a_committee_checkpoint(committee_task):
    folder, model, data = committee_task
    args = [folder / "teacher.safetensors", "--model", "committee:3", "--data", folder / "task.npz", "--method", "bp"]
    result = invoke("local-entropy", *args, "--couplings", "0.1,1,10", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = bp_local_entropy(model, data, couplings=(0.1, 1, 10)).records()
    assert [float(r["coupling"]) for r in rows] == [0.1, 1, 10]
    for row, want in zip(rows, expected):
        assert float(row["local_entropy"]) == want["local_entropy"] and row["converged"] == "True"
        assert float(row["distance"]) == pytest.approx((1 - float(row["overlap"])) / 2)
    assert "S(d)" in result.stderr
    result = invoke("local-entropy", *args, "--distances", "0.1", "--json", folder / "out.json")
    assert result.exit_code == 0, result.stderr
    assert_user_error(invoke("local-entropy", *args[:-2], "--couplings", "1"), "--couplings", "--method bp")
    assert_user_error(invoke("local-entropy", *args[:-1], "mcmc"), "--method")
    assert_user_error(invoke("local-entropy", *args, "--damping", "1.5"), "--damping")


def test_cli_bp_refuses_other_models_and_trains_then_measures(runs, tmp_path):
    assert_user_error(invoke("local-entropy", runs / "sgd", "--method", "bp"), "committee machine")
    out = tmp_path / "c"
    result = invoke("train", "--model", "committee:1", "--data", "teacher", "--classes", "0,1", "--n-train", "60",
                    "--steps", "1", "--out", out)
    assert result.exit_code == 0, result.stderr
    result = invoke("local-entropy", out, "--method", "bp")
    assert_user_error(result, "misclassifies", "training error")
