"""
Experiments as evidence: each method at its own learning rate, chosen on a validation split carved from the
training set, then trained with several seeds and compared on the test set with 95% confidence intervals.

    python studies/experiments.py baselines              # lora, gaussian, pissa, ga, one, da on SST-2
    python studies/experiments.py convergence            # the same runs, read as curves: no new runs
    python studies/experiments.py gsm8k                  # the protocol on GSM8K (test loss on the answers)
    python studies/experiments.py samples                # the open questions (FINDINGS.md): init samples |S|,
    python studies/experiments.py scarcity               #   training-set size N and the variance term,
    python studies/experiments.py ablation               #   bias/variance/normalization/γ ablation,
    python studies/experiments.py rank                   #   rank r,
    python studies/experiments.py frozen-a               #   LoRA-FA against standard LoRA, and how far A moves,
    python studies/experiments.py function-space         #   theory.md §11's subspace against LoRA-DA's, both modes,
    python studies/experiments.py distance               #   tasks at increasing distance from pretraining
    python studies/experiments.py baselines --jobs 2     # J processes of one thread each (the default: 2)
    python studies/experiments.py baselines --list       # the grid, and which runs are already done

The protocol (FINDINGS.md):
  1. selection: every method × every learning rate of one shared grid, on `select_seeds`, trained on the
     training set minus a 1,000-example validation split and scored on that split only (--no-test-eval:
     the test file is not even read);
  2. report: each method at its chosen rate (best mean validation score), on `seeds` other seeds, scored on
     the test set; same step budget, data order (the seed) and validation split for every method;
  3. aggregate: mean and 95% t-interval per method; each comparison paired by seed (the same data order) under
     one inference rule (RULE below, in every table's header): a 95% t-interval, the paired t-test and an exact
     sign-flip test, Holm over all of the study's comparisons; "wins"/"loses" only where all three agree.

Every finished run is one small JSON under studies/results/STUDY/runs/; a rerun skips them, so a study can be
finished over several sittings and anyone can recompute the tables from the committed files. A study's rows are cells (a
method with settings on top of the study's); a cell trains at the rate chosen for its rate group (its method at
the settings the rate depends on, e.g. the training-set size). A run another study already made with the same
settings is copied (naming its source), not rerun.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent        # studies/: this runner, its results
ROOT = HERE.parent                            # the core: train.py, lora_da.py, llama.py
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))  # planted.py beside this runner
import checkpoints  # noqa: E402
import cli  # noqa: E402
import llama  # noqa: E402
import lora_da  # noqa: E402
import peers  # noqa: E402
import plots  # noqa: E402
import planted  # noqa: E402
import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of a study: a method with settings on top of the study's, trained at the learning rate selected
    for its rate group: the method with `rate_args`, the settings the rate depends on (e.g. the training-set
    size); the other settings (|S|, β, γ, r) reuse the rate their method has at the study's own settings."""
    name: str                 # file-safe row name: "da-S16"
    method: str
    args: tuple = ()          # train.py settings on top of the study's
    rate_args: tuple = ()
    rate_name: str = ""       # file-safe name of rate_args: "N64"
    x: float = None           # the cell's place on the study's axis (|S|, N, r), for the plot
    series: str = ""          # the line it belongs to on the plot (default: its method)

    @property
    def group(self):
        return self.method + (f"-{self.rate_name}" if self.rate_name else "")


def plain(methods):
    return tuple(Cell(m, m) for m in methods)


@dataclasses.dataclass
class Study:
    task: str
    cells: tuple
    lrs: tuple                      # the one learning-rate grid every rate group is selected from
    select_seeds: tuple             # seeds of the selection runs (validation split only)
    seeds: tuple                    # seeds of the report runs (test set), distinct from select_seeds
    args: tuple                     # train.py settings shared by every run of the study
    metric: str = "accuracy"        # what selection maximizes ("accuracy") or minimizes ("loss")
    of: tuple = ()                  # studies whose runs this one only reads (convergence, distance)
    pairs: tuple = ()               # (cell, cell) paired differences to report (default: da − every other cell)
    xlabel: str = ""                # the plot's axis, when the cells have an x
    question: str = ""              # one line: what the study asks
    tie_seeds: tuple = ()           # where a group's two best rates are within 1 point: more selection seeds at both
    headline: tuple = ()            # the cells a verdict rests on: they get headline_seeds on top of seeds
    headline_seeds: tuple = ()
    more_lrs: tuple = ()            # (group, rates): a group's grid extended past an edge it chose, that group only
    earlier: tuple = ()             # (select_seeds, tie_seeds) of a smaller selection this one replaced: the table
                                    # shows what it chose beside what the full selection chooses

    def lrs_of(self, group):
        """A rate group's grid: the study's, and the rates added where that group chose an edge."""
        return tuple(sorted(set(self.lrs) | {lr for g, lrs in self.more_lrs if g == group for lr in lrs}))

    @property
    def all_lrs(self):
        return tuple(sorted({lr for g in self.groups for lr in self.lrs_of(g)}))

    def earlier_study(self):
        """This study as its earlier, smaller selection saw it (the same runs, fewer selection seeds)."""
        return dataclasses.replace(self, select_seeds=self.earlier[0], tie_seeds=self.earlier[1], earlier=())

    def seeds_of(self, cell):
        """The report seeds of a cell: the study's, and the headline seeds for a headline cell."""
        return self.seeds + (self.headline_seeds if cell in self.headline else ())

    @property
    def methods(self):
        return tuple(dict.fromkeys(c.method for c in self.cells))

    @property
    def groups(self):               # rate group -> (method, rate_args)
        return {c.group: (c.method, c.rate_args) for c in self.cells}

    def cell(self, name):
        return next(c for c in self.cells if c.name == name)


METHODS = ("lora", "gaussian", "pissa", "milora", "ga", "one", "corda", "eva", "da")
SST2 = ("--task", "sst2", "--steps", "400", "--eval-interval", "50", "--val-size", "1000")
GSM8K = ("--task", "gsm8k", "--steps", "150", "--batch-size", "8", "--max-len", "320", "--eval-interval", "50",
         "--val-size", "100", "--eval-limit", "100", "--decode-limit", "20")
# the open-question studies: a quarter of the baselines' tokens per run (200 steps x 16), final numbers only,
# so that several hundred runs fit on two cores; rates are re-selected at this scale on the same grid
SCALE = ("--task", "sst2", "--steps", "200", "--batch-size", "16", "--eval-interval", "0", "--val-size", "1000",
         "--no-zero-shot")
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
T_BAR = 49.5  # mean counted tokens per init sequence (SST-2, 256 samples): β = T̄ is the theory's β = 1 (theory.md §6)


def samples_cells():
    out = []
    for S in (16, 64, 256, 1024):
        out.append(Cell("da" if S == 256 else f"da-S{S}", "da", ("--init-samples", str(S)), x=S))
        for m in ("one", "ga"):  # their recipes use 8 of the samples: here all |S|
            out.append(Cell(f"{m}-S{S}", m, ("--init-samples", str(S), f"--{m}-samples", str(S)), x=S))
    return tuple(out)


def scarcity_cells():
    out = []
    for N in (64, 256, 1024, 4096):
        data = ("--train-size", str(N), "--init-samples", str(min(256, N)))
        rate = dict(rate_args=data, rate_name=f"N{N}", x=N)
        out += [Cell(f"lora-N{N}", "lora", data, **rate), Cell(f"one-N{N}", "one", data, **rate)]
        for beta, tag in ((0.0, "beta0"), (0.03, ""), (1.0, "beta1")):
            out.append(Cell(f"da-N{N}" + (f"-{tag}" if tag else ""), "da", data + ("--beta", f"{beta:g}"), **rate,
                            series=f"da β={beta:g}"))
    return tuple(out)


def rank_cells():
    out = []
    for r in (1, 2, 4, 8, 16, 32):
        for m in ("lora", "ga", "da"):
            if m == "ga" and r == 32:  # LoRA-GA takes 2r singular vectors: 2r > 32, the wk/wv output size
                continue
            # r sets LoRA-DA's initial step (BA = ΔW A0A0ᵀ/γ over r directions) and the number of trained
            # weights: each r is its own rate group (r = 8, the default, keeps the plain group names)
            rate = dict(rate_args=("--rank", str(r)), rate_name=f"r{r}") if r != 8 else {}
            out.append(Cell(m if r == 8 else f"{m}-r{r}", m, ("--rank", str(r)), x=r, **rate))
    return tuple(out)


ABLATION = (Cell("lora", "lora"), Cell("da", "da"), Cell("da-beta0", "da", ("--beta", "0")),
            Cell("da-beta1", "da", ("--beta", "1")), Cell("da-betaT", "da", ("--beta", f"{T_BAR:g}")),
            Cell("da-beta30T", "da", ("--beta", f"{30 * T_BAR:g}")), Cell("da-nonorm", "da", ("--no-normalize",)),
            # γ sets A's scale (rows of norm 1/√γ) and the initial step: each γ is its own rate group
            *(Cell(f"da-g{g}", "da", ("--gamma", str(g)), ("--gamma", str(g)), f"g{g}") for g in (64, 256, 4096)))
FROZEN = tuple(c for m in ("lora", "one", "da") for c in
               (Cell(m, m), Cell(f"{m}-FA", m, ("--freeze-A",), ("--freeze-A",), "FA", series=f"{m} (A frozen)")))
# theory.md §11's function-space subspace as an init: only A0's direction differs from LoRA-DA's (same scale and
# initial step), in standard and frozen-A training; LoRA's and LoRA-DA's cells are frozen-a's runs, copied
SUBSPACE = tuple(c for m in ("lora", "da", "whitened") for c in
                 (Cell(m, m), Cell(f"{m}-FA", m, ("--freeze-A",), ("--freeze-A",), "FA", series=f"{m} (A frozen)")))
# the second real model: babyllama936K (width 128, 5 layers, a 105-character tokenizer, 256-token context), the
# baselines' protocol at half their tokens (200 steps x 32), LoRA-FA beside standard LoRA for lora and da
BABY = ("--model", "babyllama936K", "--task", "sst2", "--steps", "200", "--eval-interval", "0", "--val-size", "1000",
        "--no-zero-shot")
BABY_CELLS = plain(("lora", "ga", "one", "da")) + tuple(
    Cell(f"{m}-FA", m, ("--freeze-A",), ("--freeze-A",), "FA", series=f"{m} (A frozen)") for m in ("lora", "da"))


