"""
Plant known bugs one at a time and report which tests catch each (run by hand, not in CI):

    python tests/mutants.py                 # every mutant, the first test that catches each (about 10 minutes)
    python tests/mutants.py --all           # every test on every mutant
    python tests/mutants.py --only sigma    # mutants whose name contains "sigma"

Each mutant is a one-line change to the code (the bugs an audit planted: each changes what the method
computes). The repository is copied to a temporary folder, the line replaced, and the value and theory
tests run there. A mutant that no test catches is a hole in the suite: the table says so.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_values.py", "tests/test_lora_da.py", "tests/test_survivors.py", "tests/test_theory.py",
         "tests/test_llama.py", "tests/test_train.py", "tests/test_distributed.py"]

MUTANTS = [  # name, file, the exact original text, its replacement
    ("folded LoRA layer without the scale s", "llama.py",
     "torch.addmm(self.base.weight, self.lora_B, self.lora_A, alpha=self.scaling)",
     "torch.addmm(self.base.weight, self.lora_B, self.lora_A)"),
    ("written-out attention lets each query see the next key", "llama.py",
     ".triu(1).repeat(n_rep, 1)", ".triu(2).repeat(n_rep, 1)"),
    ("written-out attention pairs query heads with the wrong kv heads", "llama.py",
     "q = xq.view(B, T, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4)",
     "q = xq.view(B, T, n_rep, n_kv, hd).permute(0, 3, 2, 1, 4)"),
    ("variance not divided by sigma^2 after normalizing", "lora_da.py",
     "dW, var_scale = dW / sigma, 1.0 / sigma ** 2", "dW, var_scale = dW / sigma, 1.0"),
    ("Y used without damping", "lora_da.py",
     "        Yd = Y + damping\n", "        Yd = Y\n"),
    ("N - 1 instead of N in the solve's variance coefficient", "lora_da.py",
     "c = trace_Y_inv(Y, lam_y) / cfg.N * var_scale", "c = trace_Y_inv(Y, lam_y) / (cfg.N - 1) * var_scale"),
    ("tr(Y) instead of tr(Y^-1) for diagonal Y", "lora_da.py",
     "        return (1.0 / (Y + damping)).sum()", "        return (Y + damping).sum()"),
    ("padding tokens summed into Z, token count unchanged", "lora_da.py",
     "                    Z[name].add_(xm.T @ xm)",
     "                    Z[name].add_(x.reshape(-1, d_in).T @ x.reshape(-1, d_in))"),
    ("LoRA-One uses all samples instead of its 8", "peers.py",
     'SAMPLES_USED = {"ga": "ga_samples", "one": "one_samples"}', 'SAMPLES_USED = {"ga": "ga_samples"}'),
    ("LoRA's A from U(0, 1/sqrt(d_in)) instead of U(-1/sqrt(d_in), 1/sqrt(d_in))", "lora_da.py",
     "A = (torch.rand(r, d_in, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)",
     "A = torch.rand(r, d_in, generator=generator, dtype=torch.float64) / math.sqrt(d_in)"),
    ("N - r instead of N - r - 1 in synthetic.lora_fa_risk", "synthetic.py",
     "/ (N - r - 1)).item()", "/ (N - r)).item()"),
    ("labels mask ignored (all tokens counted)", "lora_da.py",
     '    if token_mask == "labels" and "targets" in batch:', '    if False:'),
    ("natural gradient with the wrong sign", "lora_da.py",
     "        return -GZinv / Yd[:, None]", "        return GZinv / Yd[:, None]"),
    ("largest eigenvectors instead of smallest", "lora_da.py",
     "    return canonical_signs(V[:, :r]), \"eigh\"", "    return canonical_signs(V[:, -r:]), \"eigh\""),
    ("gamma applied once instead of split between A and B", "lora_da.py",
     "    lora_A = A0.T / root", "    lora_A = A0.T"),
    ("relative damping by tr(Z) instead of tr(Z)/d_in", "lora_da.py",
     "return k * Z.double().diagonal().mean().item(), k * Yd.double().mean().item()",
     "return k * Z.double().diagonal().sum().item(), k * Yd.double().mean().item()"),
    ("at LoRA's scale, B not divided by the larger scale of A", "lora_da.py",
     "    return lora_A, dW @ A0 / math.sqrt(cfg.gamma) * (root / math.sqrt(cfg.gamma))",
     "    return lora_A, dW @ A0 / math.sqrt(cfg.gamma)"),
    ("the random control's direction from another seed than LoRA's", "lora_da.py",
     "A = lora_init(d_out, d_in, r, torch.Generator().manual_seed(seed))[0]",
     "A = lora_init(d_out, d_in, r, torch.Generator().manual_seed(seed + 1))[0]"),
    ("the whitened subspace not mapped back by Z^(-1/2)", "peers.py",
     "    A0, _ = torch.linalg.qr(Zih @ V_r)", "    A0, _ = torch.linalg.qr(V_r)"),
    ("N - r instead of N - r - 1 in synthetic.lora_fa_excess_risk", "synthetic.py",
     "(self.W0.shape[0] + bias) * r / (N - r - 1)", "(self.W0.shape[0] + bias) * r / (N - r)"),
    ("the excess-risk bias with an orthogonal instead of a Z-weighted projection", "synthetic.py",
     "Z - ZA @ torch.linalg.solve(A0.T @ ZA, ZA.T)", "Z - Z @ A0 @ A0.T @ Z"),
    ("a rounded rank-deficient Z damped without clipping its negative eigenvalues", "lora_da.py",
     "(V * evals.clamp_min(0)) @ V.T + damping * eye", "(V * evals) @ V.T + damping * eye"),
    ("MiLoRA's minor singular values on the major directions", "peers.py",
     "    return (root[:, None] * Vh[-r:]).float(), (U[:, -r:] * root).float()",
     "    return (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()"),
    ("CorDA normalized by the batch's largest input instead of each sample's", "peers.py",
     "peak = x.masked_fill(~attended[..., None], -math.inf).amax(dim=(1, 2)).abs()",
     "peak = x.masked_fill(~attended[..., None], -math.inf).amax().abs().expand(bsz)"),
    ("CorDA's A without the C^-1 that maps W0 C's directions back", "peers.py",
     "(root[:, None] * (Vh[:r] @ Cinv)).float()", "(root[:, None] * Vh[:r]).float()"),
    ("EVA's PCA without centring", "peers.py",
     '"cov": S2[o] / n_tokens - torch.outer(mean, mean)', '"cov": S2[o] / n_tokens'),
    ("CorDA's covariance divided by the token count instead of the sample count", "peers.py",
     '"C": C[o] / n_samples,', '"C": C[o] / n_tokens,'),
    ("the whitened init with its two dampings swapped", "peers.py",
     "Zih, Yih = inverse_sqrt(Z, lam_z), inverse_sqrt(Y, lam_y)", "Zih, Yih = inverse_sqrt(Z, lam_y), inverse_sqrt(Y, lam_z)"),
    ("the model-level init passing the run's seed instead of each layer's", "lora_da.py",
     "seed=layer_seed(cfg.seed, name), name=name)", "seed=cfg.seed, name=name)"),
    ("EVA's first moment not reduced across processes", "peers.py",
     "for t in (C[name], S1[name], S2[name])]", "for t in (C[name], S2[name])]"),
    ("the verbalizer predicting the other word", "tasks.py",
     "pred = (logp[:, 1] > logp[:, 0]).long().cpu()", "pred = (logp[:, 0] > logp[:, 1]).long().cpu()"),
    ("EVA's label mask ignored", "peers.py",
     'token_mask=peer.eva_token_mask if method == "eva" else "all"', 'token_mask="all"'),
]


def run(name, path, old, new, keep_going):
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", "out", "__pycache__"))
        (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")  # the data, where conftest looks
        f = copy / path
        text = f.read_text()
        if text.count(old) != 1:
            return None, f"the original text is not found exactly once in {path}"
        f.write_text(text.replace(old, new))
        stop = [] if keep_going else ["-x"]  # -x: the first test that catches it is enough to say it is caught
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *stop, *TESTS],
                           cwd=copy, capture_output=True, text=True)
        failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", r.stdout, re.M)))
        return failed, None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run only mutants whose name contains this")
    p.add_argument("--all", action="store_true", help="run every test on each mutant (slower), not stop at the first catch")
    a = p.parse_args()
    rows, holes = [], 0
    for name, path, old, new in MUTANTS:
        if a.only and a.only not in name:
            continue
        failed, problem = run(name, path, old, new, a.all)
        if problem:
            print(f"- {name}: {problem}", flush=True)
            continue
        holes += not failed
        short = [t.split("::")[-1] for t in failed]
        print(f"- {name}: {'NOT CAUGHT' if not failed else f'caught by {len(failed)} test(s)'}", flush=True)
        rows.append((name, short))
    print("\n| planted bug | caught by |\n|---|---|")
    for name, short in rows:
        shown = ", ".join(f"`{t}`" for t in short[:3]) + (f" and {len(short) - 3} more" if len(short) > 3 else "")
        print(f"| {name} | {shown or '**not caught**'} |")
    sys.exit(1 if holes else 0)


if __name__ == "__main__":
    main()
