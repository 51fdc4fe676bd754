"""The theory of theory.md, verified on synthetic models where it can be checked exactly.

Each test: setup, claim (its name), check. Tolerances are in standard errors of the Monte-Carlo
estimate, which the test computes from its own samples, so a wrong formula fails by many of them."""
import pytest
import torch

import lora_da as L
import synthetic as S

EXACT = 1e-12  # damping for population quantities: keep the formulas exact


def mc_mean(x):
    """Monte-Carlo mean and its standard error."""
    return x.mean().item(), x.std().item() / len(x) ** 0.5


def frob_se(S_true, n):
    """Expected Frobenius error of a Gaussian sample covariance of n draws: √((‖S‖² + tr(S)²)/n)."""
    return ((S_true.norm() ** 2 + S_true.trace() ** 2) / n).sqrt().item()


# --- Eq. 4: K-FAC is exact for the linear-Gaussian model ------------------------------------

def test_kfac_factors_of_the_loop_match_the_exact_kronecker_fisher_within_sampling_error():
    P = S.make_linear_gaussian(d_in=6, d_out=4, seed=0)
    n = 3000
    samples = P.samples(n, torch.Generator().manual_seed(1))
    model = P.model(P.W_tgt)  # at the target the empirical Fisher is the Fisher
    st = L.kfac_statistics(model, samples, P.loss_fn, {"W": model}, batch_size=1, y_full=True)
    Z, Y = st.Z["W"].double(), st.Y["W"].double()
    # each factor against its population value, within 3 expected sampling errors (x and g = Σε⁻¹ε are Gaussian)
    assert (Z - P.Sigma_x).norm() < 3 * frob_se(P.Sigma_x, n)
    assert (Y - P.Y).norm() < 3 * frob_se(P.Y, n)
    # the exact Fisher (per-sample weight gradients, an independent path) against the Kronecker form:
    # row-major vec(g xᵀ) = g ⊗ x, so F = E[g gᵀ ⊗ x xᵀ] = Y ⊗ Z when x and g are independent
    F, G = L.exact_fisher(model, samples, P.loss_fn, model)
    F_true = torch.kron(P.Y, P.Sigma_x)
    v = torch.stack([torch.kron(P.Y @ (s["y"].double() - P.W_tgt @ s["x"].double()), s["x"].double()) for s in samples])
    se_F = (((v.norm(dim=1) ** 4).mean() - F_true.norm() ** 2) / n).sqrt().item()
    assert (F - F_true).norm() < 3 * se_F
    # and the K-FAC product, propagated: ‖ΔY‖‖Z‖ + ‖Y‖‖ΔZ‖
    se_K = frob_se(P.Y, n) * P.Sigma_x.norm() + P.Y.norm() * frob_se(P.Sigma_x, n)
    assert (torch.kron(Y, Z) - F_true).norm() < 3 * se_K
    assert (torch.kron(Y, Z) - F).norm() < 3 * (se_F + se_K)
    # the loop's G is the mean of the exact per-sample gradients
    torch.testing.assert_close(st.G["W"].double(), G, rtol=1e-5, atol=1e-6)


