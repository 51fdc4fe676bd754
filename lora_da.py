r"""
LoRA-DA: data-aware initialization of LoRA from an asymptotic bias-variance objective
(Data-Aware Initialization for Low-Rank Adaptation via Asymptotic Analysis, arXiv 2510.24561).

Read top to bottom beside theory.md; each section banner names the theory.md section it implements:
statistics (§4, Eq. 4) -> natural-gradient shift (§5, Eq. 5) -> bias and variance terms (§6, Eqs. 6-8)
-> guidance matrix and its smallest eigenvectors (§7, Eqs. 9-10) -> the LoRA factors (§8, Eq. 11), with
the attribution controls beside them (§12, Eqs. 17-18: another direction, scale or damping, or no step).
Then the model-level driver, initialize_da. The peers (§10) and the whitened subspace (§11) are in
peers.py, which imports this file; this file imports nothing of the project.

Torch layout throughout: W0 is (d_out, d_in), lora_A is (r, d_in), lora_B is (d_out, r).

| paper                          | here              | shape / meaning                                       |
|--------------------------------|-------------------|-------------------------------------------------------|
| G = ∇_W L                      | G                 | (d_out, d_in), mean per-sample gradient               |
| E[x xᵀ] (input factor)         | Z                 | (d_in, d_in), layer inputs, over counted tokens       |
| E[g gᵀ] (output factor)        | Y                 | (d_out,) diagonal or (d_out, d_out)                   |
| F ≈ Z ⊗ Y                      | K-FAC Fisher      | never formed, except in exact_fisher for tiny layers  |
| W_tgt − W0 ≈ −F⁻¹ ∇L           | dW  (ΔW)          | (d_out, d_in), natural-gradient step, Eq. 5           |
| A0                             | A0                | (d_in, r), orthonormal columns; lora_A = A0ᵀ/√γ       |
| bias term                      | bias_term         | ‖ΔW‖² − tr(A0ᵀ ΔWᵀΔW A0), Eq. 6                        |
| variance term                  | variance_term     | tr(Y⁻¹)/N · tr(A0ᵀ Z⁻¹ A0), Eq. 7                      |
| guidance matrix                | M                 | (d_in, d_in), −α ΔWᵀΔW + β tr(Y⁻¹)/N · Z⁻¹, Eq. 9       |
| α, β                           | alpha, beta       | weights of bias and variance (authors: 1, 0.03)       |
| γ                              | gamma             | B A = ΔW A0 A0ᵀ / γ (authors: 1024)                    |
| N                              | N                 | size of the fine-tuning set                           |
| r                              | r                 | LoRA rank                                             |
| λ                              | damping           | added to Z's diagonal and to Y (authors: 1e-6)        |

This file imports torch only; any model works whose target layers carry a 2-D weight
(nn.Linear, or llama.LoRALinear whose frozen W0 is layer.base.weight).
"""
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch


# the settings with a fixed set of values, and those values: the one table (train.py's --help reads it)
CHOICES = {"token_mask": ("all", "labels"), "solver": ("eigh", "lobpcg"), "direction": ("da", "random", "gradient"),
           "a_scale": ("da", "lora")}


