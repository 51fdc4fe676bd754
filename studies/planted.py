"""
Open question 1 with the truth known: a planted target shift, and where LoRA-DA's estimate of it holds.

The teacher is the real pretrained model with W0 + ΔW* in chosen layers, ΔW* = ε·‖W0‖_F·U S Vᵀ of rank r* = 4
(random orthonormal U, V; or, in the "low-energy" variant, V = the r* directions of least input energy, the
smallest eigenvectors of the layer's input factor Z under the base model). The target data are sequences
sampled from the teacher, and the loss their negative log-likelihood, so the optimum is the teacher and
W_tgt − W0 = ΔW* exactly. Without training, at each (ε, N) the estimate ΔŴ = −Y⁻¹GZ⁻¹ (Eq. 5, from N
teacher samples, at W0) is measured against ΔW*, and each init's row space against ΔW*'s (theory.md §13).

    python studies/experiments.py planted              # the init-only map, then the training half (resumable)
    python studies/experiments.py planted --aggregate  # the table and plot from the committed JSONs

One JSON per (variant, ε, N, seed) under studies/results/planted/runs/.
"""
import copy
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Grid:
    """One block of the training half: every variant x ε x N x method x mode; each rate chosen from `lrs` on the
    validation KL of SELECT_SEED, then the report seeds at the chosen rate."""
    variants: tuple
    eps: tuple
    ns: tuple
    methods: tuple
    lrs: tuple
    seeds: tuple


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model's map: where ΔW* is planted (four layers of one block), the init-only grid and the training
    half's grids. Results under studies/results/<folder>/."""
    model: str
    layers: tuple
    folder: str
    eps: tuple = EPS
    ns: tuple = NS
    seeds: tuple = SEEDS
    train: tuple = ()
    z_samples: int = 1024     # base-model sequences for the low-energy variant's Z


def block(i):
    return tuple(f"layers.{i}.{n}" for n in ("attention.wq", "attention.wv", "feed_forward.w1", "feed_forward.w2"))


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


def plant(base, eps, variant, seed, Z_base, layers=None):
    """(teacher, {layer: ΔW*}, {layer: V (d_in, r*)}): ΔW* = ε ‖W0‖_F U S Vᵀ with ‖U S Vᵀ‖_F = 1."""
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = base if eps == 0 else copy.deepcopy(base)
    mods = dict(teacher.named_modules())
    delta, V = {}, {}
    for name in layers or PLANTED:
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


def input_factors(model, samples, planted=None):
    layers = {n: m for n, m in model.named_modules() if n in (planted or PLANTED)}
    return lora_da.kfac_statistics(model, samples, lora_da.causal_lm_losses, layers, batch_size=64).Z


def angle_in(V, A):
    """The largest principal angle (degrees) between span(V) (d_in, r*) and its projection on the row space of A
    (k, d_in): 0 when A's rows contain ΔW*'s row space, 90 when some direction of it is orthogonal to them."""
    Q = torch.linalg.qr(A.double().T)[0]
    cos = torch.linalg.svdvals(V.T @ Q).min().clamp(max=1.0)
    return math.degrees(math.acos(cos.item()))


def measure(base, Z_base, variant, eps, N, seed, planted=None):
    planted = planted or PLANTED
    teacher, delta, V = plant(base, eps, variant, seed, Z_base, planted)
    seqs = sample_sequences(teacher, N, seed=seed)
    model = copy.deepcopy(base)
    layers = {n: m for n, m in model.named_modules() if n in planted}
    st = lora_da.kfac_statistics(model, as_samples(seqs), lora_da.causal_lm_losses, layers, batch_size=64)
    cfg = lora_da.DAConfig(N=N)
    tokens_per_sample = st.n_tokens / N
    out = {"variant": variant, "eps": eps, "N": N, "seed": seed, "T": T, "tokens_per_sample": tokens_per_sample,
           "layers": {}}
    for name in planted:
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


