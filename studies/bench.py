"""
Where a training step's time goes, and how much faster it is than the straightforward code; prints tables.

    python studies/bench.py                          # both real models, 1 and 2 threads: about 5 minutes
    python studies/bench.py --model stories260K --threads 1
    python studies/bench.py --check-steps 100        # also 100 optimizer steps, fast vs literal: losses compared
    python studies/bench.py --rounds 0 --check-steps 100   # only that comparison
    python studies/bench.py --compile                # also torch.compile (inductor): compile time and speed
    python studies/bench.py --limit                  # FLOPs against the CPU's matmul peak, 4 models (and HF's)
    python studies/bench.py --init --model smollm2-135M --threads 1   # LoRA-DA's init: statistics, solve, memory
    python studies/shapes7b.py                       # LLaMA-2-7B's shapes: memory per stage, the eigensolvers

Three ways to compute the same training step (the same batches, the same numbers up to float order):
  before  the straightforward code, kept as the reference: every micro-batch padded to its longest sequence,
          logits over the whole vocabulary at every position, each LoRA layer as three matmuls
          (W0 x + s·B A x), attention by the fused kernel
  groups  batches cut into length groups, logits only where a loss reads them; the same literal layers
  now     what train.py runs: groups, plus the size-chosen fast paths of llama.fast_paths: a LoRA layer of
          up to 65,536 weights as one matmul with W0 + s·B A, heads narrower than 16 attended by two
          batched matmuls and a softmax instead of the fused kernel
Timings are the best of several rounds that alternate the variants, in one process, so that a busy machine
slows all of them alike; tokens are real (unpadded) tokens.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core beside this folder
import cli  # noqa: E402
import llama  # noqa: E402
import lora_da  # noqa: E402
import peers  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402


def best_of(fns: dict, rounds: int) -> dict:
    """{name: (seconds, result)}: each fn run once to warm up, then `rounds` times in alternation; the
    fastest round counts (what a quiet machine does; noise only ever adds time)."""
    out = {name: (float("inf"), fn()) for name, fn in fns.items()}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            res = fn()
            out[name] = (min(out[name][0], time.perf_counter() - t), res)
    return out


def lora_copy(setup, cfg, fast: bool):
    model = copy.deepcopy(setup.base)
    llama.add_lora(model, r=cfg.rank, lora_alpha=cfg.lora_alpha, rslora=True)
    torch.manual_seed(9)
    peers.initialize_model(model, "lora", cfg=train.init_config(cfg, 9, len(setup.task.train)))
    # B = 0 makes both forms trivially equal: give B the size it has after some training
    for layer in llama.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    llama.mark_only_lora_trainable(model)
    return llama.fast_paths(model, fast).train()


def training_steps(setup, cfg, models, n_batches, rounds):
    """tokens/s of one training step's forward + backward (the optimizer's share is measured apart)."""
    task, tok = setup.task, setup.tok
    batches = [train.batch_indices(k * cfg.batch_size, cfg.batch_size, 9, len(task.train), {})
               for k in range(n_batches)]

    def before():
        loss, tokens = 0.0, 0
        for idx in batches:
            b = task.batch("train", idx, tok.pad_id)
            out = lora_da.sequence_losses(models["before"](b["tokens"]), b["targets"]).sum() / len(idx)
            out.backward()
            loss, tokens = loss + out.item(), tokens + int(b["attention_mask"].sum())
        return loss, tokens

    def grouped(name):
        def fn():
            loss, tokens = 0.0, 0
            for idx in batches:
                out, n = train.backward_on_batch(models[name], task, idx, tok, "cpu", cfg.length_groups, 1 / len(idx))
                loss, tokens = loss + out, tokens + n
            return loss, tokens
        return fn

    res = best_of({"before": before, "groups": grouped("groups"), "now": grouped("now")}, rounds)
    l0, n0 = res["before"][1]
    for name, (_, (loss, n)) in res.items():  # the same sums, up to float order
        assert n == n0 and abs(loss - l0) < 1e-4 * abs(l0), (name, loss, l0)
    for m in models.values():
        m.zero_grad(set_to_none=True)
    return {name: n / t for name, (t, (_, n)) in res.items()}


def optimizer_share(model, cfg, rounds):
    """Seconds of one clip + AdamW step + zero_grad over the LoRA factors (what a step adds to its backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9)

    def step():
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return best_of({"opt": step}, rounds)["opt"][0]


