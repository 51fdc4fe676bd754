"""
Plots and the side-by-side table of several runs, used by train.py (loss.png, compare.md, compare.png) and
the studies; matplotlib is imported only when a figure is drawn.
"""
import sys
from pathlib import Path

import checkpoints

def pyplot():
    """matplotlib, imported only when a plot is drawn: without a screen (Agg), unless the caller already chose
    a backend (a notebook's inline one must stay, or its own plots would vanish)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path):
    """A figure as a PNG, written atomically, then closed."""
    checkpoints.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    pyplot().close(fig)


def plot_loss(history, metrics, path, title):
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], alpha=0.3, label="train loss (per step)")
    ax.plot(history["step"], smooth(history["loss"]), label="train loss (smoothed)")
    ev = metrics["evals"]
    ax.plot([0] + [e["step"] for e in ev], [metrics["step0"]["loss"]] + [e["loss"] for e in ev], "o-",
            label="test loss (answer tokens)")
    ax.set(title=title, xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def smooth(xs, k=25):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, s


def compare(results, out_dir: Path, cfg):
    """results: {method: [metrics per seed]} -> compare.md and compare.png."""
    rows = ["| method | zero-shot acc | step-0 acc | final acc | final loss | init seconds |",
            "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        cols = []
        for get in (lambda m: m.get("zero_shot", {"accuracy": None})["accuracy"], lambda m: m["step0"]["accuracy"],
                    lambda m: m["final"]["accuracy"], lambda m: m["final"]["loss"], lambda m: m["init_seconds"]):
            mu, sd = mean_std([float("nan") if get(m) is None else get(m) for m in runs])  # None: not decoded
            cols.append(f"{mu:.4f} ± {sd:.4f}")
        rows.append(f"| {method} | " + " | ".join(cols) + " |")
    seeds = len(next(iter(results.values())))
    text = (f"# {cfg.task}: {', '.join(results)} on {cfg.checkpoint or cfg.model}, {seeds} seed(s)\n\n"
            f"mean ± std over seeds; {cfg.steps} steps × {cfg.batch_size * cfg.grad_accum} sequences, lr {cfg.lr:g}, "
            f"r={cfg.rank}, alpha={cfg.lora_alpha:g}{' (rsLoRA)' if cfg.rslora else ''}\n\n" + "\n".join(rows) + "\n")
    checkpoints.atomic_write_text(out_dir / "compare.md", text)

    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for method, runs in results.items():
        n = min(len(m["history"]["loss"]) for m in runs)
        mean = [sum(m["history"]["loss"][i] for m in runs) / len(runs) for i in range(n)]
        a1.plot(runs[0]["history"]["step"][:n], smooth(mean), label=method)
    a1.set(title="training loss (mean over seeds, smoothed)", xlabel="optimizer step",
           ylabel="cross-entropy (nats/token)")
    a1.legend()
    names = list(results)
    stats = [mean_std([m["final"]["accuracy"] for m in results[k]]) for k in names]
    a2.bar(names, [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats], capsize=4, label="final (± std)")
    zs = [m["zero_shot"]["accuracy"] for runs in results.values() for m in runs
          if m.get("zero_shot", {}).get("accuracy") is not None]
    if zs:
        a2.axhline(100 * mean_std(zs)[0], color="gray", ls="--", label="zero-shot")
    a2.set(title=f"final {cfg.task} accuracy", xlabel="initialization", ylabel="accuracy (%)")
    a2.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "compare.png")
    return text