def base_factors(base, spec):
    """Z of the planted layers under the base model, from its own sequences (the low-energy variant's V)."""
    return input_factors(base, as_samples(sample_sequences(base, spec.z_samples, seed=0)), spec.layers)


def run_map(out_dir: Path, spec=None, log=print):
    spec = spec or SPECS["stories260K"]
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    todo = [(v, e, n, s) for v in VARIANTS for e in spec.eps for n in spec.ns for s in spec.seeds]
    todo = [job for job in todo if not (runs / "{}-eps{:g}-N{}-s{}.json".format(*job)).is_file()]
    log(f"planted map ({spec.model}): {len(todo)} points to measure")
    if not todo:
        return
    base = find_model(spec.model)
    Z_base = base_factors(base, spec)
    for i, (v, e, n, s) in enumerate(todo):
        path = runs / f"{v}-eps{e:g}-N{n}-s{s}.json"
        t = time.perf_counter()
        res = measure(base, Z_base, v, e, n, s, spec.layers)
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


def aggregate(out_dir: Path, spec=None) -> str:
    spec = spec or SPECS["stories260K"]
    rows = load(out_dir)
    if not rows and not train_records(out_dir):
        return f"{out_dir.name}: no runs yet"
    lines = [f"# {out_dir.name}: LoRA-DA's estimate of a known target shift ({spec.model})", "",
             f"ΔW* = ε‖W0‖_F U S Vᵀ, rank {R_STAR}, planted in {', '.join(spec.layers)}; N teacher sequences of {T} "
             "tokens; statistics at W0. Each cell: the mean over the four planted layers, then mean ± 95% t-interval "
             f"over {len(spec.seeds)} seeds (teacher and samples). rel. error = ‖ΔŴ − ΔW*‖/‖ΔW*‖; scale = ‖ΔŴ‖/‖ΔW*‖; "
             "÷T̄²: ΔŴ divided by the squared mean tokens per sample (theory.md §13); angle = the largest principal "
             "angle between ΔW*'s row space and each init's A (r = 8; 0° = contained).", ""]
    for variant in VARIANTS:
        lines += [f"## V {variant}", "",
                  "| ε | N | ε‖W0‖√N | scale | cosine | rel. error ÷T̄² | Fisher rel. error ÷T̄² | "
                  + " | ".join(f"angle {m}" for m in METHODS) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(METHODS)]
        for e in spec.eps:
            for n in spec.ns:
                cell = [r for r in rows if r["variant"] == variant and r["eps"] == e and r["N"] == n]
                if not cell:
                    continue
                avg = lambda f: mean_ci([sum(f(L) for L in r["layers"].values()) / len(r["layers"]) for r in cell])
                fmt = lambda mc, p=3: f"{mc[0]:.{p}g}" + (f" ± {mc[1]:.2g}" if mc[1] == mc[1] else "")  # 1 seed: no ±
                axis = avg(lambda L: L["axis"])[0]
                lines.append(f"| {e:g} | {n} | {axis:.3g} | {fmt(avg(lambda L: L['est_fro'] / L['true_fro']))} | "
                             f"{fmt(avg(lambda L: L['cosine']), 2)} | {fmt(avg(lambda L: L['rel_error_T2']))} | "
                             f"{fmt(avg(lambda L: L['fisher_rel_error_T2']))} | "
                             + " | ".join(f"{avg(lambda L: L['angles'][m])[0]:.1f}" for m in METHODS) + " |")
        lines.append("")
    text = "\n".join(lines)
    trained = train_table(out_dir, spec)
    if trained:
        text += "\n" + trained
    checkpoints.atomic_write_text(out_dir / "table.md", text + "\n")
    if rows:
        plot(rows, out_dir / "map.png", spec)
    return text