# the model that reads English: SmolLM2-135M-Instruct (width 576, 30 blocks, 134.5M parameters), r = 8 on all seven
# projections of all 30 blocks, the authors' schedule. At 59 training tokens/s on one thread (FINDINGS, "Against the
# CPU's limit") the baselines' 400 x 32 sentences would take an hour a run; 48 steps of 16 sentences (768, about
# 2.4 min of training) and 500 validation sentences make a selection run about 4 min and a report run about 6, so
# that the whole study fits about 6 hours on the two cores. LoRA-FA beside standard LoRA for lora and da
SMOL = ("--model", "smollm2-135M", "--task", "sst2", "--steps", "48", "--batch-size", "16", "--eval-interval", "0",
        "--val-size", "500", "--no-zero-shot")
SMOL_CELLS = plain(("lora", "da", "milora", "ga", "pissa")) + tuple(
    Cell(f"{m}-FA", m, ("--freeze-A",), ("--freeze-A",), "FA", series=f"{m} (A frozen)") for m in ("lora", "da"))


# the attribution controls (theory.md §12): each cell changes one of A0's direction, A's scale, the initial step,
# the statistics' labels and the damping; every cell is its own rate group (the scale sets the rate), in standard
# and frozen-A training. lora, da and whitened are the frozen-a and function-space studies' runs, copied.
CONTROL_INITS = (
    ("lora", "lora", ()),                                                           # random direction, LoRA's scale
    ("da", "da", ()),                                                               # as released
    ("da-lorascale", "da", ("--a-scale", "lora", "--no-step")),                      # da direction at LoRA's scale
    ("da-nostep", "da", ("--no-step",)),                                           # da direction and scale, B = 0
    ("random-dascale", "da", ("--direction", "random", "--no-step")),                 # LoRA's direction at da's scale
    ("random-dascale-step", "da", ("--direction", "random")),                       # ... with da's step projected on it
    ("gradient-dascale", "da", ("--direction", "gradient", "--no-step")),            # LoRA-One/GA's direction
    ("gradient-lorascale", "da", ("--direction", "gradient", "--a-scale", "lora", "--no-step")),
    ("da-shuffled", "da", ("--shuffle-labels",)),                                   # statistics with labels permuted
    *((f"da-rel{k}", "da", ("--relative-damping", k)) for k in ("1e-3", "1e-2", "1e-1")),  # λ relative to each factor
    ("whitened", "whitened", ()),                                                   # §11's direction, da's scale/step
)

def control_cells():
    out = []
    for name, method, args in CONTROL_INITS:
        tag = name[len(method) + 1:] if name.startswith(method + "-") else ""   # "da-lorascale" -> "lorascale"
        tag = tag or (name if name != method else "")
        out.append(Cell(name, method, args, args, tag, series="standard"))  # every cell in both modes
        out.append(Cell(f"{name}-FA", method, args + ("--freeze-A",), args + ("--freeze-A",),
                        f"{tag}-FA" if tag else "FA", series="A frozen"))
    return tuple(out)


# the A-rate control (what the scale explanation predicts): AdamW moves each entry of A by about the rate,
# so LoRA-DA's A, √(γ/3) times smaller than LoRA's, moves that much faster relative to itself; scaling A's rate by
# √(3/γ) removes that. If the scale explains the gap, da-alr and random-dascale-alr train like LoRA (standard only)
A_RATE = f"{math.sqrt(3 / 1024):.4g}"
CONTROLS = control_cells() + (Cell("da-alr", "da", ("--a-lr-scale", A_RATE), ("--a-lr-scale", A_RATE), "alr",
                                   series="standard"),
                              Cell("random-dascale-alr", "da", ("--direction", "random", "--no-step", "--a-lr-scale",
                                                                A_RATE),
                                   ("--direction", "random", "--no-step", "--a-lr-scale", A_RATE), "random-dascale-alr",
                                   series="standard"))
# what each difference isolates; the gap da − lora telescopes along two paths: step + scale + direction
CONTROL_PAIRS = (("da", "lora", "the gap"),
                 ("da", "da-nostep", "step (da direction, da scale)"),
                 ("da-nostep", "da-lorascale", "scale (da direction, B = 0)"),
                 ("da-lorascale", "lora", "direction (LoRA's scale, B = 0)"),
                 ("da-nostep", "random-dascale", "direction (da's scale, B = 0)"),
                 ("random-dascale", "lora", "scale (random direction, B = 0)"),
                 ("random-dascale-step", "random-dascale", "step (random direction, da scale)"),
                 ("gradient-dascale", "random-dascale", "gradient direction (da's scale, B = 0)"),
                 ("gradient-lorascale", "lora", "gradient direction (LoRA's scale, B = 0)"),
                 ("da", "da-shuffled", "the labels in the statistics"),
                 *((f"da-rel{k}", "da", f"relative damping k = {k}") for k in ("1e-3", "1e-2", "1e-1")),
                 ("whitened", "da", "§11's direction"),
                 ("da-alr", "lora", "gap left with A's rate scaled to its size (the scale predicts 0)"),
                 ("da-alr", "da", "A's rate scaled to its size (da)"),
                 ("random-dascale-alr", "lora", "gap left with A's rate scaled (random direction, B = 0)"),
                 ("random-dascale-alr", "random-dascale", "A's rate scaled to its size (random, da scale)"))


# the controls on the second real model (babyllama936K at the babyllama study's budget), cut to fit two cores: the
# 2 x 2 of A's direction (LoRA-DA's Eq. 10 or random) by its scale (LoRA's or LoRA-DA's), in both modes, B = 0 off
# the released corner (so da's own cell carries its initial step too); lora, da and their frozen-A cells are the
# babyllama study's runs, copied. One selection seed, as that study, on its grid without 1e-2 (where every cell
# there predicted one class); 3e-5 because a random direction at LoRA-DA's scale chose 1e-4, the edge without it
BABY_CONTROLS = tuple(c for c in CONTROLS
                      if c.name.removesuffix("-FA") in ("lora", "da", "da-lorascale", "random-dascale")
                      or c.name == "da-rel1e-1")  # the damping control: Z has up to 274 of 352 eigenvalues below λ
BABY_CONTROL_PAIRS = (("da", "lora", "the gap"),
                      ("da", "random-dascale", "direction + step (da's scale)"),
                      ("random-dascale", "lora", "scale (random direction, B = 0)"),
                      ("da", "da-lorascale", "scale + step (da direction)"),
                      ("da-lorascale", "lora", "direction (LoRA's scale, B = 0)"),
                      ("da-rel1e-1", "da", "relative damping k = 1e-1"))
PAIR_LABELS = {(a + fa, b + fa): w for a, b, w in CONTROL_PAIRS + BABY_CONTROL_PAIRS for fa in ("", "-FA")}


def control_pairs():
    names = {c.name for c in CONTROLS}
    return tuple((a + fa, b + fa) for fa in ("", "-FA") for a, b, _ in CONTROL_PAIRS
                 if a + fa in names and b + fa in names)


def pairs_of(cells, key):
    """Paired comparisons between cells that agree on `key` (the study's axis)."""
    return tuple((a.name, b.name) for a in cells for b in cells if a.x == b.x and key(a, b))


# the cells the README's and FINDINGS' verdicts and causal sentences rest on get 10 report seeds
HEADLINE = (6, 7, 8, 9, 10)
CONTROL_HEADLINE = tuple(n + fa for n in ("lora", "da", "da-nostep", "da-lorascale", "random-dascale",
                                          "gradient-dascale", "gradient-lorascale") for fa in ("", "-FA")) + \
    ("da-alr", "random-dascale-alr")

