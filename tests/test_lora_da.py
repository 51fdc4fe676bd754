"""lora_da.py as code: the statistics paths agree, the solve is deterministic, the peers are what their
authors released, a model is initialized in place, and bad input is refused with the model untouched."""
import copy
import dataclasses

import pytest
import torch

import llama
import lora_da as L
import peers as P
from helpers import padded_samples


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- a tiny MLP -----------------------------------------------------------------

def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def mlp_samples(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(5, generator=g), "y": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("y_full", [False, True])
def test_loop_and_batched_statistics_agree_on_a_tiny_mlp(y_full):
    model, samples = tiny_mlp(), mlp_samples(64)
    layers = {"0": model[0], "2": model[2]}
    loop = L.kfac_statistics(model, samples, mlp_loss, layers, batch_size=1, y_full=y_full)
    batched = L.kfac_statistics(model, samples, mlp_loss, layers, batch_size=16, y_full=y_full)
    for n in layers:
        for a, b in ((batched.G[n], loop.G[n]), (batched.Z[n], loop.Z[n]), (batched.Y[n], loop.Y[n])):
            assert rel(a, b) < 1e-5


def test_loop_gradient_equals_the_exact_per_sample_gradients_and_one_sample_kfac_is_exact():
    model, samples = tiny_mlp(), mlp_samples(32)
    layers = {"0": model[0], "2": model[2]}
    st = L.kfac_statistics(model, samples, mlp_loss, layers, y_full=True)
    for n, layer in layers.items():
        F, G = L.exact_fisher(model, samples, mlp_loss, layer)
        assert rel(st.G[n], G) < 1e-5
    # one sample, one token: vec(g xᵀ)vec(g xᵀ)ᵀ = g gᵀ ⊗ x xᵀ exactly, so K-FAC must equal the exact Fisher
    one = samples[:1]
    st1 = L.kfac_statistics(model, one, mlp_loss, layers, y_full=True)
    for n, layer in layers.items():
        F, _ = L.exact_fisher(model, one, mlp_loss, layer)
        assert rel(torch.kron(st1.Y[n], st1.Z[n]), F) < 1e-5


def test_loop_batched_and_exact_fisher_agree_on_the_tiny_llama(stories):
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=8)
    layers = L.lora_targets(model)
    model.train()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    samples = padded_samples(12)
    loop = L.kfac_statistics(model, samples, L.causal_lm_losses, layers, batch_size=1)
    batched = L.kfac_statistics(model, samples, L.causal_lm_losses, layers, batch_size=6)
    assert loop.n_tokens == batched.n_tokens == sum(int(s["attention_mask"].sum()) for s in samples)
    worst = max(rel(a[n], b[n]) for n in layers for a, b in ((batched.G, loop.G), (batched.Z, loop.Z),
                                                             (batched.Y, loop.Y)))
    assert worst < 1e-5
    # shared inputs share one Z tensor; different inputs do not
    assert loop.Z["layers.0.attention.wq"] is loop.Z["layers.0.attention.wk"] is loop.Z["layers.0.attention.wv"]
    assert loop.Z["layers.0.feed_forward.w1"] is loop.Z["layers.0.feed_forward.w3"]
    assert loop.Z["layers.0.attention.wo"] is not loop.Z["layers.0.attention.wq"]
    # G against per-sample weight gradients on a small layer
    name = "layers.1.attention.wk"
    _, G = L.exact_fisher(model, samples[:4], L.causal_lm_losses, layers[name])
    assert rel(L.kfac_statistics(model, samples[:4], L.causal_lm_losses, {name: layers[name]}).G[name], G) < 1e-5
    # a one-token sample: K-FAC equals the exact Fisher (wv: with one key, wk's output cannot change the loss)
    name = "layers.1.attention.wv"
    one = [{"tokens": torch.tensor([1]), "targets": torch.tensor([403]), "attention_mask": torch.tensor([True])}]
    st = L.kfac_statistics(model, one, L.causal_lm_losses, {name: layers[name]}, y_full=True)
    F, _ = L.exact_fisher(model, one, L.causal_lm_losses, layers[name])
    assert rel(torch.kron(st.Y[name], st.Z[name]), F) < 1e-5
    # the statistics pass restored requires_grad and mode
    assert model.training and requires == {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(requires.values()) and not all(requires.values())


def test_label_token_mask_counts_only_scored_tokens(stories):
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=2, lora_alpha=2, targets=("wo",))
    samples = padded_samples(4)
    st = L.kfac_statistics(model, samples, L.causal_lm_losses, L.lora_targets(model), token_mask="labels")
    assert st.n_tokens == 4


