"""
Fine-tune a real LLaMA with LoRA, initialized by LoRA-DA or one of its peers, and compare them.

    python train.py --init da                                   # stories260K on SST-2, minutes on a laptop CPU
    python train.py --init lora,pissa,ga,one,da --seeds 3       # side by side: compare.md, compare.png
    python train.py --task gsm8k --init da                      # the paper's headline NLG task
    python train.py --checkpoint llama2-7b --dry-run            # memory of each stage, nothing allocated
    python train.py --checkpoint /models/llama-2-7b --tokenizer /models/tokenizer.model \\
        --dtype bf16 --device cuda --layers-per-pass 8 --lr 2e-4 --init da          # one GPU

Reads the real data from --data-dir, $LORA_DA_DATA, ./data or ../shared/data (see GUIDE.md).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import bpe
import checkpoints
import cli
import llama
import lora_da
import peers
from memory import PeakMemory, dry_run
from plots import compare, plot_loss
from tasks import GSM8K_PROMPTS, SST2_PROMPTS, TASK_FILES, Task, UsageError, accuracy, evaluate, find_data, read_init_data

DA, PEER = lora_da.DAConfig(), peers.PeerConfig()  # the initialization defaults

# -----------------------------------------------------------------------------
# settings: one grouped block of defaults; argparse is built from it, so `python train.py --init da` just works.
# Where a tiny model needs something else than the LoRA-DA paper's 7B runs, the comment says so.

SETTINGS = {
    "method": {
        "init": ("da", "initialization(s): " + ", ".join(peers.METHODS) + "; a comma list, or all"),
        "seeds": (1, "run each method with this many seeds (seed, seed+1, ...) and write compare.md"),
        "seed": (9, "random seed (the authors' runs use 9)"),
    },
    "model": {
        "model": ("stories260K", "a real pretrained model by name, read from the data folder: stories260K (width 64, "
                                 "BPE), babyllama936K (width 128, characters) or smollm2-135M (width 576, 30 blocks, "
                                 "GGUF, reads English)"),
        "checkpoint": (None, "llama2.c .bin, Meta or HF folder, or a preset (llama2-7b) for --dry-run; "
                             "default: --model's"),
        "tokenizer": (None, "sentencepiece .model, GGUF file or tokenizer.json; default: --model's"),
        "device": ("auto", "cpu, cuda, cuda:N, or auto (cuda when there is one)"),
        "dtype": ("fp32", "base weights dtype: fp32, bf16 or fp16 (LoRA and all statistics stay fp32)"),
    },
    "data": {
        "task": ("sst2", "sst2 (GLUE SST-2, accuracy on dev.tsv) or gsm8k (exact match of the final number)"),
        "sst2_prompt": ("auto", "SST-2 as a continuation: story (the tiny models' prompt, ' sad'/' happy'), review "
                                "('Sentiment:', ' negative'/' positive') or question; auto: review for a BPE "
                                "instruct model (SmolLM2), story otherwise"),
        "data_dir": (None, "folder with stories260K/, sst2/, gsm8k/ (else $LORA_DA_DATA, ./data, ../shared/data)"),
        "download": (False, "download missing data files from their canonical homes and check sha256"),
        "max_len": (0, "longest sequence in tokens, prompts truncated from the left (0: 128 for sst2 with a BPE "
                       "tokenizer; the model's context for gsm8k or a character tokenizer)"),
        "train_limit": (0, "use only the first N training examples (0: all)"),
        "val_size": (0, "hold out this many training examples (a seeded draw, never trained on) as a validation set"),
        "train_size": (0, "train on only the first N training examples left after the validation split (0: all; "
                           "data scarcity: the same step budget becomes several epochs)"),
        "test_eval": (True, "evaluate on the test split (dev.tsv for sst2); --no-test-eval never reads it "
                            "(model selection)"),
        "eval_limit": (0, "evaluate on the first N test examples (0: all 872 for sst2, 50 for gsm8k)"),
        "decode_limit": (-1, "gsm8k: greedy-decode only the first N problems of each split for exact match, the slow "
                             "part of an evaluation (-1: all; 0: none, loss only); the loss always uses all"),
    },
    "lora": {
        "rank": (8, "LoRA rank r (paper: 8)"),
        "lora_alpha": (16.0, "LoRA alpha (paper: 16)"),
        "rslora": (True, "scale by alpha/sqrt(r) (rsLoRA, paper: on) instead of alpha/r"),
        "targets": ("wq,wk,wv,wo,w1,w2,w3", "comma list of target modules (paper: all seven projections)"),
        "dropout": (0.0, "LoRA dropout (paper: 0)"),
        "freeze_A": (False, "freeze A and train B only (LoRA-FA, the setting of the LoRA-DA theory)"),
        "a_lr_scale": (1.0, "control: A's learning rate is --lr times this (B's is --lr). AdamW moves each entry by "
                            "about the rate whatever its size, so an A initialized k times smaller than LoRA's moves "
                            "k times faster relative to itself; --a-lr-scale k undoes that (theory.md §12)"),
    },
    "init": {  # defaults from lora_da.DAConfig and peers.PeerConfig, the one place they are set
        "init_samples": (256, "target samples for the init statistics (paper: 256, the head of the train set)"),
        "alpha": (DA.alpha, "LoRA-DA alpha, weight of the bias term (paper: 1)"),
        "beta": (DA.beta, "LoRA-DA beta, weight of the variance term (paper: 0.03)"),
        "gamma": (DA.gamma, "LoRA-DA gamma: B A = dW A0 A0^T / gamma (paper: 1024)"),
        "damping": (DA.damping, "LoRA-DA damping lambda on Z and Y (paper: 1e-6)"),
        "N": (DA.N, "LoRA-DA N in the variance term (0: the training set size, as the paper)"),
        "normalize": (DA.normalize, "divide dW by its largest singular value (paper's code: on)"),
        "token_mask": (DA.token_mask, "tokens counted in Z and Y: all non-padding (paper) or labels"),
        "y_full": (DA.y_full, "full output factor Y instead of its diagonal (paper: diagonal)"),
        "stats_batch_size": (DA.stats_batch_size, "samples per statistics pass (1: the explicit per-sample loop; "
                                                  "same numbers)"),
        "layers_per_pass": (DA.layers_per_pass, "transformer blocks per statistics pass, bounds memory on 7B "
                                                "(paper: 8; 0: all)"),
        "solver": (DA.solver, "eigensolver for A0: eigh (dense, exact: the default at every width) or lobpcg "
                              "(2.4x faster at d_in 11,008, but on few-token statistics it can end in a slightly "
                              "worse subspace: studies/results/shapes7b)"),
        "relative_damping": (DA.relative_damping, "k > 0: damp each factor by its own scale, lambda_Z = k tr(Z)/d_in "
                                                  "and lambda_Y = k mean(Y), instead of --damping (K-FAC practice)"),
        "direction": (DA.direction, "control: LoRA-DA's A0 from Eq. 10 (da), LoRA's random rows (random) or the "
                                    "gradient's top-r right singular vectors (gradient); the same dW"),
        "a_scale": (DA.a_scale, "control: rows of A of norm 1/sqrt(gamma) (da) or 1/sqrt(3), LoRA's (lora)"),
        "step": (DA.step, "LoRA-DA's initial step B A = dW A0 A0^T/gamma (--no-step: B = 0, the model unchanged)"),
        "shuffle_labels": (False, "control: LoRA-DA's statistics from the same init samples with their answers "
                                  "permuted among them (does the init encode the task, or the answer format?)"),
        "ga_gamma": (PEER.ga_gamma, "LoRA-GA gamma (its official code: 16)"),
        "ga_samples": (PEER.ga_samples, "LoRA-GA gradient samples (its reproduce config: 8; its example: 128)"),
        "one_gamma": (PEER.one_gamma, "LoRA-One gamma (its paper: 128)"),
        "one_samples": (PEER.one_samples, "LoRA-One gradient samples (its paper: 8)"),
        "eva_token_mask": (PEER.eva_token_mask, "EVA's PCA inputs: labels (PEFT's use_label_mask: the scored "
                                              "positions) or all non-padding tokens"),
        "eva_rho": (PEER.eva_rho, "EVA rho: components per layer offered to its rank redistribution (reported; "
                                "the rank stays r)"),
    },
    "optim": {
        "lr": (2e-3, "peak learning rate of AdamW (paper: 2e-4 on 7B; a 260K model needs a larger one)"),
        "steps": (900, "optimizer steps (paper: 1 epoch of 100k; here a budget that fits minutes on a CPU)"),
        "batch_size": (32, "sequences per micro-batch (paper: 8)"),
        "grad_accum": (1, "micro-batches per step (paper: 4, for an effective 32)"),
        "length_groups": (3, "split each micro-batch into this many groups of similar length, each padded to its own "
                             "longest: the same batch and gradient, less padding (1: off)"),
        "warmup": (0.03, "warmup fraction of the steps (paper: 0.03), then cosine decay to 0"),
        "weight_decay": (0.0, "AdamW weight decay (paper: 0)"),
        "grad_clip": (1.0, "clip the gradient norm to this (0: off)"),
    },
    "io": {
        "out_dir": ("out", "output folder: config.json, metrics.json, adapter.pt, loss.png, ckpt.pt"),
        "eval_interval": (150, "evaluate every N steps (0: only at step 0 and at the end)"),
        "zero_shot": (True, "evaluate the base model before the init (--no-zero-shot: skip it, the same for every run "
                            "of a study)"),
        "log_interval": (50, "print a progress line every N steps"),
        "resume": (False, "continue from out_dir/ckpt.pt"),
        "overwrite": (False, "replace a run already in --out-dir (without it, such a folder is refused: nothing is "
                             "lost by accident)"),
        "save_merged": (False, "also write the merged model to out_dir/merged/"),
        "merged_format": ("meta", "format of the merged model: meta (params.json + consolidated.00.pth), hf, or gguf "
                                  "(F16, with the tokenizer when it is a GGUF model's: llama.cpp runs it)"),
        "export_peft": (None, "also write the adapter as a PEFT folder (adapter_config.json + weights) here"),
        "init_only": (False, "compute the initialization, write init_adapter.pt (and --export-peft), skip training"),
        "init_data": (None, "with --init-only: the init samples from this file instead of the task (text: one sample "
                            "per line; .jsonl: {\"prompt\": ..., \"answer\": ...} per line)"),
        "gsm8k_prompt": ("auto", "GSM8K: qa ('Q: ... A: ', the tiny models' prompt) or chat (the problem as "
                                 "the user's turn of the model's ChatML template); auto: chat for a model with a "
                                 "chat template (SmolLM2), qa otherwise"),
        "dry_run": (False, "print the parameter count and the memory of each stage, allocate nothing, exit"),
    },
}
CHOICES = {"model": tuple(llama.MODELS), "merged_format": ("meta", "hf", "gguf"), "task": tuple(TASK_FILES),
           "sst2_prompt": ("auto", *SST2_PROMPTS), "gsm8k_prompt": ("auto", *GSM8K_PROMPTS),
           "dtype": tuple(llama.DTYPES), **lora_da.CHOICES, **peers.CHOICES}
METHODS = peers.METHODS
# every numeric setting's range: where its arithmetic survives fp32 and int64 and the value means something
# (cli.Number refuses the rest when the command line is parsed). The init settings' own rules (alpha and beta
# not both 0) stay DAConfig's and PeerConfig's; tests/test_cli.py fails for a numeric flag with no range here.
N_, I_, BIG = cli.Number, int, 10 ** 9
SCALE = (1e-6, 1e9)  # a scale divides or multiplies fp32 weights: outside this, B A or the update under/overflows
RANGES = {
    "seeds": N_(I_, 1, 1000, "an integer in [1, 1000]"),
    "seed": N_(I_, 0, 2 ** 31 - 1, "an integer in [0, 2^31 - 1] (a generator's seed, times 1000 per epoch)"),
    **{n: N_(I_, 0, BIG, ">= 0 (0: off or all)") for n in ("max_len", "train_limit", "val_size", "train_size",
                                                            "eval_limit", "eval_interval", "N")},
    "decode_limit": N_(I_, -1, BIG, ">= -1 (-1: all)"),
    "rank": N_(I_, 1, 65536, "a positive integer (at most the layer's width)"),
    "lora_alpha": N_(float, *SCALE, f"positive, in [{SCALE[0]:g}, {SCALE[1]:g}]"),
    "dropout": N_(float, 0.0, 1 - 2 ** -24, "a probability in [0, 1)"),
    "a_lr_scale": N_(float, 1e-6, 1e6, "positive, in [1e-6, 1e6]"),
    "init_samples": N_(I_, 1, 10 ** 7, "a positive integer"),
    **{n: N_(float, 0.0, 1e9, ">= 0 (at most 1e9)") for n in ("alpha", "beta", "relative_damping")},
    **{n: N_(float, *SCALE, f"positive, in [{SCALE[0]:g}, {SCALE[1]:g}]") for n in ("gamma", "ga_gamma",
                                                                                   "one_gamma")},
    "damping": N_(float, 1e-30, 1e9, "positive, in [1e-30, 1e9] (below it fp32 loses it)"),
    "stats_batch_size": N_(I_, 1, 65536, "a positive integer"),
    "layers_per_pass": N_(I_, 0, 10 ** 4, ">= 0 (0: all)"),
    **{n: N_(I_, 1, 10 ** 7, "a positive integer") for n in ("ga_samples", "one_samples")},
    "eva_rho": N_(float, 1.0, 1e3, "in [1, 1000]"),
    "lr": N_(float, 1e-12, 1e20, "positive, in [1e-12, 1e20] (below it no fp32 weight moves; far above it a run "
                                 "diverges, and says so)"),
    "steps": N_(I_, 1, BIG, "a positive integer"),
    **{n: N_(I_, 1, 65536, "a positive integer") for n in ("batch_size", "grad_accum", "length_groups")},
    "warmup": N_(float, 0.0, 1 - 2 ** -24, "a fraction of the steps in [0, 1)"),
    "weight_decay": N_(float, 0.0, 1e3, ">= 0 (0: off)"),
    "grad_clip": N_(float, 0.0, 1e12, ">= 0 (0: off)"),
    "log_interval": N_(I_, 1, BIG, "a positive integer"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default in --help."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for group, items in SETTINGS.items():
        g = p.add_argument_group(group)
        for name, (default, help_) in items.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(default, bool):
                g.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
            else:
                kind = RANGES.get(name, type(default) if default is not None else str)
                g.add_argument(flag, default=default, type=kind, choices=CHOICES.get(name), help=help_)
    return p


def get_args(argv=None):
    p = parser()
    cfg = p.parse_args(argv)
    try:  # comma lists: known names, each once, case as written in --help
        cfg.methods = list(METHODS) if cfg.init.strip() == "all" else cli.names(cfg.init, METHODS, "--init")
        cfg.targets = ",".join(cli.names(cfg.targets, llama.LORA_TARGETS, "--targets"))
    except ValueError as e:
        p.error(str(e))
    if cfg.seed + cfg.seeds - 1 > RANGES["seed"].hi:
        p.error(f"--seed {cfg.seed} with --seeds {cfg.seeds} runs past the largest seed {RANGES['seed'].hi}")
    for name in ("checkpoint", "tokenizer", "data_dir", "out_dir", "export_peft", "init_data"):
        if getattr(cfg, name) is not None and not str(getattr(cfg, name)).strip():  # "" is not "not given"
            p.error(f"--{name.replace('_', '-')} is empty: give a path, or leave the flag out for its default")
    controls = [f for f, on in (("--direction", cfg.direction != "da"), ("--a-scale", cfg.a_scale != "da"),
                                 ("--no-step", not cfg.step)) if on]
    if controls and cfg.methods != ["da"]:
        p.error(f"{', '.join(controls)}: LoRA-DA's controls (theory.md §12) change its init only: use them with --init da")
    if cfg.shuffle_labels and not set(cfg.methods) & set(peers.DATA_AWARE):
        p.error(f"--shuffle-labels permutes the init samples' labels: it needs a data-aware --init "
                f"({', '.join(peers.DATA_AWARE)})")
    if cfg.a_lr_scale != 1.0 and cfg.freeze_A:
        p.error("--a-lr-scale scales A's learning rate, but --freeze-A freezes A: use one or the other")
    if cfg.init_data and not cfg.init_only:
        p.error("--init-data gives samples for the initialization only: add --init-only (training needs a task)")
    if not cfg.dry_run:
        try:
            llama.resolve_device(cfg.device)
        except ValueError as e:
            p.error(str(e))
    try:
        init_config(cfg, cfg.seed, 1), peer_config(cfg)
    except lora_da.SettingError as e:
        p.error(f"--{e.name.replace('_', '-')} {e.what}")
    return cfg


# -----------------------------------------------------------------------------
# the pieces of a run, each a plain function of what it uses

def backward_on_batch(model, task, idx, tok, device, groups, scale):
    """Backpropagate scale × (sum of the per-sample losses of the batch idx); returns (loss, tokens).
    The batch is cut into `groups` groups of similar length, each padded only to its own longest sequence:
    the same batch and the same gradient (sums commute), a fraction of the padding."""
    order = sorted(idx, key=lambda i: task.length("train", i))
    size = math.ceil(len(order) / groups)
    total, tokens = 0.0, 0
    for k in range(0, len(order), size):
        b = {key: v.to(device) for key, v in task.batch("train", order[k:k + size], tok.pad_id).items()}
        loss = lora_da.causal_lm_losses(model, b).sum() * scale
        loss.backward()
        total += loss.item()
        tokens += int(b["attention_mask"].sum())
    return total, tokens


def get_lr(it, lr, steps, warmup_steps):
    """Linear warmup, then cosine decay to zero (as the paper's HF Trainer runs)."""
    if it < warmup_steps:
        return lr * (it + 1) / warmup_steps
    progress = (it - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(start, size, seed, N, perms):
    """Training examples start .. start+size-1 of the data order: a permutation per epoch seeded by
    (seed, epoch), so step k always sees the same batch, across methods and across a resume.
    perms: a dict the caller keeps, caching each epoch's permutation."""
    idx = []
    for k in range(start, start + size):
        epoch, pos = divmod(k, N)
        if epoch not in perms:
            perms[epoch] = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        idx.append(perms[epoch][pos])
    return idx


def init_config(cfg, seed, N) -> lora_da.DAConfig:
    """The one DAConfig of a run: every field of it that is also a setting, by the same name, with N
    filled in (N = the training-set size unless --N is given)."""
    names = [f.name for f in dataclasses.fields(lora_da.DAConfig) if f.name not in ("seed", "N")]
    return lora_da.DAConfig(**{k: getattr(cfg, k) for k in names}, N=cfg.N or N, seed=seed)


def peer_config(cfg) -> peers.PeerConfig:
    """The peers' settings of a run, by the same names."""
    return peers.PeerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(peers.PeerConfig)})


