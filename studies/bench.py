"""
Where a default run's time goes, before and after the throughput work; prints a table.

    python studies/bench.py                 # 2 threads (the CI machine), about a minute
    python studies/bench.py --threads 1     # as studies/experiments.py runs each job
    python studies/bench.py --model babyllama936K   # the second real model: width 128, ~3x longer sequences
    python studies/shapes7b.py                      # LLaMA-2-7B's shapes: memory per stage, the eigensolvers at 4,096/11,008

"before" is the straightforward form, kept here as the reference: every micro-batch padded to its
longest sequence, logits over the whole vocabulary at every position, evaluation in file order.
"after" is what train.py runs: batches cut into length groups, logits only where a loss or a prediction
reads them, evaluation in length order. Both compute the same numbers (checked below, to float rounding).
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core beside this folder
import llama  # noqa: E402
import lora_da  # noqa: E402
import train  # noqa: E402


def timed(fn, repeat):
    fn()  # warm up
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t) / repeat, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--steps", type=int, default=20, help="training steps timed per variant (default: 20)")
    p.add_argument("--model", default="stories260K", choices=sorted(llama.MODELS), help="which real model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = train.get_args(["--model", args.model])
    setup = train.load(cfg, log=lambda *a: None)
    tok, task = setup.tok, setup.task
    model = copy.deepcopy(setup.base)
    llama.add_lora(model, r=cfg.rank, lora_alpha=cfg.lora_alpha, rslora=True)
    lora_da.initialize(model, "lora", cfg=train.init_config(cfg, 9, len(task.train)))
    llama.mark_only_lora_trainable(model)
    model.train()
    batches = [train.batch_indices(k * cfg.batch_size, cfg.batch_size, 9, len(task.train), {}) for k in range(args.steps)]
    rows = []

    # 1. a training step (forward + backward of one 32-sequence batch), tokens/s over real tokens
    def step_before():
        loss, tokens = 0.0, 0
        for idx in batches:
            b = task.batch("train", idx, tok.pad_id)
            out = lora_da.sequence_losses(model(b["tokens"]), b["targets"]).mean()
            out.backward()
            loss, tokens = loss + out.item(), tokens + int(b["attention_mask"].sum())
        return loss, tokens

    def step_after(groups):
        def fn():
            loss, tokens = 0.0, 0
            for idx in batches:
                out, n = train.backward_on_batch(model, task, idx, tok, "cpu", groups, 1 / len(idx))
                loss, tokens = loss + out, tokens + n
            return loss, tokens
        return fn

    t0, (l0, n0) = timed(step_before, 1)
    rows.append(("training step, before (padded, full logits)", f"{n0 / t0:,.0f} tok/s", "1.00x"))
    for groups in (1, 2, 3, 4, 8):  # train.py default: 3
        t1, (l1, n1) = timed(step_after(groups), 1)
        assert abs(l1 - l0) < 1e-4 * abs(l0) and n1 == n0, (l0, l1)
        rows.append((f"training step, after ({groups} length group{'s' if groups > 1 else ''}, scored logits)",
                     f"{n1 / t1:,.0f} tok/s", f"{t0 / t1:.2f}x"))
    model.zero_grad(set_to_none=True)

    # 2. evaluation of the 872 dev sentences
    @torch.no_grad()
    def eval_before():
        model.eval()
        losses = []
        for i in range(0, len(task.test), 64):
            b = task.batch("test", range(i, min(i + 64, len(task.test))), tok.pad_id)
            losses += lora_da.sequence_losses(model(b["tokens"]), b["targets"]).tolist()
        model.train()
        return sum(losses) / len(losses)

    te0, loss0 = timed(eval_before, 2)
    te1, ev = timed(lambda: train.evaluate(model, task, "test", tok, "cpu"), 2)
    assert abs(ev["loss"] - loss0) < 1e-5
    rows.append(("evaluation of 872 dev sentences, before", f"{te0:.3f} s", "1.00x"))
    rows.append(("evaluation of 872 dev sentences, after (length order, logits where read)", f"{te1:.3f} s",
                 f"{te0 / te1:.2f}x"))

    # 3. the initializations, on the 256 head samples of the training set
    samples = task.samples(cfg.init_samples, tok.pad_id)
    padded = sum(s["tokens"].numel() for s in samples)
    real = sum(int(s["attention_mask"].sum()) for s in samples)
    rows.append(("init samples: real tokens / padded positions", f"{real:,} / {padded:,}", ""))
    for method, batch in [("lora", 16), ("pissa", 16), ("ga", 16), ("one", 16), ("da", 16), ("da", 1)]:
        m = copy.deepcopy(setup.base)
        llama.add_lora(m, r=cfg.rank, lora_alpha=cfg.lora_alpha, rslora=True)
        init_cfg = train.init_config(train.get_args(["--model", args.model, "--stats-batch-size", str(batch)]), 9,
                                     len(task.train))
        t = time.perf_counter()
        rep = lora_da.initialize(m, method, samples, cfg=init_cfg)
        what = "per-sample loop" if batch == 1 else f"batch {batch}"
        rows.append((f"init {method} ({rep.get('samples', 0)} samples, {what})", f"{time.perf_counter() - t:.2f} s", ""))

    w = max(len(r[0]) for r in rows)
    tokens = sum(task.length("train", i) + 1 for i in range(len(task.train))) / len(task.train)
    print(f"bench: {args.model}, SST-2 (mean {tokens:.0f} tokens per training example, cut to {task.max_len}), "
          f"batch {cfg.batch_size}, {args.threads} thread(s), torch {torch.__version__}")
    for name, value, speed in rows:
        print(f"  {name:<{w}}  {value:>18}  {speed:>6}")


if __name__ == "__main__":
    main()