# --- the solve -------------------------------------------------------------------

def random_stats(d_out=12, d_in=20, seed=0, y_full=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d_in, generator=g) * torch.logspace(0, -1, d_in)
    Gy = torch.randn(200, d_out, generator=g)
    Z = X.T @ X / 200
    Y = Gy.T @ Gy / 200 if y_full else (Gy ** 2).mean(0)
    return torch.randn(d_out, d_in, generator=g), Z, Y


def test_factors_have_the_closed_form_and_are_bit_identical_across_runs():
    G, Z, Y = random_stats()
    cfg = L.DAConfig(N=1000, beta=0.5)
    A, B = L.lora_da_factors(G, Z, Y, 4, cfg)
    A2, B2 = L.lora_da_factors(G, Z, Y, 4, cfg)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    out = L.lora_da_solve(G, Z, Y, 4, cfg)
    A0, dW = out["A0"], out["dW"]
    # A0 orthonormal; lora_A = A0ᵀ/√γ; B A = ΔW A0 A0ᵀ/γ with ΔW = −Y⁻¹GZ⁻¹/σ
    torch.testing.assert_close(A0.T @ A0, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(A.double(), A0.T / 32, atol=1e-7, rtol=1e-6)
    raw = -torch.diag(1 / (Y.double() + 1e-6)) @ G.double() @ torch.linalg.inv(Z.double() + 1e-6 * torch.eye(20))
    torch.testing.assert_close(dW, raw / torch.linalg.matrix_norm(raw, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((B @ A).double(), dW @ A0 @ A0.T / 1024, atol=1e-8, rtol=1e-5)
    # signs fixed: each column's largest-|.| entry is positive
    assert (A0.gather(0, A0.abs().argmax(0, keepdim=True)) > 0).all()


def test_beta_zero_picks_the_top_right_singular_subspace_of_the_natural_gradient():
    G, Z, Y = random_stats(y_full=True)
    out = L.lora_da_solve(G, Z, Y, 3, L.DAConfig(N=1000, beta=0.0))
    V = torch.linalg.svd(out["dW"])[2][:3].T
    torch.testing.assert_close(out["A0"] @ out["A0"].T, V @ V.T, atol=1e-8, rtol=0)


def test_lobpcg_finds_the_same_subspace_as_the_dense_solve_and_falls_back_when_too_small():
    G, Z, Y = random_stats(d_out=16, d_in=64, seed=3)
    dense = L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=500, beta=1.0))
    lob = L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=500, beta=1.0, solver="lobpcg"), seed=1)
    assert lob["solver"] == "lobpcg"
    torch.testing.assert_close(lob["A0"] @ lob["A0"].T, dense["A0"] @ dense["A0"].T, atol=1e-5, rtol=0)
    small = L.lora_da_solve(*random_stats(d_in=10), 4, L.DAConfig(N=500, solver="lobpcg"))  # 10 < 3·4
    assert small["solver"] == "eigh"