def resolved(cfg, method, seed, N, data_dir=None):
    """Every setting as used by this run (defaults filled in, the data folder actually read), for
    config.json and resume checks."""
    d = {k: v for k, v in vars(cfg).items() if k not in ("methods", "init", "seeds", "seed")}
    d.update(init=method, seed=seed, N=cfg.N or N, out_dir=str(cfg.out_dir))
    if data_dir is not None:
        d["data_dir"] = str(Path(data_dir).resolve())
    return d


# -----------------------------------------------------------------------------
# several processes (torchrun): the init samples, each batch and each evaluation are split across them, and
# the sums are all-reduced, so every process holds what one process would compute (up to float order)

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self):  # the process that logs and writes files
        return self.rank == 0

    def sum_(self, t):
        """Sum a tensor over the processes, in place (all-reduce); returns it."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t


def start_dist(cfg) -> Dist:
    """torchrun sets WORLD_SIZE and RANK; a plain `python train.py` has neither and runs alone, without
    torch.distributed. NCCL between GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if llama.resolve_device(cfg.device).startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    if cfg.batch_size % world or cfg.init_samples < world:
        raise UsageError(f"--batch-size {cfg.batch_size} and --init-samples {cfg.init_samples} must share evenly "
                         f"over {world} processes (batch size a multiple of {world})")
    return Dist(torch.distributed.get_rank(), world)


