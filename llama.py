"""
A single-file LLaMA-2, read beside Meta's reference model.py and llama2.c's model.py,
plus what this project needs and they lack: a key/value cache for decoding, hand-written LoRA
layers and a sentencepiece tokenizer. For tiny models on a CPU, two layers also have a
faster form of the same math, chosen by size (fast_paths): attention written out for narrow heads, and a
small LoRA layer folded into one matmul. In reading order: the model, generation, LoRA,
the tokenizer, the device and dtype helpers. The checkpoint formats (llama2.c .bin, Meta, Hugging Face,
PEFT) live beside it in checkpoints.py, as llama2.c keeps export.py beside model.py, and the sampling
command line in sample.py, as llama2.c's sample.py.
"""
import math
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


# the real pretrained models this project reads by name: (checkpoint, tokenizer) inside the data folder
MODELS = {
    "stories260K": ("stories260K/stories260K.bin", "stories260K/tok512.model"),        # width 64, 512-piece BPE
    "babyllama936K": ("babyllama936K/model5000.bin", "babyllama936K/tok105.model"),   # width 128, characters
    # width 576, 30 blocks, byte-level BPE inside the GGUF file (a 4-bit copy, dequantized to fp32 when read)
    "smollm2-135M": ("smollm2-135M/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135M/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

PRESETS = {
    "stories260K": ModelArgs(),
    "babyllama936K": ModelArgs(dim=128, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=105, hidden_dim=352,
                               max_seq_len=256),
    "smollm2-135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                              rope_theta=100000.0, max_seq_len=8192),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=32000,
                           hidden_dim=None, multiple_of=256, max_seq_len=4096, tie_embeddings=False),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, vocab_size=32000,
                            hidden_dim=None, multiple_of=256, max_seq_len=4096, tie_embeddings=False),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                            hidden_dim=None, multiple_of=4096, ffn_dim_multiplier=1.3,
                            max_seq_len=4096, tie_embeddings=False),
}


