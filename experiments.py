"""
Experiments as evidence: each method at its own learning rate, chosen on a validation split carved from the
training set, then trained with several seeds and compared on the test set with 95% confidence intervals.

    python experiments.py baselines              # lora, gaussian, pissa, ga, one, da on SST-2
    python experiments.py convergence            # the same runs, read as curves: no new runs
    python experiments.py gsm8k                  # the protocol on GSM8K (test loss on the answers)
    python experiments.py baselines --jobs 2     # J processes of one thread each (the default: 2)
    python experiments.py baselines --list       # the grid, and which runs are already done

The protocol (README.md, "Findings"):
  1. selection: every method × every learning rate of one shared grid, on `select_seeds`, trained on the
     training set minus a 1,000-example validation split and scored on that split only (--no-test-eval:
     the test file is not even read);
  2. report: each method at its chosen rate (best mean validation score), on `seeds` other seeds, scored on
     the test set; same step budget, data order (the seed) and validation split for every method;
  3. aggregate: mean and 95% t-interval per method; LoRA-DA minus each other method paired by seed (the same
     data order), with its 95% interval; "wins" only where that interval excludes zero.

Every finished run is one small JSON under results/STUDY/runs/; a rerun skips them, so a study can be finished
over several sittings and anyone can recompute the tables from the committed files.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


@dataclasses.dataclass
class Study:
    task: str
    methods: tuple
    lrs: tuple                      # the one learning-rate grid every method is selected from
    select_seeds: tuple             # seeds of the selection runs (validation split only)
    seeds: tuple                    # seeds of the report runs (test set), distinct from select_seeds
    args: tuple                     # train.py settings shared by every run of the study
    metric: str = "accuracy"        # what selection maximizes ("accuracy") or minimizes ("loss")
    of: str = ""                    # a study that only reads another study's runs (convergence)


METHODS = ("lora", "gaussian", "pissa", "ga", "one", "da")
SST2 = ("--task", "sst2", "--steps", "400", "--eval-interval", "50", "--val-size", "1000")
STUDIES = {
    "baselines": Study("sst2", METHODS, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (101, 102), (1, 2, 3, 4, 5), SST2),
    "convergence": Study("sst2", METHODS, (), (), (), (), of="baselines"),
    "gsm8k": Study("gsm8k", METHODS, (3e-4, 1e-3, 3e-3, 1e-2), (101,), (1, 2, 3),
                   ("--task", "gsm8k", "--steps", "150", "--batch-size", "8", "--max-len", "320", "--eval-interval", "50",
                    "--val-size", "100", "--eval-limit", "100"), metric="loss"),
    "tiny": Study("sst2", ("lora", "da"), (1e-3, 3e-3), (101,), (1, 2),  # the test suite's study: seconds
                  ("--task", "sst2", "--steps", "4", "--batch-size", "4", "--init-samples", "8", "--eval-interval", "2",
                   "--val-size", "16", "--eval-limit", "16", "--train-limit", "300", "--stats-batch-size", "4")),
}


# -----------------------------------------------------------------------------
# runs: a name, the train.py arguments, and one JSON file each

def run_name(method, lr, seed, phase):
    return f"{phase}-{method}-lr{lr:g}-s{seed}"


def run_args(study, method, lr, seed, phase):
    args = list(study.args) + ["--init", method, "--lr", f"{lr:g}", "--seed", str(seed)]
    # selection reads only the final validation score: no periodic evaluations
    return args + (["--no-test-eval", "--eval-interval", "0"] if phase == "select" else [])


def load_runs(out: Path) -> dict:
    runs = {}
    for f in sorted((out / "runs").glob("*.json")):
        runs[f.stem] = json.loads(f.read_text())
    return runs


def execute(job):
    """One run in a worker process (one thread): train.run, then its JSON, written atomically."""
    name, args, out = job
    import torch
    torch.set_num_threads(1)
    import llama
    import train
    cfg = train.get_args(args)
    scratch = out / "scratch" / name
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        log = (lambda *a: print(*a, file=quiet))
        setup = _setup(cfg, log)
        try:
            metrics = train.run(cfg, cfg.methods[0], cfg.seed, scratch, setup, log=log)
            record = {"config": json.loads((scratch / "config.json").read_text()), "metrics": metrics}
        except train.UsageError as e:  # a rate too large for a method diverges: a result, not a crash
            record = {"failed": str(e)}
    record.update(name=name, args=args, wall_seconds=time.perf_counter() - t0)
    llama.atomic_write_text(out / "runs" / f"{name}.json", json.dumps(record))
    shutil.rmtree(scratch, ignore_errors=True)
    return name, record["wall_seconds"]


_SETUPS = {}


def _setup(cfg, log):
    """The tokenizer, model and data once per worker and data setting (runs only copy the model)."""
    import train
    key = (cfg.task, cfg.val_size, cfg.test_eval, cfg.train_limit, cfg.eval_limit, cfg.max_len, cfg.checkpoint)
    if key not in _SETUPS:
        _SETUPS[key] = train.load(cfg, log)
    return _SETUPS[key]


def run_all(jobs, out: Path, n_jobs: int, label: str):
    """Run the jobs not yet done, n_jobs at a time, with progress and an ETA."""
    todo = [j for j in jobs if not (out / "runs" / f"{j[0]}.json").is_file()]
    done = len(jobs) - len(todo)
    print(f"{label}: {len(jobs)} runs, {done} already done, {len(todo)} to run with {n_jobs} job(s)", flush=True)
    if not todo:
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0, finished = time.perf_counter(), 0
    if n_jobs == 1:
        results = map(execute, todo)
    else:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(n_jobs, initializer=_one_thread)
        results = pool.imap_unordered(execute, todo)
    for name, seconds in results:
        finished += 1
        eta = (time.perf_counter() - t0) / finished * (len(todo) - finished)
        print(f"  [{done + finished}/{len(jobs)}] {name} ({seconds:.0f}s) | ETA {eta / 60:.0f} min", flush=True)
    if n_jobs > 1:
        pool.close()
        pool.join()


def _one_thread():
    os.environ["OMP_NUM_THREADS"] = "1"


# -----------------------------------------------------------------------------
# statistics: means, t-intervals, paired differences

def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF (numerical
    integration of the density): numpy only, accurate to ~1e-6 for the df used here."""
    def cdf(t):
        x = np.linspace(0.0, abs(t), 20001)
        logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
        area = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
        return 0.5 + math.copysign(area, t)
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(xs, level=0.95):
    """(mean, half-width of the two-sided t-interval); half-width nan for fewer than 2 values."""
    xs = np.asarray(xs, dtype=float)
    m = float(xs.mean())
    if len(xs) < 2:
        return m, float("nan")
    return m, t_quantile(1 - (1 - level) / 2, len(xs) - 1) * float(xs.std(ddof=1)) / math.sqrt(len(xs))