def reduce_step(dist, params, loss, tokens):
    """The gradient, loss and token count of the whole global batch: each process backpropagated its share
    with the one-process scale 1/per_step, so the sums over processes are the one-process numbers."""
    if dist.world == 1:
        return loss, tokens
    grads = dist.sum_(torch.cat([p.grad.flatten() for p in params]))  # one all-reduce for every LoRA factor
    for p, g in zip(params, grads.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    loss, tokens = dist.sum_(torch.tensor([loss, tokens], dtype=torch.float64, device=grads.device)).tolist()
    return loss, int(tokens)


# settings a resumed run may change: they change what is logged or written, never the numbers
RESUMABLE = ("resume", "overwrite", "out_dir", "log_interval", "eval_interval", "save_merged", "merged_format",
             "export_peft",
             "download")


def changed(saved: dict, now: dict) -> list:
    """The settings in which a saved run differs from this one (those in RESUMABLE aside). The data fingerprint
    is compared where the saved run has one (runs written before it was recorded have none)."""
    keys = (set(saved) | set(now)) - set(RESUMABLE) - ({"data_sha256"} if "data_sha256" not in saved else set())
    return sorted(k for k in keys if saved.get(k) != now.get(k))


def what_changed(diff: list) -> str:
    return ", ".join(("the data (its fingerprint data_sha256)" if k == "data_sha256" else k) for k in diff[:6])


RUN_FILES = ("config.json", "metrics.json", "adapter.pt", "init_adapter.pt", "ckpt.pt", "ckpt.prev.pt")


def check_out_dir(cfg, out_dir: Path, config: dict):
    """An --out-dir belongs to one run. A folder that already holds one is refused, unless --resume continues
    that same run (its settings are compared, as the checkpoint's are in resume) or --overwrite replaces it."""
    held = [f for f in RUN_FILES if (out_dir / f).exists()]
    if not held or cfg.overwrite:
        return
    if cfg.resume:
        try:
            saved = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").is_file() else None
        except (OSError, ValueError):
            saved = None
        if saved is not None:
            diff = changed(saved, config)
            if diff:
                raise UsageError(f"--out-dir {out_dir} holds a run with other settings ({what_changed(diff)}); "
                                 f"use another --out-dir, or --overwrite to replace it")
        return
    raise UsageError(f"--out-dir {out_dir} already holds a run ({', '.join(held)}); continue it with --resume, "
                     f"choose another --out-dir, or replace it with --overwrite")


def check_writable(out_dir: Path, flag="--out-dir"):
    """Refuse an output folder that cannot be written before any model is loaded, not at the first save (or,
    for an export, after the whole run)."""
    probe = Path(out_dir)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {out_dir}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{flag} {out_dir}: cannot write in {probe} ({e.strerror})")


@dataclasses.dataclass
class Setup:
    """What a process loads once and every run of it shares: never modified by a run."""
    tok: llama.Tokenizer
    base: llama.Transformer
    task: Task
    device: str
    checkpoint: Path
    data_dir: Path
    dist: Dist = dataclasses.field(default_factory=Dist)  # alone, or one of several processes (torchrun)


def load(cfg, log=print, dist=None) -> Setup:
    dist = dist or Dist()
    device = llama.resolve_device(cfg.device)
    if device == "cuda" and dist.world > 1:  # one GPU per process, as torchrun numbers them
        device = f"cuda:{os.environ.get('LOCAL_RANK', dist.rank)}"
    needed = [] if cfg.init_data else [f"{cfg.task}/{f}" for f in TASK_FILES[cfg.task][1]]
    model_file, tok_file = llama.MODELS[cfg.model]
    needed += [model_file] * (cfg.checkpoint is None) + [tok_file] * (cfg.tokenizer is None)
    data_dir = find_data(cfg, needed)
    ckpt_path = Path(cfg.checkpoint or data_dir / model_file)
    tok_path = Path(cfg.tokenizer or data_dir / tok_file)
    tok = bpe.load_tokenizer(tok_path)
    base = checkpoints.load_checkpoint(ckpt_path, device=device, dtype=llama.DTYPES[cfg.dtype])
    if tok.vocab_size != base.args.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, the model {ckpt_path} expects "
                         f"{base.args.vocab_size}")
    task = Task(cfg, tok, data_dir, base.args.max_seq_len, read_init_data(cfg.init_data) if cfg.init_data else None)
    log(f"{ckpt_path.name}: {base.num_params():,} parameters on {device} ({cfg.dtype}); {cfg.task}: "
        f"{len(task.train)} train, {len(task.val)} validation, {len(task.test)} test")
    return Setup(tok, base, task, device, ckpt_path, data_dir, dist)