# samples, ablation, rank and frozen-a break near-ties with a third selection seed (103): their rates came from
# two seeds, and LoRA-DA's 3e-3 had won over 1e-3 by 0.15 points
STUDIES = {
    # the verdicts rest on LoRA-DA against LoRA, MiLoRA and LoRA-GA: those four cells get 10 report seeds
    "baselines": Study("sst2", plain(METHODS), (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (101, 102), (1, 2, 3, 4, 5), SST2,
                       headline=("lora", "da", "milora", "ga"), headline_seeds=HEADLINE),
    "convergence": Study("sst2", plain(METHODS), (), (), (), (), of=("baselines",)),
    "gsm8k": Study("gsm8k", plain(METHODS), (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), (101,), (1, 2, 3, 4, 5), GSM8K, metric="loss"),
    # ga chose 3e-4, the edge of LRS, in samples and rank: their grid goes down to 1e-4
    "samples": Study("sst2", samples_cells(), (1e-4,) + LRS, (101, 102), (1, 2, 3, 4, 5), SCALE,
                     tie_seeds=(103,), xlabel="init samples |S|",
                     pairs=pairs_of(samples_cells(), lambda a, b: a.method == "da" and b.method != "da"),
                     question="How many init samples does LoRA-DA need (open question 3)?"),
    # lora-N64 chose 1e-2, the edge of LRS: the grid goes up to 3e-2. Three selection seeds at every rate (first
    # one, with 102 and 103 only at a group's two best rates within 1 point: `earlier`), and two more (104, 105)
    # at the two best where they are within 1 point
    "scarcity": Study("sst2", scarcity_cells(), LRS + (3e-2,), (101, 102, 103), (1, 2, 3, 4, 5), SCALE,
                      tie_seeds=(104, 105), earlier=((101,), (102, 103)),
                      xlabel="training sentences N",
                      pairs=pairs_of(scarcity_cells(), lambda a, b: a.method == "da" and b.method != "da" or
                                     a.name.startswith("da") and b.name.endswith("beta0") and a.name != b.name),
                      question="With few training sentences, does the variance term (β > 0) help (next check 1)?"),
    "ablation": Study("sst2", ABLATION, LRS, (101, 102), (1, 2, 3, 4, 5), SCALE, tie_seeds=(103,),
                      pairs=tuple(("da", c.name) for c in ABLATION if c.name != "da"),
                      question="What do the bias term, the variance term, normalization and γ each contribute (next check 3)?"),
    "rank": Study("sst2", rank_cells(), (1e-4,) + LRS, (101, 102), (1, 2, 3, 4, 5), SCALE,
                  tie_seeds=(103,), xlabel="rank r",
                  pairs=pairs_of(rank_cells(), lambda a, b: a.method == "da" and b.method != "da"),
                  question="Is LoRA-DA's gain robust across ranks (first experiment 2)?"),
    # a frozen A0 as small as LoRA-DA's and LoRA-One's wants larger rates: the grid goes to 1e-1
    "frozen-a": Study("sst2", FROZEN, LRS + (3e-2, 1e-1), (101, 102), (1, 2, 3, 4, 5), SCALE, tie_seeds=(103,),
                      pairs=(("lora-FA", "lora"), ("one-FA", "one"), ("da-FA", "da"), ("da-FA", "lora-FA"),
                             ("da-FA", "one-FA"), ("da", "lora"), ("da", "one")),
                      question="Does the frozen-A theory transfer to standard LoRA, and how far does A move (open question 4)?"),
    # LoRA-GA and LoRA-DA chose 3e-4, the edge of (3e-4 … 1e-2), collapsing to one class above it: the grid goes down to 3e-5
    "babyllama": Study("sst2", BABY_CELLS, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (101,), (1, 2, 3, 4, 5), BABY,
                       pairs=(("da", "lora"), ("da", "ga"), ("da", "one"), ("da-FA", "lora-FA"), ("da-FA", "da"),
                              ("lora-FA", "lora")), headline=("lora", "da"), headline_seeds=HEADLINE,
                       question="Does LoRA-DA still lose to LoRA on a second real model, twice as wide, with a "
                                "character tokenizer (babyllama936K)?"),
    # one selection seed, two more at a group's two best rates where they are within 1 point. The first grid
    # (1e-4 ... 3e-3) put LoRA-GA at its lower edge and LoRA-DA-FA at its upper one (its A is about 18 times smaller
    # than LoRA's): 3e-5 and 1e-2 for every group; LoRA-DA-FA chose 1e-2, then 3e-2, each the edge of its grid then,
    # so its grid alone goes on to 1e-1. The headline's third cell is the peer best on validation (LoRA-GA, 86.2%
    # at 1e-4; MiLoRA 85.3%, PiSSA 85.1%)
    "smollm2": Study("sst2", SMOL_CELLS, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (101,), (1, 2, 3, 4, 5), SMOL,
                     tie_seeds=(102, 103),
                     pairs=(("da", "lora"), ("da", "milora"), ("da", "ga"), ("da", "pissa"), ("da-FA", "lora-FA"),
                            ("da-FA", "da"), ("lora-FA", "lora")), headline=("lora", "da", "ga"), headline_seeds=HEADLINE,
                     more_lrs=(("da-FA", (3e-2, 1e-1)),),
                     question="On a model that reads English (SmolLM2-135M, 78.6% zero-shot), does LoRA-DA beat "
                              "LoRA and its peers, in standard and in frozen-A training?"),
    "function-space": Study("sst2", SUBSPACE, LRS + (3e-2, 1e-1), (101, 102), (1, 2, 3, 4, 5), SCALE,
                            pairs=(("whitened", "da"), ("whitened", "lora"), ("whitened-FA", "da-FA"),
                                   ("whitened-FA", "lora-FA")),
                            question="Does the subspace that minimizes LoRA-FA's excess risk (theory.md §11) do better "
                                     "than LoRA-DA's, with the same scale and initial step?"),
    # selection seeds as in scarcity; da-nostep-FA chose 1e-1 on them, the grid's edge: its grid goes on to 3e-1
    "controls": Study("sst2", CONTROLS, LRS + (3e-2, 1e-1), (101, 102, 103), (1, 2, 3, 4, 5), SCALE,
                      pairs=control_pairs(), tie_seeds=(104, 105), earlier=((101,), (102, 103)),
                      more_lrs=(("da-nostep-FA", (3e-1,)),), headline=CONTROL_HEADLINE, headline_seeds=HEADLINE,
                      question="Which of A0's direction, A's scale, the initial step, the labels and the damping "
                               "explains LoRA-DA's gap to LoRA, in standard and in frozen-A training?"),
    "controls-babyllama": Study("sst2", BABY_CONTROLS, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), (101,), (1, 2, 3, 4, 5), BABY,
                                pairs=tuple((a + fa, b + fa) for fa in ("", "-FA") for a, b, _ in BABY_CONTROL_PAIRS
                                            if {a + fa, b + fa} <= {c.name for c in BABY_CONTROLS}),
                                question="Does the attribution hold on the second real model: is LoRA-DA's gap to LoRA "
                                         "its scale in standard training and its direction with A frozen?"),
    "distance": Study("sst2", (), (), (), (), (), of=("baselines", "gsm8k"),
                      question="Does LoRA-DA's gain shrink as the task moves away from pretraining (open question 1)?"),
    "three-models": Study("sst2", (), (), (), (), (), of=("baselines", "babyllama", "smollm2"),
                          question="The three real models side by side: what holds on all three?"),
    "mechanism": Study("sst2", (), (), (), (), (),
                       question="Where does each init put A: how much of each layer's input energy its rows capture, "
                                "against the damping and the shift's rank?"),
    "planted-babyllama": Study("sst2", (), (), (), (), (),
                               question="The planted shift on the second real model (babyllama936K): the map and the "
                                        "training half."),
    "planted-smollm2": Study("sst2", (), (), (), (), (),
                             question="The planted shift on the model that reads English (SmolLM2-135M, its middle "
                                      "block): the init-only map."),
    "planted": Study("sst2", (), (), (), (), (),
                     question="Open question 1 with the truth known: does LoRA-DA's estimate find a planted target "
                              "shift, and its row space, as the shift grows from far inside the local regime to far "
                              "outside it?"),
}


# -----------------------------------------------------------------------------
# runs: a name, the train.py arguments, and one JSON file each

def run_name(name, lr, seed, phase):
    """select-GROUP-lrX-sS (a rate group's selection run) or report-CELL-lrX-sS (a cell's report run)."""
    return f"{phase}-{name}-lr{lr:g}-s{seed}"


def run_args(study, name, lr, seed, phase):
    if phase == "select":
        method, extra = study.groups[name]
    else:
        cell = study.cell(name)
        method, extra = cell.method, cell.args
    args = list(study.args) + list(extra) + ["--init", method, "--lr", f"{lr:g}", "--seed", str(seed)]
    # selection reads only the final validation score: no periodic evaluations, no GSM8K decoding
    return args + (["--no-test-eval", "--eval-interval", "0", "--decode-limit", "0"] if phase == "select" else [])


RUN_NAME = re.compile(r"^(select|report)-(.+?)-lr([0-9.e+-]+)-s(\d+)$")


def settings_of(args) -> dict:
    """The parsed settings that decide a run's numbers: not those that only change what is logged or written
    (train.RESUMABLE), nor GSM8K's decoding limit on another task."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = train.get_args(list(args))
    except SystemExit:
        raise ValueError("train.py refuses its arguments")
    d = {k: v for k, v in vars(parsed).items() if k not in train.RESUMABLE}
    if d["task"] != "gsm8k":
        d.pop("decode_limit")
    return d


def check_record(study, name, record):
    """Why a run JSON is not the run its name says in this study (None if it is): its arguments must parse to
    the settings the study gives that name (flag order aside), and its config and metrics must carry its seed.
    A name of another scheme, or of a cell the study no longer has, is not checked (it is never read)."""
    m = RUN_NAME.match(name)
    known = m and (set(study.groups) if m[1] == "select" else {c.name for c in study.cells})
    if not m or m[2] not in known:
        return None
    phase, cell, lr, seed = m[1], m[2], float(m[3]), int(m[4])
    if not isinstance(record.get("args"), list):
        return "it records no arguments"
    have, want = (settings_of(a) for a in (record["args"], run_args(study, cell, lr, seed, phase)))
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        return f"its settings are not this study's for that name ({', '.join(diff[:4])} differ)"
    for part in ("config", "metrics"):
        if part in record and (not isinstance(record[part], dict) or record[part].get("seed") != seed):
            return f"its {part} is not seed {seed}'s"
    if "metrics" not in record and "failed" not in record:
        return "it holds neither metrics nor a failure"
    if "metrics" in record and not isinstance(record["metrics"].get("final"), dict):
        return "its metrics hold no final evaluation"
    return None


def load_runs(out: Path, study=None) -> dict:
    """Every run JSON of a study, by name. One that cannot be read, that names another run than its file, or
    (given the study) whose settings or seed are not what its name says, is named on stderr and skipped (the
    next sitting reruns it): never fatal to the other runs or studies."""
    runs = {}
    for f in sorted((out / "runs").glob("*.json")):
        try:
            record = json.loads(f.read_text())
            if not isinstance(record, dict) or record.get("name", f.stem) != f.stem:
                raise ValueError(f"it records run {record.get('name') if isinstance(record, dict) else record!r:.60}")
            why = check_record(study, f.stem, record) if study is not None else None
            if why:
                raise ValueError(why)
        except (OSError, ValueError) as e:
            print(f"skipping {f}: {e} (delete it to rerun that run)", file=sys.stderr)
            continue
        runs[f.stem] = record
    return runs


def execute(job):
    """One run in a worker process (one thread): train.run, then its JSON, written atomically."""
    name, args, out = job
    torch.set_num_threads(1)
    cfg = train.get_args(args)
    scratch = out / "scratch" / name
    shutil.rmtree(scratch, ignore_errors=True)  # a run killed in an earlier sitting starts again from nothing
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
    checkpoints.atomic_write_text(out / "runs" / f"{name}.json", json.dumps(record))
    shutil.rmtree(scratch, ignore_errors=True)
    return name, record["wall_seconds"]


_SETUPS = {}


def _setup(cfg, log):
    """The tokenizer, model and data once per worker and data setting (runs only copy the model)."""
    key = (cfg.task, cfg.val_size, cfg.test_eval, cfg.train_limit, cfg.train_size, cfg.eval_limit, cfg.max_len,
           cfg.model, cfg.checkpoint, cfg.tokenizer, cfg.init_data)
    if key not in _SETUPS:
        _SETUPS[key] = train.load(cfg, log)
    return _SETUPS[key]


def config_key(args) -> str:
    """What a run computes: its parsed settings (flag order and spelling do not matter). Runs are deterministic,
    so two runs with the same key have the same result."""
    return json.dumps(vars(train.get_args(list(args))), sort_keys=True)


def finished_runs(folders) -> dict:
    """{config key: JSON path} of the runs already finished in these results folders (copies excluded)."""
    index = {}
    for folder in folders:
        for f in sorted(Path(folder).glob("*/runs/*.json")):
            try:
                rec = json.loads(f.read_text())
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:  # another study's broken file: named, never fatal here
                print(f"skipping {f}: {e} (not reused)", file=sys.stderr)
                continue
            # a report run made before runs recorded their predictions cannot say whether it collapsed: rerun it
            final = (rec.get("metrics") or {}).get("final") if isinstance(rec.get("metrics"), dict) else None
            unrecorded = f.stem.startswith("report-") and "metrics" in rec and \
                (not isinstance(final, dict) or final.get("predicted_positive") is None)
            if "copied_from" not in rec and "args" in rec and not unrecorded:
                index.setdefault(config_key(rec["args"]), f)
    return index


def reuse(jobs, out: Path, index: dict) -> int:
    """Copy the JSON of a run another study already made with the same settings (the base cells that several
    studies share): the copy names its source, and its compute is counted once, in the source's study."""
    copied = 0
    for name, args, _ in jobs:
        src = index.get(config_key(args))
        if src is None or (out / "runs" / f"{name}.json").is_file():
            continue
        rec = json.loads(src.read_text())
        rec.update(name=name, args=list(args), copied_from=str(src.relative_to(src.parents[2])))
        (out / "runs").mkdir(parents=True, exist_ok=True)
        write(out / "runs" / f"{name}.json", json.dumps(rec))
        copied += 1
    return copied