def test_objective_is_the_trace_of_the_guidance_matrix_plus_a_constant():
    G, Z, Y = random_stats(seed=4)
    dW = L.natural_gradient(G, Z, Y, 1e-6)
    Zinv = torch.linalg.inv(Z.double() + 1e-6 * torch.eye(20, dtype=torch.float64))
    M = L.guidance_matrix(dW, Zinv, L.trace_Y_inv(Y, 1e-6) / 300, 1.0, 0.2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        A0, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
        lhs = L.objective(dW, Z, Y, A0, 300, alpha=1.0, beta=0.2, damping=1e-6)
        assert lhs.item() == pytest.approx((dW.pow(2).sum() + (A0.T @ M @ A0).trace()).item(), rel=1e-8)


# --- the peers ---------------------------------------------------------------------

def test_peer_factors_follow_their_papers():
    g = torch.Generator().manual_seed(0)
    W0, G = torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g)
    s, r = 16 / 8 ** 0.5, 4
    A, B = P.pissa_init(W0, r, s)
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    torch.testing.assert_close((s * B @ A).double(), U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-5)
    A, B = P.lora_ga_init(G, r, gamma=16)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    c = 12 ** 0.25 / 4
    torch.testing.assert_close((A.double() @ A.double().T), c ** 2 * torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    # B spans the next r left singular vectors, A the top r right ones
    Pb, Pu = B.double() @ torch.linalg.pinv(B.double()), U[:, r:2 * r] @ U[:, r:2 * r].T
    torch.testing.assert_close(Pb, Pu, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.double().T @ A.double() / c ** 2, Vh[:r].T @ Vh[:r], atol=1e-5, rtol=0)
    A, B = P.lora_one_init(G, r, gamma=128)
    U, S, Vh = torch.linalg.svd(-G.double(), full_matrices=False)
    torch.testing.assert_close((B @ A).double(), U[:, :r] @ torch.diag(S[:r]) @ Vh[:r] / (S[0] * 128),
                               atol=1e-6, rtol=1e-5)
    A, B = L.lora_init(12, 20, r, g)
    assert A.abs().max() <= 20 ** -0.5 and B.abs().max() == 0


def test_milora_takes_the_minor_end_of_the_spectrum_that_pissa_leaves():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(12, 20, generator=g, dtype=torch.float64)
    s, r = 16 / 8 ** 0.5, 4
    A, B = P.milora_init(W0.float(), r, s)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    # s·B A is the rank-r part of W0 along its r smallest singular values, so W0 − s·B A keeps the top 12 − r
    torch.testing.assert_close((s * B @ A).double(), U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:], atol=1e-5, rtol=1e-5)
    assert L.principal_angle(A, Vh[-r:]) < 1e-2 and L.principal_angle(A, Vh[:r]) > 89
    with pytest.raises(ValueError, match="r <= min"):
        P.milora_init(W0.float(), 13, s)


def layer_inputs(model, layer, samples):
    """Each sample's inputs to `layer`, attended positions only, one sample per forward: the reference for
    the batched, padded statistics pass."""
    xs, hook = [], layer.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().double()))
    try:
        with torch.no_grad():
            for smp in samples:
                n = int(smp["attention_mask"].sum())
                model(smp["tokens"][None, :n])
    finally:
        hook.remove()
    return [x[0] for x in xs]


def initialized(stories, method, samples, **settings):
    """settings: DAConfig's (the statistics pass) and PeerConfig's (the peer's own), by name."""
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    peer_fields = {f.name for f in dataclasses.fields(P.PeerConfig)}
    cfg = L.DAConfig(N=1000, **{k: v for k, v in settings.items() if k not in peer_fields})
    peer = P.PeerConfig(**{k: v for k, v in settings.items() if k in peer_fields})
    return model, layers, P.initialize_model(model, method, samples, cfg=cfg, peer=peer)


def test_corda_residual_is_the_best_rank_r_residual_of_W0_times_the_per_sample_normalized_covariance(stories):
    samples = padded_samples(12)
    name = "layers.2.feed_forward.w2"
    W0 = dict(stories.named_modules())[name].weight.detach().double()
    # C = (1/n) Σ_s X_sᵀX_s with X_s = x_s/|max x_s|, computed sample by sample (batch 1, no padding)
    xs = layer_inputs(stories, dict(stories.named_modules())[name], samples)
    C = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs) / len(xs)
    Z = sum(x.T @ x for x in xs) / sum(len(x) for x in xs)
    assert rel(C, Z) > 0.1  # the normalization matters: an unnormalized covariance is a different matrix
    model, layers, report = initialized(stories, "corda", samples, stats_batch_size=5)  # padded batches of 5
    m = layers[name]
    lam = report["layers"][name]["damping"]
    Cf = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
    W_res = L.weight_of(m).detach().double()
    torch.testing.assert_close(W_res + m.scaling * B @ A, W0, atol=1e-5, rtol=0)  # the step-0 output is kept
    # (W0 − s·B A) C is W0 C minus its best rank-r approximation: its squared norm is the tail of W0 C's spectrum
    S = torch.linalg.svdvals(W0 @ Cf)
    tail = (S[4:] ** 2).sum()
    assert abs(torch.linalg.matrix_norm(W_res @ Cf) ** 2 - tail) / tail < 1e-4
    # and it is CorDA's closed form W0 − U_r S_r V_rᵀ C⁻¹ with U S Vᵀ = svd(W0 C)
    U, S, Vh = torch.linalg.svd(W0 @ Cf, full_matrices=False)
    torch.testing.assert_close(W0 - U[:, :4] @ torch.diag(S[:4]) @ Vh[:4] @ torch.linalg.inv(Cf), W_res,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("token_mask", ["labels", "all"])
def test_eva_A_spans_the_top_principal_directions_of_the_centred_inputs(stories, token_mask):
    samples = padded_samples(40)
    name = "layers.1.attention.wq"
    xs = layer_inputs(stories, dict(stories.named_modules())[name], samples)
    if token_mask == "labels":  # the positions whose outputs the loss scores: one per sample here
        xs = [x[smp["targets"][:len(x)] != -100] for x, smp in zip(xs, samples)]
    X = torch.cat(xs)
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    model, layers, report = initialized(stories, "eva", samples, eva_token_mask=token_mask)
    A = layers[name].lora_A.detach().double()
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=A.dtype), atol=1e-6, rtol=0)  # unit rows, whiten=False
    assert L.principal_angle(A, Vh[:4]) < 0.1
    _, _, Vu = torch.linalg.svd(X, full_matrices=False)  # without centring, the mean direction comes first
    assert L.principal_angle(A, Vu[:4]) > 1
    assert layers[name].lora_B.abs().max() == 0
    # the redistribution EVA would make keeps the total rank, reported beside the fixed-rank init
    assert sum(report["eva_ranks"].values()) == 4 * len(layers)