# -----------------------------------------------------------------------------
# the pieces of one run, in the order run() calls them

def lora_model(cfg, setup, take=False):
    """A fresh copy of the base model with LoRA on the chosen targets; only the LoRA factors train.
    take: the run is the only one (one method, one seed): use the base itself, not a copy, so a 7B model is
    held once, not twice; the setup cannot serve another run after that."""
    if setup.base is None:
        raise RuntimeError("this setup's base model was taken by a single run; load it again for another")
    model = setup.base if take else copy.deepcopy(setup.base)
    if take:
        setup.base = None
    llama.add_lora(model, r=cfg.rank, lora_alpha=cfg.lora_alpha, targets=cfg.targets.split(","),
                   rslora=cfg.rslora, dropout=cfg.dropout, freeze_A=cfg.freeze_A)
    llama.mark_only_lora_trainable(model)
    return model


def evaluate_splits(cfg, model, setup, decode=True, periodic=False):
    """The test split's numbers at the top level (the validation split's under --no-test-eval), with
    "split" naming it; the validation split's under "val" too, except in periodic evaluations."""
    def ev(split):
        return evaluate(model, setup.task, split, setup.tok, setup.device, decode, decode_limit=cfg.decode_limit,
                        dist=setup.dist)
    test = ev("test")
    val = None if periodic and test else ev("val")
    if test is None:
        return {**val, "split": "val"}
    return {**test, "split": "test", **({"val": val} if val else {})}