def paired(a: dict, b: dict):
    """a − b over the seeds both have: (mean, half-width, n)."""
    common = sorted(set(a) & set(b))
    m, h = mean_ci([a[s] - b[s] for s in common])
    return m, h, len(common)


def score(record, metric, split=None):
    """The final number a run is judged by: accuracy or loss of its primary split (or of split).
    A run that diverged scores the worst possible: accuracy 0, loss inf."""
    if "failed" in record:
        return 0.0 if metric == "accuracy" else float("inf")
    final = record["metrics"]["final"]
    return (final[split] if split else final)[metric]


# -----------------------------------------------------------------------------
# the protocol

def select_lrs(study, runs) -> dict:
    """Each method's learning rate: the best mean validation score over the selection seeds. Reads only
    the selection runs, which never evaluated on the test split."""
    chosen = {}
    for method in study.methods:
        means = {}
        for lr in study.lrs:
            recs = [runs.get(run_name(method, lr, s, "select")) for s in study.select_seeds]
            if any(r is None for r in recs):
                break
            assert all("failed" in r or r["metrics"]["final"]["split"] == "val" for r in recs)
            means[lr] = float(np.mean([score(r, study.metric) for r in recs]))
        else:
            best = max if study.metric == "accuracy" else min  # ties: the first (smallest) rate
            chosen[method] = best(means, key=means.get)
    return chosen


def grid(study, phase, chosen=None):
    if phase == "select":
        return [(m, lr, s) for m in study.methods for lr in study.lrs for s in study.select_seeds]
    return [(m, chosen[m], s) for m in study.methods if m in chosen for s in study.seeds]


def run_study(name, study, out, n_jobs):
    sel = [(run_name(m, lr, s, "select"), run_args(study, m, lr, s, "select"), out) for m, lr, s in grid(study, "select")]
    run_all(sel, out, n_jobs, f"{name}: selection on the validation split")
    chosen = select_lrs(study, load_runs(out))
    rep = [(run_name(m, lr, s, "report"), run_args(study, m, lr, s, "report"), out)
           for m, lr, s in grid(study, "report", chosen)]
    run_all(rep, out, n_jobs, f"{name}: report runs at each method's chosen rate")