def profile_table(fn, top: int):
    """The ops that take a step's time, by self CPU time (torch.profiler), as (name, share, calls) rows."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]]


def evaluation(setup, models, rounds):
    task, tok = setup.task, setup.tok

    @torch.no_grad()
    def before():
        """File order, padded, logits everywhere, literal layers; words that begin alike (babyllama936K) are
        scored whole, one more pass per word."""
        model = models["before"].eval()
        losses = []
        for i in range(0, len(task.test), 64):
            idx = range(i, min(i + 64, len(task.test)))
            b = task.batch("test", idx, tok.pad_id)
            losses += lora_da.sequence_losses(model(b["tokens"]), b["targets"]).tolist()
            for word in (0, 1) if task.whole_word else ():
                b = task.batch("test", idx, tok.pad_id, word=word)
                lora_da.sequence_losses(model(b["tokens"]), b["targets"])
        model.train()
        return sum(losses) / len(losses)

    def now():
        return tasks.evaluate(models["now"], task, "test", tok, "cpu")["loss"]

    res = best_of({"before": before, "now": now}, rounds)
    assert abs(res["now"][1] - res["before"][1]) < 1e-5 * abs(res["before"][1]), res
    return {name: t for name, (t, _) in res.items()}


def statistics_pass(setup, cfg, rounds):
    """Seconds of LoRA-DA's init (statistics of 256 samples, then the solve), literal vs fast layers."""
    samples = setup.task.samples(cfg.init_samples, setup.tok.pad_id)
    init_cfg = train.init_config(cfg, 9, len(setup.task.train))

    def init(fast):
        def fn():
            m = llama.fast_paths(copy.deepcopy(setup.base), fast)
            llama.add_lora(m, r=cfg.rank, lora_alpha=cfg.lora_alpha, rslora=True)
            llama.fast_paths(m, fast)
            lora_da.initialize_da(m, samples, cfg=init_cfg)
            return {n: l.lora_B.detach().clone() @ l.lora_A.detach() for n, l in llama.lora_layers(m).items()}
        return fn

    res = best_of({"literal": init(False), "fast": init(True)}, rounds)
    err = max(float((res["fast"][1][n] - BA).norm() / BA.norm()) for n, BA in res["literal"][1].items())
    return {name: t for name, (t, _) in res.items()}, err


def losses_of(setup, cfg, steps, fast, groups, dtype=torch.float32):
    """The per-step losses of `steps` optimizer steps of the default run (its schedule, clipping, AdamW)."""
    model = lora_copy(setup, cfg, fast).to(dtype)
    with torch.no_grad():  # the run's own init: LoRA's B = 0
        for layer in llama.lora_layers(model).values():
            layer.lora_B.zero_()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = train.get_lr(step, cfg.lr, cfg.steps, int(cfg.warmup * cfg.steps))
        idx = train.batch_indices(step * cfg.batch_size, cfg.batch_size, 9, len(setup.task.train), {})
        loss, _ = train.backward_on_batch(model, setup.task, idx, setup.tok, "cpu", groups, 1 / cfg.batch_size)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses


def check_steps(setup, cfg, steps):
    """Fast vs literal layers over `steps` training steps, against what any reordering of the same float sums
    does (the literal layers with one more length group), and in fp64, where rounding cannot hide a difference:
    rows of (comparison, largest per-step loss difference, first step differing by 5e-5 or more)."""
    def compare(a, b):
        diffs = [abs(x - y) for x, y in zip(a, b)]
        return max(diffs), next((k + 1 for k, d in enumerate(diffs) if d >= 5e-5), None)
    g = cfg.length_groups
    literal = losses_of(setup, cfg, steps, False, g)
    fast = losses_of(setup, cfg, steps, True, g)
    regrouped = losses_of(setup, cfg, steps, False, g + 1)
    literal64 = losses_of(setup, cfg, steps, False, g, torch.float64)
    fast64 = losses_of(setup, cfg, steps, True, g, torch.float64)
    return [("fast vs literal layers, fp32", *compare(fast, literal)),
            (f"literal layers, {g + 1} vs {g} length groups, fp32 (float order alone)", *compare(regrouped, literal)),
            ("fast vs literal layers, fp64", *compare(fast64, literal64)),
            ("literal layers, fp32 vs fp64", *compare(literal, literal64))]