def fresh_start(cfg, model, method, seed, N, setup, out_dir, log):
    """A fresh start: zero-shot evaluation, the initialization (timed), step 0. Returns the run's metrics."""
    metrics = {"method": method, "seed": seed, "evals": []}
    if not cfg.init_only and cfg.zero_shot:
        metrics["zero_shot"] = evaluate_splits(cfg, model, setup)
        log(f"zero-shot: accuracy {accuracy(metrics['zero_shot'])}, loss {metrics['zero_shot']['loss']:.4f}")
    # statistics from the head of the training set, as the authors take them
    t0 = time.perf_counter()
    samples = (setup.task.samples(cfg.init_samples, setup.tok.pad_id, cfg.shuffle_labels)
               if method in peers.DATA_AWARE else None)
    d = setup.dist
    memory = PeakMemory(setup.device)
    report = peers.initialize_model(model, method, samples, cfg=init_config(cfg, seed, N), peer=peer_config(cfg),
                                    log=log, shard=(d.rank, d.world), reduce=d.sum_ if d.world > 1 else None,
                                    stage=memory.stage)
    metrics["peak_memory_gib"], metrics["memory_at_start_gib"] = memory.peaks, memory.held
    metrics["init_seconds"], metrics["init_report"] = time.perf_counter() - t0, report
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder behind
        checkpoints.save_lora(model, out_dir / "init_adapter.pt")  # the init alone, reusable and convertible
    if not cfg.init_only:
        # step 0: after the initialization, before any update (LoRA-DA and LoRA-One already moved the model)
        metrics["step0"] = evaluate_splits(cfg, model, setup)
        log(f"init {method}: {metrics['init_seconds']:.1f}s; step 0: accuracy {accuracy(metrics['step0'])}, "
            f"loss {metrics['step0']['loss']:.4f}")
        metrics["train_seconds"], metrics["train_tokens"] = 0.0, 0
    return metrics


