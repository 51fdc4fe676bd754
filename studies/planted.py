"""
Open question 1 with the truth known: a planted target shift, and where LoRA-DA's estimate of it holds.

The teacher is the real pretrained model with W0 + ΔW* in chosen layers, ΔW* = ε·‖W0‖_F·U S Vᵀ of rank r* = 4
(random orthonormal U, V; or, in the "low-energy" variant, V = the r* directions of least input energy, the
smallest eigenvectors of the layer's input factor Z under the base model). The target data are sequences
sampled from the teacher, and the loss their negative log-likelihood, so the optimum is the teacher and
W_tgt − W0 = ΔW* exactly. Without training, at each (ε, N) the estimate ΔŴ = −Y⁻¹GZ⁻¹ (Eq. 5, from N
teacher samples, at W0) is measured against ΔW*, and each init's row space against ΔW*'s (theory.md §13).

    python studies/experiments.py planted              # the init-only map (resumable; minutes), then the table
    python studies/experiments.py planted --aggregate  # the table and plot from the committed JSONs

One JSON per (variant, ε, N, seed) under studies/results/planted/runs/.
"""
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core beside this folder
import checkpoints  # noqa: E402
import llama  # noqa: E402
import lora_da  # noqa: E402
import peers  # noqa: E402
import plots  # noqa: E402
import tasks  # noqa: E402

PLANTED = ("layers.2.attention.wq", "layers.2.attention.wv", "layers.2.feed_forward.w1", "layers.2.feed_forward.w2")
R_STAR, RANK, T = 4, 8, 64            # planted rank, LoRA's rank, tokens per sampled sequence
EPS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
NS = (64, 256, 1024)
SEEDS = (1, 2, 3)
VARIANTS = ("random", "low-energy")
METHODS = ("da", "ga", "whitened", "pissa", "milora", "random")


def find_model(name="stories260K"):
    class Cfg:
        data_dir, download = None, False
    d = tasks.find_data(Cfg, [llama.MODELS[name][0]])
    return checkpoints.load_checkpoint(d / llama.MODELS[name][0])


@torch.no_grad()
def sample_sequences(model, n, seed, T=T, batch=256):
    """n sequences of T + 1 tokens from BOS (id 1), sampled at temperature 1 with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        x = torch.ones(min(batch, n - start), 1, dtype=torch.long)
        logits = model(x, start_pos=0)[:, -1]                     # the key/value cache: one new token a step
        for _ in range(T):
            x = torch.cat([x, torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=gen)], 1)
            logits = model(x[:, -1:], start_pos=x.shape[1] - 1)[:, -1]
        out.append(x)
    return torch.cat(out)


def as_samples(seqs):
    """Every token after BOS is scored: the loss is the sequence's mean negative log-likelihood."""
    return [{"tokens": s[:-1], "targets": s[1:].clone()} for s in seqs]


