"""
The 7B path, measured on a CPU: a model of LLaMA-2-7B's exact shapes (dim 4096, 32 heads, FFN 11,008, vocab
32,000) at depth 1-2 with random bf16 weights, written as a Meta folder in a temporary directory (nothing
kept), then run end to end through train.py (LoRA-DA init on a few SST-2 samples, a few training steps).
Prints two tables:

    python studies/shapes7b.py                # both, depth 1 (about 15 minutes on 2 cores, ~8 GiB)
    python studies/shapes7b.py --part plan    # each stage's measured peak memory against --dry-run's plan
    python studies/shapes7b.py --part eig     # the A0 eigenproblem at d_in 4,096 and 11,008: eigh vs lobpcg
    python studies/shapes7b.py --gpu-check    # on a GPU machine: the full 32 blocks on CUDA (skips without CUDA)

Memory is the process's peak resident set per stage (train.py's PeakMemory, recorded in metrics.json), so it
includes torch's runtime and the data, which the plan counts as one measured row. The tokenizer is the real
32k LLaMA-layout one of the data folder (../shared/data/tokenizer32k): right vocabulary size and special
ids, another vocabulary, so the weights are random and only shapes, memory and time mean anything.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import llama  # noqa: E402
import lora_da  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402


TINY = llama.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=None, vocab_size=32000, hidden_dim=172,
                       max_seq_len=512, tie_embeddings=False)  # the same code path in seconds (the test)


def build(folder: Path, depth: int, seed: int = 0, shape: llama.ModelArgs = None):
    """LLaMA-2-7B's shapes at `depth` blocks, torch's default random init, in bf16, as a Meta folder."""
    args = llama.ModelArgs(**{**vars(shape or llama.PRESETS["llama2-7b"]), "n_layers": depth})
    torch.manual_seed(seed)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a 32-block model is 12.6 GiB, not 25
    try:
        model = llama.Transformer(args)
    finally:
        torch.set_default_dtype(dtype)
    checkpoints.save_meta_checkpoint(model, folder)
    return args


CPU_RUN = ("--steps", "2", "--batch-size", "2", "--max-len", "64", "--init-samples", "16", "--stats-batch-size", "4")
GPU_RUN = ("--steps", "3", "--batch-size", "8", "--max-len", "512", "--init-samples", "256", "--stats-batch-size", "16",
           "--layers-per-pass", "8", "--device", "cuda")   # the paper's batch of 8, 256 init samples


def run_args(folder, data, out, solver, depth, sizes=CPU_RUN):
    return ["--checkpoint", str(folder), "--tokenizer", str(data / "tokenizer32k" / "tokenizer.model"),
            "--data-dir", str(data), "--dtype", "bf16", "--init", "da", "--solver", solver, *sizes,
            "--train-limit", "300", "--eval-limit", "4", "--eval-interval", "0", "--no-zero-shot",
            "--log-interval", "1", "--out-dir", str(out)]


def plan(folder, data, depth, solver, threads, sizes=CPU_RUN):
    """Run train.py once in a fresh process and once with --dry-run; the stages side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = folder.parent / "run"
    args = run_args(folder, data, out, solver, depth, sizes)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - t
    m = json.loads((out / "metrics.json").read_text())
    d = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--dry-run"], capture_output=True, text=True,
                       env=env).stdout
    rows = dict(re.findall(r"^\s+(.+?)\s{2,}([\d.,]+ GiB)$", d, re.M))
    gib = lambda k: float(next(v for key, v in rows.items() if key.startswith(k)).split()[0])
    measured = m["peak_memory_gib"]
    what = "peak CUDA memory" if "cuda" in sizes else "peak RSS"
    print(f"\n## LLaMA-2-7B shapes at depth {depth}, bf16 base, {threads} thread(s): measured {what} per stage "
          f"against --dry-run\n")
    print(f"| stage | --dry-run plan (GiB) | measured {what} (GiB) | measured / plan | held at the stage's start (GiB) "
          f"| seconds |")
    print("|---|---|---|---|---|---|")
    sec = {"statistics": m["init_report"]["seconds"]["statistics"], "solve": m["init_report"]["seconds"]["solve"],
           "training": m["train_seconds"]}
    worst = 0.0
    for stage, key in (("statistics", "peak, statistics pass"), ("solve", "peak, solve"), ("training", "peak, training")):
        ratio = measured[stage] / gib(key)
        worst = max(worst, abs(ratio - 1))
        held = m.get("memory_at_start_gib", {}).get(stage, float("nan"))
        print(f"| {stage} | {gib(key):.3f} | {measured[stage]:.3f} | {ratio:.2f} | {held:.3f} | {sec[stage]:.1f} |")
    print(f"\n({m['init_report']['samples']} init samples, {m['train_tokens']} training tokens, {' '.join(sizes)}; "
          f"run wall time {wall:.0f} s; worst deviation {100 * worst:.0f}%)")
    print("\n--dry-run's output for the same settings:\n\n```\n" + d.strip() + "\n```")
    return worst