def start(cfg, model, optimizer, method, seed, N, setup, out_dir, config, log):
    """Resume from out_dir's checkpoint (--resume, when there is one), or start afresh with the
    initialization: (step, metrics, loss history)."""
    ckpt_file = out_dir / "ckpt.pt"
    if cfg.resume and (ckpt_file.is_file() or ckpt_file.with_name("ckpt.prev.pt").is_file()):
        return resume(ckpt_file, model, optimizer, config, log)
    if cfg.resume:
        log(f"no checkpoint at {ckpt_file}: starting from scratch")
    return 0, fresh_start(cfg, model, method, seed, N, setup, out_dir, log), {"step": [], "loss": []}


def param_groups(model, params, cfg):
    """AdamW's parameter groups: one (every LoRA factor at --lr), or, with --a-lr-scale, the A factors in a group
    of their own whose rate is scaled (the order of `params` is kept within each group)."""
    if cfg.a_lr_scale == 1.0:
        return params
    a = {id(m.lora_A) for m in llama.lora_layers(model).values()}
    return [{"params": [p for p in params if id(p) not in a], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in a], "lr_scale": cfg.a_lr_scale}]


def accumulate_gradient(cfg, model, setup, params, step, seed, perms):
    """Backpropagate step's global batch (grad_accum micro-batches of batch_size): the gradient, summed loss
    (the mean over the step's sequences) and token count of the whole batch, whatever the number of processes."""
    d, N, per_step = setup.dist, len(setup.task.train), cfg.batch_size * cfg.grad_accum
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        idx = batch_indices(step * per_step + micro * cfg.batch_size, cfg.batch_size, seed, N, perms)
        # each sequence's loss is the mean over its answer tokens; scaled by 1/per_step, the grads accumulate;
        # several processes each take every world-th sequence of the same global batch
        loss, n = backward_on_batch(model, setup.task, idx[d.rank::d.world], setup.tok, setup.device,
                                    cfg.length_groups, 1 / per_step)
        loss_sum, tokens = loss_sum + loss, tokens + n
    return reduce_step(d, params, loss_sum, tokens)


