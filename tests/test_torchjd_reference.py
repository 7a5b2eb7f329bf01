"""Native MGDA, PCGrad and CAGrad against TorchJD's weightings, an independent implementation.

TorchJD solves the same problems with different algorithms (MGDA: plain Frank-Wolfe from the
uniform point; CAGrad: cvxpy/Clarabel instead of SLSQP; PCGrad: torch.randperm and j = i
skipped), so the comparisons are on quantities that do not depend on the algorithm, with
tolerances derived from the solvers' accuracy.
"""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import MGDAWeighting, PCGradWeighting

import methods
from methods.mgda import min_norm_weights


def _random_jacobian(n_tasks, dim, common, seed):
    """Per-task gradients sharing a common component (as real task gradients do)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tasks, dim, generator=g) + common * torch.randn(1, dim, generator=g)


# ----------------------------------------------------------------------------------- MGDA

MGDA_CASES = [  # (T, D, common, seed); the native solver converges within 250 iterations on each
    (2, 20, 0.0, 0),
    (2, 20, 2.0, 1),
    (3, 20, 0.0, 2),
    (3, 20, 2.0, 3),
    (5, 30, 1.0, 4),
    (8, 40, 1.0, 5),
    (14, 60, 1.0, 6),
    (14, 60, 3.0, 7),
    (14, 10, 1.0, 8),  # D < T: rank-deficient Gramian, the coefficients are not unique
]


def _assert_min_norm_like_torchjd(jac, c):
    """``c`` (float32 simplex point) reaches TorchJD's min-norm value and vector, within the
    Frank-Wolfe duality gap that TorchJD's own answer certifies."""
    c = c.double()
    assert (c >= 0).all() and abs(c.sum().item() - 1) < 1e-6  # a point of the simplex
    g64 = (jac @ jac.T).double()
    ref = MGDAWeighting(epsilon=1e-12, max_iters=5000)(g64)
    value, ref_value = (c @ g64 @ c).item(), (ref @ g64 @ ref).item()
    # Frank-Wolfe duality gap of f(x) = x^T G x: f(ref) - min f <= 2 (ref^T G ref - min_t (G ref)_t)
    lower_bound = ref_value - 2 * (ref_value - (g64 @ ref).min().item())
    # (slack 1e-6: the native coefficients are float32, their sum is 1 only to ~1e-7)
    assert value >= lower_bound - 1e-6 * ref_value, (value, lower_bound)
    # not worse than TorchJD's value (native may be better: plain Frank-Wolfe converges slowly)
    assert value <= ref_value * (1 + 1e-4), (value, ref_value)

    # The min-norm VECTOR is unique: ||v - v*||^2 <= ||v||^2 - ||v*||^2 for v in the hull.
    v, v_ref = jac.double().T @ c, jac.double().T @ ref
    bound = (max(value - lower_bound, 0) ** 0.5) + (max(ref_value - lower_bound, 0) ** 0.5)
    distance = (v - v_ref).norm().item()
    assert distance <= bound + 1e-6 * v_ref.norm().item(), (distance, bound)
    assert distance <= 5e-3 * v_ref.norm().item(), distance / v_ref.norm().item()


@pytest.mark.parametrize("n_tasks, dim, common, seed", MGDA_CASES)
def test_mgda_min_norm_matches_torchjd(n_tasks, dim, common, seed):
    jac = _random_jacobian(n_tasks, dim, common, seed)
    c, _, converged = min_norm_weights(jac @ jac.T)  # float32, as the engine hands it over
    assert converged
    _assert_min_norm_like_torchjd(jac, c)


def test_mgda_through_the_engine_matches_torchjd():
    """The same through methods.create("mgda").backward on linear losses L_t = <g_t, theta> + 1."""
    jac = _random_jacobian(5, 30, 1.0, 4)
    theta = torch.nn.Parameter(torch.zeros(30))
    w = methods.create("mgda", 5).backward(jac @ theta + 1.0, [theta])
    _assert_min_norm_like_torchjd(jac, w)
    torch.testing.assert_close(theta.grad, w @ jac)


# --------------------------------------------------------------------------------- PCGrad


def _pcgrad_native(gramian, seed):
    m = methods.create("pcgrad", gramian.shape[0], seed=seed)
    return m.weigh(torch.zeros(gramian.shape[0]), gramian).weights