def test_natural_gradient_step_recovers_the_target_shift():
    # a shift small against the noise (the theory's ‖W_tgt − W0‖ = O(1/√N) regime)
    gen = torch.Generator().manual_seed(2)
    P = S.make_linear_gaussian(d_in=6, d_out=4, seed=3, x_spectrum=torch.logspace(0.5, -0.5, 6),
                               D=0.05 * torch.randn(4, 6, generator=gen, dtype=torch.float64))
    n = 100_000
    samples = P.samples(n, torch.Generator().manual_seed(4))
    model = P.model()  # at W0: this is what LoRA-DA sees
    st = L.kfac_statistics(model, samples, P.loss_fn, {"W": model}, batch_size=10_000, y_full=True)
    G = st.G["W"].double()
    dW = L.natural_gradient(G, st.Z["W"], st.Y["W"], EXACT)
    # with population statistics the step is exact: −Y⁻¹ G Z⁻¹ = Σε Σε⁻¹ D Σx Σx⁻¹ = D
    torch.testing.assert_close(L.natural_gradient(P.G(), P.Sigma_x, P.Y, EXACT), P.D, rtol=1e-9, atol=1e-9)
    # with n samples its error is the full estimator's noise, E‖ΔŴ − D‖² ≈ tr(Σε) tr(Σx⁻¹)/n (Eq. 7 with A0 = I);
    # the empirical Y at W0 adds a relative O(‖D Σx Dᵀ‖/‖Σε‖) ≈ 1e-2 bias, allowed for by the 5% term
    rms = (P.Sigma.trace() * torch.linalg.inv(P.Sigma_x).trace() / n).sqrt().item()
    err = (dW - P.D).norm().item()
    assert err < 3 * rms + 0.05 * P.D.norm().item()
    # a real recovery, not a tolerance that accepts anything: the best multiple of the plain gradient is far off
    c = (P.D * -G).sum() / G.pow(2).sum()
    print(f"\nnatural gradient: ‖ΔŴ − D‖/‖D‖ = {err / P.D.norm():.3f}; scaled gradient: "
          f"{(c * -G - P.D).norm() / P.D.norm():.3f}")
    assert err < 0.2 * P.D.norm().item() < (c * -G - P.D).norm().item()


# --- Eqs. 1-2, 6-7: the bias-variance decomposition ----------------------------------------

@pytest.mark.parametrize("which", ["random", "top of ΔW", "top of Σx"])
def test_monte_carlo_error_of_lora_equals_bias_plus_variance(which):
    """E‖Ŵ − W_tgt‖² = bias (Eq. 6) + variance (Eq. 7) for the LoRA estimator Ŵ = W0 + (Ŵ_full − W0) A0A0ᵀ.
    Finite-N correction: least squares on N Gaussian inputs has E[(XᵀX)⁻¹] = Σx⁻¹/(N − d_in − 1), so the
    exact variance is Eq. 7 with N replaced by N − d_in − 1; the asymptotic 1/N must be measurably wrong."""
    d_in, N, trials = 6, 40, 4000
    P = S.make_linear_gaussian(d_in=d_in, d_out=4, seed=1)
    gen = torch.Generator().manual_seed(0)
    A0 = {"random": S.random_orthonormal(d_in, 2, gen), "top of ΔW": S.top_right_singular(P.D, 2),
          "top of Σx": torch.linalg.eigh(P.Sigma_x)[1][:, -2:]}[which]
    mc, se = mc_mean(P.lora_errors([A0], N, trials, gen)[:, 0])
    bias = L.bias_term(P.D, A0).item()
    var = L.variance_term(P.Sigma_x, P.Y, A0, N - d_in - 1, EXACT).item()
    var_asymptotic = L.variance_term(P.Sigma_x, P.Y, A0, N, EXACT).item()
    print(f"\n{which}: Monte Carlo {mc:.4f} ± {se:.4f}, predicted {bias + var:.4f} "
          f"(bias {bias:.4f} + variance {var:.4f}), asymptotic {bias + var_asymptotic:.4f}")
    assert abs(mc - (bias + var)) < 4 * se
    assert abs(mc - (bias + var_asymptotic)) > 4 * se


