"""
A single-file LLaMA-2, read beside Meta's reference model.py and llama2.c's model.py,
plus what this project needs and they lack: a key/value cache for decoding, hand-written LoRA
layers, a sentencepiece tokenizer, loaders for the three real checkpoint formats, and a sampling
CLI. In reading order: the model, generation, LoRA, the tokenizer, then the checkpoint formats as an
appendix, then the CLI.

Sample from the real stories260K model:

    python llama.py --checkpoint ../shared/data/stories260K/stories260K.bin \
        --tokenizer ../shared/data/stories260K/tok512.model --prompt "Once upon a time" --temperature 0
"""
import argparse
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------
# the model


@dataclass
class ModelArgs:
    # defaults are the real stories260K model (karpathy/tinyllamas)
    dim: int = 64
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: Optional[int] = 4
    vocab_size: int = 512
    hidden_dim: Optional[int] = 172  # None: Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 4
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tie_embeddings: bool = True  # stories260K shares embedding and output; LLaMA-2-7B does not


def check_args(args: ModelArgs, source="model"):
    """The shapes the architecture needs, as one-line errors instead of a bare assert deep inside."""
    n_kv = args.n_kv_heads or args.n_heads
    for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        if not isinstance(getattr(args, name), int) or getattr(args, name) < 1:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {getattr(args, name)}")
    if args.dim % args.n_heads:
        raise CheckpointError(f"{source}: dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if n_kv < 1 or args.n_heads % n_kv:
        raise CheckpointError(f"{source}: n_heads {args.n_heads} is not a multiple of n_kv_heads {n_kv}")
    if (args.dim // args.n_heads) % 2:
        raise CheckpointError(f"{source}: head size {args.dim // args.n_heads} must be even for rotary embeddings")


PRESETS = {
    "stories260K": ModelArgs(),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=32000,
                           hidden_dim=None, multiple_of=256, max_seq_len=4096, tie_embeddings=False),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, vocab_size=32000,
                            hidden_dim=None, multiple_of=256, max_seq_len=4096, tie_embeddings=False),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                            hidden_dim=None, multiple_of=4096, ffn_dim_multiplier=1.3,
                            max_seq_len=4096, tie_embeddings=False),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 as Meta does, then cast back (matters for bf16 models)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs(head_dim: int, end: int, theta: float = 10000.0, device=None):
    """cos and sin of m·θ_i, (end, head_dim/2): the real-number form of Meta's freqs_cis."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rotary_emb(x, freqs_cos, freqs_sin):
    # x: (B, T, nh, hd); rotate the interleaved pairs (x0, x1), (x2, x3), ... as complex numbers
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x_r, x_i = xf.unbind(-1)                           # (B, T, nh, hd/2) each
    cos = freqs_cos[None, :, None, :]                  # (1, T, 1, hd/2)
    sin = freqs_sin[None, :, None, :]
    out = torch.stack([x_r * cos - x_i * sin, x_r * sin + x_i * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def repeat_kv(x, n_rep: int):
    # (B, T, n_kv, hd) -> (B, T, n_kv * n_rep, hd): grouped-query attention shares each kv head
    if n_rep == 1:
        return x
    B, T, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(B, T, n_kv, n_rep, hd).reshape(B, T, n_kv * n_rep, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        assert args.n_heads % self.n_kv_heads == 0
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.max_seq_len = args.max_seq_len
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # allocated on the first cached call

    def forward(self, x, freqs_cos, freqs_sin, start_pos: Optional[int] = None):
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, freqs_cos, freqs_sin)
        xk = apply_rotary_emb(xk, freqs_cos, freqs_sin)

        if start_pos is None:
            # training / full forward: no cache, plain causal attention
            keys, values, is_causal, mask = xk, xv, T > 1, None
        else:
            # incremental decoding: write this chunk into the cache, attend to everything so far
            if start_pos == 0 or self.cache_k is None or self.cache_k.shape[0] != B:
                shape = (B, self.max_seq_len, self.n_kv_heads, self.head_dim)
                self.cache_k = torch.zeros(shape, dtype=xk.dtype, device=x.device)
                self.cache_v = torch.zeros(shape, dtype=xv.dtype, device=x.device)
            self.cache_k[:, start_pos:start_pos + T] = xk.detach()
            self.cache_v[:, start_pos:start_pos + T] = xv.detach()
            keys = self.cache_k[:, :start_pos + T]
            values = self.cache_v[:, :start_pos + T]
            is_causal, mask = False, None
            if T > 1:  # a chunk after a prefix: query i sees keys 0 .. start_pos + i
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)

        keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)
        # (B, nh, T, hd) for scaled_dot_product_attention
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.wo(out)


def ffn_hidden_dim(args: ModelArgs) -> int:
    if args.hidden_dim is not None:
        return args.hidden_dim
    # Meta's rule: 2/3 of 4·dim, times an optional multiplier, rounded up to multiple_of
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        # SwiGLU: w2(silu(w1 x) * w3 x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cos, freqs_sin, start_pos=None):
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._init_rope()

    def _init_rope(self, device=None):
        # not persistent: derived from the config, never stored in checkpoints
        cos, sin = precompute_freqs(self.args.dim // self.args.n_heads, self.args.max_seq_len,
                                    self.args.rope_theta, device=device)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, tokens, start_pos: Optional[int] = None, at: Optional[torch.Tensor] = None):
        """tokens (B, T) -> logits (B, T, vocab). start_pos=None: full causal pass (training);
        start_pos=int: incremental decoding with the key/value cache, tokens at positions start_pos..
        at: a (B, T) bool mask -> logits only there, (n_at, vocab), as llama2.c computes only the last
        position's at inference: the vocabulary projection is skipped where no loss or prediction reads it."""
        B, T = tokens.shape
        p0 = start_pos or 0
        if p0 + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {p0 + T} tokens exceeds the model's context of {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        freqs_cos, freqs_sin = self.freqs_cos[p0:p0 + T], self.freqs_sin[p0:p0 + T]
        for layer in self.layers:
            h = layer(h, freqs_cos, freqs_sin, start_pos)
        h = self.norm(h)
        if at is not None:
            h = h[at]  # (n_at, dim)
        return self.output(h).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: Optional[float] = None,
                 stop_ids=(), generator: Optional[torch.Generator] = None):
        """Yield new token ids one at a time: a cached prefill, then one token per step.
        temperature 0 is greedy; like llama2.c's run.c, stop at any id in stop_ids."""
        logits = self(tokens, start_pos=0)[:, -1]
        pos = tokens.shape[1]
        for _ in range(max_new_tokens):
            if pos >= self.args.max_seq_len:
                return
            next_id = sample(logits, temperature, top_p, generator)
            if next_id.item() in stop_ids:
                return
            yield next_id.item()
            logits = self(next_id.view(1, 1), start_pos=pos)[:, -1]
            pos += 1