def plot(rows, path, spec):
    """The map against its axis: per variant and N, each ε's mean over seeds of the four layers' mean."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    layer_mean = lambda r, f: sum(f(L) for L in r["layers"].values()) / len(r["layers"])
    for variant, ls in zip(VARIANTS, ("-", "--")):
        for n in spec.ns:
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
                             label=f"random, {variant}, N={n}" if n == spec.ns[0] else None)
    axes[0].axhline(1, color="gray", lw=0.8)
    # (20)'s noise branch: relative error ∝ 1/a, drawn through the smallest a measured
    first = min((r for r in rows if r["variant"] == VARIANTS[0]), key=lambda r: r["eps"] * r["N"], default=None)
    if first is not None:
        a0 = layer_mean(first, lambda L: L["axis"])
        same = [r for r in rows if r["variant"] == VARIANTS[0] and r["eps"] == first["eps"] and r["N"] == first["N"]]
        e0 = sum(layer_mean(r, lambda L: L["fisher_rel_error_T2"]) for r in same) / len(same)
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


# -----------------------------------------------------------------------------
# the training half: excess risk after fine-tuning, against the truth (reduced grids, see SPECS)

TRAIN_EPS, TRAIN_N = (1e-2, 3e-1), 256
TRAIN_METHODS = ("lora", "da", "ga", "whitened", "oracle")
MODES = ("standard", "frozen")
LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
STEPS, BATCH, SELECT_SEED, REPORT_SEEDS = 60, 16, 101, (1, 2, 3)
_TEACHERS = {}  # per worker: (variant, ε, seed, split, N) -> (teacher, ΔW*, V, training sequences, held-out ones)

# the models: stories260K (the full init-only map; the training half at N = 256 on both variants, both ε, and at
# N = 64 and 1,024 in the ε = 0.3 column, the one where its runs learned anything, and at ε = 1, where the
# init-only map's cosine falls back);
# babyllama936K (width 128, 5 blocks; a training run there takes about 15 s on one thread, 2x stories260K's, so
# its training half is the ε = 0.3 column, where stories260K's runs learned anything, at six rates) and
# SmolLM2-135M (width 576, 30 blocks: its middle block; init-only, one seed, N up to 128: sampling 128 sequences
# and their statistics take about 3.5 minutes on one thread). N is both the init samples and the training set.
SPECS = {
    "stories260K": Spec("stories260K", PLANTED, "planted",
                        train=(Grid(VARIANTS, TRAIN_EPS, (TRAIN_N,), TRAIN_METHODS, LRS, REPORT_SEEDS),
                               Grid(VARIANTS, (3e-1,), (64, 1024), TRAIN_METHODS, LRS, REPORT_SEEDS),
                               Grid(VARIANTS, (1.0,), (TRAIN_N,), TRAIN_METHODS, LRS, REPORT_SEEDS))),
    "babyllama936K": Spec("babyllama936K", block(2), "planted-babyllama", seeds=(1, 2),
                          train=(Grid(VARIANTS, (3e-1,), (TRAIN_N,), TRAIN_METHODS, LRS[:6], REPORT_SEEDS),)),
    "smollm2-135M": Spec("smollm2-135M", block(15), "planted-smollm2", eps=(1e-3, 1e-2, 1e-1, 3e-1, 1.0),
                         ns=(16, 32, 128), seeds=(1,), z_samples=128),
}


def run_name(split, variant, eps, N, method, mode, lr, seed):
    """The training half's run names; N = 256 (the first grid) carries no N tag."""
    tag = "" if N == TRAIN_N else f"-N{N}"
    return f"{split}-{variant}-eps{eps:g}{tag}-{method}-{mode}-lr{lr:g}-s{seed}"