def test_lora_fa_variance_is_bounded_above_by_the_surrogate():
    """Eq. 12: with A fixed and B fitted (LoRA-FA) the variance is tr(Y⁻¹)/N · tr((A0ᵀZA0)⁻¹) (finite N:
    N − r − 1), and (A0ᵀZA0)⁻¹ ≼ A0ᵀZ⁻¹A0, so Eq. 7 is an upper bound, equal only for Z-invariant span(A0)."""
    d_in, r, N, trials = 6, 2, 40, 4000
    gen = torch.Generator().manual_seed(5)
    P = S.make_linear_gaussian(d_in=d_in, d_out=4, seed=4, D=torch.zeros(4, d_in, dtype=torch.float64))
    A0 = S.random_orthonormal(d_in, r, gen)
    mc, se = mc_mean(P.lora_fa_errors([A0], N, trials, gen)[:, 0])
    exact = (P.Sigma.trace() * torch.linalg.inv(A0.T @ P.Sigma_x @ A0).trace() / (N - r - 1)).item()
    surrogate = L.variance_term(P.Sigma_x, P.Y, A0, N - r - 1, EXACT).item()
    assert abs(mc - exact) < 4 * se
    assert surrogate > exact + 4 * se
    # the matrix inequality behind it, on many random subspaces
    Zinv = torch.linalg.inv(P.Sigma_x)
    for _ in range(200):
        A = S.random_orthonormal(d_in, r, gen)
        assert torch.linalg.eigvalsh(A.T @ Zinv @ A - torch.linalg.inv(A.T @ P.Sigma_x @ A)).min() > -1e-10
    E = torch.linalg.eigh(P.Sigma_x)[1][:, :r]  # an invariant subspace: equality
    torch.testing.assert_close(E.T @ Zinv @ E, torch.linalg.inv(E.T @ P.Sigma_x @ E))


# --- Eqs. 8-10: the smallest eigenvectors are optimal --------------------------------------

def da_subspace(P, N, beta=1.0):
    # population statistics; N − d_in − 1 is the finite-N correction of the decomposition test (Eq. 13)
    cfg = L.DAConfig(N=N - P.W0.shape[1] - 1, alpha=1.0, beta=beta, damping=EXACT)
    return L.lora_da_solve(P.G(), P.Sigma_x, P.Y, 2, cfg)["A0"]


@pytest.mark.parametrize("N", [30, 50, 200])
def test_lora_da_subspace_has_lower_measured_error_than_the_peer_subspaces(N):
    P = S.variance_matters()
    d_in, r, trials = 8, 2, 3000
    gen = torch.Generator().manual_seed(N)
    candidates = {"LoRA-DA": da_subspace(P, N), "bias-only (β=0)": da_subspace(P, N, beta=0.0),
                  "gradient-SVD": S.top_right_singular(P.G(), r), "PiSSA": S.top_right_singular(P.W0, r)}
    candidates.update({f"random {i}": S.random_orthonormal(d_in, r, gen) for i in range(5)})
    err = P.lora_errors(list(candidates.values()), N, trials, gen)  # the same data sets for every A0
    for i, name in enumerate(candidates):
        if i == 0:
            continue
        diff, se = mc_mean(err[:, i] - err[:, 0])  # paired: the other's error minus LoRA-DA's
        assert diff > 3 * se, f"N={N}: {name} is not worse than LoRA-DA ({diff:.4f} ± {se:.4f})"


def test_no_random_subspace_beats_lora_da_on_the_objective_and_ky_fan_holds():
    P = S.variance_matters()
    N, d_in = 50, P.W0.shape[1]
    n = N - d_in - 1  # the finite-N correction N − d_in − 1 (Eq. 13), as in the decomposition test
    cfg = L.DAConfig(N=n, alpha=1.0, beta=1.0, damping=EXACT, normalize=False)
    out = L.lora_da_solve(P.G(), P.Sigma_x, P.Y, 2, cfg)
    best = L.objective(P.D, P.Sigma_x, P.Y, out["A0"], n, alpha=1.0, beta=1.0, damping=EXACT).item()
    # Ky Fan: the minimum is α‖ΔW‖² + the sum of the r smallest eigenvalues of M
    M = L.guidance_matrix(P.D, torch.linalg.inv(P.Sigma_x), P.Sigma.trace() / n, 1.0, 1.0)
    assert best == pytest.approx(P.D.pow(2).sum().item() + torch.linalg.eigvalsh(M)[:2].sum().item(), rel=1e-9)
    gen = torch.Generator().manual_seed(7)
    others = [L.objective(P.D, P.Sigma_x, P.Y, S.random_orthonormal(8, 2, gen), n, alpha=1.0, beta=1.0, damping=EXACT).item()
              for _ in range(2000)]
    assert min(others) > best