# -----------------------------------------------------------------------------
# generation: greedy or nucleus sampling, one token at a time (Transformer.generate above drives it)


def sample(logits, temperature: float, top_p: Optional[float], generator=None):
    # logits (1, vocab) -> (1,) token id
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose mass reaches top_p
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        p_sorted[(p_sorted.cumsum(-1) - p_sorted) > top_p] = 0.0
        choice = torch.multinomial(p_sorted.cpu(), 1, generator=generator).to(idx.device)
        return idx.gather(-1, choice).view(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


# -----------------------------------------------------------------------------
# hand-written LoRA (Hu et al. 2021), minLoRA-sized

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A frozen nn.Linear W0 plus a trainable low-rank update s·B A.
    lora_A: (r, d_in), lora_B: (d_out, r); kept in fp32 whatever the base dtype."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, rslora: bool = False,
                 dropout: float = 0.0, freeze_A: bool = False):
        super().__init__()
        d_out, d_in = base.weight.shape
        if not 1 <= r <= min(d_in, d_out):
            raise ValueError(f"LoRA rank r={r} is impossible for a {d_out}x{d_in} layer: need 1 <= r <= {min(d_in, d_out)}")
        self.base = base.requires_grad_(False)
        self.r, self.lora_alpha, self.rslora = r, lora_alpha, rslora
        # the one place the scaling is set: s = lora_alpha/r, or lora_alpha/√r with rsLoRA (Kalajdzievski 2023)
        self.scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev), requires_grad=not freeze_A)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev))
        self.freeze_A = freeze_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.W0_shift = None  # (B, A) of the init when it moved W0 by −s·B A (PiSSA, LoRA-GA)
        # standard LoRA: A ~ Kaiming-uniform(a=√5) = U(-1/√d_in, 1/√d_in), B = 0, so B A = 0 at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        h = self.base(x)
        if self.merged:
            return h
        # h = W0 x + s·B A x
        return h + (self.scaling * F.linear(F.linear(self.dropout(x).float(), self.lora_A), self.lora_B)).type_as(h)

    @torch.no_grad()
    def init_(self, A, B, shift_W0: bool = False):
        """Write an initialization (A, B). shift_W0: W0 <- W0 - s·B A so the output is unchanged at step 0."""
        if self.merged:
            raise RuntimeError("unmerge() before writing a new LoRA init")
        if A.shape != self.lora_A.shape or B.shape != self.lora_B.shape:
            raise ValueError(f"LoRA init shapes A{tuple(A.shape)} B{tuple(B.shape)}, expected "
                             f"A{tuple(self.lora_A.shape)} B{tuple(self.lora_B.shape)}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError("LoRA init has non-finite entries")
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        if shift_W0:
            W = self.base.weight
            W.copy_((W.float() - self.scaling * B.float() @ A.float()).to(W.dtype))
            self.W0_shift = (B.detach().float().cpu().clone(), A.detach().float().cpu().clone())

    @torch.no_grad()
    def merge(self):
        # W <- W0 + s·B A; idempotent
        if not self.merged:
            W = self.base.weight
            W.copy_((W.float() + self.scaling * self.lora_B @ self.lora_A).to(W.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            W = self.base.weight
            W.copy_((W.float() - self.scaling * self.lora_B @ self.lora_A).to(W.dtype))
            self.merged = False


def add_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16.0, targets=LORA_TARGETS, rslora: bool = False,
             dropout: float = 0.0, freeze_A: bool = False) -> dict:
    """Wrap every nn.Linear whose last name is in targets; returns {name: LoRALinear}."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"}
    valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unknown = sorted(set(targets) - set(valid))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target modules {unknown or list(targets)}; valid: {valid}")
    chosen = {n: lin for n, lin in linears.items() if n.rsplit(".", 1)[-1] in targets}
    name, lin = min(chosen.items(), key=lambda kv: min(kv[1].weight.shape))
    if not 1 <= r <= min(lin.weight.shape):
        d_out, d_in = lin.weight.shape
        raise ValueError(f"LoRA rank r={r} is impossible for this model: need 1 <= r <= {min(d_out, d_in)} "
                         f"(smallest target {name} is {d_out}x{d_in})")
    wrapped = {}
    for name, lin in linears.items():
        if name.rsplit(".", 1)[-1] in targets:
            parent_name, child = name.rsplit(".", 1)
            layer = LoRALinear(lin, r, lora_alpha, rslora=rslora, dropout=dropout, freeze_A=freeze_A)
            setattr(model.get_submodule(parent_name), child, layer)
            wrapped[name] = layer
    return wrapped


def lora_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module):
    for n, p in model.named_parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(not layer.freeze_A)
        layer.lora_B.requires_grad_(True)


def lora_state(model: nn.Module) -> dict:
    """The adapter alone: A, B per layer, how to rebuild a shifted W0, and the config to rebuild it."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    one = next(iter(layers.values()))
    return {
        "config": {"r": one.r, "lora_alpha": one.lora_alpha, "rslora": one.rslora, "scaling": one.scaling,
                   "targets": sorted({n.rsplit(".", 1)[-1] for n in layers})},
        "lora": {n: {"A": m.lora_A.detach().cpu().clone(), "B": m.lora_B.detach().cpu().clone()}
                 for n, m in layers.items()},
        "W0_shift": {n: {"B": m.W0_shift[0], "A": m.W0_shift[1]} for n, m in layers.items()
                     if m.W0_shift is not None},
    }


def save_lora(model: nn.Module, path):
    atomic_save(lora_state(model), path)


def load_lora(model: nn.Module, path_or_state, dropout: float = 0.0, freeze_A: bool = False) -> dict:
    """Add LoRA to a base model as the adapter describes, apply its W0 shift, load A and B."""
    state = path_or_state
    if not isinstance(state, dict):
        if Path(state).is_dir() and (Path(state) / "adapter_config.json").is_file():
            state = read_peft(state, model)  # a PEFT folder (this project's export, or PEFT's own)
        elif not Path(state).is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {state} (a .pt file, or a PEFT folder with adapter_config.json)")
        else:
            state = torch_load(Path(state))
    cfg = state["config"]
    lora_alpha = cfg.get("lora_alpha", cfg.get("alpha"))  # "alpha" in adapters written before the rename
    layers = lora_layers(model) or add_lora(model, cfg["r"], lora_alpha, cfg["targets"], cfg["rslora"],
                                            dropout=dropout, freeze_A=freeze_A)
    if set(layers) != set(state["lora"]):
        raise ValueError(f"adapter layers {sorted(state['lora'])[:3]}... do not match the model's {sorted(layers)[:3]}...")
    for n, m in layers.items():
        dev = m.lora_A.device
        if n in state.get("W0_shift", {}):
            s = state["W0_shift"][n]
            A0, B0 = s.get("A", s.get("A0")), s.get("B", s.get("B0"))  # "A0"/"B0" before the rename
            m.init_(A0.to(dev), B0.to(dev), shift_W0=True)
        m.init_(state["lora"][n]["A"].to(dev), state["lora"][n]["B"].to(dev))
    return layers


# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A thin sentencepiece wrapper with Meta's interface."""

    def __init__(self, path):
        import sentencepiece as spm
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (expected a sentencepiece .model file)")
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(path))
        except (RuntimeError, OSError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: not a sentencepiece .model file")
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA tokenizers have no pad piece (sentencepiece says -1); like the LoRA-DA code we pad
        # with EOS, and every padded position is masked out of attention-free losses and statistics
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# -----------------------------------------------------------------------------
# appendix: real checkpoints (llama2.c legacy .bin, Meta's consolidated.NN.pth, Hugging Face)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path, device="cpu", dtype=torch.float32) -> Transformer:
    """Detect the format at `path` and return a ready Transformer in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a llama2.c .bin file, a Meta folder "
                              f"with params.json, or a Hugging Face folder with config.json)")
    if path.is_dir():
        if (path / "params.json").exists():
            args, sd = _read_meta(path)
        elif (path / "config.json").exists():
            args, sd = _read_hf(path)
        else:
            raise CheckpointError(f"{path}: folder has neither params.json (Meta) nor config.json (Hugging Face)")
    else:
        args, sd = _read_llama2c(path)
    return _build(args, sd, device, dtype, source=path)


def read_args(path) -> ModelArgs:
    """The model's shape from a checkpoint's config or header alone, no weights read (for dry runs)."""
    path = Path(path)
    if (path / "params.json").is_file():
        return meta_args(read_json(path / "params.json"), path / "params.json")
    if (path / "config.json").is_file():
        return hf_args(read_json(path / "config.json"), path / "config.json")
    if path.is_file():
        return _read_llama2c(path)[0]
    raise CheckpointError(f"checkpoint not found: {path} (expected a llama2.c .bin file, a Meta folder with "
                          f"params.json, a Hugging Face folder with config.json, or a preset: {', '.join(PRESETS)})")


def read_json(path: Path) -> dict:
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})")
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def meta_args(p: dict, source, vocab_size: Optional[int] = None, tied: bool = False) -> ModelArgs:
    """ModelArgs from Meta's params.json: the one place it is parsed. Meta writes vocab_size -1 (the
    tokenizer decides): then vocab_size (read off the embedding), else LLaMA-2's 32000."""
    try:
        vocab = p.get("vocab_size", -1)
        return ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
                         vocab_size=vocab if vocab and vocab > 0 else (vocab_size or 32000),
                         hidden_dim=p.get("hidden_dim"), multiple_of=p.get("multiple_of", 256),
                         ffn_dim_multiplier=p.get("ffn_dim_multiplier"), norm_eps=p.get("norm_eps", 1e-5),
                         rope_theta=p.get("rope_theta", 10000.0), max_seq_len=p.get("max_seq_len", 4096),
                         tie_embeddings=tied)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e}")