def compiled(setup, cfg, n_batches, rounds):
    """torch.compile (inductor, dynamic shapes for the length groups) against the same eager model: seconds of
    the first round (compiling) and tokens/s of both after it, alternating."""
    eager = lora_copy(setup, cfg, True)
    model = torch.compile(eager, dynamic=True)
    batches = [train.batch_indices(k * cfg.batch_size, cfg.batch_size, 9, len(setup.task.train), {})
               for k in range(n_batches)]

    def over(m):
        def fn():
            return sum(train.backward_on_batch(m, setup.task, idx, setup.tok, "cpu", cfg.length_groups, 1 / len(idx))[1]
                       for idx in batches)
        return fn
    t = time.perf_counter()
    over(model)()
    first = time.perf_counter() - t
    res = best_of({"compiled": over(model), "eager": over(eager)}, max(rounds, 1))
    return first, {k: n / sec for k, (sec, n) in res.items()}


def step_of(variant, setup, cfg, model, n_batches=4):
    """One round of a variant's step, for the profiler."""
    task, tok = setup.task, setup.tok
    for k in range(n_batches):
        idx = train.batch_indices(k * cfg.batch_size, cfg.batch_size, 9, len(task.train), {})
        if variant == "before":
            b = task.batch("train", idx, tok.pad_id)
            (lora_da.sequence_losses(model(b["tokens"]), b["targets"]).sum() / len(idx)).backward()
        else:
            train.backward_on_batch(model, task, idx, tok, "cpu", cfg.length_groups, 1 / len(idx))
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# against the limit: FLOPs a token counted from the shapes, the achieved rate, and torch's own matmul peak

WIDE = llama.ModelArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=3, vocab_size=4096, hidden_dim=1024, max_seq_len=256)


def matmul_peak(threads, n=2048, reps=10):
    """torch's fp32 n x n matmul rate at this thread count, GFLOP/s (the best of reps): the ceiling to compare with."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_token(args, r, T, scored_share, train=True):
    """A LoRA training step's FLOPs per token, from the shapes: the forward (every projection 2·d_in·d_out, its
    adapter 2·r·(d_in + d_out), causal attention 2·2·(T/2)·dim, the output layer 2·dim·V only at the scored share of
    positions), then the backward's activation gradients (the same products again: W0 is frozen, so no weight
    gradient but the adapters' 2·2·r·(d_in + d_out))."""
    hd = args.dim // args.n_heads
    kv = (args.n_kv_heads or args.n_heads) * hd
    shapes = [(args.dim, args.dim), (args.dim, kv), (args.dim, kv), (args.dim, args.dim),
              (args.dim, llama.ffn_hidden_dim(args)), (llama.ffn_hidden_dim(args), args.dim),
              (args.dim, llama.ffn_hidden_dim(args))]
    proj = sum(2 * i * o for i, o in shapes) * args.n_layers
    lora = sum(2 * r * (i + o) for i, o in shapes) * args.n_layers
    attn = 2 * 2 * (T / 2) * args.dim * args.n_layers
    out = 2 * args.dim * args.vocab_size * scored_share
    forward = proj + lora + attn + out
    return forward if not train else 2 * forward + 2 * lora  # activation gradients + the adapters' own