def test_lora_da_approaches_the_bias_only_subspace_as_N_grows():
    P = S.variance_matters()
    bias_only = S.projector(da_subspace(P, 100, beta=0.0))
    gaps = [(S.projector(da_subspace(P, N)) - bias_only).norm().item() for N in (50, 500, 5000, 10 ** 6)]
    assert gaps[0] > 1.0                    # at small N the variance term moves the subspace
    assert all(a >= b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3


# --- where K-FAC is only an approximation -------------------------------------------------

def test_decomposition_holds_for_softmax_regression_where_kfac_is_approximate():
    """Multinomial logistic regression: the Fisher E[(diag p − ppᵀ) ⊗ xxᵀ] is not a Kronecker product.
    At large N the error still splits as bias + tr(P F⁻¹ P)/N (to a few SE, the MLE's O(1/N²) aside);
    K-FAC's tr(Y⁻¹)tr(A0ᵀZ⁻¹A0)/N approximates that variance, here within 35% (measured: about 25% low)."""
    P = S.make_softmax(d=4, K=3, scale=1.0, seed=0)
    gen = torch.Generator().manual_seed(0)
    model = P.model(P.W_tgt)
    st = L.kfac_statistics(model, P.samples(20000, gen), P.loss_fn, {"W": model}, batch_size=5000, y_full=True)
    Z, Y = st.Z["W"].double(), st.Y["W"].double()
    A0 = S.random_orthonormal(4, 2, torch.Generator().manual_seed(5))
    N, trials = 2000, 1000
    mc, se = mc_mean(P.lora_errors([A0], N, trials, gen)[:, 0])
    bias = L.bias_term(P.W_tgt - P.W0, A0).item()
    IP = torch.kron(torch.eye(2, dtype=torch.float64), S.projector(A0))  # row-major vec(E A0A0ᵀ)
    var_exact = (IP @ torch.linalg.inv(P.fisher(n=50000)) @ IP).trace().item() / N
    var_kfac = L.variance_term(Z, Y, A0, N, EXACT).item()
    print(f"\nsoftmax: Monte Carlo {mc:.5f} ± {se:.5f}; bias {bias:.5f} + exact variance {var_exact:.5f}; "
          f"K-FAC variance {var_kfac:.5f}")
    assert abs(mc - (bias + var_exact)) < 4 * se
    assert abs(var_kfac - (mc - bias)) < 0.35 * (mc - bias)
    assert abs(var_kfac - var_exact) > 0.05 * var_exact  # K-FAC really is approximate here


def test_surrogate_and_true_lora_fa_risk_can_prefer_different_subspaces():
    """theory.md §9: with anisotropic inputs, the A0 that minimizes Eq. 8 is not the one that minimizes the
    exact LoRA-FA risk (Eq. 12: Z-weighted bias, (A0ᵀZA0)⁻¹ variance). The risk formula is itself checked by MC."""
    P, N, r = S.variance_matters(), 50, 2
    gen = torch.Generator().manual_seed(0)
    A = S.random_orthonormal(8, r, gen)
    mc, se = mc_mean(P.lora_fa_errors([A], N, 4000, gen)[:, 0])
    assert abs(mc - P.lora_fa_risk(A, N)) < 4 * se
    da = da_subspace(P, N)
    others = [S.random_orthonormal(8, r, gen) for _ in range(3000)]
    surrogate = lambda A0: L.objective(P.D, P.Sigma_x, P.Y, A0, N - 8 - 1, alpha=1.0, beta=1.0, damping=EXACT).item()  # N − d_in − 1
    best_fa = min(others, key=lambda A0: P.lora_fa_risk(A0, N))
    assert all(surrogate(da) <= surrogate(A0) for A0 in others[:300])  # LoRA-DA wins its own objective
    assert P.lora_fa_risk(best_fa, N) < P.lora_fa_risk(da, N)          # but not the LoRA-FA risk
    assert surrogate(best_fa) > surrogate(da)