def hf_args(c: dict, source, has_output: bool = True) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json: the one place it is parsed."""
    try:
        return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                         n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                         vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                         norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=c.get("rope_theta", 10000.0),
                         max_seq_len=c.get("max_position_embeddings", 4096),
                         tie_embeddings=c.get("tie_word_embeddings", False) or not has_output)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e}")


def _build(args: ModelArgs, sd: dict, device, dtype, source) -> Transformer:
    check_args(args, source)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        sd.pop("output.weight", None)
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)}")
    check_finite(sd, source)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)  # assign: no second copy of a 7B model
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model._init_rope(device=device)
    return model.eval()


def _read_llama2c(path: Path):
    """llama2.c's legacy (version 0) export: 7 int32 header, then fp32 arrays in a fixed order."""
    nbytes = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(28)
        if len(header) < 28:
            raise CheckpointError(f"{path}: {nbytes} bytes, too short for a llama2.c header (28 bytes)")
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("7i", header)
        if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or dim % n_heads:
            hdr = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
            raise CheckpointError(f"{path}: not a llama2.c legacy .bin (header {hdr})")
        shared = vocab_size > 0  # a negative vocab_size means an untied output layer at the end
        V, D, H, L = abs(vocab_size), dim, hidden_dim, n_layers
        hd = D // n_heads
        kv = n_kv_heads * hd
        shapes = [("tok_embeddings.weight", (V, D)), ("attention_norm", (L, D)), ("wq", (L, D, D)),
                  ("wk", (L, kv, D)), ("wv", (L, kv, D)), ("wo", (L, D, D)), ("ffn_norm", (L, D)),
                  ("w1", (L, H, D)), ("w2", (L, D, H)), ("w3", (L, H, D)), ("norm.weight", (D,)),
                  ("freqs_cos", (seq_len, hd // 2)), ("freqs_sin", (seq_len, hd // 2))]
        if not shared:
            shapes.append(("output.weight", (V, D)))
        expected = 28 + 4 * sum(math.prod(s) for _, s in shapes)
        if nbytes != expected:
            raise CheckpointError(f"{path}: {nbytes} bytes, expected {expected} for header "
                                  f"(dim={D}, hidden={H}, layers={L}, heads={n_heads}, kv_heads={n_kv_heads}, "
                                  f"vocab={vocab_size}, seq_len={seq_len}); truncated or not a llama2.c export?")
        arrays = {}
        for name, shape in shapes:
            buf = f.read(4 * math.prod(shape))
            arrays[name] = torch.frombuffer(bytearray(buf), dtype=torch.float32).view(shape)
    sd = {"tok_embeddings.weight": arrays["tok_embeddings.weight"], "norm.weight": arrays["norm.weight"]}
    where = {"attention_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight",
             "wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
             "wo": "attention.wo.weight", "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight",
             "w3": "feed_forward.w3.weight"}
    for short, full in where.items():
        for i in range(L):
            sd[f"layers.{i}.{full}"] = arrays[short][i]
    if not shared:
        sd["output.weight"] = arrays["output.weight"]
    args = ModelArgs(dim=D, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=V, hidden_dim=H,
                     max_seq_len=seq_len, tie_embeddings=shared)
    return args, sd


# Meta's model parallelism splits each weight along one dimension; merging shards undoes it.
# ColumnParallelLinear (wq wk wv w1 w3 output): dim 0; RowParallelLinear (wo w2) and
# ParallelEmbedding: dim 1; norms are replicated.
def _meta_shard_dim(name: str) -> Optional[int]:
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
        return 0
    if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
        return 1
    return None


def torch_load(path: Path):
    """torch.load with weights_only=True: tensors and plain containers only, no code from the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # an unpickler refusal, a truncated zip, random bytes
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint, or a damaged one ({first})")


def check_finite(sd: dict, source):
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: weight {k} has NaN or inf entries")


def _read_meta(path: Path):
    params = read_json(path / "params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: params.json found but no consolidated.NN.pth shards")
    states = [torch_load(s) for s in shards]
    sd = {}
    for name in states[0]:
        if name == "rope.freqs":  # Meta's 7B carries its RoPE table; we recompute it
            continue
        parts = [s[name] for s in states]
        d = _meta_shard_dim(name)
        sd[name] = parts[0] if d is None or len(parts) == 1 else torch.cat(parts, dim=d)
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError(f"{path}: no tok_embeddings.weight in {shards[0].name}")
    args = meta_args(params, path / "params.json", vocab_size=sd["tok_embeddings.weight"].shape[0],
                     tied="output.weight" not in sd)
    return args, sd


def save_meta_checkpoint(model: Transformer, folder, n_shards: int = 1):
    """Write params.json and consolidated.NN.pth, split as Meta's model parallelism would."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "hidden_dim": ffn_hidden_dim(a), "multiple_of": a.multiple_of,
              "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_seq_len": a.max_seq_len}
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if a.tie_embeddings:
        sd.pop("output.weight", None)
    for i in range(n_shards):
        shard = {}
        for k, v in sd.items():
            d = _meta_shard_dim(k)
            shard[k] = v.clone() if d is None else v.chunk(n_shards, dim=d)[i].clone()
        atomic_save(shard, folder / f"consolidated.{i:02d}.pth")
    atomic_write_text(folder / "params.json", json.dumps(params, indent=2))


def hf_unpermute(w, n_heads: int):
    """Undo Hugging Face's q/k permutation: HF rotates half-split pairs (i, i + hd/2), Meta rotates
    interleaved pairs (2i, 2i+1); the convert script reorders each head's rows to match."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def hf_permute(w, n_heads: int):
    """Meta's row order -> Hugging Face's (the inverse of hf_unpermute), for W and for LoRA's B."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


_HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}


def _read_hf(path: Path):
    cfg = read_json(path / "config.json")
    raw = {}
    st_files = sorted(path.glob("*.safetensors"))
    pt_files = sorted(path.glob("pytorch_model*.bin"))
    if st_files:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path} holds .safetensors files: pip install safetensors to read them")
        for f in st_files:
            raw.update(load_file(str(f)))
    elif pt_files:
        for f in pt_files:
            raw.update(torch_load(f))
    else:
        raise CheckpointError(f"{path}: config.json found but no *.safetensors or pytorch_model*.bin")
    shape = hf_args(cfg, path / "config.json")
    n_heads, n_kv = shape.n_heads, shape.n_kv_heads
    sd = {}
    for k, v in raw.items():
        k = k.removeprefix("model.")
        if k == "embed_tokens.weight":
            sd["tok_embeddings.weight"] = v
        elif k == "norm.weight":
            sd[k] = v
        elif k == "lm_head.weight":
            sd["output.weight"] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod not in _HF_NAMES:
                continue  # e.g. rotary_emb.inv_freq in old exports
            name = f"layers.{i}.{_HF_NAMES[mod]}.{leaf}"
            if mod == "self_attn.q_proj":
                v = hf_unpermute(v, n_heads)
            elif mod == "self_attn.k_proj":
                v = hf_unpermute(v, n_kv)
            sd[name] = v
    args = hf_args(cfg, path / "config.json", has_output="output.weight" in sd)
    return args, sd