def read_checkpoint(ckpt_file: Path, log):
    """The latest checkpoint, or the previous one (kept beside it) when the latest is unreadable."""
    prev = ckpt_file.with_name("ckpt.prev.pt")
    try:
        return torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty or not a weights-only checkpoint
        why = str(e).splitlines()[0][:120] if str(e) else "empty"
        problem = f"{ckpt_file} is unreadable ({type(e).__name__}: {why})"
    if not prev.is_file():
        raise UsageError(f"{problem}, and there is no earlier checkpoint {prev.name}; start again without --resume "
                         f"or use another --out-dir")
    try:
        ckpt = torch.load(prev, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{problem}, and the earlier {prev} too ({type(e).__name__}); start again without --resume")
    log(f"notice: {problem}; resuming from the previous checkpoint {prev.name} (step {ckpt['step']})")
    return ckpt


def resume(ckpt_file, model, optimizer, config, log):
    """Continue where the checkpoint stopped: LoRA factors, AdamW moments, RNG, metrics, loss history."""
    ckpt = read_checkpoint(ckpt_file, log)
    diff = changed(ckpt["config"], config)
    if diff:
        raise UsageError(f"{ckpt_file} was written with other settings ({what_changed(diff)}); use another --out-dir")
    checkpoints.load_lora(model, ckpt["adapter"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    log(f"resumed from {ckpt_file} at step {ckpt['step']}")
    return ckpt["step"], ckpt["metrics"], ckpt["history"]


def checkpoint_state(step, model, optimizer, metrics, history, config) -> dict:
    """Everything a resume needs, as a plain dict that carries its own config (as nanoGPT's)."""
    return {"step": step, "adapter": llama.lora_state(model), "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(), "metrics": metrics, "history": history, "config": config}


def save_checkpoint(ckpt_file: Path, state: dict):
    """The new checkpoint is written whole first, then the latest becomes ckpt.prev.pt: a good one always
    exists, and a broken (non-finite) state never replaces it."""
    if not all(torch.isfinite(t).all() for layer in state["adapter"]["lora"].values() for t in layer.values()):
        raise UsageError(f"LoRA weights became non-finite by step {state['step']}; lower --lr "
                         f"(now {state['config']['lr']:g})" + (f"; the last good checkpoint is {ckpt_file}"
                                                            if ckpt_file.is_file() else ""))
    checkpoints.atomic_save(state, ckpt_file, keep_previous=ckpt_file.with_name("ckpt.prev.pt"))


class Clock:
    """Training time and tokens: this sitting's, added to the earlier sittings' totals kept in metrics."""

    def __init__(self, metrics):
        self.metrics, self.seconds0, self.tokens0 = metrics, metrics["train_seconds"], metrics["train_tokens"]
        self.t0, self.t_done, self.tokens = time.perf_counter(), None, 0

    def totals(self):
        m = self.metrics
        m["train_seconds"] = self.seconds0 + (self.t_done or time.perf_counter()) - self.t0
        m["train_tokens"] = self.tokens0 + self.tokens
        m["tokens_per_second"] = m["train_tokens"] / max(m["train_seconds"], 1e-9)


def data_counts(task, metrics, log):
    """What the data lost on its way in, per split, logged and in metrics.json: never silent."""
    metrics["truncated"], metrics["unknown_tokens"] = dict(task.truncated), dict(task.unknown)
    if any(task.truncated.values()):
        log(f"truncated to --max-len {task.max_len} from the left of the prompt: " +
            ", ".join(f"{n} {split}" for split, n in task.truncated.items() if n) + " examples")
    if any(task.unknown.values()):
        log("characters outside the tokenizer's alphabet, read as <unk> (never a target): " +
            ", ".join(f"{n} in {split}" for split, n in task.unknown.items() if n))


def finish(cfg, model, setup, out_dir, metrics, history, step, clock, t_start, log):
    """The final evaluation, how far A moved, and the run's totals."""
    clock.t_done = time.perf_counter()  # the training loop's clock stops here
    clock.totals()
    if "final" not in metrics or metrics.get("final_step") != step:
        metrics["final"] = evaluate_splits(cfg, model, setup)
        metrics["final_step"] = step
        metrics["evals"].append({"step": step, **metrics["final"]})
    task = setup.task
    data_counts(task, metrics, log)
    total = metrics["init_seconds"] + metrics["train_seconds"]
    metrics["init_share"] = metrics["init_seconds"] / total if total else 0.0
    metrics["history"] = history
    # how far each A moved from its init: the largest principal angle between the row spaces (frozen A: 0)
    init = checkpoints.torch_load(out_dir / "init_adapter.pt")["lora"]
    drift = {n: lora_da.principal_angle(init[n]["A"], m.lora_A) for n, m in llama.lora_layers(model).items()}
    metrics["A_drift_degrees"] = {"mean": sum(drift.values()) / len(drift), "max": max(drift.values()), "layers": drift}
    log(f"final: accuracy {accuracy(metrics['final'])}, loss {metrics['final']['loss']:.4f} "
        + (f"(zero-shot {accuracy(metrics['zero_shot'])}); " if "zero_shot" in metrics else "; ")
        + f"init {metrics['init_seconds']:.1f}s = {100 * metrics['init_share']:.1f}% of init+train; "
        f"total {time.perf_counter() - t_start:.0f}s")


def write_outputs(cfg, model, setup, out_dir, config, metrics, log, history=None):
    """Settings and metrics; after training the adapter (with what rebuilds a shifted W0) and the loss
    curve (history None: --init-only, the init alone); then the exports."""
    checkpoints.atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))
    checkpoints.atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    if history is None:
        log(f"init {metrics['method']}: {metrics['init_seconds']:.1f}s; written to {out_dir / 'init_adapter.pt'}")
    else:
        checkpoints.save_lora(model, out_dir / "adapter.pt")
        plot_loss(history, metrics, out_dir / "loss.png", f"{metrics['method']} (seed {metrics['seed']}) on {cfg.task}")
    if cfg.export_peft:
        checkpoints.save_peft(model, cfg.export_peft, base_model=str(setup.checkpoint))
        log(f"PEFT adapter written to {cfg.export_peft}")
    if cfg.save_merged:
        merged = copy.deepcopy(model)
        for layer in llama.lora_layers(merged).values():
            layer.merge()
        for name, layer in llama.lora_layers(merged).items():  # back to plain nn.Linear: Meta's names
            parent, child = name.rsplit(".", 1)
            setattr(merged.get_submodule(parent), child, layer.base)
        if cfg.merged_format == "gguf":
            checkpoints.save_gguf(merged, out_dir / "merged" / "model.gguf", tokenizer=setup.tok)
        else:
            save = checkpoints.save_hf_checkpoint if cfg.merged_format == "hf" else checkpoints.save_meta_checkpoint
            save(merged, out_dir / "merged")
        log(f"merged model ({cfg.merged_format} format) written to {out_dir / 'merged'}")


# -----------------------------------------------------------------------------
# one run: load -> LoRA -> init or resume -> the loop -> outputs

def run(cfg, method, seed, out_dir: Path, setup: Setup = None, log=print, take=False):
    """One method, one seed: load -> LoRA -> init (or resume) -> the loop -> outputs; returns the metrics.
    take: the setup serves this run only, so its base model is used in place (lora_model)."""
    take = take or setup is None
    setup = setup or load(cfg, log)
    d = setup.dist
    log = log if d.main else (lambda *a: None)  # one process speaks
    task, N, t_start = setup.task, len(setup.task.train), time.perf_counter()
    torch.manual_seed(seed)  # LoRA's random A comes from here: the same seed, the same init
    log(f"[{method} seed {seed}] -> {out_dir}")
    model = lora_model(cfg, setup, take=take)
    params = [p for p in model.parameters() if p.requires_grad]  # A and B of each layer, fp32 (B only if frozen A)
    optimizer = torch.optim.AdamW(param_groups(model, params, cfg), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)
    ckpt_file, config = out_dir / "ckpt.pt", {**resolved(cfg, method, seed, N, setup.data_dir),
                                              "prompt": task.prompt_record, "data_sha256": task.fingerprint}
    if d.main:
        check_out_dir(cfg, out_dir, config)
    step, metrics, history = start(cfg, model, optimizer, method, seed, N, setup, out_dir, config, log)
    if cfg.init_only:  # hand the initialization to another trainer: no training here
        data_counts(task, metrics, log)
        if d.main:
            write_outputs(cfg, model, setup, out_dir, config, metrics, log)
        return metrics

    # the loop: AdamW on the LoRA factors; step k always sees the same batch of the seeded data order
    warmup_steps, perms, first_step = int(cfg.warmup * cfg.steps), {}, step
    clock = Clock(metrics)
    model.train()
    memory = PeakMemory(setup.device)
    memory.stage("training")
    while step < cfg.steps:
        lr = get_lr(step, cfg.lr, cfg.steps, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum, tokens = accumulate_gradient(cfg, model, setup, params, step, seed, perms)
        clock.tokens += tokens
        if not math.isfinite(loss_sum):
            raise UsageError(f"loss became {loss_sum} at step {step}; lower --lr (now {cfg.lr:g}) or check the data"
                             + (f"; the last good checkpoint is {ckpt_file}" if ckpt_file.is_file() else ""))
        if cfg.grad_clip:  # the global norm over all LoRA factors, as HF's Trainer clips
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the grads between steps
        step += 1
        history["step"].append(step)
        history["loss"].append(loss_sum)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            dt = time.perf_counter() - clock.t0
            eta = dt / max(1, step - first_step) * (cfg.steps - step)  # from this sitting's pace
            log(f"step {step:5d}/{cfg.steps} | loss {loss_sum:.4f} | lr {lr:.2e} | "
                f"{clock.tokens / max(dt, 1e-9):,.0f} tok/s | ETA {eta:.0f}s")
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:  # the last step evaluates below
            ev = evaluate_splits(cfg, model, setup, decode=False, periodic=True)  # GSM8K decodes only at the end
            metrics["evals"].append({"step": step, **ev})
            log(f"eval step {step}: accuracy {accuracy(ev)}, loss {ev['loss']:.4f}")
            clock.totals()
            if d.main:
                save_checkpoint(ckpt_file, checkpoint_state(step, model, optimizer, metrics, history, config))

    memory.stage(None)
    if memory.peaks:
        metrics.setdefault("peak_memory_gib", {}).update(memory.peaks)
        metrics.setdefault("memory_at_start_gib", {}).update(memory.held)
    finish(cfg, model, setup, out_dir, metrics, history, step, clock, t_start, log)
    if d.main:
        save_checkpoint(ckpt_file, checkpoint_state(step, model, optimizer, metrics, history, config))
        write_outputs(cfg, model, setup, out_dir, config, metrics, log, history)
    return metrics


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = get_args(argv)
    cli.boundary(lambda: main_of(cfg), on_interrupt=lambda: kept(cfg))


def main_of(cfg):
    if cfg.dry_run:
        if cfg.checkpoint in llama.PRESETS or cfg.checkpoint is None:
            args = llama.PRESETS[cfg.checkpoint or cfg.model]
        else:
            args = checkpoints.read_args(cfg.checkpoint)
        auto = "cuda" if torch.cuda.is_available() else "cpu"  # a plan needs no device: never refuse one
        dry_run(cfg, args, auto if cfg.device == "auto" else cfg.device)
        return
    out = Path(cfg.out_dir)
    multi = len(cfg.methods) > 1 or cfg.seeds > 1
    runs = [(m, s, out / f"{m}-s{s}" if multi else out) for m in cfg.methods for s in range(cfg.seed, cfg.seed + cfg.seeds)]
    dist = start_dist(cfg)  # alone, unless torchrun started several of us
    if dist.main:
        check_writable(out)
        if cfg.export_peft:
            check_writable(Path(cfg.export_peft), "--export-peft")
    # one writer per folder: the out-dir and, for several runs, each run's subfolder (a run started in one of
    # them by hand is refused, and a multi-run started over one is refused before it writes anything)
    releases = lock_all(dict.fromkeys([out] + [d for _, _, d in runs])) if dist.main else []
    try:
        setup = load(cfg, print if dist.main else (lambda *a: None), dist)  # once; runs copy it, a single run takes it
        results = {}
        for method, seed, run_dir in runs:
            results.setdefault(method, []).append(run(cfg, method, seed, run_dir, setup, take=not multi))
        if multi and dist.main:
            print(compare(results, out, cfg))
    finally:
        for release in reversed(releases):
            release()
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def kept(cfg) -> str:
    """What an interrupted run leaves: its latest checkpoint and how to continue."""
    latest = max(Path(cfg.out_dir).rglob("ckpt.pt"), key=lambda f: f.stat().st_mtime, default=None)
    if latest is None:
        return "no checkpoint was written yet"
    return (f"the latest checkpoint is {latest} (step {torch.load(latest, weights_only=True)['step']}); "
            f"continue with the same command and --resume")


def lock(out: Path):
    """One writer per output folder: OUT/.lock, created exclusively, holds the writer's pid; a lock whose
    process is gone (killed) is taken over. Returns the release, which also removes a folder this run
    created and left empty (a refused run leaves nothing behind)."""
    created, path = not out.exists(), out / ".lock"
    out.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip())
                os.kill(pid, 0)  # raises if no such process
            except (ValueError, OSError) as e:  # unreadable, or its process is gone: a stale lock
                if isinstance(e, PermissionError):  # the process exists, it is someone else's
                    raise UsageError(f"--out-dir {out} is in use by process {pid} ({path}); use another --out-dir")
                path.unlink(missing_ok=True)
                continue
            raise UsageError(f"--out-dir {out} is in use by process {pid} ({path}); wait for it to finish or use "
                             f"another --out-dir")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)

    def release():
        path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return release


def lock_all(folders) -> list:
    """Lock each folder in turn; if one is in use, release the ones taken and refuse (nothing is left behind)."""
    releases = []
    try:
        for folder in folders:
            releases.append(lock(Path(folder)))
    except BaseException:
        for release in reversed(releases):
            release()
        raise
    return releases


if __name__ == "__main__":
    main()