def peak_rss_reset():
    Path("/proc/self/clear_refs").write_text("5")


def rss():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 2 ** 20


def peak_rss():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2 ** 20


def guidance(G, Z, Y, c: lora_da.DAConfig):
    """Eq. 9's M for one layer, as lora_da.lora_da_solve builds it (normalized ΔW)."""
    Lz = lora_da.damped_cholesky(Z, c.damping, "Z")
    dW = lora_da.natural_gradient(G, Z, Y, c.damping, Lz=Lz)
    sigma = torch.linalg.matrix_norm(dW, ord=2).item()
    coef = lora_da.trace_Y_inv(Y, c.damping) / c.N / sigma ** 2
    return lora_da.guidance_matrix(dW / sigma, torch.cholesky_inverse(Lz), coef, c.alpha, c.beta)


def eig(folder, data, depth, threads):
    """The A0 eigenproblem (Eq. 10) on the real-shaped M of the depth-1 model (not a random symmetric matrix):
    eigh, this project's lobpcg (up to 200 iterations to a 1e-9 tolerance, checked, eigh as fallback) and the
    authors' lobpcg (10 iterations); time, peak memory above what is already held, the largest principal
    angle to eigh's A0, and the Ky Fan sum tr(A0ᵀ M A0) each reaches against eigh's (the minimum)."""
    torch.set_num_threads(threads)
    cfg = train.get_args(run_args(folder, data, folder.parent / "eig", "eigh", depth))
    setup = train.load(cfg, log=lambda *a: None)
    model = train.lora_model(cfg, setup, take=True)
    samples = setup.task.samples(cfg.init_samples, setup.tok.pad_id)
    layers = lora_da.lora_targets(model)
    names = ["layers.0.attention.wq", "layers.0.feed_forward.w2"]
    st = lora_da.kfac_statistics(model, samples, lora_da.causal_lm_losses, {n: layers[n] for n in names},
                                 batch_size=cfg.stats_batch_size)
    c = train.init_config(cfg, cfg.seed, len(setup.task.train))
    r = cfg.rank
    print(f"\n## The A0 eigenproblem at LLaMA-2-7B widths ({st.n_tokens} counted tokens from {len(samples)} samples, "
          f"{threads} thread(s), fp64, r = {r})\n")
    print("| layer | d_in | solver | seconds | peak memory above M (GiB) | angle to eigh's A0 | tr(A0ᵀMA0) − eigh's |")
    print("|---|---|---|---|---|---|---|")

    def authors(M, seed):  # torch.lobpcg as the released code calls it: 10 iterations, no check, no fallback
        gen = torch.Generator().manual_seed(seed)
        X0, _ = torch.linalg.qr(torch.randn(M.shape[0], r, generator=gen, dtype=M.dtype))
        return torch.lobpcg(M, k=r, X=X0, largest=False, niter=10)[1]

    for name in names:
        M = guidance(st.G[name], st.Z[name], st.Y[name], c)
        seed = lora_da.layer_seed(c.seed, name)
        ref = None
        for label, solve in (("eigh", lambda: lora_da.smallest_eigenvectors(M, r, "eigh", seed)),
                             ("lobpcg (this project: checked, eigh fallback)",
                              lambda: lora_da.smallest_eigenvectors(M, r, "lobpcg", seed)),
                             ("lobpcg, 10 iterations (the authors')", lambda: (authors(M, seed), "lobpcg"))):
            peak_rss_reset()
            base = rss()                      # what is held already (the model, the statistics, M)
            t = time.perf_counter()
            A0, used = solve()
            sec = time.perf_counter() - t
            ref = A0 if ref is None else ref
            fan = lambda V: torch.trace(torch.linalg.qr(V)[0].T @ M @ torch.linalg.qr(V)[0]).item()
            used = f" (used {used})" if used not in label else ""
            print(f"| {name} | {M.shape[0]} | {label}{used} | {sec:.1f} | {max(0.0, peak_rss() - base):.2f} | "
                  f"{lora_da.principal_angle(ref.T, A0.T):.2f}° | {fan(A0) - fan(ref):.2e} |", flush=True)
        del M