_META_NAMES = {v: k for k, v in _HF_NAMES.items()}


def save_hf_checkpoint(model: Transformer, folder):
    """Write config.json and the weights as Hugging Face's LlamaForCausalLM names them (q and k rows permuted
    back to HF's rotary layout); model.safetensors when safetensors is installed, else pytorch_model.bin."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": ffn_hidden_dim(a), "num_attention_heads": a.n_heads,
              "num_hidden_layers": a.n_layers, "num_key_value_heads": a.n_kv_heads or a.n_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": a.max_seq_len, "tie_word_embeddings": a.tie_embeddings,
              "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if k == "tok_embeddings.weight":
            sd["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            sd["model.norm.weight"] = v
        elif k == "output.weight":
            if not a.tie_embeddings:
                sd["lm_head.weight"] = v
        else:
            _, i, mod, leaf = k.split(".", 3)
            mod, leaf = f"{mod}.{leaf}".rsplit(".", 1)
            if mod == "attention.wq":
                v = hf_permute(v, a.n_heads).contiguous()
            elif mod == "attention.wk":
                v = hf_permute(v, a.n_kv_heads or a.n_heads).contiguous()
            sd[f"model.layers.{i}.{_META_NAMES[mod]}.{leaf}"] = v
    _save_tensors(sd, folder, "model")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))


def _save_tensors(sd: dict, folder: Path, stem: str) -> Path:
    """stem.safetensors when the safetensors package is installed, else a plain state dict in the .bin name HF uses."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
        atomic_save(sd, path)
        return path
    path = folder / f"{stem}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