@pytest.mark.parametrize("method,unchanged", [("lora", True), ("gaussian", True), ("pissa", True), ("milora", True),
                                              ("ga", True), ("corda", True), ("eva", True), ("one", False),
                                              ("da", False)])
def test_step_zero_output_equals_the_base_model_exactly_when_the_method_says_so(stories, method, unchanged):
    base = copy.deepcopy(stories)
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    samples = padded_samples(8)
    P.initialize_model(model, method, samples, cfg=L.DAConfig(N=1000))
    tokens = torch.stack([s["tokens"] for s in samples[:2]])
    with torch.no_grad():
        gap = (model(tokens) - base(tokens)).abs().max().item()
    if unchanged:
        assert gap < 1e-4  # fp32 round-off of W0 − s·B A + s·B A
    else:
        assert gap > 1e-4  # LoRA-One and LoRA-DA start one small step away from W0


def test_initialize_da_writes_every_layer_and_reports_each_stage(stories):
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    samples = padded_samples(8)
    W0 = {n: m.base.weight.clone() for n, m in layers.items()}
    rep = L.initialize_da(model, samples, cfg=L.DAConfig(N=1000, layers_per_pass=2, stats_batch_size=4))
    assert set(rep["layers"]) == set(layers)
    assert {"statistics", "solve", "write", "total"} <= set(rep["seconds"])
    for n, m in layers.items():
        assert torch.equal(m.base.weight, W0[n])                      # W0 is not changed
        torch.testing.assert_close(m.lora_A @ m.lora_A.T, torch.eye(4) / 1024, atol=1e-6, rtol=0)
        info = rep["layers"][n]
        assert info["sigma"] > 0 and info["bias"] >= -1e-9 and info["variance"] > 0 and info["Y_median"] > 0
    # grouping the statistics passes changes nothing
    other = copy.deepcopy(stories)
    llama.add_lora(other, r=4, lora_alpha=16, rslora=True)
    L.initialize_da(other, samples, cfg=L.DAConfig(N=1000, stats_batch_size=4))
    for n, m in L.lora_targets(other).items():
        torch.testing.assert_close(m.lora_B, layers[n].lora_B, atol=1e-6, rtol=1e-4)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), r"rank r must be an integer in \[1, d_in=20\]"),
    (dict(r=21), r"rank r must be an integer in \[1, d_in=20\]"),
    (dict(alpha=-1.0), "alpha must be >= 0, got -1.0"),
    (dict(beta=-0.1), "beta must be >= 0, got -0.1"),
    (dict(alpha=0.0, beta=0.0), "not both zero"),
    (dict(N=-1), "N must be an integer >= 0"),
    (dict(N=0), "N must be an integer >= 1 in the solve"),
    (dict(damping=0.0), "damping must be > 0"),
])
def test_impossible_settings_are_refused(kwargs, message):
    G, Z, Y = random_stats()
    args = dict(r=4, N=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        L.lora_da_factors(G, Z, Y, args.pop("r"), L.DAConfig(**args))


def test_bad_shapes_non_finite_and_indefinite_factors_are_refused():
    G, Z, Y = random_stats()
    with pytest.raises(ValueError, match=r"Z must be \(20, 20\) to fit G \(12, 20\)"):
        L.lora_da_factors(G, Z[:10, :10], Y, 4, L.DAConfig(N=100))
    with pytest.raises(ValueError, match=r"Y must be \(12,\) or \(12, 12\)"):
        L.lora_da_factors(G, Z, Y[:5], 4, L.DAConfig(N=100))
    Gn = G.clone()
    Gn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="G has NaN or inf entries in layer layers.3.wq"):
        L.lora_da_solve(Gn, Z, Y, 4, L.DAConfig(N=100), name="layers.3.wq")
    with pytest.raises(ValueError, match=r"not positive definite after damping 1e-06 .*use a larger damping"):
        L.lora_da_factors(G, Z - 2 * torch.eye(20), Y, 4, L.DAConfig(N=100))