@dataclass
class DAConfig:
    """LoRA-DA's settings; the defaults are the authors' released runs (conf/lora_da.yaml). train.py
    builds its command line from these defaults, so they are stated nowhere else (the peers' own settings
    are peers.PeerConfig)."""
    # LoRA-DA (theory.md §6-8)
    alpha: float = 1.0           # α: weight of the bias term
    beta: float = 0.03           # β: weight of the variance term (the theory says 1; 0.03 is tuned for LLMs)
    gamma: float = 1024.0        # γ: B A = ΔW A0 A0ᵀ / γ
    damping: float = 1e-6        # λ: added to Z's diagonal and to Y
    N: int = 0                   # N: size of the fine-tuning set, in the variance term (0: the caller's)
    normalize: bool = True       # divide ΔW by its largest singular value σ (and the variance by σ²)
    y_full: bool = False         # Y as a full (d_out, d_out) matrix instead of its diagonal
    token_mask: str = "all"      # tokens counted in Z and Y: "all" non-padding tokens, or "labels" (loss tokens)
    solver: str = "eigh"         # "eigh" (dense, exact) or "lobpcg" (faster at large d_in, not always the minimum)
    relative_damping: float = 0.0  # k > 0: λ_Z = k·tr(Z)/d_in and λ_Y = k·mean(Y) replace λ (K-FAC practice, §12)
    # the attribution controls (theory.md §12): change one of A0's direction, A's scale and the initial step
    direction: str = "da"        # A0: "da" (Eq. 10), "random" (LoRA's rows, orthonormalized), "gradient" (top-r of G)
    a_scale: str = "da"          # rows of A: "da" (norm 1/√γ, Eq. 11) or "lora" (norm 1/√3, LoRA's Kaiming rows)
    step: bool = True            # B0 = ΔW A0/(γ·scale), so B A = ΔW A0 A0ᵀ/γ (Eq. 11); False: B0 = 0
    # the statistics pass (theory.md §4)
    stats_batch_size: int = 16   # samples per forward pass; 1 is the explicit per-sample loop (same numbers)
    layers_per_pass: int = 0     # transformer blocks per statistics pass (bounds memory on 7B); 0: all
    seed: int = 9                # seeds every randomized start (LoRA, Gaussian, LOBPCG), per layer

    def __post_init__(self):
        """The one place these settings are checked (train.py's command line reports the same errors with
        the flag's name); the functions below trust a DAConfig."""
        for name in ("alpha", "beta", "gamma", "damping", "relative_damping"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SettingError(name, f"must be a finite number, got {v}")
        for name in ("alpha", "beta", "relative_damping"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.alpha == 0 and self.beta == 0:
            raise SettingError("beta", "must be > 0 when alpha is 0 (not both zero: nothing left to minimize)")
        for name in ("gamma", "damping"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"must be > 0, got {getattr(self, name)}")
        lowest = {"N": 0, "stats_batch_size": 1, "layers_per_pass": 0}
        for name, lo in lowest.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise SettingError(name, f"must be an integer >= {lo}, got {v}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SettingError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


class SettingError(ValueError):
    """A setting out of its range: `name` is the DAConfig field (train.py's flag is --name)."""

    def __init__(self, name, what):
        super().__init__(f"{name} {what}")
        self.name, self.what = name, what


# =============================================================================
# theory.md §4, Eq. 4. Statistics: G, Z, Y by explicit autograd loops
# =============================================================================

def weight_of(layer) -> torch.Tensor:
    """The frozen W0 of a target layer: llama.LoRALinear keeps it at .base.weight."""
    return layer.base.weight if hasattr(layer, "base") else layer.weight


def collate(samples: list) -> dict:
    """Stack single samples into a batch. With right padding (an attention_mask), trailing positions that no
    sample attends to are dropped: a causal model's outputs at the kept positions are unchanged."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
        bsz, T = mask.shape
        keep = int(mask.any(0).nonzero().max()) + 1 if mask.any() else T
        batch = {k: (v[:, :keep] if v.shape[:2] == (bsz, T) else v) for k, v in batch.items()}
    return batch


def length_order(samples: list) -> list:
    """Sample indices by attended length (stable), so a batch holds samples of similar length and pads little.
    The statistics are sums over samples: their order changes nothing but floating-point rounding."""
    if "attention_mask" not in samples[0]:
        return list(range(len(samples)))
    return sorted(range(len(samples)), key=lambda i: int(samples[i]["attention_mask"].sum()))


@contextmanager
def recording(model: torch.nn.Module, layers: dict):
    """Forward hooks keeping each target layer's input x and output h. Every parameter is frozen and
    the model put in eval mode (no dropout in the statistics); each h is made to require grad so
    autograd reaches it. Hooks, requires_grad and train mode are restored whatever happens."""
    io = {}

    def hook(name):
        def fn(module, inputs, out):
            if not out.requires_grad:  # no trainable path above this layer: make h a leaf that needs grad
                out.requires_grad_()
            io[name] = (inputs[0], out)
        return fn

    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield io
    finally:
        for h in handles:
            h.remove()
        for p, req in requires.items():
            p.requires_grad_(req)
        model.train(was_training)


def counted_tokens(batch: dict, token_mask: str, bsz: int, T: int, device) -> torch.Tensor:
    """(bsz, T) bool: the tokens whose x and g enter Z and Y. "all": every non-padding token (the
    authors' default); "labels": only tokens whose target is scored (targets != -100)."""
    if token_mask == "labels" and "targets" in batch:
        return (batch["targets"] != -100).to(device).view(bsz, T)
    if "attention_mask" in batch:
        return batch["attention_mask"].to(device).bool().view(bsz, T)
    return torch.ones(bsz, T, dtype=torch.bool, device=device)


def shared_input_owners(io: dict, names: list) -> dict:
    """Layers fed the very same input tensor (wq/wk/wv, w1/w3) share one input statistic: each layer's name ->
    the first of them, whose running sum is the one kept (read off the first batch's recorded inputs)."""
    seen = {}
    return {name: seen.setdefault(id(io[name][0]), name) for name in names}


def reduce_sums(reduce: Callable, n_samples: int, n_tokens: int, sums: list, device) -> tuple:
    """Over several processes, each with its share of the samples: sum the two counts and every running sum
    across them, in place and in the given order (the same on every process). The sums are what add up, so
    every process ends with the statistics of all the samples. Returns the total (n_samples, n_tokens)."""
    if reduce is None:
        return n_samples, n_tokens
    counts = torch.tensor([n_samples, n_tokens], dtype=torch.float64, device=device)
    reduce(counts)
    for t in sums:
        reduce(t)
    return int(counts[0]), int(counts[1])


@dataclass
class Statistics:
    """Per target layer: G (d_out, d_in); Z (d_in, d_in), one shared tensor for layers with one input;
    Y (d_out,) or (d_out, d_out). All fp32, all means (G over samples, Z and Y over counted tokens)."""
    G: dict
    Z: dict = field(default_factory=dict)
    Y: dict = field(default_factory=dict)
    n_tokens: int = 0            # counted tokens, the denominator of Z and Y


def kfac_statistics(model, samples: list, loss_fn: Callable, layers: dict, *, batch_size: int = 1,
                    token_mask: str = "all", y_full: bool = False, factors: bool = True,
                    reduce: Callable = None) -> Statistics:
    """Eq. 4: G = E_s[∇_W L_s], Z = E_t[x xᵀ], Y = E_t[g gᵀ] with g = ∂L_s/∂h at token t.

    samples: list of dicts of tensors (one sample each, no batch dim); loss_fn(model, batch) -> (bsz,)
    per-sample losses. batch_size=1 is the explicit per-sample loop; a larger batch gives the same
    numbers because sample i's outputs enter only L_i, so ∂(Σ_j L_j)/∂h_i = ∂L_i/∂h_i.
    reduce: over several processes, each with its share of the samples, sums a tensor across them in
    place (torch.distributed.all_reduce): the sums are what add up, so every process gets the statistics
    of all the samples, as one process would compute them (up to the order of the float sums)."""
    if len(samples) == 0:
        raise ValueError("empty sample set: LoRA-DA needs at least one target sample")
    device = next(model.parameters()).device
    names = list(layers)
    shape = {name: tuple(weight_of(layers[name]).shape) for name in names}  # (d_out, d_in)
    G = {name: torch.zeros(shape[name], device=device) for name in names}
    Z, Y, z_owner = {}, {}, {}
    n_tokens = 0
    order = length_order(samples) if batch_size > 1 else list(range(len(samples)))
    with recording(model, layers) as io:
        for start in range(0, len(samples), batch_size):
            ids = order[start:start + batch_size]
            chunk = [samples[i] for i in ids]
            batch, bsz = collate(chunk), len(chunk)
            losses = loss_fn(model, {k: v.to(device) for k, v in batch.items()})  # (bsz,)
            for name in names:  # forward order: the first layer whose output is not finite is the culprit
                if not torch.isfinite(io[name][1]).all():
                    raise ValueError(f"non-finite output of layer {name} on samples {sorted(ids)}")
            if losses.shape != (bsz,):
                raise ValueError(f"loss_fn must return one loss per sample, shape ({bsz},), got {tuple(losses.shape)}")
            if not torch.isfinite(losses).all():
                raise ValueError(f"non-finite loss on samples {sorted(ids)}")
            # g_l = ∂(Σ_i L_i)/∂h_l for every target layer l: one backward for the whole batch
            grads = torch.autograd.grad(losses.sum(), [io[name][1] for name in names])
            z_owner = z_owner or shared_input_owners(io, names)  # wq/wk/wv and w1/w3 share one Z
            for name, g in zip(names, grads):
                d_out, d_in = shape[name]
                x = io[name][0].detach().float().reshape(bsz, -1, d_in)  # (bsz, T, d_in)
                g = g.float().reshape(bsz, -1, d_out)                     # (bsz, T, d_out)
                if not torch.isfinite(g).all():
                    raise ValueError(f"non-finite output gradient in layer {name}")
                # G += Σ_i Σ_t g_it x_itᵀ: the per-sample weight gradient, summed
                G[name] += torch.einsum("bto,bti->oi", g, x)
                m = counted_tokens(batch, token_mask, bsz, x.shape[1], device)
                if name == names[0]:
                    n_tokens += int(m.sum())
                if not factors:
                    continue
                xm, gm = x[m], g[m]                                       # (n_counted, d_in), (n_counted, d_out)
                if name not in Y:  # the running sums, allocated once (at d_in = 11,008 a copy of Z is 0.5 GiB)
                    Y[name] = torch.zeros((d_out, d_out) if y_full else (d_out,), device=device)
                    if z_owner[name] == name:
                        Z[name] = torch.zeros(d_in, d_in, device=device)
                if z_owner[name] == name:
                    # Z += Σ_t x_t x_tᵀ, in place
                    Z[name].add_(xm.T @ xm)
                # Y += Σ_t g_t g_tᵀ (or its diagonal Σ_t g_t²)
                Y[name].add_(gm.T @ gm if y_full else (gm * gm).sum(0))
            io.clear()
    # Σ over the processes' shares: counts, G, and the factors, layer by layer in the same order everywhere
    sums = []
    for name in names:
        sums += [G[name]] + ([Z[name]] if factors and z_owner[name] == name else []) + ([Y[name]] if factors else [])
    n_samples, n_tokens = reduce_sums(reduce, len(samples), n_tokens, sums, device)
    # sums -> means, in place: a second copy of every factor would double the pass's peak memory
    stats = Statistics(G={k: v.div_(n_samples) for k, v in G.items()}, n_tokens=n_tokens)
    if factors:
        if n_tokens == 0:
            raise ValueError("no counted tokens: every token was masked out (check token_mask and the masks)")
        Zm = {k: v.div_(n_tokens) for k, v in Z.items()}
        stats.Z = {k: Zm[z_owner[k]] for k in names}  # the same tensor object for layers sharing an input
        stats.Y = {k: v.div_(n_tokens) for k, v in Y.items()}
    return stats


def exact_fisher(model, samples: list, loss_fn: Callable, layer) -> tuple:
    """The exact empirical Fisher of one small layer, F = E_s[vec(∇_W L_s) vec(∇_W L_s)ᵀ], from
    per-sample weight gradients (row-major vec, so K-FAC reads F ≈ Y ⊗ Z here), and their mean G.
    A second, independent path to the same G, and the reference K-FAC is compared against."""
    W = weight_of(layer)
    if W.numel() > 16384:
        raise ValueError(f"exact_fisher is for tiny layers; this one has {W.numel()} weights (limit 16384)")
    device = W.device
    F = torch.zeros(W.numel(), W.numel(), dtype=torch.float64, device=device)
    G = torch.zeros(W.shape, dtype=torch.float64, device=device)
    with recording(model, {}):
        W.requires_grad_(True)
        for s in samples:
            batch = {k: v[None].to(device) for k, v in s.items()}
            (gW,) = torch.autograd.grad(loss_fn(model, batch).sum(), [W])
            v = gW.double().flatten()
            F += torch.outer(v, v)
            G += gW.double()
    return F / len(samples), G / len(samples)


# =============================================================================
# theory.md §5, Eq. 5. The natural-gradient estimate of the target shift
# =============================================================================

def _check_inputs(G, Z, Y, name=""):
    where = f" in layer {name}" if name else ""
    if G.dim() != 2:
        raise ValueError(f"G must be (d_out, d_in), got shape {tuple(G.shape)}{where}")
    d_out, d_in = G.shape
    if Z.shape != (d_in, d_in):
        raise ValueError(f"Z must be ({d_in}, {d_in}) to fit G {tuple(G.shape)}, got {tuple(Z.shape)}{where}")
    if Y.shape not in ((d_out,), (d_out, d_out)):
        raise ValueError(f"Y must be ({d_out},) or ({d_out}, {d_out}) to fit G {tuple(G.shape)}, "
                         f"got {tuple(Y.shape)}{where}")
    for sym, t in (("G", G), ("Z", Z), ("Y", Y)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{sym} has NaN or inf entries{where}")


def damped_cholesky(Z, damping, what="Z", name=""):
    """Cholesky factor of sym(Z) + λI in fp64; raises with the damping tried when Z is not positive definite.
    Z and Y are Gram matrices, positive semi-definite in exact arithmetic; summed in fp32 over many tokens, a
    rank-deficient one (fewer distinct inputs than d_in, as a character-level model's first layer, whose inputs
    are ~100 embeddings in 128 dimensions) can come out with eigenvalues a rounding error below zero, which an
    absolute λ = 1e-6 may not lift. Such an eigenvalue (above −1e-5 of the largest: fp32's ~1e-7 relative
    error, summed over thousands of tokens) is set to zero before damping; a truly indefinite factor is refused."""
    def symmetric(Z):  # (Z + Zᵀ)/2 in fp64, built in place: at d_in = 11,008 each copy is 0.9 GiB
        Zs = Z.double().clone() if Z.dtype == torch.float64 else Z.double()
        return Zs.add_(Zs.T.contiguous()).div_(2)
    Zd = symmetric(Z)
    Zd.diagonal().add_(damping)                    # + λI, without forming I
    L, info = torch.linalg.cholesky_ex(Zd)
    del Zd
    if info.item() != 0:
        Zs = symmetric(Z)
        eye = torch.eye(Z.shape[0], dtype=Zs.dtype, device=Zs.device)
        evals, V = torch.linalg.eigh(Zs)
        lo = evals[0].item()
        if lo >= -1e-5 * evals[-1].abs().item():  # rounding, not indefiniteness: the nearest PSD matrix
            L, info = torch.linalg.cholesky_ex((V * evals.clamp_min(0)) @ V.T + damping * eye)
        if info.item() != 0:
            where = f" of layer {name}" if name else ""
            hint = max(10 * damping, 2 * abs(lo))
            raise ValueError(f"factor {what}{where} is not positive definite after damping {damping:g} (smallest "
                             f"eigenvalue {lo + damping:.3g}); use a larger damping, e.g. {hint:.1g}")
    return L


def natural_gradient(G, Z, Y, damping, name="", Lz=None):
    r"""Eq. 5: $\Delta W = -F^{-1}\nabla L$ with $F \approx Z\otimes Y$, i.e. $\Delta W = -Y^{-1} G Z^{-1}$.
    Lz: the damped Cholesky factor of Z, when the caller already has it."""
    G, Y = G.double(), Y.double()
    Lz = damped_cholesky(Z, damping, "Z", name) if Lz is None else Lz
    GZinv = torch.cholesky_solve(G.T, Lz).T                       # G Z⁻¹   (Z symmetric)
    if Y.dim() == 1:
        Yd = Y + damping
        if (Yd <= 0).any():
            raise ValueError(f"factor Y{' of layer ' + name if name else ''} is not positive definite after "
                             f"damping {damping:g}; use a larger damping")
        return -GZinv / Yd[:, None]                               # −Y⁻¹ G Z⁻¹, Y diagonal
    Ly = damped_cholesky(Y, damping, "Y", name)
    return -torch.cholesky_solve(GZinv, Ly)                       # −Y⁻¹ G Z⁻¹, Y full


def trace_Y_inv(Y, damping):
    """tr(Y⁻¹) of the damped output factor."""
    Y = Y.double()
    if Y.dim() == 1:
        return (1.0 / (Y + damping)).sum()
    return torch.cholesky_inverse(damped_cholesky(Y, damping, "Y")).trace()


# =============================================================================
# theory.md §6, Eqs. 6-8. The asymptotic objective
# =============================================================================

def bias_term(dW, A0):
    r"""Eq. 6: the part of the shift LoRA cannot reach from span(A0),
    $\|\Delta W (I - A_0A_0^\top)\|_F^2 = \|\Delta W\|_F^2 - \mathrm{tr}(A_0^\top \Delta W^\top\Delta W A_0)$."""
    dW, A0 = dW.double(), A0.double()
    return dW.pow(2).sum() - (dW @ A0).pow(2).sum()


def variance_term(Z, Y, A0, N, damping, Lz=None):
    r"""Eq. 7: the estimation noise inside span(A0), $\frac{\mathrm{tr}(Y^{-1})}{N}\,\mathrm{tr}(A_0^\top Z^{-1}A_0)$.
    Lz: the damped Cholesky factor of Z, when the caller already has it."""
    Lz = damped_cholesky(Z, damping, "Z") if Lz is None else Lz
    A0 = A0.double()
    # tr(A0ᵀ Z⁻¹ A0) = Σ A0 ∘ (Z⁻¹ A0)
    return trace_Y_inv(Y, damping) / N * (A0 * torch.cholesky_solve(A0, Lz)).sum()


def objective(dW, Z, Y, A0, N, *, alpha, beta, damping):
    """Eq. 8: α·bias + β·variance, the asymptotic risk of LoRA with input subspace A0."""
    return alpha * bias_term(dW, A0) + beta * variance_term(Z, Y, A0, N, damping)


# =============================================================================
# theory.md §7, Eqs. 9-10. The solution: smallest eigenvectors of the guidance matrix
# =============================================================================

def guidance_matrix(dW, Zinv, c, alpha, beta):
    r"""Eq. 9: $M = -\alpha\,\Delta W^\top\Delta W + \beta\,c\,Z^{-1}$ with the variance coefficient
    $c = \mathrm{tr}(Y^{-1})/N$, so that Eq. 8 = α‖ΔW‖² + tr(A0ᵀ M A0)."""
    M = -alpha * dW.T @ dW
    if beta != 0:
        M.add_((beta * c) * Zinv)
    return M.add_(M.T.contiguous()).div_(2)       # symmetric, in place: at d_in = 11,008 each copy is 0.9 GiB


def largest_entry_signs(V):
    """±1 per column of V: the sign of its largest-|.| entry (+1 where that entry is 0). The one sign rule:
    eigenvectors and singular pairs are defined up to sign, and this fixes it."""
    idx = V.abs().argmax(dim=0)
    s = torch.sign(V[idx, torch.arange(V.shape[1])])
    s[s == 0] = 1
    return s


def canonical_signs(V):
    """Flip each column so its largest-|.| entry is positive."""
    return V * largest_entry_signs(V)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order layers are visited in."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def smallest_eigenvectors(M, r, solver="eigh", seed=0):
    """Eq. 10 (Ky Fan): the minimum of tr(A0ᵀ M A0) over orthonormal (d, r) A0 is the sum of M's r
    smallest eigenvalues, reached by their eigenvectors. Returns (A0, solver actually used)."""
    d = M.shape[0]
    if solver == "lobpcg" and d >= 3 * r:  # torch.lobpcg needs n >= 3k
        gen = torch.Generator(device="cpu").manual_seed(seed)
        X0, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=M.dtype).to(M.device))
        try:
            evals, V = torch.lobpcg(M, k=r, X=X0, largest=False, niter=200, tol=1e-9)
            residual = (M @ V - V * evals).norm() / M.norm().clamp_min(1e-300)
            if torch.isfinite(V).all() and residual < 1e-5:
                return canonical_signs(V), "lobpcg"
        except Exception:  # LOBPCG can break down on (nearly) degenerate spectra: dense solve instead
            pass
    evals, V = torch.linalg.eigh(M)  # ascending
    return canonical_signs(V[:, :r]), "eigh"


# =============================================================================
# theory.md §8, Eq. 11. The factors
# =============================================================================

def dampings(Z, Y, cfg: DAConfig):
    """(λ_Z, λ_Y): the authors' absolute λ for both factors, or, with relative_damping k > 0, each factor's own
    scale as K-FAC practice sets it (§12): λ_Z = k·tr(Z)/d_in, λ_Y = k·mean(Y) (the mean of Y's diagonal when
    Y is full). An absolute λ = 1e-6 is far below Z's eigenvalues but close to Y's median in some layers, so
    there Y⁻¹ is set by λ, not by the data."""
    if cfg.relative_damping == 0:
        return cfg.damping, cfg.damping
    k = cfg.relative_damping
    Yd = Y if Y.dim() == 1 else Y.diagonal()
    return k * Z.double().diagonal().mean().item(), k * Yd.double().mean().item()


def lora_init(d_out, d_in, r, generator):
    """LoRA (Hu et al. 2021; PEFT default): A ~ Kaiming-uniform(a=√5) = U(−1/√d_in, 1/√d_in), B = 0.
    Here because §12's random control takes LoRA's own A for its direction."""
    A = (torch.rand(r, d_in, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    return A.float(), torch.zeros(d_out, r)


def svd_canonical(W):
    """Full SVD in fp64 with each singular pair's sign fixed (largest-|.| entry of u positive): §12's gradient
    control, and the peers' SVDs (peers.py)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    s = largest_entry_signs(U)
    return U * s, S, Vh * s[:, None]


def control_direction(direction, G, r, seed=0):
    """§12's other row spaces for A0 (d_in, r), orthonormal: "random" is the span of LoRA's own random A for the
    layer (the same seed), "gradient" the top-r right singular vectors of G (LoRA-One's and LoRA-GA's A)."""
    d_out, d_in = G.shape
    if direction == "random":
        A = lora_init(d_out, d_in, r, torch.Generator().manual_seed(seed))[0]
        return canonical_signs(torch.linalg.qr(A.double().T)[0])
    return svd_canonical(G)[2][:r].T.contiguous()


def scaled_factors(dW, A0, cfg: DAConfig):
    """Eq. 11 with §12's two switches: lora_A = s·A0ᵀ with s = 1/√γ (LoRA-DA) or 1/√3 (the row norm of LoRA's
    Kaiming-uniform A, whose entries have variance 1/(3 d_in)); lora_B = ΔW A0/(γ s), so that B A = ΔW A0 A0ᵀ/γ
    at either scale, or 0 without the initial step."""
    root = math.sqrt(cfg.gamma if cfg.a_scale == "da" else 3.0)    # 1/s
    lora_A = A0.T / root
    if not cfg.step:
        return lora_A, dW.new_zeros(dW.shape[0], A0.shape[1])
    return lora_A, dW @ A0 / math.sqrt(cfg.gamma) * (root / math.sqrt(cfg.gamma))   # × 1.0 at LoRA-DA's scale


def lora_da_solve(G, Z, Y, r, cfg: DAConfig, *, seed=0, name=""):
    """Eqs. 5-11 for one layer, each by the function that theory.md names; returns a dict with
    lora_A, lora_B and the diagnostics (A0, ΔW, σ, bias and variance at A0)."""
    _check_inputs(G, Z, Y, name)
    d_out, d_in = G.shape
    if not isinstance(r, int) or not 1 <= r <= d_in:
        raise ValueError(f"rank r must be an integer in [1, d_in={d_in}], got {r}")
    if cfg.N < 1:
        raise ValueError(f"N must be an integer >= 1 in the solve (DAConfig.N: the fine-tuning set's size), "
                         f"got {cfg.N}")
    where = f" in layer {name}" if name else ""

    lam_z, lam_y = dampings(Z, Y, cfg)                # λ, or each factor's own (§12)
    Lz = damped_cholesky(Z, lam_z, "Z", name)         # Z + λI = L Lᵀ, factored once for Eqs. 5, 7, 9
    # ΔW = −Y⁻¹ G Z⁻¹                                                            (Eq. 5)
    dW = natural_gradient(G, Z, Y, lam_y, name, Lz=Lz)
    # σ = ‖ΔW‖₂; ΔW ← ΔW/σ, so the bias term is divided by σ² and the variance coefficient must be too,
    # or β would be measured against the loss scale: c = tr(Y⁻¹)/(N σ²), as the authors' code (Eq. 11)
    sigma = torch.linalg.matrix_norm(dW, ord=2).item()
    if cfg.normalize:
        if sigma == 0:
            raise ValueError(f"the natural-gradient step is zero{where}: G = 0?")
        dW, var_scale = dW / sigma, 1.0 / sigma ** 2
    else:
        var_scale = 1.0
    # M = −α ΔWᵀΔW + β c Z⁻¹,  c = tr(Y⁻¹)/N                                    (Eq. 9)
    c = trace_Y_inv(Y, lam_y) / cfg.N * var_scale
    M = guidance_matrix(dW, torch.cholesky_inverse(Lz), c, cfg.alpha, cfg.beta)
    # A0 = the r eigenvectors of M with the smallest eigenvalues                 (Eq. 10)
    A0, used = smallest_eigenvectors(M, r, cfg.solver, seed)
    if cfg.direction != "da":                         # a control: another row space, the same ΔW (§12)
        A0 = control_direction(cfg.direction, G, r, seed)
    # lora_A = A0ᵀ/√γ, lora_B = ΔW A0/√γ, so B A = ΔW A0 A0ᵀ/γ                   (Eq. 11)
    lora_A, lora_B = scaled_factors(dW, A0, cfg)
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise ValueError(f"non-finite LoRA-DA factor{where}; raise the damping")
    # the two terms of Eq. 8 at the chosen A0 (in ΔW/σ units when normalized)    (Eqs. 6, 7)
    bias = bias_term(dW, A0).item()
    var = (variance_term(Z, Y, A0, cfg.N, lam_y, Lz=Lz) * var_scale).item()
    dW_fro = torch.linalg.matrix_norm(dW).item() * (sigma if cfg.normalize else 1.0)  # ‖ΔW‖_F, unnormalized
    return {"lora_A": lora_A.float(), "lora_B": lora_B.float(), "A0": A0, "dW": dW, "sigma": sigma,
            "dW_fro": dW_fro, "bias": bias, "variance": var, "solver": used, "damping": (lam_z, lam_y)}


def lora_da_factors(G, Z, Y, r, cfg: DAConfig, *, seed=0):
    """The closed form of LoRA-DA for one layer (Eqs. 5-11): (lora_A (r, d_in), lora_B (d_out, r)), fp32."""
    out = lora_da_solve(G, Z, Y, r, cfg, seed=seed)
    return out["lora_A"], out["lora_B"]


# =============================================================================
# Initializing a model: statistics and solve for every LoRA layer (not in theory.md: plumbing)
# =============================================================================

def principal_angle(A1, A2) -> float:
    """The largest principal angle, in degrees, between the row spaces of two (r, d_in) factors: 0 when A
    spans the same input subspace (whatever its scale), 90 when some direction of one is orthogonal to the
    other. How the studies measure how far A moves in training and how fast the |S|-sample estimate settles."""
    Q1 = torch.linalg.qr(A1.detach().double().T).Q
    Q2 = torch.linalg.qr(A2.detach().double().T).Q
    cos = torch.linalg.svdvals(Q1.T @ Q2).min().clamp(max=1.0)
    return math.degrees(math.acos(cos.item()))


def lora_targets(model) -> dict:
    """The model's LoRA layers (anything with lora_A, lora_B and an init_ method), by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "init_")}


def layer_groups(names: list, per_pass: int) -> list:
    """Split layer names into passes of `per_pass` transformer blocks (by the i in 'layers.i.'); 0: one pass."""
    if not per_pass:
        return [names]
    if per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {per_pass}")

    def block(name):
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
    blocks = sorted({block(name) for name in names})
    chunks = [set(blocks[i:i + per_pass]) for i in range(0, len(blocks), per_pass)]
    return [[name for name in names if block(name) in c] for c in chunks]


def causal_lm_losses(model, batch):
    """Per-sample loss of a causal LM: the mean cross-entropy over the sample's scored tokens
    (targets != -100), as the HF loss of one sequence. batch: tokens, targets (bsz, T).
    The model is asked for logits only at the scored positions (model(tokens, at=mask), as
    llama.Transformer supports): the same losses and gradients, without the unused vocabulary projection."""
    scored = batch["targets"] != -100                                    # (bsz, T)
    return scored_losses(model(batch["tokens"], at=scored), batch["targets"])


def scored_losses(logits_at, targets):
    """(n_scored, V) logits at the scored positions (row-major), (bsz, T) targets -> (bsz,) mean CE per row."""
    scored = targets != -100
    ce = torch.nn.functional.cross_entropy(logits_at.float(), targets[scored], reduction="none")
    rows = scored.nonzero()[:, 0]                                        # the sample each scored token belongs to
    total = torch.zeros(targets.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
    return total / scored.sum(1).clamp_min(1)


def sequence_losses(logits, targets):
    """(bsz, T, V) logits, (bsz, T) targets with -100 where unscored -> (bsz,) mean CE over each row's scored tokens."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                           reduction="none").view(targets.shape)
    return ce.sum(1) / (targets != -100).sum(1).clamp_min(1)


def solve_in_passes(model, layers: dict, samples: list, loss_fn: Callable, cfg: DAConfig, solve: Callable, *,
                    factors: bool = True, label: str = "da", report: dict, log: Callable, shard=(0, 1),
                    reduce: Callable = None, stage: Callable) -> dict:
    """The statistics (Eq. 4) and a per-layer solve, one group of cfg.layers_per_pass transformer blocks at a
    time, so that only one group's G, Z, Y are held (bounded memory on 7B). solve(name, layer, stats) ->
    (A, B, shift_W0). factors: whether Z and Y are needed (False: G alone, as LoRA-GA and LoRA-One). Times
    each stage into report["seconds"]; returns {name: (A, B, shift_W0)}, nothing written yet."""
    report["seconds"].update(statistics=0.0, solve=0.0)
    report["samples"] = len(samples)
    if len(samples) < shard[1]:
        raise ValueError(f"{len(samples)} samples for {label} cannot be shared by {shard[1]} processes")
    out = {}
    groups = layer_groups(list(layers), cfg.layers_per_pass)
    for gi, names in enumerate(groups):
        t1 = time.perf_counter()
        stage("statistics")
        stats = kfac_statistics(model, samples[shard[0]::shard[1]], loss_fn, {name: layers[name] for name in names},
                                batch_size=cfg.stats_batch_size, token_mask=cfg.token_mask, y_full=cfg.y_full,
                                factors=factors, reduce=reduce)
        t2 = time.perf_counter()
        report["seconds"]["statistics"] += t2 - t1
        stage("solve")
        for name in names:
            out[name] = solve(name, layers[name], stats)
        report["seconds"]["solve"] += time.perf_counter() - t2
        log(f"{label} init, pass {gi + 1}/{len(groups)}: {len(names)} layers, {len(samples)} samples, "
            f"{time.perf_counter() - t1:.1f}s")
        del stats
    return out


def write_factors(layers: dict, factors: dict, report: dict, t0: float):
    """Write every layer's (A, B), shifting W0 by −s·B A where the init asks (shift_W0); the last step, so that
    an error in any layer's solve leaves the model untouched."""
    t3 = time.perf_counter()
    for name, (A, B, shift) in factors.items():
        m = layers[name]
        m.init_(A.to(m.lora_A.device), B.to(m.lora_B.device), shift_W0=shift)
    report["seconds"]["write"] = time.perf_counter() - t3
    report["seconds"]["total"] = time.perf_counter() - t0


def initialize_da(model, samples: list, loss_fn: Callable = causal_lm_losses, cfg: DAConfig = None,
                  log: Callable = None, shard=(0, 1), reduce: Callable = None, stage: Callable = None) -> dict:
    """LoRA-DA on every LoRA layer of `model` (Eqs. 4-11, or a §12 control): statistics from the target
    samples, the solve per layer (each seeded by its name), then the factors written; returns a report with
    each layer's σ, ‖ΔW‖, bias and variance. shard (rank, world) and reduce: over several processes, each
    takes every world-th sample and the statistics are summed across them (kfac_statistics); every process
    then solves the same problem, so all end with the same factors. stage(name): called as each stage
    ("statistics", "solve") begins and with None at the end (train.py measures each stage's peak memory)."""
    cfg = cfg or DAConfig()
    log = log or (lambda *a: None)
    stage = stage or (lambda name: None)
    layers = lora_targets(model)
    if not layers:
        raise ValueError("model has no LoRA layers: call llama.add_lora(model, ...) first")
    if not samples:
        raise ValueError("init 'da' needs target samples; got an empty sample set")
    t0 = time.perf_counter()
    report = {"method": "da", "seconds": {}, "layers": {}}

    def solve(name, m, stats):
        G, Y = stats.G[name], stats.Y[name]
        out = lora_da_solve(G, stats.Z[name], Y, m.r, cfg, seed=layer_seed(cfg.seed, name), name=name)
        Yd = Y if Y.dim() == 1 else Y.diagonal()
        report["layers"][name] = {"sigma": out["sigma"], "dW_fro": out["dW_fro"],
                                  "G_fro": torch.linalg.matrix_norm(G.float()).item(),
                                  "W0_fro": torch.linalg.matrix_norm(weight_of(m).float()).item(),
                                  "bias": out["bias"], "variance": out["variance"], "Y_median": Yd.median().item(),
                                  "damping": out["damping"][0], "damping_Y": out["damping"][1],
                                  "solver": out["solver"]}
        return out["lora_A"].cpu(), out["lora_B"].cpu(), False
    factors = solve_in_passes(model, layers, samples, loss_fn, cfg, solve, report=report, log=log, shard=shard,
                              reduce=reduce, stage=stage)
    stage(None)
    write_factors(layers, factors, report, t0)
    return report