# PEFT's adapter format for LlamaForCausalLM: adapter_config.json + adapter_model.safetensors (or .bin),
# tensors named base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...
PEFT_PREFIX = "base_model.model.model.layers."


def save_peft(model: nn.Module, folder, base_model: str = "", readme: str = ""):
    """Write the model's LoRA adapter as a PEFT folder. An init that moved W0 (PiSSA, LoRA-GA) cannot be an
    adapter of rank r on the original W0: it is written at rank 2r as [B, −B_init] [A; A_init] (the trained
    update minus the initial one, as PEFT converts PiSSA), with lora_alpha set so the scale is unchanged."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to export")
    one = next(iter(layers.values()))
    moved = any(m.W0_shift is not None for m in layers.values())
    if moved and not all(m.W0_shift is not None for m in layers.values()):
        raise ValueError("some layers moved W0 and some did not: cannot export one PEFT adapter")
    r = 2 * one.r if moved else one.r
    lora_alpha = one.scaling * (math.sqrt(r) if one.rslora else r)  # PEFT: s = lora_alpha/√r (rsLoRA) or /r
    n_heads, n_kv = model.args.n_heads, model.args.n_kv_heads or model.args.n_heads
    sd = {}
    for name, m in layers.items():
        A, B = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        if moved:
            B0, A0 = m.W0_shift
            A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)  # s[B, −B0][A; A0] = s(B A − B0 A0)
        _, i, mod = name.split(".", 2)
        if mod == "attention.wq":
            B = hf_permute(B, n_heads)
        elif mod == "attention.wk":
            B = hf_permute(B, n_kv)
        key = f"{PEFT_PREFIX}{i}.{_META_NAMES[mod]}"
        sd[f"{key}.lora_A.weight"] = A.contiguous()
        sd[f"{key}.lora_B.weight"] = B.contiguous()
    targets = sorted({_META_NAMES[n.split(".", 2)[2]].rsplit(".", 1)[1] for n in layers})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
              "use_rslora": one.rslora, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": base_model, "init_lora_weights": True,
              "inference_mode": False, "modules_to_save": None}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(sd, folder, "adapter_model")
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))
    note = readme or ""
    if moved:
        note += (f"\nThis adapter was initialized by a method that moves W0 (PiSSA or LoRA-GA). It is written at rank "
                 f"{r} = 2 x {one.r} on the ORIGINAL base weights: its product is the trained update minus the initial "
                 f"one, [B, -B_init][A; A_init], with lora_alpha = {lora_alpha:g} so that the scale is unchanged.\n")
    if note:
        atomic_write_text(folder / "README.md", note.lstrip())
    return folder


def read_peft(folder, model: Transformer) -> dict:
    """A PEFT adapter folder (as save_peft writes it) -> the state load_lora takes: names and the q/k row
    permutation undone."""
    folder = Path(folder)
    cfg = read_json(folder / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}: adapter_config.json has peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    if (folder / "adapter_model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{folder} holds adapter_model.safetensors: pip install safetensors to read it")
        raw = load_file(str(folder / "adapter_model.safetensors"))
    elif (folder / "adapter_model.bin").is_file():
        raw = torch_load(folder / "adapter_model.bin")
    else:
        raise CheckpointError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    n_heads, n_kv = model.args.n_heads, model.args.n_kv_heads or model.args.n_heads
    lora = {}
    for k, v in raw.items():
        if not k.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{folder}: unexpected tensor {k} (expected {PEFT_PREFIX}...)")
        i, rest = k[len(PEFT_PREFIX):].split(".", 1)      # "0", "self_attn.q_proj.lora_A.weight"
        mod, which, _ = rest.rsplit(".", 2)                 # "self_attn.q_proj", "lora_A", "weight"
        if mod not in _HF_NAMES or which not in ("lora_A", "lora_B"):
            raise CheckpointError(f"{folder}: unexpected tensor {k}")
        meta = _HF_NAMES[mod]
        if which == "lora_B" and meta == "attention.wq":
            v = hf_unpermute(v, n_heads)
        elif which == "lora_B" and meta == "attention.wk":
            v = hf_unpermute(v, n_kv)
        lora.setdefault(f"layers.{i}.{meta}", {})["A" if which == "lora_A" else "B"] = v.float()
    return {"config": {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "rslora": cfg.get("use_rslora", False),
                       "targets": sorted({n.rsplit(".", 1)[1] for n in lora})},
            "lora": lora, "W0_shift": {}}


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# sampling CLI


def main(argv=None):
    here = Path(__file__).resolve().parent
    default_dir = here.parent / "shared" / "data" / "stories260K"
    p = argparse.ArgumentParser(description="Sample from a LLaMA checkpoint (llama2.c .bin, Meta or Hugging Face folder).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(default_dir / "stories260K.bin"), help="checkpoint file or folder")
    p.add_argument("--tokenizer", default=str(default_dir / "tok512.model"), help="sentencepiece .model file")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (BOS is prepended)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 0 or not (math.isfinite(args.temperature) and args.temperature >= 0):
            raise ValueError(f"--max-new-tokens and --temperature must be finite and >= 0, got "
                             f"{args.max_new_tokens} and {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        tok = Tokenizer(args.tokenizer)
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
        if tok.vocab_size != model.args.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model expects {model.args.vocab_size}")
        ids = tok.encode(args.prompt, bos=True)
        if len(ids) >= model.args.max_seq_len:
            raise ValueError(f"the prompt is {len(ids)} tokens and fills the model's context of "
                             f"{model.args.max_seq_len}: nothing can be generated; shorten it")
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.tensor([ids], device=args.device)
        new = list(model.generate(x, args.max_new_tokens, args.temperature, args.top_p,
                                  stop_ids=(tok.eos_id, tok.bos_id), generator=gen))
        print(tok.decode(ids + new))
        if len(new) < args.max_new_tokens and len(ids) + len(new) >= model.args.max_seq_len:
            print(f"note: stopped after {len(new)} tokens at the model's context of {model.args.max_seq_len}",
                  file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
