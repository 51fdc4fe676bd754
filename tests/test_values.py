"""The method's numbers against independent restatements: each test writes the formula of theory.md again,
in the plainest form (explicit inverses, fp64), and compares values, not only consistency. Each guards
against a class of bug that a consistency check lets through (tests/mutants.py plants them one at a time)."""
import copy
import math

import pytest
import torch

import llama
import lora_da as L
import peers as P


# --- Eqs. 5-11: the closed form, restated --------------------------------------------------

def restated(G, Z, Y, r, N, alpha, beta, gamma, lam, normalize):
    """theory.md Eqs. 5-11 written out again: returns (A0 A0ᵀ, B A, the sorted eigenvalues of M)."""
    G, Z, Y = G.double(), Z.double(), Y.double()
    I_in = torch.eye(Z.shape[0], dtype=torch.float64)
    Zi = torch.linalg.inv(Z + lam * I_in)                                     # (Z + λI)⁻¹
    Yi = torch.diag(1 / (Y + lam)) if Y.dim() == 1 else torch.linalg.inv(Y + lam * torch.eye(Y.shape[0], dtype=torch.float64))
    dW = -Yi @ G @ Zi                                                         # Eq. 5
    c = torch.trace(Yi) / N                                                   # tr(Y⁻¹)/N, Eq. 7
    if normalize:                                                             # Eq. 11's normalization
        s = torch.linalg.svdvals(dW)[0]
        dW, c = dW / s, c / s ** 2
    M = -alpha * dW.T @ dW + beta * c * Zi                                    # Eq. 9
    evals, V = torch.linalg.eigh((M + M.T) / 2)
    A0 = V[:, :r]                                                             # Eq. 10
    return A0 @ A0.T, dW @ A0 @ A0.T / gamma, evals                           # Eq. 11: B A = ΔW A0 A0ᵀ/γ


def stats(d_out=10, d_in=12, seed=0, y_full=False, y_scale=1.0, sigma=10.0, lam=1e-6):
    """Well-conditioned fp64 statistics: Z from 400 anisotropic draws, Y spread over two decades, and G scaled
    so that σ = ‖ΔW‖₂ = sigma, far from 1 (so that forgetting the /σ² of Eq. 11 changes the answer)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d_in, dtype=torch.float64)
    Z = X.T @ X / 400
    spread = torch.logspace(-1, 1, d_out, dtype=torch.float64)
    if y_full:
        Q, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
        Y = y_scale * (Q * spread) @ Q.T
    else:
        Y = y_scale * spread[torch.randperm(d_out, generator=g)]
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    *_, dW = inverses_and_step(G, Z, Y, lam)
    return G * sigma / torch.linalg.svdvals(dW)[0], Z, Y


def inverses_and_step(G, Z, Y, lam):
    Zi = torch.linalg.inv(Z + lam * torch.eye(Z.shape[0], dtype=torch.float64))
    Yi = torch.diag(1 / (Y + lam)) if Y.dim() == 1 else torch.linalg.inv(Y + lam * torch.eye(Y.shape[0], dtype=torch.float64))
    return Zi, Yi, -Yi @ G @ Zi


def competing_beta(G, Z, Y, N, lam, weight=2.0):
    """The β at which the variance term's largest entry, β·tr(Y⁻¹)/(Nσ²)·λ_max(Z⁻¹), is `weight` times the bias
    term's (1, for ΔW/σ): there both terms shape the subspace, and a wrong coefficient in either moves it."""
    Zi, Yi, dW = inverses_and_step(G, Z, Y, lam)
    sigma2 = torch.linalg.svdvals(dW)[0].item() ** 2
    return weight * sigma2 * N / (torch.trace(Yi).item() * torch.linalg.eigvalsh(Zi)[-1].item())