def student(base, method, mode, train_samples, V, N, planted=None):
    """The base model with LoRA (r = 8, α = 16, rsLoRA) on the planted layers only, initialized by `method`:
    lora (Kaiming A, B = 0), da (Eqs. 5-11), ga (LoRA-GA, W0 shifted), whitened (Eq. 16), oracle (A's rows
    span ΔW*'s row space and 4 random directions, at LoRA's row norm 1/√3, B = 0: the ceiling for A)."""
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())
    layers = {}
    for name in planted or PLANTED:
        parent, child = name.rsplit(".", 1)
        layer = llama.LoRALinear(mods[name], RANK, 16.0, rslora=True, freeze_A=mode == "frozen")
        setattr(model.get_submodule(parent), child, layer)
        layers[name] = layer
    llama.mark_only_lora_trainable(model)
    if method in ("da", "ga", "whitened"):
        st = lora_da.kfac_statistics(model, train_samples, lora_da.causal_lm_losses, layers, batch_size=64,
                                     factors=method != "ga")
    cfg = lora_da.DAConfig(N=N)
    for name, m in layers.items():
        seed = lora_da.layer_seed(9, name)
        d_out, d_in = m.base.weight.shape
        shift = False
        if method == "lora":
            A, B = lora_da.lora_init(d_out, d_in, RANK, torch.Generator().manual_seed(seed))
        elif method == "da":
            out = lora_da.lora_da_solve(st.G[name], st.Z[name], st.Y[name], RANK, cfg, seed=seed, name=name)
            A, B = out["lora_A"], out["lora_B"]
        elif method == "ga":
            A, B = peers.lora_ga_init(st.G[name].cpu(), RANK, 16.0)
            shift = True
        elif method == "whitened":
            out = peers.whitened_solve(st.G[name], st.Z[name], st.Y[name], RANK, cfg, name=name)
            A, B = out["lora_A"], out["lora_B"]
        else:
            extra = orthonormal(d_in, RANK, torch.Generator().manual_seed(seed))
            Q = torch.linalg.qr(torch.cat([V[name], extra], 1))[0][:, :RANK]
            A, B = (Q.T / math.sqrt(3)).float(), torch.zeros(d_out, RANK)
        m.init_(A, B, shift_W0=shift)
    return model, layers


@torch.no_grad()
def excess_kl(teacher, model, seqs, batch=64):
    """KL(teacher ‖ student) per token, exactly from both models' logits, over held-out teacher sequences."""
    total, count = 0.0, 0
    for k in range(0, len(seqs), batch):
        x = seqs[k:k + batch, :-1]
        lt = torch.log_softmax(teacher(x).double(), -1)
        ls = torch.log_softmax(model(x).double(), -1)
        total += (lt.exp() * (lt - ls)).sum().item()
        count += x.numel()
    return total / count


def train_run(base, Z_base, variant, eps, method, mode, lr, seed, split, N=TRAIN_N, planted=None):
    """One fine-tune on N teacher sequences; the excess KL on held-out teacher sequences of `split` (val:
    for choosing the rate; test: reported) and how far s·B A (with any W0 shift) is from ΔW*."""
    planted = planted or PLANTED
    t0 = time.perf_counter()
    key = (variant, eps, seed, split, N)
    if key not in _TEACHERS:  # every method, mode and rate of one teacher sees the same sequences
        if len(_TEACHERS) > 4:  # a worker goes through the teachers in order: keep a few
            _TEACHERS.pop(next(iter(_TEACHERS)))
        teacher, delta, V = plant(base, eps, variant, seed, Z_base, planted)
        _TEACHERS[key] = (teacher, delta, V, sample_sequences(teacher, N, seed=seed),
                          sample_sequences(teacher, 256, seed=(10_000 if split == "val" else 20_000) + seed))
    teacher, delta, V, seqs, held = _TEACHERS[key]
    samples = as_samples(seqs)
    torch.manual_seed(seed)
    model, layers = student(base, method, mode, samples, V, N, planted)
    W0 = {n: dict(base.named_modules())[n].weight.detach().double() for n in planted}

    def distance():
        out = {}
        for n, m in layers.items():
            W = m.base.weight.detach().double() + m.scaling * m.lora_B.detach().double() @ m.lora_A.detach().double()
            out[n] = ((W - W0[n] - delta[n]).norm() / delta[n].norm()).item()
        return sum(out.values()) / len(out)
    step0 = {"kl": excess_kl(teacher, model, held), "distance": distance()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    warm = max(1, int(0.03 * STEPS))
    model.train()
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr * (step + 1) / warm if step < warm else \
                lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, STEPS - warm)))
        idx = torch.randint(0, N, (BATCH,), generator=gen)
        x = seqs[idx]
        loss = lora_da.causal_lm_losses(model, {"tokens": x[:, :-1], "targets": x[:, 1:]}).mean()
        if not math.isfinite(loss.item()):
            return {"failed": f"loss {loss.item()} at step {step}", "seconds": time.perf_counter() - t0}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return {"variant": variant, "eps": eps, "method": method, "mode": mode, "lr": lr, "seed": seed, "split": split,
            **({} if N == TRAIN_N else {"N": N}),
            "step0": step0, "kl": excess_kl(teacher, model, held), "distance": distance(),
            "seconds": time.perf_counter() - t0}


