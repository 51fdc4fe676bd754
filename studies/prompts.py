"""
The SST-2 and GSM8K prompts of an instruct model, chosen on the validation split (never the test split).
SST-2: the zero-shot accuracy of each style of tasks.SST2_PROMPTS on 1,000 sentences held out of SST-2's
training set (train.py's --val-size draw). GSM8K: the mean loss per token of the reference solutions under
each style of tasks.GSM8K_PROMPTS on 200 problems held out of GSM8K's training set (exact match is not the
criterion: at 135M parameters it is a few percent, too coarse on a small split to choose by, and greedy
decoding is the slow part; GSM8K_DECODED > 0 adds it). Then the chosen style on the test split, reported once.

    python studies/prompts.py                       # SmolLM2-135M: about 15 minutes on one core; resumable
    python studies/prompts.py --aggregate           # rebuild table.md from the JSONs

One JSON per (model, task, style, split) under studies/results/prompts/; a finished one is skipped.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core beside this folder
import checkpoints  # noqa: E402
import cli  # noqa: E402
import llama  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "prompts"
STYLES = tuple(tasks.SST2_PROMPTS)


GSM8K_VAL, GSM8K_DECODED = 200, 0  # exact match off: greedy decoding at 1 CPU thread is the slow part


def measure(model_name, style, split, setup_cache, task_name="sst2"):
    sst2 = task_name == "sst2"
    path = OUT / (f"{model_name}-{style}-{split}.json" if sst2 else f"{model_name}-gsm8k-{style}-{split}.json")
    if path.is_file():
        return json.loads(path.read_text())
    if sst2:
        args = ["--model", model_name, "--sst2-prompt", style, "--val-size", "1000"]
    else:
        args = ["--model", model_name, "--task", "gsm8k", "--gsm8k-prompt", style, "--val-size", str(GSM8K_VAL)]
    args += ["--no-test-eval"] if split == "val" else []
    cfg = train.get_args(args)
    if model_name not in setup_cache:
        setup_cache[model_name] = train.load(cfg, log=print)
    setup = setup_cache[model_name]
    task = tasks.Task(cfg, setup.tok, setup.data_dir, setup.base.args.max_seq_len)
    t = time.perf_counter()
    ev = tasks.evaluate(setup.base, task, split, setup.tok, setup.device,
                        **({} if sst2 else {"decode_limit": GSM8K_DECODED, "batch_size": 16}))
    row = {"model": model_name, "task": task_name, "style": style, "split": split, **task.prompt_record,
           "n": len(getattr(task, split)), **ev, "seconds": time.perf_counter() - t,
           "threads": torch.get_num_threads()}
    checkpoints.atomic_write_text(path, json.dumps(row, indent=2))
    acc = "not decoded" if ev["accuracy"] is None else f"{ev['accuracy']:.4f}"
    print(f"{model_name} {task_name} {style} {split}: accuracy {acc}, loss {ev['loss']:.4f} "
          f"({row['n']} examples, {row['seconds']:.0f}s)")
    return row


def table(rows):
    lines = ["# The SST-2 and GSM8K prompts of SmolLM2-135M-Instruct, chosen on the validation split", "",
             "## SST-2", "",
             "Zero-shot accuracy; the label word with the higher log-probability wins (first tokens: both words are "
             "one token). Validation: 1,000 sentences held out of SST-2's training set (seed 12345); the test split "
             "(dev.tsv, 872) is read only for the chosen style.", "",
             "| model | style | prompt | words | validation accuracy | predicted positive | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    sst2 = [r for r in rows if r.get("task", "sst2") == "sst2"]
    test = {(r["model"], r["style"]): r for r in sst2 if r["split"] == "test"}
    for r in sorted((r for r in sst2 if r["split"] == "val"), key=lambda r: (r["model"], -r["accuracy"])):
        t = test.get((r["model"], r["style"]))
        test_acc = f"{100 * t['accuracy']:.2f}" if t else "(not read)"
        lines.append(f"| {r['model']} | {r['style']} | `{r['prompt']!r}` | {' / '.join(map(repr, r['words']))} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['predicted_positive']:.1f}% | {test_acc} |")
    gsm = [r for r in rows if r.get("task") == "gsm8k"]
    if gsm:
        lines += ["", "## GSM8K", "",
                  f"Chosen by the mean loss per token of the reference solutions on {GSM8K_VAL} problems held out of "
                  f"GSM8K's training set (seed 12345), lower is better; greedy exact match of the final number beside "
                  f"it where decoded. The test split (test.jsonl) is read only for the chosen style (its first 50 "
                  f"problems, as train.py's default --eval-limit).", "",
                  "| model | style | prompt | validation loss | validation exact match | test loss | test exact match |",
                  "|---|---|---|---|---|---|---|"]
        test = {(r["model"], r["style"]): r for r in gsm if r["split"] == "test"}
        for r in sorted((r for r in gsm if r["split"] == "val"), key=lambda r: (r["model"], r["loss"])):
            t = test.get((r["model"], r["style"]))
            def em(x):
                return "not decoded" if x.get("accuracy") is None else f"{x['accuracy'] * x['decoded']:.0f}/{x['decoded']}"
            tt = f"{t['loss']:.4f} | {em(t)}" if t else "(not read) | (not read)"
            lines.append(f"| {r['model']} | {r['style']} | `{r['prompt']!r}` | {r['loss']:.4f} | {em(r)} | {tt} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135M", choices=sorted(llama.MODELS), help="which real model")
    p.add_argument("--aggregate", action="store_true", help="only rebuild table.md from the committed JSONs")
    p.add_argument("--threads", type=cli.Number(int, 1, 256, "a positive integer"), default=1, help="torch threads")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    cli.boundary(lambda: prompts_main(a))


def prompts_main(a):
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if not a.aggregate:
        cache = {}
        val = [measure(a.model, s, "val", cache) for s in STYLES]
        best = max(val, key=lambda r: r["accuracy"])
        measure(a.model, best["style"], "test", cache)
        val = [measure(a.model, s, "val", cache, "gsm8k") for s in tasks.GSM8K_PROMPTS]
        best = min(val, key=lambda r: r["loss"])
        measure(a.model, best["style"], "test", cache, "gsm8k")
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    checkpoints.atomic_write_text(OUT / "table.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