# -----------------------------------------------------------------------------
# tables and plots

def fmt(m, h, pct=False):
    k = 100 if pct else 1
    return f"{k * m:.2f} ± {k * h:.2f}" if pct else f"{m:.4f} ± {h:.4f}"


def report_scores(study, runs, chosen, metric, split=None):
    """{method: {seed: final score}} of the report runs."""
    out = {}
    for m in study.methods:
        if m not in chosen:
            continue
        for s in study.seeds:
            r = runs.get(run_name(m, chosen[m], s, "report"))
            if r is not None and score(r, metric, split) is not None:
                out.setdefault(m, {})[s] = score(r, metric, split)
    return out


def aggregate(name, study, out: Path) -> str:
    runs = load_runs(out)
    chosen = select_lrs(study, runs)
    lines = [f"# {name}: {study.task}, {' '.join(study.args)}", "",
             f"Runs: {len(runs)} JSON files in `runs/` (recompute with `python experiments.py {name} --aggregate`). "
             f"Compute: {sum(r['wall_seconds'] for r in runs.values()) / 3600:.2f} CPU-thread hours.", ""]
    # 1. selection
    pct = study.metric == "accuracy"
    lines += [f"## 1. Learning-rate selection: mean validation {study.metric} over seeds "
              f"{', '.join(map(str, study.select_seeds))} (validation split carved from train; test never read)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in study.lrs) + " | chosen |",
              "|---|" + "---|" * (len(study.lrs) + 1)]
    for m in study.methods:
        cells = []
        for lr in study.lrs:
            recs = [runs.get(run_name(m, lr, s, "select")) for s in study.select_seeds]
            vals = [score(r, study.metric) for r in recs if r]
            cell = (f"{100 * np.mean(vals):.2f}" if pct else f"{np.mean(vals):.4f}") if vals else "–"
            cells.append(f"**{cell}**" if chosen.get(m) == lr else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen[m]:g} |" if m in chosen else
                     f"| {m} | " + " | ".join(cells) + " | (incomplete) |")
    # 2. report
    lines += ["", f"## 2. Test results at each method's chosen rate: mean ± 95% CI over seeds "
              f"{', '.join(map(str, study.seeds))}", ""]
    acc = report_scores(study, runs, chosen, "accuracy")
    loss = report_scores(study, runs, chosen, "loss")
    lines += ["| method | lr | seeds | test accuracy (%) | test loss | step-0 loss | init seconds |", "|---|---|---|---|---|---|---|"]
    for m in loss:
        recs = [runs[run_name(m, chosen[m], s, "report")] for s in loss[m]]
        if any("failed" in r for r in recs):
            lines.append(f"| {m} | {chosen[m]:g} | {len(recs)} | diverged in {sum('failed' in r for r in recs)} run(s) | | | |")
            continue
        a = fmt(*mean_ci(list(acc[m].values())), pct=True) if m in acc else "–"
        lines.append(f"| {m} | {chosen[m]:g} | {len(loss[m])} | {a} | {fmt(*mean_ci(list(loss[m].values())))} | "
                     f"{fmt(*mean_ci([r['metrics']['step0']['loss'] for r in recs]))} | "
                     f"{np.mean([r['metrics']['init_seconds'] for r in recs]):.2f} |")
    # 3. paired differences
    if "da" in loss:
        lines += ["", "## 3. LoRA-DA minus each other method, paired by seed (same data order): mean ± 95% CI", "",
                  "| other | Δ test accuracy (points) | Δ test loss | pairs | verdict |", "|---|---|---|---|---|"]
        main = acc if pct else loss
        for m in loss:
            if m == "da":
                continue
            da_, dh, n = paired(acc["da"], acc[m]) if m in acc and "da" in acc else (float("nan"),) * 3
            dl, dlh, n2 = paired(loss["da"], loss[m])
            d, h, _ = paired(main["da"], main[m])
            better = d > 0 if pct else d < 0
            verdict = ("LoRA-DA wins" if better else "LoRA-DA loses") if abs(d) > h else "no resolved difference"
            lines.append(f"| {m} | {100 * da_:+.2f} ± {100 * dh:.2f} | {dl:+.4f} ± {dlh:.4f} | {n2} | {verdict} |")
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    plot_selection(study, runs, chosen, out / "selection.png")
    return text


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def savefig(fig, path: Path):
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_selection(study, runs, chosen, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in study.methods:
        xs, ys = [], []
        for lr in study.lrs:
            vals = [score(r, study.metric) for s in study.select_seeds
                    if (r := runs.get(run_name(m, lr, s, "select")))]
            if vals:
                xs.append(lr)
                ys.append(np.mean(vals))
        ax.plot(xs, ys, "o-", label=m + (f" (chosen {chosen[m]:g})" if m in chosen else ""))
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"validation {study.metric} (mean over seeds)",
           title=f"{study.task}: learning-rate selection on the validation split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def convergence(study, runs, out: Path) -> str:
    """Dev accuracy and training loss against steps at each method's chosen rate (the report runs), and the
    steps each needs to come within 1 point of its own final accuracy: the paper's "faster convergence"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = select_lrs(study, runs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    lines = ["# convergence: the report runs of `baselines`, each method at its chosen rate", "",
             "Steps to come within 1 point of the run's own final test accuracy (first evaluation at or above "
             "final − 1 point; evaluations every 50 steps), mean ± 95% CI over seeds; and the area under the "
             "accuracy curve (mean accuracy over the evaluations, step 0 included), a single number for speed.", "",
             "| method | lr | seeds | steps to final − 1 pt | mean accuracy over the run (%) | final accuracy (%) |",
             "|---|---|---|---|---|---|"]
    for m in study.methods:
        recs = [runs[n] for s in study.seeds if (n := run_name(m, chosen.get(m, 0), s, "report")) in runs]
        if not recs:
            continue
        steps = [0] + [e["step"] for e in recs[0]["metrics"]["evals"]]
        curves = np.array([[r["metrics"]["step0"]["accuracy"]] + [e["accuracy"] for e in r["metrics"]["evals"]]
                           for r in recs])
        mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(recs) > 1 else np.zeros(curves.shape[1])
        a1.plot(steps, 100 * mean, "o-", ms=3, label=m)
        a1.fill_between(steps, 100 * (mean - sd), 100 * (mean + sd), alpha=0.15)
        losses = np.array([r["metrics"]["history"]["loss"] for r in recs])
        k = 25
        smooth = np.array([np.convolve(l, np.ones(k) / k, mode="valid") for l in losses])
        xs = np.arange(k, losses.shape[1] + 1)
        a2.plot(xs, smooth.mean(0), label=m)
        a2.fill_between(xs, smooth.mean(0) - smooth.std(0), smooth.mean(0) + smooth.std(0), alpha=0.15)
        reach = [next(st for st, a in zip(steps, c) if a >= c[-1] - 0.01) for c in curves]
        rm, rh = mean_ci(reach)
        lines.append(f"| {m} | {chosen[m]:g} | {len(recs)} | {rm:.0f} ± {rh:.0f} | "
                     f"{fmt(*mean_ci(curves.mean(1)), pct=True)} | {fmt(*mean_ci(curves[:, -1]), pct=True)} |")
    a1.set(xlabel="optimizer step", ylabel="SST-2 dev accuracy (%)", title="test accuracy (mean ± sd over seeds)")
    a2.set(xlabel="optimizer step", ylabel="training loss (25-step mean)", title="training loss (mean ± sd over seeds)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    savefig(fig, out / "convergence.png")
    plt.close(fig)
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    return text


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES), help="which study")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one thread each (default: 2, the cores here)")
    p.add_argument("--out", default=None, help="results folder (default: results/STUDY)")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the tables and plots from the JSONs")
    p.add_argument("--list", action="store_true", help="list the grid and what is done, run nothing")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    study = STUDIES[a.study]
    out = Path(a.out or ROOT / "results" / a.study)
    if study.of:  # convergence: read the runs of another study, run nothing
        print(convergence(STUDIES[study.of], load_runs(ROOT / "results" / study.of), out))
        return
    if a.list:
        runs = load_runs(out)
        for m, lr, s in grid(study, "select"):
            n = run_name(m, lr, s, "select")
            print(("done  " if n in runs else "to do ") + n)
        chosen = select_lrs(study, runs)
        for m, lr, s in grid(study, "report", chosen):
            n = run_name(m, lr, s, "report")
            print(("done  " if n in runs else "to do ") + n)
        return
    if not a.aggregate:
        run_study(a.study, study, out, a.jobs)
    print(aggregate(a.study, study, out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