def _train_job(job):
    out_dir, model, variant, eps, N, method, mode, lr, seed, split = job
    torch.set_num_threads(1)
    global _BASE
    spec = SPECS[model]
    if globals().get("_BASE", (None,))[0] != model:
        base = find_model(model)
        _BASE = (model, base, base_factors(base, spec))
    name = run_name(split, variant, eps, N, method, mode, lr, seed)
    res = train_run(_BASE[1], _BASE[2], variant, eps, method, mode, lr, seed, split, N, spec.layers)
    res["name"] = name
    checkpoints.atomic_write_text(out_dir / "train" / f"{name}.json", json.dumps(res, indent=1))
    return name, res.get("seconds", 0.0)


def train_records(out_dir):
    recs = {}
    for f in sorted((out_dir / "train").glob("*.json")):
        try:
            recs[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {f}: unreadable ({e})", file=sys.stderr)
    return recs


def cells(spec):
    """(grid, variant, ε, N, method, mode) of every cell of the training half, in the table's order."""
    return [(g, v, e, n, m, mode) for g in spec.train for v in g.variants for e in g.eps for n in g.ns
            for mode in MODES for m in g.methods]


def chosen_rates(recs, spec=None):
    """Per (variant, ε, N, method, mode): the rate of the lowest validation KL (selection seed; never the test
    sequences), and whether it sits at the grid's edge."""
    out = {}
    for g, v, e, n, m, mode in cells(spec or SPECS["stories260K"]):
        kls = {lr: recs[k]["kl"] for lr in g.lrs
               if (k := run_name("val", v, e, n, m, mode, lr, SELECT_SEED)) in recs and "kl" in recs[k]}
        if len(kls) == len(g.lrs):
            lr = min(kls, key=kls.get)
            out[(v, e, n, m, mode)] = (lr, lr in (g.lrs[0], g.lrs[-1]))
    return out


def run_training(out_dir: Path, spec=None, jobs=2, log=print):
    import multiprocessing as mp
    spec = spec or SPECS["stories260K"]
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    for phase in ("val", "test"):
        recs = train_records(out_dir)
        if phase == "val":
            todo = [(out_dir, spec.model, v, e, n, m, mode, lr, SELECT_SEED, "val")
                    for g, v, e, n, m, mode in cells(spec) for lr in g.lrs]
        else:
            rates = chosen_rates(recs, spec)
            todo = [(out_dir, spec.model, v, e, n, m, mode, rates[(v, e, n, m, mode)][0], s, "test")
                    for g, v, e, n, m, mode in cells(spec) if (v, e, n, m, mode) in rates for s in g.seeds]
        todo = [j for j in todo if run_name(j[9], j[2], j[3], j[4], j[5], j[6], j[7], j[8]) not in recs]
        todo.sort(key=lambda j: (j[2], j[3], j[4], j[8]))  # one teacher's runs together: a worker samples it once
        log(f"planted training ({spec.model}), {phase}: {len(todo)} runs to do")
        if not todo:
            continue
        with mp.get_context("spawn").Pool(jobs) as pool:
            for i, (name, sec) in enumerate(pool.imap(_train_job, todo, chunksize=5)):
                log(f"  [{i + 1}/{len(todo)}] {name}: {sec:.0f}s")


def paired_kl(recs, rates, g, point, mode, runs, other) -> str:
    """A cell's test KL minus `other`'s at its own chosen rate, paired by seed (teacher and samples): mean ± 95% t."""
    if (*point, other, mode) not in rates:
        return ""
    lr = rates[(*point, other, mode)][0]
    ref = {s: recs.get(run_name("test", *point, other, mode, lr, s)) for s in g.seeds}
    pairs = [(r["kl"], ref[r["seed"]]["kl"]) for r in runs if ref.get(r["seed"]) and "kl" in ref[r["seed"]]]
    if len(pairs) < 2:
        return ""
    mc = mean_ci([a - b for a, b in pairs])
    return f"{mc[0]:+.3g} ± {mc[1]:.2g}" + (" (resolved, unadjusted)" if abs(mc[0]) > mc[1] else "") + \
        (f" ({len(pairs)} pairs)" if len(pairs) != len(g.seeds) else "")


def train_table(out_dir: Path, spec=None) -> str:
    spec = spec or SPECS["stories260K"]
    recs = train_records(out_dir)
    rates = chosen_rates(recs, spec)
    if not rates:
        return ""
    lines = ["## After training (excess KL per token on held-out teacher sequences)", "",
             f"LoRA (r = 8) on the four planted layers only; N teacher sequences (N = {TRAIN_N} where the table "
             f"says no other), {STEPS} steps × {BATCH}, AdamW with warmup and cosine decay, clip 1; each method's "
             f"rate chosen from {', '.join(f'{lr:g}' for lr in spec.train[0].lrs)} on the validation KL of selection "
             f"seed {SELECT_SEED} (its own teacher and held-out sequences); report seeds "
             f"{', '.join(map(str, spec.train[0].seeds))} (each its own teacher, samples and test sequences), paired "
             "by seed. distance = ‖W − W0 − ΔW*‖_F/‖ΔW*‖_F after training (1 at W0). Intervals: 95% t over the pairs; "
             "an exact sign-flip test on n pairs cannot go below p = 2/2ⁿ (0.25 at 3, 0.0625 at 5), so with 5 or fewer "
             "no difference here survives it: the words are 'resolved (unadjusted)' at most. "
             "`*`: the chosen rate is at the grid's edge.", "",
             "| V | ε | N | mode | method | rate | step-0 KL | KL | distance | KL − LoRA's (paired) | "
             "LoRA-DA's KL − LoRA-GA's (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, v, e, n, m, mode in cells(spec):
        if (v, e, n, m, mode) not in rates:
            continue
        lr, edge = rates[(v, e, n, m, mode)]
        runs = [recs.get(run_name("test", v, e, n, m, mode, lr, s)) for s in g.seeds]
        runs = [r for r in runs if r is not None and "kl" in r]
        if len(runs) < 2:
            lines.append(f"| {v} | {e:g} | {n} | {mode} | {m} | {lr:g}{'*' if edge else ''} | (not yet run) | | | | |")
            continue
        k = mean_ci([r["kl"] for r in runs])
        d = mean_ci([r["distance"] for r in runs])
        k0 = mean_ci([r["step0"]["kl"] for r in runs])

        lines.append(f"| {v} | {e:g} | {n} | {mode} | {m} | {lr:g}{'*' if edge else ''} | {k0[0]:.4g} | "
                     f"{k[0]:.4g} ± {k[1]:.2g} | {d[0]:.3g} ± {d[1]:.2g} | "
                     f"{paired_kl(recs, rates, g, (v, e, n), mode, runs, 'lora') if m != 'lora' else ''} | "
                     f"{paired_kl(recs, rates, g, (v, e, n), mode, runs, 'ga') if m == 'da' else ''} |")
    return "\n".join(lines) + "\n"