def run_all(jobs, out: Path, n_jobs: int, label: str, shared=None):
    """Run the jobs not yet done, n_jobs at a time, with progress and an ETA. With `shared` (a folder of
    studies), runs another study already finished with the same settings are copied, not rerun."""
    copied = reuse(jobs, out, finished_runs([shared])) if shared else 0
    todo = [j for j in jobs if not (out / "runs" / f"{j[0]}.json").is_file()]
    done = len(jobs) - len(todo)
    print(f"{label}: {len(jobs)} runs, {done} already done ({copied} copied from other studies just now), "
          f"{len(todo)} to run with {n_jobs} job(s)", flush=True)
    if not todo:
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0, finished = time.perf_counter(), 0
    if n_jobs == 1:
        results = map(execute, todo)
    else:
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

def t_cdf(t, df):
    """Student's t CDF by numerical integration of the density: numpy only, accurate to ~1e-6 here."""
    x = np.linspace(0.0, abs(t), 20001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    area = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
    return 0.5 + math.copysign(area, t)


def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF."""
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_p(a: dict, b: dict):
    """Two-sided p-value of the paired t-test of a − b over the seeds both have (the interval's test)."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(d) < 2:
        return float("nan")
    sd = float(np.std(d, ddof=1))
    if sd == 0:
        return 0.0 if np.mean(d) != 0 else 1.0
    t = float(np.mean(d)) / (sd / math.sqrt(len(d)))
    return 2 * (1 - t_cdf(abs(t), len(d) - 1))


def holm(pvalues: dict, alpha=0.05) -> dict:
    """Holm's step-down correction over a family of tests: {name: rejected?}, controlling the chance of any
    false verdict at alpha (the smallest p against alpha/m, the next against alpha/(m − 1), ... until one fails)."""
    order = sorted(pvalues, key=pvalues.get)
    out, going = {}, True
    for i, k in enumerate(order):
        going = going and pvalues[k] <= alpha / (len(order) - i)
        out[k] = going
    return out


def sign_flip_p(diffs) -> float:
    """Exact two-sided paired sign-flip (permutation) test of mean 0: under the null each difference's sign is a
    fair coin, so p is the share of the 2^n sign patterns whose |sum| is at least the observed one (with a
    relative tolerance, so that the observed pattern and its mirror always count). With n pairs p >= 2/2^n:
    0.0625 at n = 5, 0.0020 at n = 10."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0 or len(d) > 20:
        return float("nan")
    signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)   # every pattern of ±1
    sums, observed = np.abs(signs @ d), abs(d.sum())
    return float(np.mean(sums >= observed - 1e-9 * max(1.0, observed)))


ALPHA = 0.05
FLOOR = 0.5  # a cell is at the collapse floor when at least half of its report runs predict one class


@dataclasses.dataclass
class Comparison:
    """One comparison a − b under the rule: the paired mean difference and its 95% t half-width over n seeds,
    both tests' p-values, Holm's verdict within the study's family, and whether a cell sits at the floor."""
    d: float
    h: float
    n: int
    p_t: float
    p_sign: float
    holm: bool = False
    floor: str = ""          # the cell(s) at the collapse floor, named

    @property
    def p(self):             # the rule's p: both tests must reject, so the larger decides
        return max(self.p_t, self.p_sign)

    def word(self, higher_better=True, a="a") -> str:
        """The rule's words: wins/loses (both tests and Holm), resolved (unadjusted), no difference shown."""
        t_ok, s_ok = self.p_t <= ALPHA, self.p_sign <= ALPHA
        if t_ok and s_ok and self.holm:
            out = f"{a} {'wins' if (self.d > 0) == higher_better else 'loses'}"
        elif t_ok or s_ok:
            out = "resolved (unadjusted: " + " and ".join(t for t, ok in (("t", t_ok), ("sign-flip", s_ok)) if ok) + ")"
        else:
            out = "no difference shown"
        return out + (f"; {self.floor} at the collapse floor" if self.floor else "")


RULE = ("Inference rule (every comparison of this study): paired by seed, Δ with its 95% t-interval; p from the "
        "paired t-test and from an exact paired sign-flip test; Holm's step-down over all {m} comparisons of this "
        "study (one family) on the larger of the two, α = 0.05. 'wins'/'loses' only where both tests reject and Holm "
        "keeps it; 'resolved (unadjusted)' where a test rejects without that; 'no difference shown' where neither "
        "does. A cell at the collapse floor (half or more of its runs predict one class) is named: not a causal "
        "reading.")


def family(scores: dict, pairs, floor=()) -> dict:
    """{(a, b): Comparison} for every pair with at least two common seeds, Holm over all of them."""
    out = {}
    for a, b in pairs:
        if a in scores and b in scores and len(set(scores[a]) & set(scores[b])) >= 2:
            m, h, n = paired(scores[a], scores[b])
            diffs = [scores[a][s] - scores[b][s] for s in sorted(set(scores[a]) & set(scores[b]))]
            out[a, b] = Comparison(m, h, n, paired_p(scores[a], scores[b]), sign_flip_p(diffs),
                                   floor=" and ".join(c for c in (a, b) if c in floor))
    for k, ok in holm({k: c.p for k, c in out.items()}).items():
        out[k].holm = ok
    return out


def at_floor(study, runs, chosen) -> set:
    """The cells at the collapse floor: half or more of their report runs predict one class."""
    out = set()
    for c in study.cells:
        recs = report_records(study, runs, chosen, c.name)
        if recs and sum(map(collapsed, recs)) >= FLOOR * len(recs):
            out.add(c.name)
    return out


def study_family(study, runs, chosen) -> dict:
    """The study's one family: its pairs (default: LoRA-DA against every other cell), on its own metric."""
    pct = study.metric == "accuracy"
    scores = report_scores(study, runs, chosen, study.metric)
    pairs = study.pairs or tuple(("da", c.name) for c in study.cells if c.name != "da")
    return family(scores, pairs, at_floor(study, runs, chosen) if pct and study.task == "sst2" else ())


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

def selection_means(study, group, runs, seeds, lrs=None) -> dict:
    """{lr: mean validation score over seeds} while every run is there (stops at the first rate missing one)."""
    means = {}
    for lr in (study.lrs_of(group) if lrs is None else lrs):
        recs = [runs.get(run_name(group, lr, s, "select")) for s in seeds]
        if any(r is None for r in recs):
            break
        assert all("failed" in r or r["metrics"]["final"]["split"] == "val" for r in recs)
        means[lr] = float(np.mean([score(r, study.metric) for r in recs]))
    return means


TIE_SLACK = 1e-9  # "within 1 point" with a tolerance: 0.585 − 0.575 is 0.010000000000000009 in floats


def tied(study, means) -> tuple:
    """The two best rates when they are within 1 point of accuracy and the study breaks ties (else ()): both get
    the tie seeds, and the mean over all selection seeds decides between them."""
    if not study.tie_seeds or study.metric != "accuracy" or len(means) < 2:
        return ()
    a, b = sorted(means, key=lambda lr: -means[lr])[:2]  # equal means keep the grid's order: the smaller rate first
    return (a, b) if means[a] - means[b] <= 0.01 + TIE_SLACK else ()


def select_lrs(study, runs) -> dict:
    """Each rate group's learning rate (a group: a method at the settings its rate depends on): the best mean
    validation score over the selection seeds; where the two best are within 1 point, the better of the two over
    the selection and tie seeds. Reads only the selection runs, which never read the test split."""
    chosen = {}
    for group in study.groups:
        means = selection_means(study, group, runs, study.select_seeds)
        if len(means) < len(study.lrs_of(group)):
            continue
        best = max if study.metric == "accuracy" else min  # ties: the first (smallest) rate
        chosen[group] = best(means, key=means.get)
        pair = tied(study, means)
        if pair:
            wide = selection_means(study, group, runs, study.select_seeds + study.tie_seeds, sorted(pair))
            if len(wide) < 2:
                del chosen[group]  # the tie seeds are not all in yet
            else:
                chosen[group] = max(wide, key=wide.get)
    return chosen


def tie_grid(study, runs):
    """(group, lr, seed) of the tie-break runs that the finished selection asks for."""
    out = []
    for group in study.groups:
        means = selection_means(study, group, runs, study.select_seeds)
        if len(means) == len(study.lrs_of(group)):
            out += [(group, lr, s) for lr in tied(study, means) for s in study.tie_seeds]
    return out


def grid(study, phase, chosen=None):
    """(name, lr, seed) of every run of a phase: each rate group at each rate; each cell at its group's rate."""
    if phase == "select":
        return [(g, lr, s) for g in study.groups for lr in study.lrs_of(g) for s in study.select_seeds]
    # seed by seed across the cells: a study stopped part-way has every cell at about the same number of seeds
    cells = [c for c in study.cells if c.group in chosen]
    rank = max((len(study.seeds_of(c.name)) for c in cells), default=0)
    return [(c.name, chosen[c.group], study.seeds_of(c.name)[i]) for i in range(rank) for c in cells
            if i < len(study.seeds_of(c.name))]


def run_study(name, study, out, n_jobs, shared=None):
    sel = [(run_name(g, lr, s, "select"), run_args(study, g, lr, s, "select"), out) for g, lr, s in grid(study, "select")]
    run_all(sel, out, n_jobs, f"{name}: selection on the validation split", shared)
    ties = [(run_name(g, lr, s, "select"), run_args(study, g, lr, s, "select"), out) for g, lr, s in
            tie_grid(study, load_runs(out, study))]
    if ties:
        run_all(ties, out, n_jobs, f"{name}: tie-breaking seeds {study.tie_seeds} where the two best rates are within "
                                   f"1 point", shared)
    chosen = select_lrs(study, load_runs(out, study))
    rep = [(run_name(c, lr, s, "report"), run_args(study, c, lr, s, "report"), out)
           for c, lr, s in grid(study, "report", chosen)]
    run_all(rep, out, n_jobs, f"{name}: report runs at each cell's chosen rate", shared)


# -----------------------------------------------------------------------------
# tables and plots

def fmt(m, h, pct=False):
    k = 100 if pct else 1
    return f"{k * m:.2f} ± {k * h:.2f}" if pct else f"{m:.4f} ± {h:.4f}"


def report_records(study, runs, chosen, cell):
    """The finished (not diverged) report runs of a cell at its group's chosen rate, one per seed that has one."""
    rate = chosen.get(study.cell(cell).group, 0)
    return [r for s in study.seeds_of(cell) if (r := runs.get(run_name(cell, rate, s, "report"))) and "metrics" in r]


def report_scores(study, runs, chosen, metric, split=None):
    """{cell: {seed: final score}} of the report runs."""
    out = {}
    for c in study.cells:
        if c.group not in chosen:
            continue
        m = c.name
        for s in study.seeds_of(m):
            r = runs.get(run_name(m, chosen[c.group], s, "report"))
            if r is not None and score(r, metric, split) is not None:
                out.setdefault(m, {})[s] = score(r, metric, split)
    return out


def aggregate(name, study, out: Path) -> str:
    runs = load_runs(out, study)
    chosen = select_lrs(study, runs)
    own = [r for r in runs.values() if "copied_from" not in r]
    lines = [f"# {name}: {study.task}, {' '.join(study.args)}", ""] + ([study.question, ""] if study.question else []) + [
             f"Runs: {len(runs)} JSON files in `runs/` ({len(runs) - len(own)} copied from the study that ran the same "
             f"settings first; recompute with `python studies/experiments.py {name} --aggregate`). "
             f"Compute: {sum(r['wall_seconds'] for r in own) / 3600:.2f} CPU-thread hours.", ""]
    # 1. selection
    pct = study.metric == "accuracy"
    lines += [f"## 1. Learning-rate selection: mean validation {study.metric} over seeds "
              f"{', '.join(map(str, study.select_seeds))} (validation split carved from train; test never read)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in study.all_lrs) +
              (f" | two best within 1 point: mean over seeds {', '.join(map(str, study.select_seeds + study.tie_seeds))}"
               if study.tie_seeds else "") + " | chosen |" + (
                  f" chosen on seeds {', '.join(map(str, study.earlier[0]))} (ties: "
                  f"{', '.join(map(str, study.earlier[1])) or 'none'}) |" if study.earlier else ""),
              "|---|" + "---|" * (len(study.all_lrs) + 1 + bool(study.tie_seeds) + bool(study.earlier))]
    before = select_lrs(study.earlier_study(), runs) if study.earlier else {}
    for g in study.groups:
        cells = []
        for lr in study.all_lrs:
            recs = [runs.get(run_name(g, lr, s, "select")) for s in study.select_seeds]
            vals = [score(r, study.metric) for r in recs if r]
            cell = (f"{100 * np.mean(vals):.2f}" if pct else f"{np.mean(vals):.4f}") if vals else "–"
            cells.append(f"**{cell}**" if chosen.get(g) == lr else cell)
        lrs = study.lrs_of(g)
        edge = " (grid edge)" if g in chosen and chosen[g] in (lrs[0], lrs[-1]) and len(lrs) > 2 else ""
        pair = tied(study, selection_means(study, g, runs, study.select_seeds))
        wide = selection_means(study, g, runs, study.select_seeds + study.tie_seeds, sorted(pair)) if pair else {}
        tie = (" vs ".join(f"{lr:g}: {100 * v:.2f}" for lr, v in wide.items()) if len(wide) == 2 else
               "within 1 point, seeds pending" if pair else "–") if study.tie_seeds else ""
        was = ""
        if study.earlier:  # the earlier selection's choice, flagged where the full one differs
            was = f" {before[g]:g}{' (changed)' if chosen.get(g, before[g]) != before[g] else ''} |" if g in before else " – |"
        lines.append(f"| {g} | " + " | ".join(cells) + (f" | {tie}" if study.tie_seeds else "") +
                     (f" | {chosen[g]:g}{edge} |" if g in chosen else " | (incomplete) |") + was)
    # 2. report
    lines += ["", f"## 2. Test results at each method's chosen rate: mean ± 95% CI over seeds "
              f"{', '.join(map(str, study.seeds))}" + (f" (the headline cells {', '.join(study.headline)}: also "
                                                       f"{', '.join(map(str, study.headline_seeds))})"
                                                       if study.headline else ""), ""]
    acc = report_scores(study, runs, chosen, "accuracy")
    loss = report_scores(study, runs, chosen, "loss")
    lines += ["| method | lr | seeds | test accuracy (%) | test loss | step-0 loss | init seconds |", "|---|---|---|---|---|---|---|"]
    for m in loss:
        lr = chosen[study.cell(m).group]
        recs = [runs[run_name(m, lr, s, "report")] for s in loss[m]]
        if any("failed" in r for r in recs):
            lines.append(f"| {m} | {lr:g} | {len(recs)} | diverged in {sum('failed' in r for r in recs)} run(s) | | | |")
            continue
        a = fmt(*mean_ci(list(acc[m].values())), pct=True) if m in acc else "–"
        lines.append(f"| {m} | {lr:g} | {len(loss[m])} | {a} | {fmt(*mean_ci(list(loss[m].values())))} | "
                     f"{fmt(*mean_ci([r['metrics']['step0']['loss'] for r in recs]))} | "
                     f"{np.mean([r['metrics']['init_seconds'] for r in recs]):.2f} |")
    # 3. paired differences, under the one rule
    fam = study_family(study, runs, chosen)
    pairs = study.pairs or tuple(("da", m) for m in loss if m != "da")
    if pairs and ("da" in loss or study.pairs):
        lines += ["", "## 3. Paired differences by seed (the same data order), under the study's one inference rule",
                  "", RULE.format(m=len(fam)), "",
                  "| a − b | Δ test accuracy (points) | Δ test loss | pairs | p (t) | p (sign-flip) | Holm | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for x, y in pairs:
            if (x, y) not in fam:
                lines.append(f"| {x} − {y} | (not yet run) | | | | | | |")
                continue
            c = fam[x, y]
            da_, dh, _ = paired(acc[x], acc[y]) if x in acc and y in acc else (float("nan"),) * 3
            dl, dlh, _ = paired(loss[x], loss[y])
            lines.append(f"| {x} − {y} | {100 * da_:+.2f} ± {100 * dh:.2f} | {dl:+.4f} ± {dlh:.4f} | {c.n} | "
                         f"{c.p_t:.3f} | {c.p_sign:.3f} | {'rejects' if c.holm else '–'} | "
                         f"{c.word(pct, 'LoRA-DA' if x == 'da' else x)} |")
    if name in EXTRAS:
        lines += [""] + EXTRAS[name](study, runs, chosen, out)
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    plot_selection(study, runs, chosen, out / "selection.png")
    if study.pairs:  # the open-question studies: accuracy against the study's axis, or per cell
        (plot_axis if any(c.x is not None for c in study.cells) else plot_cells)(study, acc, out / f"{name}.png")
    return text


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(path, text)


def plot_selection(study, runs, chosen, path):
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in study.groups:
        xs, ys = [], []
        for lr in study.lrs_of(m):
            vals = [score(r, study.metric) for s in study.select_seeds
                    if (r := runs.get(run_name(m, lr, s, "select")))]
            if vals:
                xs.append(lr)
                ys.append(np.mean(vals))
        ax.plot(xs, ys, "o-", label=m + (f" (chosen {chosen[m]:g})" if m in chosen else ""))
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"validation {study.metric} (mean over seeds)",
           title=f"{study.task}: learning-rate selection on the validation split")
    ax.legend(fontsize=7 if len(study.groups) > 6 else 8)
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_axis(study, acc, path):
    """Test accuracy (mean ± 95% CI) against the study's axis (|S|, N, r), one line per series."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for c in study.cells:
        if c.name in acc and len(acc[c.name]) >= 2:
            series.setdefault(c.series or c.method, []).append((c.x, *mean_ci(list(acc[c.name].values()))))
    for k, (label, pts) in enumerate(series.items()):
        x, m, h = map(np.array, zip(*sorted(pts)))
        ax.errorbar(x * (1 + 0.03 * (k - len(series) / 2)), 100 * m, yerr=100 * h, fmt="o-", capsize=3, label=label)
    ax.set(xscale="log", xlabel=study.xlabel, ylabel="SST-2 dev accuracy (%)", title=study.question or "")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_cells(study, acc, path):
    """Test accuracy (mean ± 95% CI) per cell, for studies without an axis (ablation, frozen-a)."""
    plt = plots.pyplot()
    names = [c.name for c in study.cells if c.name in acc and len(acc[c.name]) >= 2]
    stats = [mean_ci(list(acc[n].values())) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4))
    ax.bar(names, [100 * m for m, _ in stats], yerr=[100 * h for _, h in stats], capsize=4, color="C0")
    ax.set(ylabel="SST-2 dev accuracy (%), mean ± 95% CI", ylim=(45, None), title=study.question)
    ax.title.set_fontsize(9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    plots.save_figure(fig, path)


def convergence(study, runs, out: Path) -> str:
    """Dev accuracy and training loss against steps at each method's chosen rate (the report runs), and the
    steps each needs to come within 1 point of its own final accuracy: the paper's "faster convergence"."""
    plt = plots.pyplot()
    chosen = select_lrs(study, runs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    lines = ["# convergence: the report runs of `baselines`, each method at its chosen rate", "",
             "Steps to come within 1 point of the run's own final test accuracy (first evaluation at or above "
             "final − 1 point; evaluations every 50 steps), mean ± 95% CI over seeds; and the area under the "
             "accuracy curve (mean accuracy over the evaluations, step 0 included), a single number for speed.", "",
             "| method | lr | seeds | steps to final − 1 pt | mean accuracy over the run (%) | final accuracy (%) |",
             "|---|---|---|---|---|---|"]
    for m in study.methods:
        recs = [runs[n] for s in study.seeds_of(m) if (n := run_name(m, chosen.get(m, 0), s, "report")) in runs]
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
    plots.save_figure(fig, out / "convergence.png")
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    return text


# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# what each open-question study adds to its table: the measurements that need no training run

def init_only(args, method, out: Path, extra=()):
    """One initialization through train.run --init-only (the code path every run takes); returns its report
    and its LoRA factors {layer: {"A", "B"}}."""
    cfg = train.get_args(list(args) + list(extra) + ["--init", method, "--init-only"])
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        log = (lambda *a: print(*a, file=quiet))
        metrics = train.run(cfg, method, cfg.seed, Path(tmp) / "init", _setup(cfg, log), log=log)
        return metrics["init_report"], checkpoints.torch_load(Path(tmp) / "init" / "init_adapter.pt")["lora"]


def cached(path: Path, compute):
    """A measurement computed once and committed as JSON (deterministic: rerun by deleting the file)."""
    if not path.is_file():
        write(path, json.dumps(compute(), indent=1))
    return json.loads(path.read_text())


def ratios(report, alpha, beta):
    """Per layer, the variance term against the bias term as they enter Eq. 8: β·variance / (α·bias)."""
    return [beta * v["variance"] / (alpha * v["bias"]) for v in report["layers"].values()]


def samples_extra(study, runs, chosen, out):
    """How fast the subspace settles: the largest principal angle between A0 from |S| samples and from 1024."""

    def compute():
        res = {}
        for m in ("da", "one", "ga"):
            A = {}
            for S in (16, 64, 256, 1024):
                extra = ["--init-samples", str(S)] + ([f"--{m}-samples", str(S)] if m != "da" else [])
                A[S] = init_only(study.args, m, out, extra)[1]
            res[m] = {S: [lora_da.principal_angle(A[S][n]["A"], A[1024][n]["A"]) for n in A[S]] for S in A}
        return res
    angles = cached(out / "angles.json", compute)
    lines = ["## 4. How fast the estimate settles: largest principal angle (degrees) between the row space of A from "
             "|S| samples and from 1,024 (the head of the training set; one value per layer, 35 layers): "
             "median [max] over layers", "",
             "| method | 16 samples | 64 | 256 | 1024 |", "|---|---|---|---|---|"]
    for m, by in angles.items():
        lines.append(f"| {m} | " + " | ".join(f"{np.median(v):.1f} [{max(v):.1f}]" for v in by.values()) + " |")
    return lines


def scarcity_extra(study, runs, chosen, out):
    """The variance term against the bias term per layer at each N (from the report runs' init reports)."""
    lines = ["## 4. The variance term against the bias term at LoRA-DA's chosen A0: β·variance/(α·bias) over "
             "the 35 layers, median [max]; the variance coefficient is tr(Y⁻¹)/N with N the real training-set size", "",
             "| N | β = 0.03 | β = 1 |", "|---|---|---|"]
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in study.cells:
        if c.method != "da" or "beta" in c.name:
            continue
        rec = next((r for s in study.seeds if (r := runs.get(run_name(c.name, chosen.get(c.group, 0), s, "report")))
                    and "failed" not in r), None)
        if rec is None:
            continue
        rep = rec["metrics"]["init_report"]
        r03, r1 = ratios(rep, 1.0, 0.03), ratios(rep, 1.0, 1.0)
        lines.append(f"| {c.x} | {np.median(r03):.2e} [{max(r03):.2e}] | {np.median(r1):.2e} [{max(r1):.2e}] |")
        ax.scatter([c.x] * len(r1), r1, s=8, color="C0", alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel="training sentences N", ylabel="β·variance / bias at β = 1, per layer",
           title="variance/bias per layer (β = 0.03: divide by 33)")
    fig.tight_layout()
    plots.save_figure(fig, out / "ratio.png")
    return lines


def ablation_extra(study, runs, chosen, out):
    rec = next((r for s in study.seeds if (r := runs.get(run_name("da", chosen.get("da", 0), s, "report")))), None)
    if rec is None:
        return []
    lines = ["## 4. The variance term against the bias term at this N (the full training set): β·variance/(α·bias) "
             "at LoRA-DA's default A0, median [max] over the 35 layers", "", "| β | ratio |", "|---|---|"]
    for beta in (0.03, 1.0, T_BAR, 30 * T_BAR):
        r = ratios(rec["metrics"]["init_report"], 1.0, beta)
        lines.append(f"| {beta:g} | {np.median(r):.2e} [{max(r):.2e}] |")
    return lines


def frozen_extra(study, runs, chosen, out):
    lines = ["## 4. How far A moves in standard training: largest principal angle (degrees) between the row spaces of "
             "the initial and the final A, mean over the 35 layers; mean ± 95% CI over seeds (A frozen: 0 by "
             "construction, checked)", "", "| cell | A drift (degrees) | max over layers, mean over seeds |", "|---|---|---|"]
    for c in study.cells:
        recs = [r for s in study.seeds if (r := runs.get(run_name(c.name, chosen.get(c.group, 0), s, "report")))
                and "A_drift_degrees" in r.get("metrics", {})]
        if len(recs) >= 2:
            d = [r["metrics"]["A_drift_degrees"] for r in recs]
            m, h = mean_ci([x["mean"] for x in d])
            lines.append(f"| {c.name} | {m:.1f} ± {h:.1f} | {np.mean([x['max'] for x in d]):.1f} |")
    return lines


def generated_stories(path: Path, n=256, max_new=200, seed=0):
    """The pretraining domain at hand: n stories sampled from stories260K itself (temperature 1), one per line.
    The model's own distribution is as near to its pretraining as a task can be."""
    cfg = train.get_args([])
    setup = _setup(cfg, lambda *a: None)
    gen, lines = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        ids = list(setup.base.generate(torch.tensor([[setup.tok.bos_id]]), max_new, 1.0, generator=gen,
                                       stop_ids=(setup.tok.eos_id, setup.tok.bos_id)))
        lines.append(" ".join(setup.tok.decode(ids).split()))
    write(path, "\n".join(line for line in lines if line) + "\n")
    return path


def base_nll(setup, n=256):
    """The base model's mean cross-entropy per token over every token of the first n training examples (prompt
    and answer): how surprising the task's text is to the pretrained model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p, a in setup.task.encoded["train"][:n]:
            seq = torch.tensor([p + a])
            logits = setup.base(seq[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0].float(), seq[0, 1:], reduction="sum").item()
            count += seq.shape[1] - 1
    return total / count


def distance(out: Path) -> str:
    """Open question 1 from the data at hand: per task, how far it sits from pretraining (the base model's loss on
    its text; the estimated shift ‖ΔW‖ against ‖W0‖) and LoRA-DA's gain over LoRA in final test loss."""
    tasks = {"stories (sampled from the model)": ("--init-data", str(out / "scratch" / "stories.txt")),
             "SST-2 (movie reviews)": ("--task", "sst2"),
             "GSM8K (word problems)": ("--task", "gsm8k", "--max-len", "320")}

    def compute():
        generated_stories(out / "scratch" / "stories.txt")
        res = {}
        for label, args in tasks.items():
            report, _ = init_only(args, "da", out)
            cfg = train.get_args(list(args) + ["--init-only"])
            layers = report["layers"].values()
            res[label] = {"nll": base_nll(_setup(cfg, lambda *a: None)),
                          "rel_shift": [v["dW_fro"] / v["W0_fro"] for v in layers],
                          "grad": [v["G_fro"] for v in layers],
                          "sigma": [v["sigma"] for v in layers]}
        return res
    norms = cached(out / "norms.json", compute)
    gains = {}
    for label, study in (("SST-2 (movie reviews)", "baselines"), ("GSM8K (word problems)", "gsm8k")):
        st, runs = STUDIES[study], load_runs(RESULTS / study, STUDIES[study])
        chosen = select_lrs(st, runs)
        loss = report_scores(st, runs, chosen, "loss")
        if "da" in loss and "lora" in loss:
            gains[label] = (*paired(loss["da"], loss["lora"]), study)
    lines = ["# distance: tasks at increasing distance from the pretraining domain (children's stories)", "",
             STUDIES["distance"].question, "",
             "Distance is measured two ways on each task's first 256 training examples: the base model's mean loss per "
             "token (every token, prompt and answer), and the size of LoRA-DA's estimated shift, ‖ΔW‖_F/‖W0‖_F per layer "
             "(ΔW = −Y⁻¹GZ⁻¹, Eq. 5, damping 1e-6), with the mean gradient's norm ‖G‖_F beside it (zero in expectation on "
             "the model's own distribution), each median [min, max] over the 35 layers. The gain is LoRA-DA minus LoRA "
             "in final test loss, paired by seed, each at its chosen rate (from the `baselines` and `gsm8k` studies; "
             "negative = LoRA-DA better). The stories task is for the distance only: it has no test set to train for.", "",
             "| task | base loss per token (nats) | ‖G‖_F (mean gradient) | ‖ΔW‖_F/‖W0‖_F | LoRA-DA − LoRA, test loss | pairs | from |",
             "|---|---|---|---|---|---|---|"]
    for label, r in sorted(norms.items(), key=lambda kv: kv[1]["nll"]):
        g = gains.get(label)
        rel = r["rel_shift"]
        gain = f"{g[0]:+.4f} ± {g[1]:.4f} | {g[2]} | `{g[3]}`" if g else "– | – | –"
        g_ = r["grad"]
        lines.append(f"| {label} | {r['nll']:.3f} | {np.median(g_):.3g} [{min(g_):.3g}, {max(g_):.3g}] | "
                     f"{np.median(rel):.3g} [{min(rel):.3g}, {max(rel):.3g}] | {gain} |")
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (label, r) in enumerate(norms.items()):
        ax.scatter([r["nll"]] * len(r["rel_shift"]), r["rel_shift"], s=10, alpha=0.6, label=label, color=f"C{k}")
    ax.set(yscale="log", xlabel="base model loss per token on the task (nats)", ylabel="‖ΔW‖_F / ‖W0‖_F per layer",
           title="estimated shift against distance from pretraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save_figure(fig, out / "distance.png")
    return text


def collapsed(record, share=0.95):
    """A run that predicts one class for (nearly) every test sentence: it learned the label prior, not the task."""
    p = record.get("metrics", {}).get("final", {}).get("predicted_positive")
    return p is not None and max(p, 1 - p) >= share


def collapse_count(recs) -> str:
    """"k of n" runs collapsed, or "not recorded" where a run predates the recorded predictions."""
    known = [r for r in recs if r["metrics"].get("final", {}).get("predicted_positive") is not None]
    return f"{sum(map(collapsed, known))} of {len(known)}" if len(known) == len(recs) else "not recorded"


def babyllama_extra(study, runs, chosen, out):
    """The second model's diagnostics: collapse to one class, the variance/bias ratio per layer, how far A
    moves, and what its character tokenizer does to SST-2 (truncation, <unk>)."""
    lines = ["## 4. Runs collapsed to one class (≥ 95% of test predictions the same label) and A's drift (largest "
             "principal angle between the initial and final row spaces of A, mean over the 35 layers; mean ± 95% CI "
             "over seeds)", "", "| cell | collapsed | A drift (degrees) |", "|---|---|---|"]
    for c in study.cells:
        recs = report_records(study, runs, chosen, c.name)
        if recs:
            drift = mean_ci([r["metrics"]["A_drift_degrees"]["mean"] for r in recs])
            lines.append(f"| {c.name} | {sum(map(collapsed, recs))} of {len(recs)} | {drift[0]:.1f} ± {drift[1]:.1f} |")
    rec = next((r for s in study.seeds if (r := runs.get(run_name("da", chosen.get("da", 0), s, "report")))
                and "metrics" in r), None)
    if rec:
        m, rep = rec["metrics"], rec["metrics"]["init_report"]
        r = ratios(rep, 1.0, 0.03)
        lines += ["", "## 5. The variance term against the bias term at LoRA-DA's A0 (β = 0.03, N = the training set): "
                  f"β·variance/(α·bias) over the 35 layers: median {np.median(r):.2e}, max {max(r):.2e}. "
                  f"Truncated to the 256-character context: {m['truncated']}; characters outside the 105-piece "
                  f"alphabet (read as <unk>, never a target): {m['unknown_tokens']}."]
    return lines


def smollm2_extra(study, runs, chosen, out):
    """The model that reads English: each cell's step-0 and final accuracy, collapse to one class and A's drift;
    LoRA-DA's estimate per layer (the variance term against the bias term, the shift's size against W0's), and
    the training loss over the budget (is LoRA converged at 48 steps?)."""
    lines = ["## 4. Step 0, collapse to one class (≥ 95% of test predictions the same label) and A's drift (largest "
             "principal angle between the initial and final row spaces of A, mean over the 210 layers); mean ± 95% "
             "CI over seeds", "", "| cell | seeds | step-0 test accuracy | final test accuracy | collapsed | "
             "A drift (degrees) |", "|---|---|---|---|---|---|"]
    for c in study.cells:
        recs = report_records(study, runs, chosen, c.name)
        if recs:
            s0 = mean_ci([r["metrics"]["step0"]["accuracy"] for r in recs])
            fin = mean_ci([r["metrics"]["final"]["accuracy"] for r in recs])
            drift = mean_ci([r["metrics"]["A_drift_degrees"]["mean"] for r in recs])
            lines.append(f"| {c.name} | {len(recs)} | {fmt(*s0, pct=True)} | {fmt(*fin, pct=True)} | "
                         f"{sum(map(collapsed, recs))} of {len(recs)} | {drift[0]:.1f} ± {drift[1]:.1f} |")
    rec = next((r for s in study.seeds if (r := runs.get(run_name("da", chosen.get("da", 0), s, "report")))
                and "metrics" in r), None)
    if rec:
        layers = rec["metrics"]["init_report"]["layers"].values()
        r = ratios(rec["metrics"]["init_report"], 1.0, 0.03)
        rel = [v["dW_fro"] / v["W0_fro"] for v in layers]
        q = lambda xs: f"median {np.median(xs):.3g} [{min(xs):.3g}, {max(xs):.3g}]"
        lines += ["", f"## 5. LoRA-DA's estimate at its A0 (report seed {rec['metrics']['seed']}, {len(r)} layers): "
                  f"β·variance/(α·bias) (β = 0.03, N = the training set) {q(r)}; ‖ΔŴ‖_F/‖W0‖_F {q(rel)}; each "
                  f"layer's median entry of Y: {q([v['Y_median'] for v in layers])}, against the damping "
                  f"λ = {next(iter(layers))['damping']:g}."]
    lora = report_records(study, runs, chosen, "lora")
    if lora:
        loss = np.array([r["metrics"]["history"]["loss"] for r in lora])
        n = loss.shape[1]
        at = sorted({0, n // 4 - 1, n // 2 - 1, 3 * n // 4 - 1, n - 1})
        lines += ["", f"## 6. LoRA's training loss over the budget (mean of {len(lora)} report seeds; each step a "
                  "different batch of 16, so a curve that still falls at the end is not converged): " +
                  ", ".join(f"step {i + 1}: {loss[:, max(0, i - 3):i + 1].mean():.4f}" for i in at) +
                  " (each point the mean over that step and the three before it)."]
    return lines


def controls_extra(study, runs, chosen, out):
    """What each control isolates, per training mode: the paired difference, its p-value, and Holm's verdict within
    the mode's family; the gap da − lora as the sum of its steps along two paths; and per cell, the runs that
    collapsed to one class, how far A moved and where the init put the model at step 0."""
    acc = report_scores(study, runs, chosen, "accuracy")
    fam = study_family(study, runs, chosen)
    lines = []
    for fa, mode in (("", "standard training"), ("-FA", "A frozen (LoRA-FA)")):
        pairs = [(a, b, PAIR_LABELS[a, b]) for a, b in study.pairs if a.endswith("-FA") == bool(fa) and (a, b) in fam]
        if not pairs:
            continue
        lines += [f"## What each control isolates: {mode} (test accuracy; one family: Holm over all {len(fam)} "
                  "comparisons of this study, both modes)", "", "| a − b | isolates | Δ (points) | pairs | p (t) | "
                  "p (sign-flip) | Holm | verdict |", "|---|---|---|---|---|---|---|---|"]
        for x, y, w in pairs:
            c = fam[x, y]
            lines.append(f"| {x} − {y} | {w} | {100 * c.d:+.2f} ± {100 * c.h:.2f} | {c.n} | {c.p_t:.3f} | "
                         f"{c.p_sign:.3f} | {'rejects' if c.holm else '–'} | {c.word(True, x)} |")
        paths = (("da", "da-nostep", "da-lorascale", "lora"), ("da", "da-nostep", "random-dascale", "lora"),
                 ("da", "random-dascale", "lora"), ("da", "da-lorascale", "lora"))
        for path in paths:
            names = [n + fa for n in path]
            if all(n in acc for n in names):
                steps = [paired(acc[a], acc[b]) for a, b in zip(names, names[1:])]
                total = paired(acc[names[0]], acc[names[-1]])
                lines += ["", f"The gap {names[0]} − {names[-1]} = {100 * total[0]:+.2f} ± {100 * total[1]:.2f} points, "
                          "as " + " + ".join(f"({a} − {b}: {100 * m:+.2f} ± {100 * h:.2f})"
                                             for (a, b), (m, h, _) in zip(zip(names, names[1:]), steps)) + "."]
        lines.append("")
    lines += ["## Per cell: collapse to one class (≥ 95% of test predictions the same label), A's drift (largest "
              "principal angle between the initial and final row spaces of A, mean over the 35 layers) and step 0",
              "", "| cell | lr | collapsed | A drift (degrees) | step-0 test accuracy (%) | step-0 test loss |",
              "|---|---|---|---|---|---|"]
    for c in study.cells:
        recs = report_records(study, runs, chosen, c.name)
        if recs:
            m = recs[0]["metrics"]
            drift = mean_ci([r["metrics"]["A_drift_degrees"]["mean"] for r in recs])
            lines.append(f"| {c.name} | {chosen[c.group]:g} | {collapse_count(recs)} | "
                         f"{drift[0]:.1f} ± {drift[1]:.1f} | {100 * m['step0']['accuracy']:.2f} | "
                         f"{m['step0']['loss']:.4f} |")
    return lines


MECHANISM_METHODS = ("lora", "pissa", "milora", "ga", "one", "corda", "eva", "da", "whitened", "da-rel1e-3", "da-rel1e-2",
                     "da-rel1e-1")
MECHANISM_ARGS = {f"da-rel{k}": ("da", ("--relative-damping", k)) for k in ("1e-3", "1e-2", "1e-1")}  # theory.md §12


def mechanism(out: Path) -> str:
    """Per layer of each real model, from the 256 init samples at W0: the share of the layer's input energy
    that each init's row space captures, tr(A Z Aᵀ)/tr(Z) for orthonormal rows (a random r-subspace: r/d_in on
    average); Z's spectrum and Y's median against the damping λ; the stable rank ‖ΔW‖²_F/σ² of the shift."""

    def compute(res):
        """Fills in what the committed mechanism.json lacks (a model, or a method's shares), nothing else."""
        for model in llama_models():
            have = res.get(model, {}).get("layers", {})
            todo = [m for m in MECHANISM_METHODS if not have or m not in next(iter(have.values()))["share"]]
            if not todo:
                continue
            cfg = train.get_args(["--model", model])
            setup = _setup(cfg, lambda *a: None)
            samples = setup.task.samples(cfg.init_samples, setup.tok.pad_id)
            base = train.lora_model(cfg, setup)
            layers = lora_da.lora_targets(base)
            st = lora_da.kfac_statistics(base, samples, lora_da.causal_lm_losses, layers, batch_size=16)
            rows = have
            ref = train.lora_model(cfg, setup)
            lora_da.initialize_da(ref, samples, cfg=train.init_config(cfg, cfg.seed, len(setup.task.train)))
            reference = {n: m.lora_A.detach().clone() for n, m in lora_da.lora_targets(ref).items()}
            for name in layers:
                Z, Y = st.Z[name].double(), st.Y[name].double()
                if name not in rows:
                    ez = torch.linalg.eigvalsh((Z + Z.T) / 2)
                    rows[name] = {"d_in": Z.shape[0], "Z_below_damping": int((ez < cfg.damping).sum()),
                                  "Z_median": ez.median().item(), "Y_median": Y.median().item(), "share": {}}
                # how much of Y the absolute λ decides: its entries below 10 λ (there Y + λ is > 10% λ)
                rows[name].setdefault("Y_below_10_damping", ((Y < 10 * cfg.damping).double().mean().item()))
                rows[name].setdefault("Z_mean", Z.diagonal().mean().item())
            for method in todo:
                base_method, extra = MECHANISM_ARGS.get(method, (method, ()))
                mcfg = train.get_args(["--model", model, *extra])
                model_ = train.lora_model(mcfg, setup)
                report = peers.initialize_model(model_, base_method, samples,
                                            cfg=train.init_config(mcfg, mcfg.seed, len(setup.task.train)))
                for name, m in lora_da.lora_targets(model_).items():
                    A0 = torch.linalg.qr(m.lora_A.detach().double().T)[0]            # (d_in, r), orthonormal
                    Z = st.Z[name].double()
                    rows[name]["share"][method] = ((A0.T @ Z @ A0).trace() / Z.trace()).item()
                    if method in MECHANISM_ARGS:  # how far the relative damping turns A0 from λ's
                        da_A = reference[name]
                        rows[name].setdefault("angle_to_da", {})[method] = lora_da.principal_angle(m.lora_A, da_A)
                    if method == "da":
                        rep = report["layers"][name]
                        rows[name]["stable_rank"] = (rep["dW_fro"] / rep["sigma"]) ** 2
            res[model] = {"r": cfg.rank, "damping": cfg.damping, "layers": rows}
        return res
    path = out / "mechanism.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    res = compute(json.loads(json.dumps(before)))
    if res != before:
        write(path, json.dumps(res, indent=1))
    lines = ["# mechanism: where each init puts A, on both real models", "", STUDIES["mechanism"].question, "",
             "Per layer (35 per model), from the 256 init samples at W0. Input-energy share: tr(A Z Aᵀ)/tr(Z) for "
             "the orthonormalized rows of each init's A; a random r-subspace has r/d_in on average. Median [min, max] "
             "over layers.", "",
             "| model | r/d_in (median) | " + " | ".join(MECHANISM_METHODS) + " |", "|---|---|" + "---|" * len(MECHANISM_METHODS)]
    for model, rm in res.items():
        L_ = rm["layers"].values()
        cells = []
        for method in MECHANISM_METHODS:
            v = [x["share"][method] for x in L_]
            cells.append(f"{np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        lines.append(f"| {model} | {np.median([rm['r'] / x['d_in'] for x in L_]):.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Z's eigenvalues below the damping λ, Z's and Y's medians against λ, and the stable rank "
              "‖ΔW‖²_F/σ² of LoRA-DA's shift (how many of the r directions carry it): median [min, max] over layers.", "",
              "| model | λ | Z eigenvalues < λ (of d_in) | median eigenvalue of Z | median of Y | stable rank of ΔW |",
              "|---|---|---|---|---|---|"]
    for model, rm in res.items():
        L_ = list(rm["layers"].values())
        f = lambda k: f"{np.median([x[k] for x in L_]):.3g} [{min(x[k] for x in L_):.3g}, {max(x[k] for x in L_):.3g}]"
        below = f"{np.median([x['Z_below_damping'] for x in L_]):.0f} [{min(x['Z_below_damping'] for x in L_)}, " \
                f"{max(x['Z_below_damping'] for x in L_)}] of {np.median([x['d_in'] for x in L_]):.0f}"
        lines.append(f"| {model} | {rm['damping']:g} | {below} | {f('Z_median')} | {f('Y_median')} | {f('stable_rank')} |")
    lines += ["", "The relative damping (theory.md §12, Eq. 18: λ_Z = k·tr(Z)/d_in, λ_Y = k·mean(Y)): how far it turns "
              "LoRA-DA's A0 from the one with the absolute λ (largest principal angle, degrees), and the share of Y's "
              "entries below 10 λ, where the absolute damping, not the data, sets Y⁻¹ to within 10%: median [min, max] "
              "over layers.", "",
              "| model | Y entries < 10 λ | λ_Z at k = 0.1 (median) | angle to A0(λ), k = 1e-3 | k = 1e-2 | k = 1e-1 |",
              "|---|---|---|---|---|---|"]
    for model, rm in res.items():
        L_ = list(rm["layers"].values())
        if not all("angle_to_da" in x for x in L_):
            continue
        g = lambda v: f"{np.median(v):.3g} [{min(v):.3g}, {max(v):.3g}]"
        lines.append(f"| {model} | {g([x['Y_below_10_damping'] for x in L_])} | "
                     f"{np.median([0.1 * x['Z_mean'] for x in L_]):.3g} | " +
                     " | ".join(g([x["angle_to_da"][f"da-rel{k}"] for x in L_]) for k in ("1e-3", "1e-2", "1e-1")) + " |")
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(res), figsize=(6.5 * len(res), 4), squeeze=False)
    for ax, (model, rm) in zip(axes[0], res.items()):
        names = list(rm["layers"])
        for k, method in enumerate(m for m in MECHANISM_METHODS if m not in ("da-rel1e-3", "da-rel1e-2")):
            ax.plot(range(len(names)), [rm["layers"][n]["share"][method] for n in names], "o-", ms=3, label=method)
        ax.plot(range(len(names)), [rm["r"] / rm["layers"][n]["d_in"] for n in names], "k--", label="random (r/d_in)")
        ax.set(yscale="log", title=f"{model}: input-energy share of A's row space", xlabel="layer (7 per block)",
               ylabel="tr(A Z Aᵀ)/tr(Z)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, out / "mechanism.png")
    return text


THREE = (("stories260K", "baselines"), ("babyllama936K", "babyllama"), ("SmolLM2-135M", "smollm2"))
THREE_CELLS = ("lora", "da", "milora", "ga", "pissa", "one", "lora-FA", "da-FA")


def three_models(out: Path) -> str:
    """The three real models side by side, each from its own study (its budget, grid and seeds): zero-shot, each
    method's test accuracy, and LoRA-DA against each other method with that study's verdict under the one rule
    (its own Holm family). Reads the studies' committed runs; runs nothing."""
    rows, diffs = [], []
    for model, name in THREE:
        study = STUDIES[name]
        runs = load_runs(RESULTS / name, study)
        chosen = select_lrs(study, runs)
        acc = report_scores(study, runs, chosen, "accuracy")
        lora = report_records(study, runs, chosen, "lora")
        zero = mean_ci([r["metrics"]["step0"]["accuracy"] for r in lora])[0] if lora else float("nan")  # B = 0
        cells = [(f"{fmt(*mean_ci(list(acc[c].values())), pct=True)} ({len(acc[c])})" if c in acc else "–")
                 for c in THREE_CELLS]
        rows.append(f"| {model} | {name} | {100 * zero:.2f} | " + " | ".join(cells) + " |")
        fam = study_family(study, runs, chosen)
        for (a, b), c in fam.items():
            if a.removesuffix("-FA") == "da" and b in THREE_CELLS:
                diffs.append(f"| {model} | {a} − {b} | {100 * c.d:+.2f} ± {100 * c.h:.2f} | {c.n} | {c.p_t:.3f} | "
                             f"{c.p_sign:.3f} | {len(fam)} | {c.word(True, 'LoRA-DA')} |")
    lines = ["# Three real models side by side (SST-2 test accuracy, %)", "",
             "Each model from its own study, at that study's budget, grid and seeds (the study's table.md has the "
             "settings): stories260K `baselines` (400 steps × 32), babyllama936K `babyllama` (200 × 32), "
             "SmolLM2-135M `smollm2` (48 × 16). Zero-shot = LoRA's step 0 (B = 0: the base model). Each entry: mean "
             "± 95% t-interval (report seeds). Rebuild: `python studies/experiments.py three-models`.", "",
             "| model | study | zero-shot | " + " | ".join(THREE_CELLS) + " |", "|---|---|---|" + "---|" * len(THREE_CELLS)]
    lines += rows + ["", "LoRA-DA against each method, paired by seed (points), under the one inference rule: the "
                     "paired 95% t-interval and an exact paired sign-flip test; Holm's step-down over each study's "
                     "own family (its size in the column) on the larger p, α = 0.05; 'wins'/'loses' only where both "
                     "tests reject and Holm keeps it, 'resolved (unadjusted)' where a test rejects without that, "
                     "'no difference shown' where neither does; a cell at the collapse floor is named.", "",
                     "| model | a − b | Δ | pairs | p (t) | p (sign-flip) | family | verdict |",
                     "|---|---|---|---|---|---|---|---|"] + diffs
    text = "\n".join(lines) + "\n"
    write(out / "table.md", text)
    return text


def llama_models():
    return tuple(llama.MODELS)


def collapse_extra(study, runs, chosen, out):
    """Every cell's runs that collapsed to one class, a column of its own (the pairs' table shows only b's)."""
    lines = ["## Runs collapsed to one class per cell (≥ 95% of test predictions the same label)", "",
             "| cell | lr | collapsed |", "|---|---|---|"]
    for c in study.cells:
        recs = report_records(study, runs, chosen, c.name)
        if recs:
            lines.append(f"| {c.name} | {chosen[c.group]:g} | {collapse_count(recs)} |")
    return lines


def with_holm(extra=lambda *a: []):
    """A study's own diagnostics, then each cell's collapsed runs (its comparisons, under the one rule with Holm
    over the whole study, are section 3)."""
    return lambda *a: extra(*a) + [""] + collapse_extra(*a)


EXTRAS = {"controls": controls_extra, "controls-babyllama": controls_extra, "babyllama": babyllama_extra,
          "baselines": with_holm(), "smollm2": with_holm(smollm2_extra), "function-space": with_holm(), "rank": with_holm(),
          "samples": with_holm(samples_extra), "scarcity": with_holm(scarcity_extra),
          "ablation": with_holm(ablation_extra), "frozen-a": with_holm(frozen_extra)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES), help="which study")
    p.add_argument("--jobs", type=cli.Number(int, 1, 256, "a positive integer (processes, one thread each)"),
                   default=2, help="parallel runs, one thread each (default: 2, the cores here)")
    p.add_argument("--out", default=None, help="results folder (default: studies/results/STUDY)")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the tables and plots from the JSONs")
    p.add_argument("--list", action="store_true", help="list the grid and what is done, run nothing")
    p.add_argument("--only", default=None, help="comma list of cells: run only these (and their rate groups), e.g. "
                                                "to finish the most important cells first; the table shows them all")
    return p


def parse_args(argv=None):
    """The command line, with the checks that need no results: the parser's ranges, --only's cells, --out."""
    p = parser()
    a = p.parse_args(argv)
    if a.only is not None:
        try:
            cli.names(a.only, [c.name for c in STUDIES[a.study].cells], "--only")
        except ValueError as e:
            p.error(f"{e} (the cells of {a.study})")
    if a.out is not None and not a.out.strip():
        p.error("--out is empty: give a folder, or leave the flag out for studies/results/STUDY")
    return a


def main(argv=None):
    a = parse_args(argv)
    cli.boundary(lambda: study_main(a))


def study_main(a):
    study = STUDIES[a.study]
    out = Path(a.out or RESULTS / a.study)
    if a.study == "distance":  # reads the baselines and gsm8k runs; its measurements need no training
        print(distance(out))
        return
    if a.study == "three-models":  # reads the three models' studies
        print(three_models(out))
        return
    if a.study == "mechanism":  # measurements of the inits alone, on both real models
        print(mechanism(out))
        return
    if a.study.startswith("planted"):  # a known target shift: the estimate and the subspaces against the truth
        spec = next(sp for sp in planted.SPECS.values() if sp.folder == a.study)
        if not a.aggregate:
            planted.run_map(out, spec)
            if spec.train:
                planted.run_training(out, spec, jobs=a.jobs)
        print(planted.aggregate(out, spec))
        return
    if study.of:  # convergence: read the runs of another study, run nothing
        print(convergence(STUDIES[study.of[0]], load_runs(RESULTS / study.of[0], STUDIES[study.of[0]]), out))
        return
    if a.list:
        runs = load_runs(out, study)
        for m, lr, s in grid(study, "select"):
            n = run_name(m, lr, s, "select")
            print(("done  " if n in runs else "to do ") + n)
        for m, lr, s in tie_grid(study, runs):
            n = run_name(m, lr, s, "select")
            print(("done  " if n in runs else "to do ") + n + " (tie-break)")
        chosen = select_lrs(study, runs)
        for m, lr, s in grid(study, "report", chosen):
            n = run_name(m, lr, s, "report")
            print(("done  " if n in runs else "to do ") + n)
        return
    if not a.aggregate:
        part = study
        if a.only:
            names = cli.names(a.only, [c.name for c in study.cells], "--only")
            part = dataclasses.replace(study, cells=tuple(c for c in study.cells if c.name in names))
        run_study(a.study, part, out, a.jobs, shared=RESULTS)
    print(aggregate(a.study, study, out))


if __name__ == "__main__":
    main()