def orthonormal(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


def plant(base, eps, variant, seed, Z_base):
    """(teacher, {layer: ΔW*}, {layer: V (d_in, r*)}): ΔW* = ε ‖W0‖_F U S Vᵀ with ‖U S Vᵀ‖_F = 1."""
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = base if eps == 0 else copy.deepcopy(base)
    mods = dict(teacher.named_modules())
    delta, V = {}, {}
    for name in PLANTED:
        W = mods[name].weight
        d_out, d_in = W.shape
        U = orthonormal(d_out, R_STAR, gen)
        if variant == "random":
            Vn = orthonormal(d_in, R_STAR, gen)
        else:  # the directions with the least input energy under the base model
            Vn = torch.linalg.eigh(Z_base[name].double())[1][:, :R_STAR]
        S = torch.linspace(1.0, 0.5, R_STAR, dtype=torch.float64)
        D = U @ torch.diag(S / S.norm()) @ Vn.T
        delta[name] = eps * W.double().norm() * D
        V[name] = Vn
        with torch.no_grad():
            W.add_(delta[name].float())
    return teacher, delta, V


def input_factors(model, samples):
    layers = {n: m for n, m in model.named_modules() if n in PLANTED}
    return lora_da.kfac_statistics(model, samples, lora_da.causal_lm_losses, layers, batch_size=64).Z


def angle_in(V, A):
    """The largest principal angle (degrees) between span(V) (d_in, r*) and its projection on the row space of A
    (k, d_in): 0 when A's rows contain ΔW*'s row space, 90 when some direction of it is orthogonal to them."""
    Q = torch.linalg.qr(A.double().T)[0]
    cos = torch.linalg.svdvals(V.T @ Q).min().clamp(max=1.0)
    return math.degrees(math.acos(cos.item()))


def measure(base, Z_base, variant, eps, N, seed):
    teacher, delta, V = plant(base, eps, variant, seed, Z_base)
    seqs = sample_sequences(teacher, N, seed=seed)
    model = copy.deepcopy(base)
    layers = {n: m for n, m in model.named_modules() if n in PLANTED}
    st = lora_da.kfac_statistics(model, as_samples(seqs), lora_da.causal_lm_losses, layers, batch_size=64)
    cfg = lora_da.DAConfig(N=N)
    tokens_per_sample = st.n_tokens / N
    out = {"variant": variant, "eps": eps, "N": N, "seed": seed, "T": T, "tokens_per_sample": tokens_per_sample,
           "layers": {}}
    for name in PLANTED:
        G, Z, Y = st.G[name], st.Z[name], st.Y[name]
        W0 = layers[name].weight.detach()
        dW = lora_da.natural_gradient(G, Z, Y, cfg.damping)                       # −Y⁻¹ G Z⁻¹, Eq. 5
        true = delta[name]
        Zh = torch.linalg.cholesky(Z.double() + cfg.damping * torch.eye(Z.shape[0], dtype=torch.float64))
        fisher = lambda D: ((Y.double() + cfg.damping).sqrt()[:, None] * D @ Zh).norm().item()  # ‖Y^½ D Z^½‖_F
        cos = (dW * true).sum().item() / (dW.norm() * true.norm()).item()
        A = {"da": lora_da.lora_da_solve(G, Z, Y, RANK, cfg, seed=lora_da.layer_seed(9, name))["A0"].T,
             "ga": lora_da.svd_canonical(G)[2][:RANK],
             "whitened": peers.whitened_gradient_subspace(G, Z, Y, RANK, cfg.damping).T,
             "pissa": lora_da.svd_canonical(W0)[2][:RANK],
             "milora": lora_da.svd_canonical(W0)[2][-RANK:],
             "random": lora_da.lora_init(*W0.shape, RANK, torch.Generator().manual_seed(lora_da.layer_seed(9, name)))[0]}
        out["layers"][name] = {
            "W0_fro": W0.double().norm().item(), "true_fro": true.norm().item(), "est_fro": dW.norm().item(),
            "rel_error": ((dW - true).norm() / true.norm()).item(),
            "rel_error_T2": ((dW / tokens_per_sample ** 2 - true).norm() / true.norm()).item(),
            "cosine": cos, "fisher_rel_error": fisher(dW - true) / fisher(true),
            "fisher_rel_error_T2": fisher(dW / tokens_per_sample ** 2 - true) / fisher(true),
            "snr": fisher(true) * math.sqrt(st.n_tokens) / math.sqrt(true.numel()),
            "axis": (eps * W0.double().norm() * math.sqrt(N)).item(),
            "angles": {m: angle_in(V[name], a) for m, a in A.items()}}
    return out


def run_map(out_dir: Path, log=print):
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    base = find_model()
    Z_base = input_factors(base, as_samples(sample_sequences(base, 1024, seed=0)))
    todo = [(v, e, n, s) for v in VARIANTS for e in EPS for n in NS for s in SEEDS]
    for i, (v, e, n, s) in enumerate(todo):
        path = runs / f"{v}-eps{e:g}-N{n}-s{s}.json"
        if path.is_file():
            continue
        t = time.perf_counter()
        res = measure(base, Z_base, v, e, n, s)
        res["seconds"] = time.perf_counter() - t
        checkpoints.atomic_write_text(path, json.dumps(res, indent=1))
        log(f"[{i + 1}/{len(todo)}] {path.name}: {res['seconds']:.1f}s")


def load(out_dir: Path):
    rows = []
    for f in sorted((out_dir / "runs").glob("*.json")):
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            print(f"skipping {f}: unreadable ({e})", file=sys.stderr)
    return rows


def mean_ci(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(n, 1.96)
    return m, t * sd / n ** 0.5


def aggregate(out_dir: Path) -> str:
    rows = load(out_dir)
    if not rows:
        return "planted: no runs yet"
    lines = ["# planted: LoRA-DA's estimate of a known target shift (stories260K)", "",
             f"ΔW* = ε‖W0‖_F U S Vᵀ, rank {R_STAR}, planted in {', '.join(PLANTED)}; N teacher sequences of {T} "
             "tokens; statistics at W0. Each cell: the mean over the four planted layers, then mean ± 95% t-interval "
             f"over {len(SEEDS)} seeds (teacher and samples). rel. error = ‖ΔŴ − ΔW*‖/‖ΔW*‖; scale = ‖ΔŴ‖/‖ΔW*‖; "
             "÷T̄²: ΔŴ divided by the squared mean tokens per sample (theory.md §13); angle = the largest principal "
             "angle between ΔW*'s row space and each init's A (r = 8; 0° = contained).", ""]
    for variant in VARIANTS:
        lines += [f"## V {variant}", "",
                  "| ε | N | ε‖W0‖√N | scale | cosine | rel. error ÷T̄² | Fisher rel. error ÷T̄² | "
                  + " | ".join(f"angle {m}" for m in METHODS) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(METHODS)]
        for e in EPS:
            for n in NS:
                cell = [r for r in rows if r["variant"] == variant and r["eps"] == e and r["N"] == n]
                if not cell:
                    continue
                avg = lambda f: mean_ci([sum(f(L) for L in r["layers"].values()) / len(r["layers"]) for r in cell])
                fmt = lambda mc, p=3: f"{mc[0]:.{p}g} ± {mc[1]:.2g}"
                axis = avg(lambda L: L["axis"])[0]
                lines.append(f"| {e:g} | {n} | {axis:.3g} | {fmt(avg(lambda L: L['est_fro'] / L['true_fro']))} | "
                             f"{fmt(avg(lambda L: L['cosine']), 2)} | {fmt(avg(lambda L: L['rel_error_T2']))} | "
                             f"{fmt(avg(lambda L: L['fisher_rel_error_T2']))} | "
                             + " | ".join(f"{avg(lambda L: L['angles'][m])[0]:.1f}" for m in METHODS) + " |")
        lines.append("")
    text = "\n".join(lines)
    checkpoints.atomic_write_text(out_dir / "table.md", text + "\n")
    plot(rows, out_dir / "map.png")
    return text


def plot(rows, path):
    """The map against its axis: per variant and N, each ε's mean over seeds of the four layers' mean."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    layer_mean = lambda r, f: sum(f(L) for L in r["layers"].values()) / len(r["layers"])
    for variant, ls in zip(VARIANTS, ("-", "--")):
        for n in NS:
            eps = sorted({r["eps"] for r in rows if r["variant"] == variant and r["N"] == n})
            if not eps:
                continue
            cells = [[r for r in rows if r["variant"] == variant and r["N"] == n and r["eps"] == e] for e in eps]
            y = lambda f: [sum(layer_mean(r, f) for r in c) / len(c) for c in cells]
            xs = y(lambda L: L["axis"])
            axes[0].loglog(xs, y(lambda L: L["fisher_rel_error_T2"]), ls, marker="o", label=f"{variant}, N={n}")
            axes[1].semilogx(xs, y(lambda L: L["cosine"]), ls, marker="o", label=f"{variant}, N={n}")
            axes[2].semilogx(xs, y(lambda L: L["angles"]["da"]), ls, marker="o", label=f"LoRA-DA, {variant}, N={n}")
            axes[2].semilogx(xs, y(lambda L: L["angles"]["random"]), ls, color="gray", alpha=0.5,
                             label=f"random, {variant}, N={n}" if n == NS[0] else None)
    axes[0].axhline(1, color="gray", lw=0.8)
    # (20)'s noise branch: relative error ∝ 1/a, drawn through the smallest a measured
    first = min((r for r in rows if r["variant"] == VARIANTS[0]), key=lambda r: r["eps"] * r["N"], default=None)
    if first is not None:
        a0 = layer_mean(first, lambda L: L["axis"])
        e0 = sum(layer_mean(r, lambda L: L["fisher_rel_error_T2"]) for r in rows if r["variant"] == VARIANTS[0]
                 and r["eps"] == first["eps"] and r["N"] == first["N"]) / len(SEEDS)
        grid = [a0 * 10 ** (k / 4) for k in range(0, 4 * 5 + 1)]
        axes[0].loglog(grid, [e0 * a0 / a for a in grid], ":", color="black", label="prediction, noise only: ∝ 1/a")
    axes[0].set(title="Fisher-norm error of ΔŴ/T̄² (1 = no better than 0)", xlabel="ε‖W0‖_F √N",
                ylabel="‖ΔŴ/T̄² − ΔW*‖_F̂ / ‖ΔW*‖_F̂")
    axes[1].set(title="cosine(ΔŴ, ΔW*)", xlabel="ε‖W0‖_F √N")
    axes[2].set(title="largest angle: ΔW*'s row space vs LoRA-DA's A (°)", xlabel="ε‖W0‖_F √N")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    plots.save_figure(fig, path)
