"""
The peers of LoRA-DA: every other initialization this project compares it with, each as its authors
released it (../shared/paper/peer-recipes.md, theory.md §10-§11), and the one function that writes any
initialization into a model, `initialize_model`, which hands LoRA-DA itself to lora_da.initialize_da.

    LoRA, Gaussian          data-blind random A, B = 0
    PiSSA, MiLoRA           data-blind: the largest / smallest singular triplets of W0, W0 shifted
    LoRA-GA, LoRA-One       the gradient G of a few samples (its SVD)
    CorDA, EVA              the layer inputs alone (a forward pass, no gradient)
    whitened                LoRA-DA's scale and step on the subspace of the Fisher-whitened gradient (§11)

This file imports lora_da (the statistics, the canonical SVD and the sharing of a pass over processes),
never the reverse: lora_da.py stays LoRA-DA alone, read beside theory.md.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

import lora_da as L
from lora_da import svd_canonical, canonical_signs, damped_cholesky, natural_gradient, weight_of

CHOICES = {"eva_token_mask": ("all", "labels")}  # the peers' settings with a fixed set of values


@dataclass
class PeerConfig:
    """The peers' own settings; the defaults are their authors' released runs (peer-recipes.md). train.py
    builds its command line from these defaults, so they are stated nowhere else. The settings a pass over
    the samples shares with LoRA-DA (batch, blocks per pass, seed) are DAConfig's."""
    ga_gamma: float = 16.0       # LoRA-GA's γ (reproduce/conf/init/gradient.yaml)
    ga_samples: int = 8          # LoRA-GA's gradient samples (reproduce config: bsz 1 × 8 iters)
    one_gamma: float = 128.0     # LoRA-One's γ
    one_samples: int = 8         # LoRA-One's gradient samples
    eva_token_mask: str = "labels"  # EVA's inputs: PEFT's default use_label_mask (the scored positions), or "all"
    eva_rho: float = 2.0         # EVA's ρ: components per layer offered to the rank redistribution (reported)

    def __post_init__(self):
        for name in ("ga_gamma", "one_gamma", "eva_rho"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise L.SettingError(name, f"must be a finite number, got {v}")
            if not v > 0:
                raise L.SettingError(name, f"must be > 0, got {v}")
        for name in ("ga_samples", "one_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise L.SettingError(name, f"must be an integer >= 1, got {v}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise L.SettingError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


# =============================================================================
# theory.md §10. The peer initializations, each as its authors released it
# =============================================================================

def gaussian_init(d_out, d_in, r, generator):
    """PEFT's "gaussian": A ~ N(0, (1/r)²), B = 0."""
    return (torch.randn(r, d_in, generator=generator, dtype=torch.float64) / r).float(), torch.zeros(d_out, r)


def pissa_init(W0, r, scaling):
    """PiSSA (Meng et al. 2024): W0 = U S Vᵀ; A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s), so s·B A is the best
    rank-r part of W0, which is then subtracted from W0 (W0 <- W0 − s·B A)."""
    U, S, Vh = svd_canonical(W0)
    root = (S[:r] / scaling).sqrt()
    return (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()


def lora_ga_init(G, r, gamma):
    """LoRA-GA (Wang et al. 2024, official code): G = U S Vᵀ; A = top-r right singular vectors,
    B = the next r left singular vectors, both × d_out^¼/√γ; then W0 <- W0 − s·B A."""
    d_out, d_in = G.shape
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"LoRA-GA needs 2r <= min(d_out, d_in) = {min(d_out, d_in)}, got r={r}")
    U, S, Vh = svd_canonical(G)
    c = d_out ** 0.25 / math.sqrt(gamma)
    return (Vh[:r] * c).float(), (U[:, r:2 * r] * c).float()


def lora_one_init(G, r, gamma):
    """LoRA-One (Zhang et al. 2025): −G = U S Vᵀ; B = U_r √S_r/√(σ1 γ), A = √S_r V_rᵀ/√(σ1 γ), so
    B A = (−G)_r/(σ1 γ): one normalized gradient step. W0 is unchanged."""
    U, S, Vh = svd_canonical(-G)
    if S[0] == 0:
        raise ValueError("LoRA-One: the gradient is zero")
    root = S[:r].sqrt() / math.sqrt(S[0].item() * gamma)
    return (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()


def milora_init(W0, r, scaling):
    """MiLoRA (Wang et al. 2024, sufenlp/MiLoRA svd_init.py, mode "min"): W0 = U S Vᵀ; A = √(S/s) Vᵀ and
    B = U √(S/s) over the r *smallest* triplets, then W0 <- W0 − s·B A. The opposite end of PiSSA's
    spectrum: the adapter starts in the directions the pretrained weight uses least, and the step-0 output
    is the base model's."""
    if r > min(W0.shape):
        raise ValueError(f"MiLoRA needs r <= min(d_out, d_in) = {min(W0.shape)}, got r={r}")
    U, S, Vh = svd_canonical(W0)
    root = (S[-r:] / scaling).sqrt()
    return (root[:, None] * Vh[-r:]).float(), (U[:, -r:] * root).float()


def corda_damped(C, start=0.01, tol=0.05, max_doublings=60):
    """CorDA's damping (peft corda.py collect_eigens_for_layer): C + λ·mean(diag C)·I, λ from 0.01 doubled
    until ‖C_λ C_λ⁻¹ − I‖_F < 0.05, i.e. until the inverse is trustworthy. In fp64 the first λ passes
    for any covariance of these models; the loop is kept because it is the recipe."""
    C = C.double()
    scale = C.diagonal().mean()
    if not scale > 0:
        raise ValueError("CorDA: the input covariance is zero (no counted tokens reached this layer?)")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam = start
    for _ in range(max_doublings):
        Cf = C + lam * scale * eye
        Cinv = torch.linalg.inv(Cf)
        if torch.linalg.matrix_norm(Cf @ Cinv - eye) < tol:
            return Cf, Cinv, lam
        lam *= 2
    raise ValueError(f"CorDA: covariance not invertible after damping {lam:g}·mean(diag C)")


def corda_init(W0, C, r, scaling):
    """CorDA IPM (Yang et al. 2024, peft corda_init): W0 C = U S Vᵀ with C the damped input covariance;
    A = √(S_r/s) (Vᵀ C⁻¹)_r, B = U_r √(S_r/s), then W0 <- W0 − s·B A = W0 − U_r S_r V_rᵀ C⁻¹. The rank-r part
    is chosen by how much output it makes on the task's inputs (W0 C), not by W0 alone as PiSSA does:
    (W0 − s·B A)·C is the best rank-r residual of W0 C (Eckart–Young). Returns (A, B, λ)."""
    if r > min(W0.shape):
        raise ValueError(f"CorDA needs r <= min(d_out, d_in) = {min(W0.shape)}, got r={r}")
    Cf, Cinv, lam = corda_damped(C)
    U, S, Vh = svd_canonical(W0.double() @ Cf)
    root = (S[:r] / scaling).sqrt()
    return (root[:, None] * (Vh[:r] @ Cinv)).float(), (U[:, :r] * root).float(), lam


def eva_init(mean, cov, r):
    """EVA (Paischer et al. 2024, peft eva.py): A = the top-r principal directions of the layer inputs
    (rows, unit norm: whiten=False), B = 0, W0 kept. PEFT runs an incremental PCA over batches until the
    components settle; this is the exact PCA of the same centred covariance, the limit it converges to.
    mean (d_in,), cov (d_in, d_in) = E[x xᵀ] − mean meanᵀ. Returns (A, explained-variance ratios, k): k, the
    covariance's numerical rank, when it is below r (else None). Its last r − k rows then span no variance at
    all, and an eigensolver would leave them to rounding (two processes' sums, summed in another order, land
    up to 89° apart): they are filled deterministically, the coordinate axes in order, made orthogonal to
    everything before them (Gram-Schmidt), kept where at least half of the axis survives."""
    if r > cov.shape[0]:
        raise ValueError(f"EVA needs r <= d_in = {cov.shape[0]}, got r={r}")
    evals, evecs = torch.linalg.eigh(cov.double())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)           # descending
    ratio = evals / evals.sum().clamp_min(torch.finfo(evals.dtype).tiny)
    # an eigenvalue below d_in·eps64 of the largest is rounding, not variance
    k = int((evals > cov.shape[0] * torch.finfo(torch.float64).eps * evals[0].clamp_min(1e-300)).sum())
    V = canonical_signs(evecs[:, :min(k, r)])                           # (d_in, k), largest-|.| entry positive
    if k < r:
        rows = list(V.T)
        for i in range(cov.shape[0]):
            v = torch.zeros(cov.shape[0], dtype=V.dtype, device=V.device)
            v[i] = 1.0
            for u in rows:
                v = v - (u @ v) * u
            if v.norm() > 0.5:
                rows.append(v / v.norm())
            if len(rows) == r:
                break
        V = torch.stack(rows, 1)
    return V.T.float(), ratio, (k if k < r else None)


def eva_ranks(ratios: dict, r: int, rho: float = 2.0) -> dict:
    """EVA's rank redistribution (peft eva.py): pool every layer's top round(ρ·r) explained-variance ratios,
    keep the globally largest r·(number of layers), and give each layer as many as it holds. Reported only:
    the init keeps r per layer (every method here trains the same adapter shapes, so a difference in
    accuracy cannot come from where the parameters went)."""
    k = max(1, round(rho * r))
    pool = sorted(((float(v), name) for name, q in ratios.items() for v in q[:k]), reverse=True)
    keep = pool[:r * len(ratios)]
    counts = {name: 0 for name in ratios}
    for _, name in keep:
        counts[name] += 1
    return counts


# =============================================================================
# theory.md §11, Eq. 16. The subspace the excess risk prescribes: LoRA-DA's scale and step, another direction
# =============================================================================

def inverse_sqrt(S, damping):
    """(S + λI)^(-1/2) of a symmetric positive semi-definite factor, in fp64 (a vector: its diagonal)."""
    S = S.double()
    if S.dim() == 1:
        return (S + damping).rsqrt()
    evals, V = torch.linalg.eigh((S + S.T) / 2)
    return (V * (evals.clamp_min(0) + damping).rsqrt()) @ V.T


def whitened_gradient_subspace(G, Z, Y, r, damping):
    r"""Eq. 16: the rows of A that minimize the excess-risk bias of LoRA-FA span $Z^{-1/2} V_r$, with $V_r$ the
    top-r right singular vectors of the Fisher-whitened gradient $Y^{-1/2} G Z^{-1/2}$. Returns A0 (d_in, r),
    orthonormal: the same subspace, in the form LoRA-DA's factors take (Eq. 11). damping: λ, or (λ_Z, λ_Y)."""
    lam_z, lam_y = damping if isinstance(damping, tuple) else (damping, damping)
    Zih, Yih = inverse_sqrt(Z, lam_z), inverse_sqrt(Y, lam_y)
    # M = Y^(-1/2) G Z^(-1/2)   (= −Y^(1/2) ΔW Z^(1/2) in the linear-Gaussian model)
    M = (Yih[:, None] * G.double() if Yih.dim() == 1 else Yih @ G.double()) @ Zih
    V_r = torch.linalg.svd(M, full_matrices=False)[2][:r].T          # (d_in, r)
    A0, _ = torch.linalg.qr(Zih @ V_r)                                 # span Z^(-1/2) V_r, orthonormal
    return canonical_signs(A0)


def whitened_solve(G, Z, Y, r, cfg: L.DAConfig, *, name=""):
    """LoRA-DA's factors (Eq. 11: ΔW normalized as configured, lora_A = A0ᵀ/√γ, lora_B = ΔW A0/√γ) on the
    whitened-gradient subspace (Eq. 16) instead of Eq. 10's: only the direction of A differs."""
    L._check_inputs(G, Z, Y, name)
    lam_z, lam_y = L.dampings(Z, Y, cfg)
    dW = natural_gradient(G, Z, Y, lam_y, name, Lz=damped_cholesky(Z, lam_z, "Z", name))
    sigma = torch.linalg.matrix_norm(dW, ord=2).item()
    if cfg.normalize and sigma > 0:
        dW = dW / sigma
    A0 = whitened_gradient_subspace(G, Z, Y, r, (lam_z, lam_y))
    lora_A, lora_B = A0.T / math.sqrt(cfg.gamma), dW @ A0 / math.sqrt(cfg.gamma)
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise ValueError(f"non-finite factor{' in layer ' + name if name else ''}; raise the damping")
    return {"lora_A": lora_A.float(), "lora_B": lora_B.float(), "A0": A0, "sigma": sigma}


# =============================================================================
# The activation-based peers' statistics: one forward pass over the samples
# =============================================================================

def input_statistics(model, samples: list, loss_fn: Callable, layers: dict, *, batch_size: int = 16,
                     token_mask: str = "all", reduce: Callable = None) -> dict:
    """Forward-only statistics of each target layer's inputs x, for the activation-based peers (no
    gradient: they never look at the loss, only at what flows into W0). Per layer:
      C    = (1/n_samples) Σ_s X_sᵀX_s with X_s = x_s/|max x_s|, each sample scaled by its own largest entry
             (CorDA's per-sample normalization; its hook takes the signed max, then the absolute value);
      mean = E_t[x], cov = E_t[x xᵀ] − mean meanᵀ over counted tokens (EVA's centred PCA).
    token_mask as in lora_da.counted_tokens ("labels": the positions whose outputs the loss scores)."""
    if len(samples) == 0:
        raise ValueError("empty sample set: an activation-based init needs at least one target sample")
    device = next(model.parameters()).device
    names = list(layers)
    C, S1, S2, owner = {}, {}, {}, {}
    n_tokens = 0
    order = L.length_order(samples)
    with torch.no_grad(), L.recording(model, layers) as io:
        for start in range(0, len(samples), batch_size):
            chunk = [samples[i] for i in order[start:start + batch_size]]
            batch, bsz = L.collate(chunk), len(chunk)
            loss_fn(model, {k: v.to(device) for k, v in batch.items()})   # the forward pass fills io
            owner = owner or L.shared_input_owners(io, names)
            for name in names:
                if owner[name] != name:
                    continue
                d_in = weight_of(layers[name]).shape[1]
                x = io[name][0].detach().double().reshape(bsz, -1, d_in)
                if not torch.isfinite(x).all():
                    raise ValueError(f"non-finite input of layer {name}")
                attended = L.counted_tokens(batch, "all", bsz, x.shape[1], device)
                peak = x.masked_fill(~attended[..., None], -math.inf).amax(dim=(1, 2)).abs()   # (bsz,)
                if not (peak > 0).all():
                    raise ValueError(f"CorDA: a sample's largest input to layer {name} is 0")
                X = (x / peak[:, None, None])[attended]
                C[name] = C.get(name, 0) + X.T @ X
                xm = x[L.counted_tokens(batch, token_mask, bsz, x.shape[1], device)]
                S1[name] = S1.get(name, 0) + xm.sum(0)
                S2[name] = S2.get(name, 0) + xm.T @ xm
                if name == names[0]:
                    n_tokens += xm.shape[0]
            io.clear()
    sums = [t for name in names if owner[name] == name for t in (C[name], S1[name], S2[name])]
    n_samples, n_tokens = L.reduce_sums(reduce, len(samples), n_tokens, sums, device)
    if n_tokens == 0:
        raise ValueError("no counted tokens: every token was masked out (check token_mask and the masks)")
    out = {}
    for name in names:
        o = owner[name]
        mean = S1[o] / n_tokens
        out[name] = {"C": C[o] / n_samples, "mean": mean, "cov": S2[o] / n_tokens - torch.outer(mean, mean)}
    return out


# =============================================================================
# Initializing a model: one small function per family, behind one table
# =============================================================================

METHODS = ("lora", "gaussian", "pissa", "milora", "ga", "one", "corda", "eva", "da", "whitened")
DATA_AWARE = ("ga", "one", "corda", "eva", "da", "whitened")  # the methods that need target samples
SAMPLES_USED = {"ga": "ga_samples", "one": "one_samples"}  # the peers' own sample counts; LoRA-DA uses all


def data_blind(model, layers, method, samples, loss_fn, cfg, peer, report, log, shard, reduce, stage):
    """LoRA, Gaussian (random A, B = 0) and PiSSA, MiLoRA (from W0 alone, W0 shifted): no samples."""
    t0 = time.perf_counter()
    factors = {}  # name -> (A, B, shift_W0)
    for name, m in layers.items():
        d_out, d_in = weight_of(m).shape
        gen = torch.Generator().manual_seed(L.layer_seed(cfg.seed, name))
        if method in ("pissa", "milora"):
            A, B = (pissa_init if method == "pissa" else milora_init)(weight_of(m).detach().float(), m.r, m.scaling)
            factors[name] = (A, B, True)
        else:
            A, B = (L.lora_init if method == "lora" else gaussian_init)(d_out, d_in, m.r, gen)
            factors[name] = (A, B, False)
    report["seconds"]["solve"] = time.perf_counter() - t0
    return factors


def activation_based(model, layers, method, samples, loss_fn, cfg, peer, report, log, shard, reduce, stage):
    """CorDA, EVA: one forward pass over the samples (input_statistics), then one SVD or PCA per layer."""
    t0 = time.perf_counter()
    report["samples"] = len(samples)
    if len(samples) < shard[1]:
        raise ValueError(f"{len(samples)} samples for {method} cannot be shared by {shard[1]} processes")
    stage("statistics")
    stats = input_statistics(model, samples[shard[0]::shard[1]], loss_fn, layers, batch_size=cfg.stats_batch_size,
                             token_mask=peer.eva_token_mask if method == "eva" else "all", reduce=reduce)
    t1 = time.perf_counter()
    report["seconds"]["statistics"] = t1 - t0
    stage("solve")
    factors, ratios = {}, {}
    for name, m in layers.items():
        W0, st = weight_of(m).detach(), stats[name]
        if method == "corda":
            A, B, lam = corda_init(W0.to(st["C"].device), st["C"], m.r, m.scaling)
            factors[name] = (A.cpu(), B.cpu(), True)
            report["layers"][name] = {"damping": lam}
        else:
            A, ratios[name], rank = eva_init(st["mean"], st["cov"], m.r)
            factors[name] = (A.cpu(), torch.zeros(W0.shape[0], m.r), False)
            report["layers"][name] = {"explained": ratios[name][:m.r].sum().item()}
            if rank is not None:  # fewer directions with variance than rows of A: said, and filled deterministically
                report["layers"][name]["covariance_rank"] = rank
                log(f"eva: {name}'s input covariance has rank {rank} < r = {m.r}: rows {rank + 1}..{m.r} of A "
                    f"are coordinate axes made orthogonal to the rest (no input variance there)")
    if method == "eva":
        report["eva_ranks"] = eva_ranks(ratios, next(iter(layers.values())).r, peer.eva_rho)
    report["seconds"]["solve"] = time.perf_counter() - t1
    log(f"{method} init: {len(layers)} layers, {len(samples)} samples, {time.perf_counter() - t0:.1f}s")
    return factors


def gradient_based(model, layers, method, samples, loss_fn, cfg, peer, report, log, shard, reduce, stage):
    """LoRA-GA, LoRA-One (G of their own few samples) and the whitened init (G, Z, Y): LoRA-DA's statistics
    pass (lora_da.solve_in_passes), each layer solved by the peer's own formula."""
    used = samples[:getattr(peer, SAMPLES_USED[method])] if method in SAMPLES_USED else samples

    def solve(name, m, stats):
        G = stats.G[name]
        if method == "ga":    # W0 <- W0 − s·B A: the output is unchanged at step 0
            return (*lora_ga_init(G.cpu(), m.r, peer.ga_gamma), True)
        if method == "one":
            return (*lora_one_init(G.cpu(), m.r, peer.one_gamma), False)
        out = whitened_solve(G, stats.Z[name], stats.Y[name], m.r, cfg, name=name)
        return out["lora_A"].cpu(), out["lora_B"].cpu(), False
    return L.solve_in_passes(model, layers, used, loss_fn, cfg, solve, factors=method == "whitened", label=method,
                             report=report, log=log, shard=shard, reduce=reduce, stage=stage)


FAMILIES = {"lora": data_blind, "gaussian": data_blind, "pissa": data_blind, "milora": data_blind,
            "ga": gradient_based, "one": gradient_based, "whitened": gradient_based,
            "corda": activation_based, "eva": activation_based}


def initialize_model(model, method: str, samples: list = None, loss_fn: Callable = L.causal_lm_losses,
                     cfg: L.DAConfig = None, peer: PeerConfig = None, log: Callable = None, shard=(0, 1),
                     reduce: Callable = None, stage: Callable = None) -> dict:
    """Write the chosen initialization into every LoRA layer of `model`; returns a report. "da" is
    lora_da.initialize_da; every other method is its family's function above. All factors are computed
    first and written last, so an error leaves the model untouched. shard, reduce and stage as in
    lora_da.initialize_da (several processes; each stage's peak memory)."""
    cfg, peer = cfg or L.DAConfig(), peer or PeerConfig()
    log = log or (lambda *a: None)
    stage = stage or (lambda name: None)
    layers = L.lora_targets(model)
    if not layers:
        raise ValueError("model has no LoRA layers: call llama.add_lora(model, ...) first")
    if method not in METHODS:
        raise ValueError(f"unknown init {method!r}; choose from {', '.join(METHODS)}")
    if method in DATA_AWARE and not samples:
        raise ValueError(f"init {method!r} needs target samples; got an empty sample set")
    if method == "da":
        return L.initialize_da(model, samples, loss_fn, cfg, log=log, shard=shard, reduce=reduce, stage=stage)
    t0 = time.perf_counter()
    report = {"method": method, "seconds": {}, "layers": {}}
    factors = FAMILIES[method](model, layers, method, samples, loss_fn, cfg, peer, report, log, shard, reduce, stage)
    stage(None)
    L.write_factors(layers, factors, report, t0)
    return report