def test_a_rank_deficient_gram_factor_rounded_below_zero_is_damped_not_refused():
    """Z summed in fp32 from fewer inputs than d_in is PSD up to rounding; the solve damps its nearest PSD
    matrix (negative eigenvalues set to 0), while a truly indefinite factor is still refused (test above)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 40, generator=gen) @ torch.randn(40, 64, generator=gen)  # rank 40 < d_in = 64
    Z = X.T @ X / len(X)                                                           # fp32, as the statistics pass
    evals, V = torch.linalg.eigh(Z.double())
    assert evals[0] < -1e-9  # the premise: fp32 rounding put eigenvalues below zero, below the damping used
    C = L.damped_cholesky(Z, 1e-9)
    nearest = (V * evals.clamp_min(0)) @ V.T + 1e-9 * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(C @ C.T, nearest, rtol=0, atol=1e-9)  # fp64 round trip of entries ~10


def test_failed_initialization_leaves_the_model_untouched(stories):
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="damping must be > 0"):
        L.initialize_da(model, padded_samples(4), cfg=L.DAConfig(damping=0.0))
    with pytest.raises(ValueError, match="empty sample set"):
        L.initialize_da(model, [], cfg=L.DAConfig())
    with torch.no_grad():
        layers["layers.2.feed_forward.w1"].base.weight[0, 0] = float("nan")
    before["layers.2.feed_forward.w1.base.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.2.feed_forward.w1"):
        L.initialize_da(model, padded_samples(4), cfg=L.DAConfig())
    after = model.state_dict()
    # equal, NaN where the planted NaN is (torch.equal is False for any tensor holding a NaN)
    assert all(torch.equal(before[k].isnan(), after[k].isnan()) for k in before)
    assert all(torch.equal(torch.nan_to_num(before[k]), torch.nan_to_num(after[k])) for k in before)


def test_principal_angle_sees_the_subspace_not_the_basis_or_the_scale():
    # setup: two orthonormal directions e1, e2 in R^5 and a rotation of e2 by theta toward e3
    import math
    E = torch.eye(5, dtype=torch.float64)
    theta = 0.3
    A1 = E[:2]
    A2 = torch.stack([E[0], math.cos(theta) * E[1] + math.sin(theta) * E[2]])
    mix = torch.tensor([[2.0, 1.0], [0.5, -3.0]], dtype=torch.float64)
    # claims: invariant to basis and scale; the largest angle is theta; orthogonal subspaces are at 90 degrees
    assert L.principal_angle(A1, 0.01 * mix @ A1) == pytest.approx(0.0, abs=1e-5)
    assert L.principal_angle(A1, A2) == pytest.approx(math.degrees(theta), abs=1e-6)
    assert L.principal_angle(A1, E[2:4]) == pytest.approx(90.0, abs=1e-6)


def test_the_solve_reports_the_unnormalized_shift_norm():
    # claim: dW_fro is ‖ΔW‖_F of Eq. 5 whether or not ΔW is normalized before the solve
    torch.manual_seed(0)
    G, X, E = torch.randn(6, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    Z, Y = X.T @ X / 40, (E * E).mean(0)
    dW = L.natural_gradient(G, Z, Y, 1e-6)
    for normalize in (True, False):
        cfg = L.DAConfig(N=100, normalize=normalize)
        out = L.lora_da_solve(G, Z, Y, 2, cfg)
        assert out["dW_fro"] == pytest.approx(torch.linalg.matrix_norm(dW).item(), rel=1e-9)


def test_the_whitened_init_is_lora_da_with_only_the_direction_changed():
    """theory.md §11: `--init whitened` keeps LoRA-DA's ΔW (normalized by σ), γ and B0 = ΔW A0/√γ (Eq. 11), and
    changes only A0: orthonormal rows spanning Z^(-1/2) V_r (Eq. 16), another subspace than Eq. 10's."""
    G, Z, Y = random_stats()
    cfg = L.DAConfig(N=100)
    da, wh = L.lora_da_solve(G, Z, Y, 4, cfg), P.whitened_solve(G, Z, Y, 4, cfg)
    A0 = wh["A0"]
    torch.testing.assert_close(A0.T @ A0, torch.eye(4, dtype=A0.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(wh["lora_A"].double(), A0.T / cfg.gamma ** 0.5, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(wh["lora_B"].double(), da["dW"] @ A0 / cfg.gamma ** 0.5, atol=1e-7, rtol=1e-6)
    assert wh["sigma"] == pytest.approx(da["sigma"])
    assert L.principal_angle(wh["lora_A"], da["lora_A"]) > 1.0  # degrees: a different direction
    # the direction: Z^(-1/2) times the top right singular vectors of Y^(-1/2) G Z^(-1/2), written out again
    e, V = torch.linalg.eigh(Z.double() + cfg.damping * torch.eye(Z.shape[0], dtype=torch.float64))
    Zih = (V * e.rsqrt()) @ V.T
    Vr = torch.linalg.svd((Y.double() + cfg.damping).rsqrt()[:, None] * G.double() @ Zih)[2][:4].T
    ref = torch.linalg.qr(Zih @ Vr)[0]
    torch.testing.assert_close(A0 @ A0.T, ref @ ref.T, atol=1e-8, rtol=0)


# --- theory.md §12: the attribution controls, each changing one thing -------------------------------------------

def test_relative_damping_damps_each_factor_by_its_own_scale():
    """k > 0: ΔW = −(Y + k·mean(Y))⁻¹ G (Z + k·tr(Z)/d_in I)⁻¹, written out here independently."""
    G, Z, Y = random_stats(seed=5)
    k = 0.1
    out = L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=100, relative_damping=k))
    lz, ly = k * Z.double().trace().item() / Z.shape[0], k * Y.double().mean().item()
    assert out["damping"] == pytest.approx((lz, ly), rel=1e-12)
    raw = -(G.double() / (Y.double() + ly)[:, None]) @ torch.linalg.inv(Z.double() + lz * torch.eye(Z.shape[0]))
    torch.testing.assert_close(out["dW"], raw / torch.linalg.matrix_norm(raw, 2), atol=1e-9, rtol=1e-7)
    assert L.principal_angle(out["lora_A"], L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=100))["lora_A"]) > 1.0