def _single_conflict_gramians(n_tasks, count, seed):
    """Gramians with exactly one conflicting pair (i, j) whose projections create no new
    conflict: <g_i - (G_ij / G_jj) g_j, g_k> > 0 for every k != j (and symmetrically). Then
    PCGrad's result depends neither on the random order nor on whether j = i is visited."""
    g = torch.Generator().manual_seed(seed)
    found = []
    while len(found) < count:
        jac = torch.randn(n_tasks, 8, generator=g) + torch.randn(1, 8, generator=g)
        gram = (jac @ jac.T).double()
        pairs = [(i, j) for i in range(n_tasks) for j in range(i + 1, n_tasks) if gram[i, j] < 0]
        if len(pairs) != 1:
            continue
        i, j = pairs[0]
        margin = 1e-3 * gram.diagonal().max()
        if all(
            gram[a, k] - gram[a, b] * gram[b, k] / gram[b, b] > margin
            for a, b in ((i, j), (j, i))
            for k in range(n_tasks)
            if k != b
        ):
            found.append(gram)
    return found


def test_pcgrad_two_tasks_matches_torchjd():
    torch.manual_seed(0)  # torchjd's order (irrelevant with two tasks, but deterministic)
    g = torch.Generator().manual_seed(1)
    conflicts = 0
    for _ in range(20):
        jac = torch.randn(2, 6, generator=g).double()
        gram = jac @ jac.T
        conflicts += bool(gram[0, 1] < 0)
        ref = PCGradWeighting()(gram)
        for seed in (0, 1):
            torch.testing.assert_close(_pcgrad_native(gram, seed), ref, rtol=1e-12, atol=1e-12)
    assert 5 <= conflicts <= 15  # both branches exercised


@pytest.mark.parametrize("n_tasks", [3, 4, 6])
def test_pcgrad_single_conflict_matches_torchjd(n_tasks):
    torch.manual_seed(0)
    for gram in _single_conflict_gramians(n_tasks, count=5, seed=n_tasks):
        ref = PCGradWeighting()(gram)
        assert not torch.allclose(ref, torch.ones(n_tasks, dtype=gram.dtype))  # a projection
        for seed in (0, 1, 2):
            torch.testing.assert_close(_pcgrad_native(gram, seed), ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- CAGrad
# TorchJD's CAGradWeighting(c) returns 1/T + c ||g0|| / ||g_w|| w (no rescale, no 1e-8 terms;
# it normalises G by its trace first, to which these weights are invariant). That is native
# cagrad with rescale=0 up to the 1e-8 terms; rescale 1 and 2 only divide by 1 + calpha^2 and
# 1 + calpha. TorchJD solves with cvxpy/Clarabel (an optional dependency, torchjd[cagrad]);
# native with SLSQP at its default tolerance (ftol 1e-6), so they agree to ~1e-4.

CAGRAD_CASES = [  # (T, D, common, seed, calpha, rescale)
    (3, 20, 0.0, 10, 0.4, 0),
    (3, 20, 1.0, 11, 0.5, 1),
    (3, 20, 2.0, 12, 0.9, 2),
    (5, 30, 1.0, 13, 0.5, 0),
    (8, 40, 0.5, 14, 0.3, 1),
    (14, 60, 1.0, 15, 0.5, 0),
    (14, 10, 1.0, 16, 0.5, 0),
]


@pytest.mark.parametrize("n_tasks, dim, common, seed, calpha, rescale", CAGRAD_CASES)
def test_cagrad_matches_torchjd(n_tasks, dim, common, seed, calpha, rescale):
    pytest.importorskip("cvxpy", reason="TorchJD's CAGrad needs cvxpy (pip install 'torchjd[cagrad]')")
    pytest.importorskip("clarabel")
    from torchjd.aggregation import CAGradWeighting

    jac = _random_jacobian(n_tasks, dim, common, seed)
    gramian = jac @ jac.T
    native = methods.create("cagrad", n_tasks, calpha=calpha, rescale=rescale)
    w = native.weigh(torch.ones(n_tasks), gramian).weights.double()
    divisor = {0: 1.0, 1: 1 + calpha**2, 2: 1 + calpha}[rescale]
    ref = CAGradWeighting(c=calpha)(gramian.double()) / divisor
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-3)
    v, v_ref = jac.double().T @ w, jac.double().T @ ref
    assert (v - v_ref).norm() <= 1e-3 * v_ref.norm()