def limit_rows(name, threads, rounds, hf=False):
    """(training tok/s, evaluation tok/s, FLOPs/token, achieved GFLOP/s, share of the matmul peak) of one model."""
    torch.set_num_threads(threads)
    if name == "width-384":
        torch.manual_seed(0)
        base = llama.Transformer(WIDE)
        tokens = torch.randint(0, WIDE.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens, "targets": torch.roll(tokens, -1, 1)}
        model = copy.deepcopy(base)
        llama.add_lora(model, r=8, lora_alpha=16, rslora=True)
        llama.mark_only_lora_trainable(model)
        model.train()

        def step():
            lora_da.sequence_losses(model(batch["tokens"]), batch["targets"]).mean().backward()
            return tokens.numel()

        def evaluate():
            with torch.no_grad():
                model(batch["tokens"])
            return tokens.numel()
        args, T, share = WIDE, 256, 1.0
    else:
        cfg = train.get_args(["--model", name])
        setup = train.load(cfg, log=lambda *a: None)
        model = lora_copy(setup, cfg, True)
        task, tok = setup.task, setup.tok
        idx = train.batch_indices(0, cfg.batch_size, 9, len(task.train), {})

        def step():
            return train.backward_on_batch(model, task, idx, tok, "cpu", cfg.length_groups, 1 / len(idx))[1]

        def evaluate():
            with torch.no_grad():
                n = 0
                for k in range(0, len(idx), 16):
                    b = task.batch("train", idx[k:k + 16], tok.pad_id)
                    model(b["tokens"], at=b["targets"] != -100)
                    n += int(b["attention_mask"].sum())
            return n
        args = setup.base.args
        b = task.batch("train", idx, tok.pad_id)
        T = int(b["attention_mask"].sum(1).float().mean())
        share = float((b["targets"] != -100).sum() / b["attention_mask"].sum())
    res = best_of({"train": step, "eval": evaluate}, rounds)
    train_tps = res["train"][1] / res["train"][0]
    eval_tps = res["eval"][1] / res["eval"][0]
    f = flops_per_token(args, 8, T, share)
    out = {"train": train_tps, "eval": eval_tps, "flops": f, "gflops": f * train_tps / 1e9,
           "eval_gflops": flops_per_token(args, 8, T, share, train=False) * eval_tps / 1e9, "T": T}
    if hf and name in ("width-384", "smollm2-135M"):
        out["hf"] = hf_train_tps(args, T, threads, rounds)
    return out


def hf_train_tps(args, T, threads, rounds, batch=4):
    """Hugging Face transformers' LlamaForCausalLM (sdpa attention) at the same shapes, forward + backward with the
    base frozen and a trainable rank-8 adapter on every projection (peft's LoRA), full-vocabulary logits at every
    position and the loss over all of them: tokens/s. None where transformers or peft is not installed."""
    try:
        import transformers
        import peft
    except ImportError:
        return None
    torch.set_num_threads(threads)
    hcfg = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim,
                                    intermediate_size=llama.ffn_hidden_dim(args), num_hidden_layers=args.n_layers,
                                    num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                                    max_position_embeddings=max(T, 256), rms_norm_eps=args.norm_eps,
                                    rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings,
                                    attn_implementation="sdpa")
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(hcfg), peft.LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    tokens = torch.randint(0, args.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=tokens, labels=tokens).loss.backward()
        return tokens.numel()
    t, n = best_of({"hf": step}, rounds)["hf"]
    return n / t