def test_the_controls_change_only_the_direction_the_scale_or_the_step():
    G, Z, Y = random_stats(seed=6)
    da = L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=100), seed=7)
    c = lambda **kw: L.lora_da_solve(G, Z, Y, 4, L.DAConfig(N=100, **kw), seed=7)
    # LoRA's scale: the same direction, rows of norm 1/√3, and the same B A (the step does not depend on the scale)
    big = c(a_scale="lora")
    assert L.principal_angle(big["lora_A"], da["lora_A"]) < 1e-4
    torch.testing.assert_close(big["lora_A"].norm(dim=1), torch.full((4,), 3 ** -0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(big["lora_B"] @ big["lora_A"], da["lora_B"] @ da["lora_A"], atol=1e-9, rtol=1e-5)
    # no step: B = 0, A unchanged
    assert torch.equal(c(step=False)["lora_A"], da["lora_A"]) and not c(step=False)["lora_B"].any()
    # random: the row space of LoRA's own A for the same seed; gradient: G's top-r right singular vectors
    lora_A = L.lora_init(*G.shape, 4, torch.Generator().manual_seed(7))[0]
    assert L.principal_angle(c(direction="random")["lora_A"], lora_A) < 1e-4
    V = torch.linalg.svd(G.double())[2][:4]
    assert L.principal_angle(c(direction="gradient")["lora_A"], V) < 1e-4
    # a control's step is ΔW projected onto its own subspace: B A = ΔW A0 A0ᵀ/γ with its A0
    rnd = c(direction="random")
    torch.testing.assert_close((rnd["lora_B"] @ rnd["lora_A"]).double(), rnd["dW"] @ rnd["A0"] @ rnd["A0"].T / 1024,
                               atol=1e-9, rtol=1e-5)
