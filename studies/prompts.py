"""
The SST-2 prompt of an instruct model, chosen on the validation split (never the test split): the zero-shot
accuracy of each prompt style of tasks.SST2_PROMPTS on 1,000 sentences held out of SST-2's training set
(train.py's --val-size draw), then the chosen style's accuracy on the test split (dev.tsv), reported once.

    python studies/prompts.py                       # SmolLM2-135M: about 10 minutes on one core; resumable
    python studies/prompts.py --aggregate           # rebuild table.md from the JSONs

One JSON per (model, style, split) under studies/results/prompts/; a finished one is skipped.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core beside this folder
import checkpoints  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "prompts"
STYLES = tuple(tasks.SST2_PROMPTS)


def measure(model_name, style, split, setup_cache):
    path = OUT / f"{model_name}-{style}-{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    args = ["--model", model_name, "--sst2-prompt", style, "--val-size", "1000"]
    args += ["--no-test-eval"] if split == "val" else []
    cfg = train.get_args(args)
    if model_name not in setup_cache:
        setup_cache[model_name] = train.load(cfg, log=print)
    setup = setup_cache[model_name]
    task = tasks.Task(cfg, setup.tok, setup.data_dir, setup.base.args.max_seq_len)
    t = time.perf_counter()
    ev = tasks.evaluate(setup.base, task, split, setup.tok, setup.device)
    row = {"model": model_name, "style": style, "split": split, "prompt": tasks.SST2_PROMPTS[style][0],
           "words": list(tasks.SST2_PROMPTS[style][1]), "n": len(getattr(task, split)), **ev,
           "seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}
    checkpoints.atomic_write_text(path, json.dumps(row, indent=2))
    print(f"{model_name} {style} {split}: accuracy {ev['accuracy']:.4f} ({row['n']} sentences, {row['seconds']:.0f}s)")
    return row


def table(rows):
    lines = ["# The SST-2 prompt of SmolLM2-135M-Instruct, chosen on the validation split", "",
             "Zero-shot accuracy; the label word with the higher log-probability wins (first tokens: both words are "
             "one token). Validation: 1,000 sentences held out of SST-2's training set (seed 12345); the test split "
             "(dev.tsv, 872) is read only for the chosen style.", "",
             "| model | style | prompt | words | validation accuracy | predicted positive | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    test = {(r["model"], r["style"]): r for r in rows if r["split"] == "test"}
    for r in sorted((r for r in rows if r["split"] == "val"), key=lambda r: (r["model"], -r["accuracy"])):
        t = test.get((r["model"], r["style"]))
        test_acc = f"{100 * t['accuracy']:.2f}" if t else "(not read)"
        lines.append(f"| {r['model']} | {r['style']} | `{r['prompt']!r}` | {' / '.join(map(repr, r['words']))} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['predicted_positive']:.1f}% | {test_acc} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135M")
    p.add_argument("--aggregate", action="store_true", help="only rebuild table.md from the committed JSONs")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if not a.aggregate:
        cache = {}
        val = [measure(a.model, s, "val", cache) for s in STYLES]
        best = max(val, key=lambda r: r["accuracy"])
        measure(a.model, best["style"], "test", cache)
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    checkpoints.atomic_write_text(OUT / "table.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