def gpu_check(data, depth, threads, device="cuda", shape=None):
    """For whoever has a GPU: LoRA-DA's init of stories260K on `device` against the CPU (they should agree to
    solver precision), then the plan against the measured peak CUDA memory of the full LLaMA-2-7B shapes."""
    t0 = time.perf_counter()
    cfg = train.get_args(["--data-dir", str(data), "--init-samples", "256"])
    setup = train.load(cfg, log=lambda *a: None)
    samples = setup.task.samples(cfg.init_samples, setup.tok.pad_id)
    A = {}
    for dev in ("cpu", device):
        model = train.lora_model(cfg, setup).to(dev)
        lora_da.initialize_da(model, [{k: v.to(dev) for k, v in s.items()} for s in samples],
                           cfg=train.init_config(cfg, cfg.seed, len(setup.task.train)))
        A[dev] = {n: (m.lora_A.detach().cpu().double(), m.lora_B.detach().cpu().double())
                  for n, m in lora_da.lora_targets(model).items()}
    angles = sorted(lora_da.principal_angle(A["cpu"][n][0], A[device][n][0]) for n in A["cpu"])
    errors = sorted(((B1 @ A1 - B2 @ A2).norm() / (B1 @ A1).norm()).item()
                    for n, ((A1, B1), (A2, B2)) in ((n, (A["cpu"][n], A[device][n])) for n in A["cpu"]))
    print(f"\n## stories260K: LoRA-DA init on {device} against cpu (35 layers)\n")
    print(f"principal angle median {angles[len(angles) // 2]:.3f}°, max {angles[-1]:.3f}°; B A relative error "
          f"median {errors[len(errors) // 2]:.2e}, max {errors[-1]:.2e} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama2-7b-shapes"
        t = time.perf_counter()
        build(folder, depth, shape=shape)
        print(f"\nwrote the {depth}-block model in {time.perf_counter() - t:.0f} s", flush=True)
        sizes = GPU_RUN if device == "cuda" else tuple(x for x in CPU_RUN) + ("--device", device)
        plan(folder, data, depth, "eigh", threads, sizes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=cli.Number(int, 1, 32, "an integer in [1, 32] (LLaMA-2-7B has 32 blocks)"),
                   default=1, help="transformer blocks of LLaMA-2-7B's shape (1-2 fit 24 GiB)")
    p.add_argument("--part", choices=("plan", "eig", "all"), default="all")
    p.add_argument("--solver", default="eigh", choices=("eigh", "lobpcg"), help="the solver of the plan's run")
    p.add_argument("--threads", type=cli.Number(int, 1, 256, "a positive integer"), default=2, help="torch threads")
    p.add_argument("--data-dir", default=None, help="the data folder (default: as train.py finds it)")
    p.add_argument("--gpu-check", action="store_true", help="on a CUDA machine: stories260K's init on GPU vs CPU, "
                   "then the full 32 blocks against the plan; skips without CUDA")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same layout (the test's: seconds)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    cli.boundary(lambda: shapes_main(a))


def shapes_main(a):
    cfg = train.get_args(["--data-dir", a.data_dir] if a.data_dir else [])
    data = next((d for d in tasks.data_dirs(cfg) if (d / "tokenizer32k" / "tokenizer.model").is_file()), None)
    if data is None:
        raise tasks.UsageError(f"tokenizer32k/tokenizer.model not found in {', '.join(map(str, tasks.data_dirs(cfg)))}")
    shape = TINY if a.tiny else None
    if a.gpu_check:
        if not torch.cuda.is_available() and not a.tiny:
            print("gpu check skipped: no CUDA device here (torch.cuda.is_available() is False)")
            return
        return gpu_check(data, a.depth if a.depth != 1 or a.tiny else 32, a.threads,
                         "cuda" if torch.cuda.is_available() else "cpu", shape)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama2-7b-shapes"
        t = time.perf_counter()
        args = build(folder, a.depth, shape=shape)
        print(f"wrote a {a.depth}-block LLaMA-2-7B-shaped model (dim {args.dim}, FFN "
              f"{llama.ffn_hidden_dim(args)}, vocab {args.vocab_size}) in {time.perf_counter() - t:.0f} s", flush=True)
        if a.part in ("plan", "all"):
            plan(folder, data, a.depth, a.solver, a.threads)
        if a.part in ("eig", "all"):
            eig(folder, data, a.depth, a.threads)


if __name__ == "__main__":
    main()