def ours_full_logits_tps(args, T, threads, rounds, batch=4):
    """This project's model at the same shapes and the same work as hf_train_tps: logits at every position."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    llama.add_lora(model, r=8, lora_alpha=16, rslora=True)
    llama.mark_only_lora_trainable(model)
    model.train()
    tokens = torch.randint(0, args.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))

    def step():
        lora_da.sequence_losses(model(tokens), torch.roll(tokens, -1, 1)).mean().backward()
        return tokens.numel()
    t, n = best_of({"ours": step}, rounds)["ours"]
    return n / t


def limit(models, threads_list, rounds):
    print(f"\n== against the limit: torch {torch.__version__}, fp32, LoRA r=8 on all seven projections")
    for threads in threads_list:
        peak = matmul_peak(threads)
        print(f"\n-- {threads} thread(s): torch's 2048x2048 fp32 matmul peaks at {peak:.1f} GFLOP/s")
        print("| model | tokens/seq | train tok/s | FLOPs/token (train) | GFLOP/s | share of peak | eval tok/s | "
              "eval share of peak |")
        print("|---|---|---|---|---|---|---|---|")
        for name in models:
            r = limit_rows(name, threads, rounds)
            print(f"| {name} | {r['T']} | {r['train']:,.0f} | {r['flops'] / 1e6:,.1f} M | {r['gflops']:.1f} | "
                  f"{r['gflops'] / peak:.0%} | {r['eval']:,.0f} | {r['eval_gflops'] / peak:.0%} |")
        for name, args, T in (("width-384, FFN 1024", WIDE, 256),
                              ("SmolLM2-135M's shapes", llama.PRESETS["smollm2-135M"], 256)):
            hf = hf_train_tps(args, T, threads, rounds)
            ours = ours_full_logits_tps(args, T, threads, rounds)
            if hf is None:
                print(f"  {name}, 4 x {T} tokens, full logits: ours {ours:,.0f} tok/s; transformers + peft not "
                      f"installed, no comparison")
            else:
                print(f"  {name}, 4 x {T} tokens, full logits, one after the other: ours {ours:,.0f} tok/s, transformers + "
                      f"peft {hf:,.0f} tok/s: {ours / hf:.2f}x")


def init_rows(name, threads, authors):
    """LoRA-DA's init of 256 samples as `train.py --init da --init-only` runs it, in its own process (so the
    peak resident memory is the init's alone): the statistics pass, the solve, each stage's peak, and the
    --dry-run plan beside them. authors: also the per-sample loop (--stats-batch-size 1, the authors' released
    estimator feeds one sample per backward pass; the same numbers up to float order)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    plan = subprocess.run([sys.executable, "train.py", "--model", name, "--init", "da", "--init-only", "--dry-run"],
                          cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    planned = {k: float(line.split()[-2]) for line in plan.splitlines() for k in ("statistics", "solve")
               if line.strip().startswith(f"peak, {k}")}
    rows = []
    for label, batch in (("this project (16 samples per pass)", "16"),) + ((("the authors' loop (1 sample per "
                                                                             "pass)", "1"),) if authors else ()):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "train.py", "--model", name, "--init", "da", "--init-only",
                            "--stats-batch-size", batch, "--out-dir", tmp], cwd=root, env=env, check=True,
                           capture_output=True, text=True)
            m = json.loads((Path(tmp) / "metrics.json").read_text())
        sec = m["init_report"]["seconds"]
        rows.append((label, sec["statistics"], sec["solve"], m["peak_memory_gib"]))
    return rows, planned


def init_table(models, threads_list, authors):
    print(f"\n== LoRA-DA's init (256 SST-2 samples, r = 8, all seven projections), torch {torch.__version__}, "
          f"each run in its own process")
    print("| model | threads | statistics pass | statistics s | solve s | total s | peak statistics GiB | "
          "peak solve GiB | --dry-run plan (statistics / solve) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        for threads in threads_list:
            rows, planned = init_rows(name, threads, authors)
            for label, stat, solve, peak in rows:
                print(f"| {name} | {threads} | {label} | {stat:.1f} | {solve:.1f} | {stat + solve:.1f} | "
                      f"{peak.get('statistics', float('nan')):.2f} | {peak.get('solve', float('nan')):.2f} | "
                      f"{planned.get('statistics', float('nan')):.2f} / {planned.get('solve', float('nan')):.2f} |",
                      flush=True)
            if len(rows) == 2:
                print(f"|  |  | this project / the authors' loop |  |  | {sum(rows[0][1:3]) / sum(rows[1][1:3]):.2f}x"
                      f" |  |  |  |")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(llama.MODELS) + ["width-384"], action="append",
                   help="which real model (repeatable; default: both)")
    p.add_argument("--threads", type=cli.Number(int, 1, 256, "a positive integer"), action="append",
                   help="torch threads (repeatable; default: 1 and 2)")
    p.add_argument("--batches", type=cli.Number(int, 1, 10 ** 4, "a positive integer"), default=12,
                   help="training batches of 32 per timed round (default: 12)")
    p.add_argument("--rounds", type=cli.Number(int, 0, 1000, "an integer in [0, 1000]"), default=3,
                   help="timed rounds per variant (default: 3; 0: no timing)")
    p.add_argument("--top", type=cli.Number(int, 1, 1000, "a positive integer"), default=10,
                   help="rows of the profiler's table (default: 10)")
    p.add_argument("--check-steps", type=cli.Number(int, 0, 10 ** 5, ">= 0 (0: off)"), default=0,
                   help="also train this many steps with fast and literal layers and compare the losses")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (about a minute per model)")
    p.add_argument("--limit", action="store_true", help="only the table against the matmul peak: stories260K, "
                   "babyllama936K, a width-384 model and SmolLM2-135M, and transformers where it is installed")
    p.add_argument("--init", action="store_true", help="only LoRA-DA's init (statistics, solve, peak memory, the "
                   "dry-run plan), each in its own process; default models: all three real ones")
    p.add_argument("--authors", action="store_true", help="with --init: also the authors' one-sample-per-pass loop")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    cli.boundary(lambda: bench_main(args))