def at_least_fp32(x):
    # bf16/fp16 -> fp32 for the numerically delicate steps; fp32 and fp64 stay as they are
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 (or wider) as Meta does, then cast back (matters for bf16 models)
        xf = at_least_fp32(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs(head_dim: int, end: int, theta: float = 10000.0, device=None):
    """cos and sin of m·θ_i, (end, head_dim/2): the real-number form of Meta's freqs_cis."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rotary_emb(x, freqs_cos, freqs_sin):
    # x: (B, T, nh, hd); rotate the interleaved pairs (x0, x1), (x2, x3), ... as complex numbers
    xf = at_least_fp32(x).reshape(*x.shape[:-1], -1, 2)
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


EXPLICIT_BELOW = 16  # head widths below this use causal_attention on a CPU
SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa since torch 2.5


def causal_attention(xq, xk, xv):
    """softmax(Q Kᵀ/√hd + causal mask) V, written out: the same numbers as the fused kernel, up to float order.
    Grouped-query attention without repeat_kv's copies: the n_rep query heads that share a kv head are
    stacked along T, so each kv head meets all of its queries in one matmul."""
    B, T, nh, hd = xq.shape                                                         # xq: (B, T, nh, hd)
    n_kv = xk.shape[2]
    n_rep = nh // n_kv
    q = xq.view(B, T, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B * n_kv, n_rep * T, hd)
    k = xk.permute(0, 2, 3, 1).reshape(B * n_kv, hd, T)                             # (B·n_kv, hd, T): Kᵀ
    v = xv.transpose(1, 2).reshape(B * n_kv, T, hd)                                 # (B·n_kv, T, hd)
    # query i sees keys 0..i: −inf above the diagonal, one (T, T) block per stacked head
    mask = torch.full((T, T), float("-inf"), dtype=xq.dtype, device=xq.device).triu(1).repeat(n_rep, 1)
    scores = torch.baddbmm(mask, q, k, alpha=hd ** -0.5)                            # (B·n_kv, n_rep·T, T)
    att = at_least_fp32(scores).softmax(-1).type_as(v)                              # softmax in fp32, as the kernel
    out = torch.bmm(att, v)                                                         # (B·n_kv, n_rep·T, hd)
    return out.view(B, n_kv, n_rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)


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
        # heads narrower than 16 (stories260K's are 8): on a CPU the fused kernel is slower than attention
        # written out in two batched matmuls and a softmax (studies/bench.py measures both)
        self.explicit = self.head_dim < EXPLICIT_BELOW

    def forward(self, x, freqs_cos, freqs_sin, start_pos: Optional[int] = None):
        B, T, _ = x.shape                                              # x: (B, T, dim)
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)        # (B, T, nh, hd)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)     # (B, T, n_kv, hd): fewer kv heads (GQA)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, freqs_cos, freqs_sin)  # positions enter q and k only, never v
        xk = apply_rotary_emb(xk, freqs_cos, freqs_sin)

        if start_pos is None and self.explicit and x.device.type == "cpu":
            return self.wo(causal_attention(xq, xk, xv))
        if start_pos is None:
            # training / full forward: no cache, plain causal attention
            keys, values, is_causal, mask = xk, xv, T > 1, None
        else:
            # incremental decoding: write this chunk into the cache, attend to everything so far
            # the cache grows with the sequence (doubling, up to the context), never to the whole context at once:
            # 256 sequences at SmolLM2's 8,192-token context would hold 97 GB of keys and values
            need = start_pos + T
            if start_pos == 0 or self.cache_k is None or self.cache_k.shape[0] != B:
                self.cache_k = self.cache_v = xk.new_zeros(B, 0, self.n_kv_heads, self.head_dim)
            if need > self.cache_k.shape[1]:
                size = min(self.max_seq_len, max(need, 2 * self.cache_k.shape[1], 64))
                grow = lambda c: torch.cat([c, c.new_zeros(B, size - c.shape[1], *c.shape[2:])], 1)
                self.cache_k, self.cache_v = grow(self.cache_k), grow(self.cache_v)
            self.cache_k[:, start_pos:start_pos + T] = xk.detach()
            self.cache_v[:, start_pos:start_pos + T] = xv.detach()
            keys = self.cache_k[:, :start_pos + T]
            values = self.cache_v[:, :start_pos + T]
            is_causal, mask = False, None
            if T > 1:  # a chunk after a prefix: query i sees keys 0 .. start_pos + i
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)

        if not SDPA_GQA:  # torch < 2.5: every query head gets its own copy of its kv head
            keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)
        # (B, nh, T, hd) for scaled_dot_product_attention; with enable_gqa query head h reads kv head h // n_rep,
        # the pairing repeat_kv makes, without copying K and V n_rep times
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=is_causal,
                                             **({"enable_gqa": self.n_rep > 1} if SDPA_GQA else {}))
        out = out.transpose(1, 2).reshape(B, T, -1)                    # (B, T, nh * hd): heads side by side
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
        # pre-norm residual blocks, as LLaMA: the residual stream x itself is never normalized
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
    # the largest logit subtracted before dividing: a tiny temperature sends the others to −inf (probability
    # 0), never to inf − inf = NaN; the limit is greedy decoding
    logits = logits.float()
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, dim=-1)
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
FOLD_MAX = 1 << 16  # layers of at most this many weights (256 KiB in fp32, cache-sized) train folded


class LoRALinear(nn.Module):
    """A frozen nn.Linear W0 plus a trainable low-rank update s·B A.
    lora_A: (r, d_in), lora_B: (d_out, r); kept in fp32 whatever the base dtype."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, rslora: bool = False,
                 dropout: float = 0.0, freeze_A: bool = False):
        super().__init__()
        d_out, d_in = base.weight.shape
        self.base = base.requires_grad_(False)
        self.r, self.lora_alpha, self.rslora = r, lora_alpha, rslora
        # the one place the scaling is set: s = lora_alpha/r, or lora_alpha/√r with rsLoRA (Kalajdzievski 2023)
        self.scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev), requires_grad=not freeze_A)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev))
        self.freeze_A = freeze_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # a small layer is overhead-bound: one matmul with W0 + s·B A costs less than three (the same product
        # and the same gradients of A and B); a large one is flop-bound and keeps the low-rank path
        self.foldable = dropout == 0 and d_in * d_out <= FOLD_MAX
        self.fold = self.foldable  # fast_paths switches it
        self.merged = False
        self.W0_shift = None  # (B, A) of the init when it moved W0 by −s·B A (PiSSA, LoRA-GA)
        # standard LoRA: A ~ Kaiming-uniform(a=√5) = U(-1/√d_in, 1/√d_in), B = 0, so B A = 0 at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        if self.fold and not self.merged and self.base.weight.dtype == self.lora_A.dtype:
            # h = (W0 + s·B A) x, one matmul: small layers whose W0 has the adapter's precision (not a bf16 base)
            return F.linear(x, torch.addmm(self.base.weight, self.lora_B, self.lora_A, alpha=self.scaling),
                            self.base.bias)
        h = self.base(x)
        if self.merged:
            return h
        # h = W0 x + s·B A x
        x = self.dropout(x).to(self.lora_A.dtype)  # the adapter's precision (fp32), whatever the base's
        xa = F.linear(x, self.lora_A)                                   # (..., r)
        if h.dtype == xa.dtype:  # one kernel for h + s·(A x) Bᵀ: no separate scaled copy and sum over (..., d_out)
            return torch.addmm(h.reshape(-1, h.shape[-1]), xa.reshape(-1, self.r), self.lora_B.T,
                               alpha=self.scaling).view(h.shape)
        return h + (self.scaling * F.linear(xa, self.lora_B)).type_as(h)

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
    if not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0 (the scale s of s·B A), got {lora_alpha}")
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


def fast_paths(model: nn.Module, on: bool = True):
    """on: small LoRA layers folded, narrow heads attended by causal_attention on a CPU (chosen by size, as
    built); off: the literal forms everywhere, three matmuls per LoRA layer and the fused attention kernel.
    The two give the same numbers up to float order; studies/bench.py times both, the tests compare them."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fold = on and m.foldable
        elif isinstance(m, Attention):
            m.explicit = on and m.head_dim < EXPLICIT_BELOW
    return model


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


# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A thin sentencepiece wrapper with Meta's interface."""

    def __init__(self, path):
        import sentencepiece as spm  # here, not at the top: the model itself runs without it
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
        self.unk_id = self.sp.unk_id()  # what a tokenizer without byte fallback makes of a character it lacks
        # LLaMA tokenizers have no pad piece (sentencepiece says -1); like the LoRA-DA code we pad
        # with EOS, and every padded position is masked out of attention-free losses and statistics
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# -----------------------------------------------------------------------------
# devices and dtypes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    """auto -> cuda when there is one, else cpu; a CUDA device on a machine without one is refused here,
    once, rather than as a traceback at the first tensor moved."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); "
                         f"use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported here")
    return name
