"""
Memory: the plan of --dry-run (arithmetic on the shapes, nothing allocated) and the measured peak of each
stage of a run (PeakMemory). Apart from train.py because both speak of the same stages and are checked
against each other (studies/shapes7b.py measures a run of LLaMA-2-7B's shapes against the plan), and
neither is needed to read the training loop.
"""
from pathlib import Path

import torch

import llama
import tasks

def dry_run(cfg, args: llama.ModelArgs, device):
    with torch.device("meta"):
        model = llama.Transformer(args)
    n_params = model.num_params()
    bytes_w = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.dtype]
    targets = [t.strip() for t in cfg.targets.split(",")]
    valid = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"output"})
    if not targets or set(targets) - set(valid):  # the run would refuse them: so does its plan
        raise ValueError(f"--targets {cfg.targets!r}: unknown LoRA target modules {sorted(set(targets) - set(valid))}; "
                         f"valid: {', '.join(valid)}")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    per_block = [s for n, s in shapes.items() if n.startswith("layers.0.")]
    blocks = cfg.layers_per_pass or args.n_layers
    G = sum(o * i for o, i in per_block) * blocks * 4
    shared = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "w1": "ffn_in", "w3": "ffn_in"}
    z_dims = {shared.get(n.rsplit(".", 1)[-1], n): s[1] for n, s in shapes.items() if n.startswith("layers.0.")}
    Z = sum(d * d for d in z_dims.values()) * blocks * 4
    Y = sum((o * o if cfg.y_full else o) for o, _ in per_block) * blocks * 4
    # fp64, one layer at a time: Z's Cholesky factor, M, and eigh's eigenvectors and workspace (2 d_in²)
    M = max(i for _, i in per_block) ** 2 * 8 * 5
    temp = max(o * i + i * i for o, i in per_block) * 4  # the statistics pass's largest per-layer temporaries
    # what the process holds besides tensors (torch, tokenizer, data): on CPU its resident set, measured
    # here now that torch is loaded; on CUDA the counters see tensors only
    runtime = 0 if str(device).startswith("cuda") else _rss_bytes()
    r = cfg.rank
    lora = sum(r * (o + i) for o, i in shapes.values())
    T = tasks.sequence_length(cfg, args.vocab_size, args.max_seq_len)  # the run's longest batch
    B = cfg.batch_size
    hidden = llama.ffn_hidden_dim(args)
    # activations kept for backward per block: ~ norms, q/k/v/o, attention out, SwiGLU (3 × hidden), residuals
    act = B * T * (10 * args.dim + 4 * hidden) * bytes_w * args.n_layers + B * T * args.vocab_size * 4 * 2
    rows = [("parameters", f"{n_params:,}"), ("weights", gib(n_params * bytes_w)),
            ("runtime: this process with torch loaded (CPU resident set, measured)", gib(runtime)),
            (f"G, {blocks} blocks per pass (fp32)", gib(G)), (f"Z + Y, {blocks} blocks per pass (fp32)", gib(Z + Y)),
            ("eigenproblem, one layer (fp64: factor, M, eigenvectors, workspace)", gib(M)),
            (f"LoRA r={r} + AdamW state (fp32: param, grad, 2 moments)", gib(lora * 4 * 4)),
            (f"activations, batch {B} x {T} tokens (estimate)", gib(act)),
            (f"peak, statistics pass ({cfg.stats_batch_size} samples per pass)",
             gib(runtime + n_params * bytes_w + G + Z + Y + temp + act * cfg.stats_batch_size // B)),
            ("peak, solve", gib(runtime + n_params * bytes_w + G + Z + Y + M)),
            ("peak, training", gib(runtime + n_params * bytes_w + lora * 16 + act))]
    print(f"dry run: {cfg.checkpoint or cfg.model} on {device}, dtype {cfg.dtype}, {len(shapes)} LoRA layers")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v:>14}")
    print("  checked: the three peaks against the measured peak memory of LLaMA-2-7B's shapes at 1 block on CPU "
          "(measured: 0.98x, 1.13x, 1.15x the plan; studies/shapes7b.py); the activations row only at 2 x 64 tokens")
    return dict(rows)


def _rss_bytes():
    """This process's resident set in bytes (Linux), else 0."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def gib(nbytes):
    return f"{nbytes / 2 ** 30:.3f} GiB"


class PeakMemory:
    """Peak memory of each stage of a run (statistics pass, solve, training), in GiB, for metrics.json and the
    check of --dry-run's plan. On CUDA: the peak of allocated tensors (torch's counter). On Linux CPU: the
    process's peak resident set (VmHWM, reset between stages through /proc/self/clear_refs), which also
    counts torch's runtime and the data. Elsewhere: nothing is recorded."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.ok = self.cuda or Path("/proc/self/clear_refs").exists()
        self.peaks, self.held, self.current = {}, {}, None

    def _reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.ok = False

    def _read(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 30
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20  # kB
        return 0.0

    def stage(self, name):
        """`name` begins now (None: the last one ended); a stage met several times (one pass per group of
        blocks) keeps its largest peak."""
        if not self.ok:
            return
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), round(self._read(), 3))
        self._reset()
        if name is not None and name not in self.held:
            self.held[name] = round(self._read(), 3)  # right after the reset: what the stage starts from
        self.current = name
