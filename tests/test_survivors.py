"""Planted single-line bugs that once survived the suite (tests/mutants.py lists them), each now caught here:
CorDA's factors entrywise, the whitened init with relative damping, the per-layer seed of the random control
through the model-level init, and the verbalizer's count (tests/test_train.py). The two-process EVA and CorDA
inits are in tests/test_distributed.py."""
import copy

import torch

import llama
import lora_da as L
import peers as P
from helpers import padded_samples


def layer_inputs(model, name, samples):
    """Each sample's inputs to layer `name` at its attended positions, one unpadded forward per sample."""
    layer = dict(model.named_modules())[name]
    xs, hook = [], layer.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().double()[0]))
    try:
        with torch.no_grad():
            for s in samples:
                model(s["tokens"][None, :int(s["attention_mask"].sum())])
    finally:
        hook.remove()
    return xs


def test_corda_factors_equal_a_hand_computation_entry_by_entry(stories):
    """C = (1/n_samples) Σ_s X_sᵀX_s with X_s = x_s/|max x_s| (peft corda.py), damped by 0.01·mean(diag C),
    W0 C = U S Vᵀ, A = √(S_r/s) (Vᵀ C⁻¹)_r, B = U_r √(S_r/s): checked entrywise, so that a C divided by the
    token count (A and B then scale by √(n_tokens/n_samples) in opposite directions, s·B A unchanged) fails."""
    samples = padded_samples(10)
    name = "layers.1.feed_forward.w2"
    base = copy.deepcopy(stories)
    W0 = dict(base.named_modules())[name].weight.detach().double()
    xs = layer_inputs(base, name, samples)
    C = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs) / len(xs)
    Cf = C + 0.01 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    U, S, Vh = L.svd_canonical(W0 @ Cf)
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    P.initialize_model(model, "corda", samples, cfg=L.DAConfig(N=1000, stats_batch_size=4))
    s = layers[name].scaling
    root = (S[:4] / s).sqrt()
    A_hand, B_hand = root[:, None] * (Vh[:4] @ torch.linalg.inv(Cf)), U[:, :4] * root
    A, B = layers[name].lora_A.detach().double(), layers[name].lora_B.detach().double()
    # fp32 factors of entries ~1e-1..1e1; the sums over ~150 tokens were fp64 on both sides
    torch.testing.assert_close(A, A_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(B, B_hand, rtol=1e-4, atol=1e-5)


def inv_sqrt(S, lam):
    if S.dim() == 1:
        return (S + lam).rsqrt()
    evals, V = torch.linalg.eigh(S)
    return (V * (evals.clamp_min(0) + lam).rsqrt()) @ V.T


def test_whitened_init_with_relative_damping_damps_Z_and_Y_by_their_own_scales():
    """Eq. 16 with §12's relative damping: A0 spans (Z + λ_Z I)^(-½) V_r, V_r the top-r right singular vectors
    of (Y + λ_Y)^(-½) G (Z + λ_Z I)^(-½), λ_Z = k·tr(Z)/d_in, λ_Y = k·mean(Y): built here by hand. Z and Y of
    very different scales (as in the real layers) make swapping the two dampings visible."""
    g = torch.Generator().manual_seed(4)
    d_out, d_in, r, k = 12, 20, 3, 0.3
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    Z = X.T @ X / 200
    Y = torch.logspace(-6, -3, d_out, dtype=torch.float64)
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 1e-3
    lam_z, lam_y = k * Z.diagonal().mean(), k * Y.mean()
    Zih, Yih = inv_sqrt(Z, lam_z), inv_sqrt(Y, lam_y)
    V_r = torch.linalg.svd(Yih[:, None] * G @ Zih)[2][:r].T
    A_hand = torch.linalg.qr(Zih @ V_r)[0]
    out = P.whitened_solve(G, Z, Y, r, L.DAConfig(N=100, relative_damping=k))
    torch.testing.assert_close(out["A0"] @ out["A0"].T, A_hand @ A_hand.T, atol=1e-8, rtol=0)


def test_the_random_control_through_the_model_init_gives_each_layer_loras_own_row_space(stories):
    """--direction random (§12): every layer's A0 spans the rows of the A that --init lora draws for that layer
    (the same per-layer seed), through initialize_da as train.py calls it, not only in the solver."""
    samples = padded_samples(6)
    lora, ctrl = copy.deepcopy(stories), copy.deepcopy(stories)
    A_lora = llama.add_lora(lora, r=4, lora_alpha=16, rslora=True)
    A_ctrl = llama.add_lora(ctrl, r=4, lora_alpha=16, rslora=True)
    P.initialize_model(lora, "lora", cfg=L.DAConfig(N=1000, seed=5))
    L.initialize_da(ctrl, samples, cfg=L.DAConfig(N=1000, seed=5, direction="random", stats_batch_size=3))
    angles = {n: L.principal_angle(A_lora[n].lora_A, A_ctrl[n].lora_A) for n in A_lora}
    assert max(angles.values()) < 1e-4, max(angles.items(), key=lambda kv: kv[1])
    # and the layers differ from one another: a seed shared by every layer would give equal rows in equal shapes
    assert L.principal_angle(A_ctrl["layers.0.attention.wq"].lora_A, A_ctrl["layers.1.attention.wq"].lora_A) > 10


def test_eva_on_a_rank_deficient_covariance_says_so_and_does_not_leave_rows_to_rounding():
    """Inputs with two distinct values (a rank-1 centred covariance), r = 4: the first row is the one principal
    direction; the other three are fixed by the rule (coordinate axes, Gram-Schmidt), the same after a
    perturbation at rounding level (1e-15) that turns an eigensolver's null-space vectors anywhere."""
    u = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64) / 5
    cov = 2.0 * torch.outer(u, u)
    A, ratio, rank = P.eva_init(torch.zeros(5), cov, 4)
    assert rank == 1 and ratio[0].item() == 1.0
    torch.testing.assert_close(A[0].double(), u.to(torch.float32).double(), atol=1e-7, rtol=0)
    noise = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-15
    A2, _, rank2 = P.eva_init(torch.zeros(5), cov + noise @ noise.T, 4)
    assert rank2 == 1
    torch.testing.assert_close(A2, A, atol=1e-12, rtol=0)  # rounding moves them by 1e-30, not by degrees
    torch.testing.assert_close(A.double() @ A.double().T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    full = P.eva_init(torch.zeros(5), torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)), 4)
    assert full[2] is None  # full rank: nothing to say