def bench_main(args):
    if args.init:
        init_table(args.model or ["stories260K", "babyllama936K", "smollm2-135M"], args.threads or [1, 2], args.authors)
        return
    if args.limit:
        limit(args.model or ["stories260K", "babyllama936K", "width-384", "smollm2-135M"], args.threads or [1, 2],
              max(args.rounds, 1))
        return
    for name in args.model or ["stories260K", "babyllama936K"]:
        cfg = train.get_args(["--model", name])
        setup = train.load(cfg, log=lambda *a: None)
        task = setup.task
        mean_len = sum(task.length("train", i) + 1 for i in range(len(task.train))) / len(task.train)
        print(f"\n== {name}: SST-2 (mean {mean_len:.0f} tokens per training example, cut to {task.max_len}), "
              f"batch {cfg.batch_size} in {cfg.length_groups} length groups, torch {torch.__version__}")
        models = {"before": lora_copy(setup, cfg, False), "groups": lora_copy(setup, cfg, False),
                  "now": lora_copy(setup, cfg, True)}
        for threads in (args.threads or [1, 2]) if args.rounds > 0 else ():
            torch.set_num_threads(threads)
            tps = training_steps(setup, cfg, models, args.batches, args.rounds)
            opt = optimizer_share(models["now"], cfg, args.rounds)
            ev = evaluation(setup, models, args.rounds)
            print(f"\n-- {threads} thread(s)")
            rows = [(f"training step, {k}", f"{v:,.0f} tok/s", f"{v / tps['before']:.2f}x") for k, v in tps.items()]
            rows.append(("clip + AdamW + zero_grad per step", f"{opt * 1e3:.1f} ms", ""))
            rows.append(("evaluation of the 872 dev sentences, before (padded, file order, literal)",
                         f"{ev['before']:.2f} s", "1.00x"))
            rows.append(("evaluation, now (length order, logits where read, fast paths)", f"{ev['now']:.2f} s",
                         f"{ev['before'] / ev['now']:.2f}x"))
            if threads == (args.threads or [1, 2])[-1]:
                init, err = statistics_pass(setup, cfg, 1)
                rows.append(("LoRA-DA init (256 samples), literal layers", f"{init['literal']:.2f} s", "1.00x"))
                rows.append((f"LoRA-DA init, fast paths (B·A within {err:.0e} of literal)", f"{init['fast']:.2f} s",
                             f"{init['literal'] / init['fast']:.2f}x"))
            w = max(len(r[0]) for r in rows)
            for label, value, speed in rows:
                print(f"  {label:<{w}}  {value:>14}  {speed:>6}")
            for variant in ("before", "now"):
                table = profile_table(lambda: step_of(variant, setup, cfg, models[variant]), args.top)
                print(f"  where a step's time goes, {variant} (torch.profiler, self CPU time):")
                for op, share, calls in table:
                    print(f"    {share:6.1%}  {calls:6d} calls  {op[:70]}")
        torch.set_num_threads((args.threads or [1, 2])[-1])
        if args.check_steps:
            print(f"\n  {args.check_steps} optimizer steps of the default run, per-step training losses compared:")
            for label, diff, first in check_steps(setup, cfg, args.check_steps):
                print(f"    {label:<66} largest difference {diff:.1e}, "
                      + (f"first at 5e-5 or more: step {first}" if first else "all steps within 5e-5"))
        if args.compile:
            first, tps = compiled(setup, cfg, args.batches, args.rounds)
            print(f"\n  torch.compile (inductor, dynamic), {torch.get_num_threads()} thread(s): first {args.batches} "
                  f"batches {first:.1f} s (compiling), then {tps['compiled']:,.0f} tok/s against {tps['eager']:,.0f} "
                  f"eager ({tps['compiled'] / tps['eager']:.2f}x)")


if __name__ == "__main__":
    main()