CASES = {  # name: (stats kwargs, N, normalize)
    "diagonal Y, normalized": (dict(), 40, True),
    "full Y, normalized": (dict(y_full=True), 40, True),
    "diagonal Y, not normalized": (dict(), 40, False),
    "full Y, not normalized": (dict(y_full=True), 40, False),
    "Y of the order of the damping": (dict(y_scale=1e-6), 40, True),
    "small N": (dict(seed=3), 3, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_equals_the_restated_equations(case):
    kwargs, N, normalize = CASES[case]
    G, Z, Y = stats(**kwargs)
    r, lam, gamma = 3, 1e-6, 1024.0
    beta = competing_beta(G, Z, Y, N, lam)
    cfg = L.DAConfig(N=N, beta=beta, gamma=gamma, damping=lam, normalize=normalize)
    out = L.lora_da_solve(G, Z, Y, r, cfg)
    P, BA, evals = restated(G, Z, Y, r, N, 1.0, beta, gamma, lam, normalize)
    # the case is sensitive: the variance term moves the subspace (a wrong coefficient would show), and the
    # r-th eigen-gap is open (the subspace is well defined, so 1e-6 is a fair tolerance)
    P0, _, _ = restated(G, Z, Y, r, N, 1.0, 0.0, gamma, lam, normalize)
    assert (P - P0).norm() > 0.1, "variance term does not matter in this case: it would not catch a wrong coefficient"
    assert (evals[r] - evals[r - 1]) > 1e-4 * evals.abs().max()
    torch.testing.assert_close(out["A0"] @ out["A0"].T, P, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["lora_B"].double() @ out["lora_A"].double(), BA, atol=1e-6 * BA.abs().max().item(), rtol=1e-4)
    # and the reported terms are Eqs. 6 and 7 at that A0 (in ΔW/σ units when normalized)
    A0 = out["A0"]
    dW = out["dW"]
    Zi = torch.linalg.inv(Z + lam * torch.eye(Z.shape[0], dtype=torch.float64))
    Yi = torch.diag(1 / (Y + lam)) if Y.dim() == 1 else torch.linalg.inv(Y + lam * torch.eye(Y.shape[0], dtype=torch.float64))
    scale = out["sigma"] ** 2 if normalize else 1.0
    assert out["bias"] == pytest.approx((dW @ (torch.eye(12, dtype=torch.float64) - A0 @ A0.T)).pow(2).sum().item(), rel=1e-8)
    assert out["variance"] == pytest.approx((torch.trace(Yi) / (N * scale) * torch.trace(A0.T @ Zi @ A0)).item(), rel=1e-8)


def test_ky_fan_holds_on_the_default_path():
    """The default settings (normalize, diagonal Y, β = 0.03): no orthonormal A0 has a lower Eq. 8 than the
    solve's, and its value is α‖ΔW‖² + the sum of the r smallest eigenvalues of M (Ky Fan)."""
    G, Z, Y = stats(seed=5)
    cfg = L.DAConfig(N=20)
    # G scaled so that the default β = 0.03 makes the variance term compete (as competing_beta sets β elsewhere)
    G = G * (competing_beta(G, Z, Y, cfg.N, cfg.damping) / cfg.beta) ** 0.5
    assert cfg.normalize and not cfg.y_full and cfg.beta == 0.03
    r = 3
    out = L.lora_da_solve(G, Z, Y, r, cfg)
    sigma2 = out["sigma"] ** 2
    J = lambda A0: (L.bias_term(out["dW"], A0) + cfg.beta * L.variance_term(Z, Y, A0, cfg.N, cfg.damping) / sigma2).item()
    _, _, evals = restated(G, Z, Y, r, cfg.N, 1.0, cfg.beta, cfg.gamma, cfg.damping, True)
    optimum = out["dW"].pow(2).sum().item() + evals[:r].sum().item()
    assert J(out["A0"]) == pytest.approx(optimum, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    others = [J(torch.linalg.qr(torch.randn(12, r, generator=g, dtype=torch.float64))[0]) for _ in range(3000)]
    # the margin: the best random subspace is above the optimum by more than rounding (here by > 1e-6 relative)
    assert min(others) > optimum * (1 + 1e-6)
    assert out["variance"] * cfg.beta > 1e-3 * out["bias"]  # β·variance is not negligible here: the test sees it


# --- Eq. 4: Z, Y by hand on padded sequences ------------------------------------------------

def sequences(n=6, T=20, seed=0):
    """Right-padded multi-token sequences of different lengths, several scored tokens each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, T + 1, (), generator=g))
        tokens = torch.full((T,), 2)
        tokens[:length] = torch.randint(3, 512, (length,), generator=g)
        tokens[0] = 1
        targets = torch.full((T,), -100)
        start = int(torch.randint(2, length - 3, (), generator=g))
        targets[start:length - 1] = tokens[start + 1:length]                   # an "answer" of several tokens
        out.append({"tokens": tokens, "targets": targets, "attention_mask": torch.arange(T) < length})
    return out


def by_hand(model, layer, samples, labels_only=False):
    """Z = Σ_t x xᵀ / n, Y = Σ_t g² / n over the counted tokens, G = mean over samples of Σ_t g xᵀ:
    one unpadded sample at a time, x and h from a hook, g = ∂L_s/∂h."""
    d_out, d_in = layer.base.weight.shape
    Z, Y, G, n = torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_out, dtype=torch.float64), 0, 0
    for s in samples:
        length = int(s["attention_mask"].sum())
        seen = {}
        handle = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], h=o))
        loss = L.causal_lm_losses(model, {"tokens": s["tokens"][None, :length], "targets": s["targets"][None, :length]})
        handle.remove()
        (g,) = torch.autograd.grad(loss.sum(), seen["h"])
        x, g = seen["x"][0].double(), g[0].double()                           # (length, d_in), (length, d_out)
        keep = s["targets"][:length] != -100 if labels_only else torch.ones(length, dtype=torch.bool)
        Z += x[keep].T @ x[keep]
        Y += (g[keep] ** 2).sum(0)
        G = G + g.T @ x
        n += int(keep.sum())
    return Z / n, Y / n, G / len(samples), n


@pytest.mark.parametrize("token_mask", ["all", "labels"])
def test_kfac_statistics_equal_a_hand_computation_on_padded_sequences(stories, token_mask):
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=2, lora_alpha=4, targets=("wv", "w2"))
    llama.mark_only_lora_trainable(model)
    samples = sequences()
    layers = L.lora_targets(model)
    for batch_size in (1, 4):  # the per-sample loop and a padded batch
        st = L.kfac_statistics(model, samples, L.causal_lm_losses, layers, batch_size=batch_size, token_mask=token_mask)
        for name in ("layers.1.attention.wv", "layers.3.feed_forward.w2"):
            Z, Y, G, n = by_hand(model, layers[name], samples, labels_only=(token_mask == "labels"))
            assert st.n_tokens == n
            torch.testing.assert_close(st.Z[name].double(), Z, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.Y[name].double(), Y, rtol=1e-4, atol=1e-12)
            torch.testing.assert_close(st.G[name].double(), G, rtol=1e-4, atol=1e-5 * G.abs().max().item())  # fp32 sums
    # the labels mask counts exactly the scored tokens
    if token_mask == "labels":
        assert st.n_tokens == sum(int((s["targets"] != -100).sum()) for s in samples)


# --- Eq. 11 at step 0: direction and size of the move; the peers' sample counts -----------

@pytest.mark.parametrize("method", ["da", "one"])
def test_step_zero_moves_each_layer_downhill_by_the_stated_size(stories, method):
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    samples = sequences(n=12, seed=1)
    cfg = L.DAConfig(N=1000, stats_batch_size=4)
    used = samples[:P.PeerConfig().one_samples] if method == "one" else samples
    G = L.kfac_statistics(model, used, L.causal_lm_losses, layers, batch_size=4, factors=False).G  # at W0
    P.initialize_model(model, method, samples, cfg=cfg)
    x = torch.randn(5, 64)
    llama.fast_paths(model, False)  # W0 x + s·B A x as written: the folded (W0 + s·B A) x would lose the small step to cancellation
    for name, m in layers.items():
        BA = m.lora_B.double() @ m.lora_A.double()
        # the output change of each layer is s·B A x (the adapter is the only thing that moved)
        if m.base.in_features == 64:
            with torch.no_grad():
                torch.testing.assert_close((m(x) - m.base(x)).double(), m.scaling * x.double() @ BA.T, atol=1e-6, rtol=1e-5)
        # direction: a descent step, ⟨G, B A⟩ < 0
        assert (G[name].double() * BA).sum() < 0, name
        # size: ‖B A‖₂ = 1/γ for LoRA-One ((−G)_r/(σ1 γ)); ≤ 1/γ for LoRA-DA (ΔW/σ projected, ‖ΔW/σ‖₂ = 1)
        top = torch.linalg.svdvals(BA)[0].item()
        if method == "one":
            assert top == pytest.approx(1 / P.PeerConfig().one_gamma, rel=1e-4)
        else:
            assert 0.5 / cfg.gamma < top <= 1 / cfg.gamma * (1 + 1e-4)


@pytest.mark.parametrize("method,field", [("one", "one_samples"), ("ga", "ga_samples")])
def test_peers_use_their_own_sample_counts(stories, method, field):
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=2, lora_alpha=4, targets=("wq", "w1"))
    samples = sequences(n=12, seed=2)
    cfg, peer = L.DAConfig(stats_batch_size=4), P.PeerConfig(**{field: 5})
    rep = P.initialize_model(copy.deepcopy(model), method, samples, cfg=cfg, peer=peer)
    assert rep["samples"] == 5
    G5 = L.kfac_statistics(model, samples[:5], L.causal_lm_losses, layers, batch_size=4, factors=False).G
    init = P.lora_one_init if method == "one" else P.lora_ga_init
    gamma = peer.one_gamma if method == "one" else peer.ga_gamma
    other = copy.deepcopy(model)
    P.initialize_model(other, method, samples, cfg=cfg, peer=peer)
    for name, m in L.lora_targets(other).items():
        A, B = init(G5[name], m.r, gamma)
        torch.testing.assert_close(m.lora_A, A, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.lora_B, B, atol=1e-6, rtol=1e-4)


# --- the random inits' distributions --------------------------------------------------------

def test_lora_and_gaussian_inits_have_their_stated_distributions():
    g = torch.Generator().manual_seed(0)
    d_in, r = 4096, 64
    A, B = L.lora_init(128, d_in, r, g)
    a, bound = A.double().flatten(), 1 / math.sqrt(d_in)
    n = a.numel()
    # U(−1/√d_in, 1/√d_in): mean 0 (sd of the mean: bound/√(3n)), variance bound²/3, both ends reached
    assert abs(a.mean().item()) < 4 * bound / math.sqrt(3 * n)
    assert a.var().item() == pytest.approx(bound ** 2 / 3, rel=0.02)
    assert -bound <= a.min().item() < -0.99 * bound and 0.99 * bound < a.max().item() <= bound
    assert B.abs().max() == 0
    A, B = P.gaussian_init(128, d_in, r, g)
    a = A.double().flatten()
    # N(0, 1/r²): mean 0 (sd of the mean 1/(r√n)), sd 1/r, and Gaussian tails (4 sd reached, kurtosis 3)
    assert abs(a.mean().item()) < 4 / (r * math.sqrt(n))
    assert a.std().item() == pytest.approx(1 / r, rel=0.01)
    assert ((a - a.mean()) ** 4).mean().item() / a.var().item() ** 2 == pytest.approx(3.0, rel=0.05)
    assert B.abs().max() == 0
