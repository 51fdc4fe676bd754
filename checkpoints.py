"""
The real checkpoint formats, beside the model as llama2.c keeps export.py beside model.py: llama2.c's
legacy .bin, llama.cpp's GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_1 read and dequantized to fp32; F32/F16
written), Meta's params.json + consolidated.NN.pth, Hugging Face folders, and PEFT adapter folders
(read and write); this project's own LoRA files; and the atomic file writes every output uses.

    model = checkpoints.load_checkpoint("../shared/data/stories260K/stories260K.bin")
    checkpoints.save_peft(model_with_lora, "lora_da_init")       # then PeftModel.from_pretrained(...)
"""
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llama import ModelArgs, PRESETS, Transformer, add_lora, ffn_hidden_dim, lora_layers, lora_state

# -----------------------------------------------------------------------------
# atomic writes: a temp file beside the target, then one rename; a crash never leaves half a file


def atomic_write(path, write, keep_previous=None):
    """write(tmp) writes the whole file to tmp; then it replaces path (and, with keep_previous, the old
    path is first renamed to keep_previous, so a good file always exists). A failed write removes tmp and
    leaves path as it was; a full disk (or any failed write) says which file and how much space is left."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # ENOSPC, or torch's "PytorchStreamWriter failed writing"
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            free = shutil.disk_usage(path.parent).free / 2 ** 20
            kept = " (the previous one is kept)" if path.exists() else ""
            raise OSError(f"could not write {path}{kept}: {why}; {free:,.0f} MiB free there") from None
        raise
    if keep_previous is not None and path.is_file():
        os.replace(path, keep_previous)
    os.replace(tmp, path)
    return path


def atomic_save(obj, path, keep_previous=None):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), keep_previous)


def atomic_write_text(path, text: str):
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# -----------------------------------------------------------------------------
# checkpoints: llama2.c legacy .bin, Meta's consolidated.NN.pth, Hugging Face

class CheckpointError(ValueError):
    pass


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



def load_checkpoint(path, device="cpu", dtype=torch.float32) -> Transformer:
    """Detect the format at `path` and return a ready Transformer in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a llama2.c .bin file, a GGUF file, a Meta "
                              f"folder with params.json, or a Hugging Face folder with config.json)")
    if path.is_dir():
        if (path / "params.json").exists():
            args, sd = _read_meta(path)
        elif (path / "config.json").exists():
            args, sd = _read_hf(path)
        else:
            raise CheckpointError(f"{path}: folder has neither params.json (Meta) nor config.json (Hugging Face)")
    elif is_gguf(path) or path.suffix.lower() == ".gguf":
        args, sd = _read_gguf_model(path)
    else:
        args, sd = _read_llama2c(path)
    return _build(args, sd, device, dtype, source=path)


def is_gguf(path) -> bool:
    """A file that starts with GGUF's magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_args(path) -> ModelArgs:
    """The model's shape from a checkpoint's config or header alone, no weights read (for dry runs)."""
    path = Path(path)
    if (path / "params.json").is_file():
        return meta_args(read_json(path / "params.json"), path / "params.json")
    if (path / "config.json").is_file():
        return hf_args(read_json(path / "config.json"), path / "config.json")
    if path.is_file() and (is_gguf(path) or path.suffix.lower() == ".gguf"):
        meta, tensors, _ = read_gguf(path)
        return gguf_args(meta, path, tensors["token_embd.weight"][1][0] if "token_embd.weight" in tensors else 0)
    if path.is_file():
        return _read_llama2c(path)[0]
    raise CheckpointError(f"checkpoint not found: {path} (expected a llama2.c .bin file, a GGUF file, a Meta folder with "
                          f"params.json, a Hugging Face folder with config.json, or a preset: {', '.join(PRESETS)})")


def read_json(path: Path) -> dict:
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})")
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


# The config readers go by allow-list: each field they know is read (type- and range-checked), accepted only at
# the value this code implements, or known to be metadata that never changes the computation. Any other field
# is refused by name: a field this reader has never heard of may change the model, and ignoring it would compute
# a different model without a word.
def _pos_int(v):
    return type(v) is int and 0 < v < 2 ** 31


def _pos_float(hi):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and 0 < v <= hi


def _check_fields(c: dict, source, read: dict, neutral: dict, metadata: set):
    for key, value in c.items():
        if key in read:
            ok, what = read[key]
            if value is not None and not ok(value):
                raise CheckpointError(f"{source}: {key} must be {what}, got {value!r:.60}")
        elif key in neutral:
            if value not in neutral[key]:
                raise CheckpointError(f"{source}: {key} = {value!r:.80} is not implemented here (only "
                                      f"{' or '.join(map(repr, neutral[key]))}); this model would be computed wrongly")
        elif key not in metadata:
            raise CheckpointError(f"{source}: unknown field {key!r} (= {value!r:.40}); it may change the model and "
                                  f"is not implemented here (remove it only if it does not)")


POS_INT, EPS, SCALE = (_pos_int, "a positive integer"), (_pos_float(1.0), "a number in (0, 1]"), \
    (_pos_float(1e12), "a positive number")
META_READ = {"dim": POS_INT, "n_layers": POS_INT, "n_heads": POS_INT, "n_kv_heads": POS_INT,
             "vocab_size": (lambda v: type(v) is int and (v == -1 or _pos_int(v)), "a positive integer or -1"),
             "hidden_dim": POS_INT, "multiple_of": POS_INT, "ffn_dim_multiplier": SCALE, "norm_eps": EPS,
             "rope_theta": SCALE, "max_seq_len": POS_INT}
META_NEUTRAL = {"use_scaled_rope": (False,)}       # LLaMA 3.1's scaled RoPE is not implemented
META_METADATA = {"max_batch_size"}                 # an inference setting of Meta's code


def meta_args(p: dict, source, vocab_size: Optional[int] = None, tied: bool = False) -> ModelArgs:
    """ModelArgs from Meta's params.json: the one place it is parsed. Meta writes vocab_size -1 (the
    tokenizer decides): then vocab_size (read off the embedding), else LLaMA-2's 32000."""
    _check_fields(p, source, META_READ, META_NEUTRAL, META_METADATA)
    try:
        vocab = p.get("vocab_size", -1)
        return ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
                         vocab_size=vocab if vocab and vocab > 0 else (vocab_size or 32000),
                         hidden_dim=p.get("hidden_dim"), multiple_of=p.get("multiple_of") or 256,
                         ffn_dim_multiplier=p.get("ffn_dim_multiplier"), norm_eps=p.get("norm_eps") or 1e-5,
                         rope_theta=p.get("rope_theta") or 10000.0, max_seq_len=p.get("max_seq_len") or 4096,
                         tie_embeddings=tied)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e}")


HF_READ = {"hidden_size": POS_INT, "num_hidden_layers": POS_INT, "num_attention_heads": POS_INT,
           "num_key_value_heads": POS_INT, "vocab_size": POS_INT, "intermediate_size": POS_INT,
           "max_position_embeddings": POS_INT, "head_dim": POS_INT, "rms_norm_eps": EPS, "rope_theta": SCALE,
           "tie_word_embeddings": (lambda v: type(v) is bool, "true or false"),
           # transformers 5 keeps θ here: {"rope_type": "default", "rope_theta": θ}; any other rope_type is refused
           "rope_parameters": (lambda v: isinstance(v, dict) and v.get("rope_type", "default") == "default" and
                               set(v) <= {"rope_type", "rope_theta"} and _pos_float(1e12)(v.get("rope_theta", 1.0)),
                               "{'rope_type': 'default', 'rope_theta': θ} (scaled RoPE is not implemented)")}
# config.json fields that change LLaMA's computation and are not implemented here: the values accepted
HF_UNSUPPORTED = {"rope_scaling": (None,), "attention_bias": (None, False), "mlp_bias": (None, False),
                  "hidden_act": (None, "silu"), "pretraining_tp": (None, 1), "attention_dropout": (None, 0, 0.0),
                  "model_type": (None, "llama"), "rope_interleaved": (None, False)}
# metadata: names, versions, token ids, dtypes, caching and logging switches; none changes the computation
HF_METADATA = {"_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
               "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "tokenizer_class",
               "output_attentions", "output_hidden_states", "return_dict", "is_llama_config", "id2label",
               "label2id", "problem_type", "chunk_size_feed_forward"}


def hf_args(c: dict, source, has_output: bool = True) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json: the one place it is parsed, by allow-list (above). A field
    that would change the computation and is not implemented is refused by name, never ignored."""
    _check_fields(c, source, HF_READ, HF_UNSUPPORTED, HF_METADATA)
    if c.get("head_dim") not in (None, c.get("hidden_size", 0) // max(1, c.get("num_attention_heads", 1))):
        raise CheckpointError(f"{source}: head_dim = {c['head_dim']} differs from hidden_size / num_attention_heads; "
                              f"not implemented here")
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    if c.get("rope_theta") and c.get("rope_parameters", {}).get("rope_theta") not in (None, c["rope_theta"]):
        raise CheckpointError(f"{source}: rope_theta {c['rope_theta']} and rope_parameters.rope_theta "
                              f"{c['rope_parameters']['rope_theta']} disagree")
    try:
        return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                         n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                         vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                         norm_eps=c.get("rms_norm_eps") or 1e-5, rope_theta=theta,
                         max_seq_len=c.get("max_position_embeddings") or 4096,
                         tie_embeddings=c.get("tie_word_embeddings") or not has_output)
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
    _check_rope_table(path, arrays["freqs_cos"], arrays["freqs_sin"], hd, (D, H, L, n_heads, n_kv_heads,
                                                                           vocab_size, seq_len))
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


def _check_rope_table(path, cos, sin, head_dim, header):
    """The header against what the rest of the file says about itself: llama2.c's export stores its RoPE
    table (cos and sin of t·θ^(-2i/head_dim), θ = 10,000, for t < seq_len), so a header that lies about the
    head size or the context while keeping the byte count (n_heads and seq_len halved together) no longer
    matches it. Tolerance: fp32 angles up to seq_len radians round to ~seq_len·6e-8."""
    t = torch.arange(cos.shape[0], dtype=torch.float64)[:, None]
    freqs = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim)
    angles = t * freqs[None, :]
    err = max(float((cos.double() - angles.cos()).abs().max()), float((sin.double() - angles.sin()).abs().max()))
    if not err <= 1e-3:
        names = ("dim", "hidden", "layers", "heads", "kv_heads", "vocab", "seq_len")
        raise CheckpointError(f"{path}: the header ({', '.join(f'{n}={v}' for n, v in zip(names, header))}) disagrees "
                              f"with the file's own RoPE table (off by {err:.2g} for head size {head_dim}); the header "
                              f"is wrong, or this is not a llama2.c legacy export")


# Meta's model parallelism splits each weight along one dimension; merging shards undoes it.
# ColumnParallelLinear (wq wk wv w1 w3 output): dim 0; RowParallelLinear (wo w2) and
# ParallelEmbedding: dim 1; norms are replicated.
# -----------------------------------------------------------------------------
# GGUF (llama.cpp's format, v2 and v3): a header, typed metadata, tensor infos, then the aligned tensor data.
#
#   magic b"GGUF" | u32 version | u64 n_tensors | u64 n_metadata
#   n_metadata x (string key | u32 value type | value)      string = u64 byte length + UTF-8 bytes
#   n_tensors  x (string name | u32 n_dims | u64 dims[n_dims], innermost first | u32 ggml type | u64 offset)
#   padding to general.alignment (default 32), then each tensor at data start + its offset (itself aligned)
#
# A tensor listed as dims [576, 49152] is torch's (49152, 576): GGUF lists the fastest-varying dimension first.
# Block layouts of the quantized types read here (ggml-common.h), 32 weights a block, little-endian:
#   Q8_0  34 bytes: f16 d, then 32 x int8 q;                       w[i] = d * q[i]
#   Q4_0  18 bytes: f16 d, then 16 bytes of nibbles;               w[i] = d * (q[i] - 8)
#   Q4_1  20 bytes: f16 d, f16 m, then 16 bytes of nibbles;        w[i] = d * q[i] + m
#   nibbles: byte j holds weight j in its low 4 bits and weight j + 16 in its high 4 bits (j = 0..15).

GGUF_MAGIC = b"GGUF"
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
              19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}
# the types dequantized here: (weights per block, bytes per block)
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
# llama.cpp's tensor names -> Meta's (this model's)
GGUF_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
              "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}


class _Reader:
    """Little-endian reads from a byte buffer, each one checked against the end (a truncated file is named)."""

    def __init__(self, data, source):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise CheckpointError(f"{self.source}: truncated GGUF header ({n} bytes wanted at byte {self.pos} of "
                                  f"{len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        raw = self.take(self.scalar("<Q"))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.source}: a GGUF string at byte {self.pos - len(raw)} is not UTF-8")

    def value(self, vtype):
        if vtype in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[vtype])
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in GGUF_SCALARS and etype != 7:  # numbers: one unpack for the whole array
                size = struct.calcsize(GGUF_SCALARS[etype])
                return list(memoryview(self.take(n * size)).cast(GGUF_SCALARS[etype][1]))
            return [self.value(etype) for _ in range(n)]
        raise CheckpointError(f"{self.source}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_gguf(path) -> tuple:
    """A GGUF file -> (metadata dict, {name: (ggml type name, torch shape, offset in file, nbytes)}, the file's
    bytes as a memoryview). Nothing is dequantized yet."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})")
    r = _Reader(data, path)
    magic = bytes(r.take(4)) if len(data) >= 4 else bytes(data)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version}; this reader knows versions 2 and 3")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > len(data) or n_kv > len(data):
        raise CheckpointError(f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata keys in a "
                              f"{len(data)}-byte file")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = {}
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows at most 4)")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        code, offset = r.scalar("<I"), r.scalar("<Q")
        kind = GGML_TYPES.get(code, f"type {code}")
        infos[name] = (kind, tuple(reversed(dims)), offset)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise CheckpointError(f"{path}: general.alignment {align} is not a power of two")
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, (kind, shape, offset) in infos.items():
        if kind not in GGML_BLOCKS:
            raise CheckpointError(f"{path}: tensor {name} is {kind}; this reader dequantizes "
                                  f"{', '.join(GGML_BLOCKS)} only (re-export the model in one of them)")
        per, size = GGML_BLOCKS[kind]
        n = math.prod(shape)
        if n % per or (shape and shape[-1] % per):
            raise CheckpointError(f"{path}: tensor {name} {shape} is not a whole number of {kind} blocks of {per}")
        nbytes = n // per * size
        if offset % align or start + offset + nbytes > len(data):
            raise CheckpointError(f"{path}: tensor {name} ({kind}, {shape}) at offset {offset} runs past the end of "
                                  f"the file ({len(data)} bytes) or is not {align}-aligned: truncated or corrupt")
        tensors[name] = (kind, shape, start + offset, nbytes)
    return meta, tensors, data


def dequantize(kind: str, raw, shape) -> torch.Tensor:
    """The fp32 weights of one GGUF tensor from its raw bytes (layouts in the comment above)."""
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if kind == "F32":
        return buf.view(torch.float32).reshape(shape).clone()
    if kind == "F16":
        return buf.view(torch.float16).float().reshape(shape)
    if kind == "BF16":
        return buf.view(torch.bfloat16).float().reshape(shape)
    per, size = GGML_BLOCKS[kind]
    blocks = buf.view(-1, size)                                          # (n_blocks, bytes per block)
    d = blocks[:, :2].contiguous().view(torch.float16).float()           # (n_blocks, 1) scale
    if kind == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()          # (n_blocks, 32)
        return (d * q).reshape(shape)
    nib = blocks[:, size - 16:]                                          # (n_blocks, 16) packed nibbles
    q = torch.cat([nib & 0x0F, nib >> 4], dim=1).float()                 # weights 0..15 low, 16..31 high
    if kind == "Q4_0":
        return (d * (q - 8)).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()          # Q4_1: (n_blocks, 1) minimum
    return (d * q + m).reshape(shape)


def gguf_args(meta: dict, source, vocab_size: int) -> ModelArgs:
    """ModelArgs from a GGUF file's llama.* metadata; another architecture is refused."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: general.architecture is {arch!r}; this project reads llama models only")

    def get(key, kind=int):
        v = meta.get(f"llama.{key}")
        if v is None:
            raise CheckpointError(f"{source}: missing metadata key llama.{key}")
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise CheckpointError(f"{source}: llama.{key} must be an integer, got {v!r}")
        if kind is float and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise CheckpointError(f"{source}: llama.{key} must be a positive number, got {v!r}")
        return v
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    rope = meta.get("llama.rope.dimension_count", dim // max(n_heads, 1))
    if n_heads and rope != dim // n_heads:
        raise CheckpointError(f"{source}: llama.rope.dimension_count {rope} rotates part of each head "
                              f"({dim // n_heads}); partial rotary embeddings are not implemented")
    for key in ("llama.rope.scaling.type", "llama.rope.scaling.factor"):
        if meta.get(key) not in (None, "none", 1, 1.0):
            raise CheckpointError(f"{source}: {key} = {meta[key]!r}: RoPE scaling is not implemented")
    if meta.get("llama.vocab_size", vocab_size) != vocab_size:
        raise CheckpointError(f"{source}: llama.vocab_size {meta['llama.vocab_size']} disagrees with the token "
                              f"embedding's {vocab_size} rows")
    return ModelArgs(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads), vocab_size=vocab_size,
                     hidden_dim=get("feed_forward_length"),
                     # stored as float32: 7 significant digits say what was written (1e-05, not 9.99999974e-06)
                     norm_eps=float(f"{get('attention.layer_norm_rms_epsilon', float):.7g}"),
                     rope_theta=float(f"{meta.get('llama.rope.freq_base', 10000.0):.7g}"),
                     max_seq_len=get("context_length"), tie_embeddings=True)


def _read_gguf_model(path: Path):
    """A llama GGUF file -> (ModelArgs, Meta-named fp32 state dict). wq and wk need no permutation: llama.cpp's
    converter stores them in Meta's interleaved-pair rotary layout (it permutes Hugging Face's half-split
    layout back), the layout llama.py's RoPE uses; tests/test_gguf.py checks it against the other one."""
    meta, tensors, data = read_gguf(path)
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    vocab = tensors["token_embd.weight"][1][0]
    args = gguf_args(meta, path, vocab)
    args.tie_embeddings = "output.weight" not in tensors
    sd = {}
    for name, (kind, shape, offset, nbytes) in tensors.items():
        if name == "rope_freqs.weight":  # derived from θ, as Meta's rope.freqs: recomputed, never read
            continue
        parts = name.split(".")
        if name == "token_embd.weight":
            key = "tok_embeddings.weight"
        elif name == "output_norm.weight":
            key = "norm.weight"
        elif name == "output.weight":
            key = "output.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES and parts[1].isdigit():
            key = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
        else:
            raise CheckpointError(f"{path}: tensor {name} is not part of a llama model")
        sd[key] = dequantize(kind, data[offset:offset + nbytes], shape)
    return args, sd


GGUF_FILE_TYPES = {"F32": 0, "F16": 1}


def save_gguf(model: Transformer, path, tokenizer=None, dtype: str = "F16", name: str = "lora-da"):
    """The model (merge LoRA first) as a llama GGUF v3 file that llama.cpp runs: Meta-layout weights in F32 or
    F16 (the norms always F32, as llama.cpp writes them), llama.* metadata, and the byte-level BPE tokenizer's
    tokens, types, merges and special ids when `tokenizer` is a bpe.BPETokenizer (its metadata is copied)."""
    if dtype not in GGUF_FILE_TYPES:
        raise ValueError(f"GGUF export writes F32 or F16, got {dtype!r}")
    a = model.args
    meta = {"general.architecture": "llama", "general.name": name, "general.file_type": GGUF_FILE_TYPES[dtype],
            "general.alignment": 32, "llama.context_length": a.max_seq_len, "llama.embedding_length": a.dim,
            "llama.block_count": a.n_layers, "llama.feed_forward_length": ffn_hidden_dim(a),
            "llama.attention.head_count": a.n_heads, "llama.attention.head_count_kv": a.n_kv_heads or a.n_heads,
            "llama.rope.freq_base": float(a.rope_theta), "llama.rope.dimension_count": a.dim // a.n_heads,
            "llama.attention.layer_norm_rms_epsilon": float(a.norm_eps), "llama.vocab_size": a.vocab_size}
    if tokenizer is not None and getattr(tokenizer, "gguf_metadata", None):
        meta.update(tokenizer.gguf_metadata())
    back = {v: k for k, v in GGUF_NAMES.items()}
    tensors = []
    for key, t in model.state_dict().items():
        if key == "output.weight" and a.tie_embeddings:
            continue
        if "lora_" in key or ".base." in key:
            raise ValueError(f"merge the LoRA layers before a GGUF export (found {key})")
        if key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            gname = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}.get(key, key)
        else:
            _, i, mod = key.split(".", 2)
            gname = f"blk.{i}.{back[mod.rsplit('.', 1)[0]]}.weight"
        t = t.detach().float().cpu().contiguous()
        kind = "F32" if t.dim() == 1 or dtype == "F32" else "F16"
        tensors.append((gname, kind, t if kind == "F32" else t.half()))
    return write_gguf(path, meta, [(n, k, tuple(t.shape), t.numpy().tobytes()) for n, k, t in tensors])


def write_gguf(path, meta: dict, tensors: list, version: int = 3):
    """A GGUF file from metadata {key: value} and tensors [(name, type name, torch shape, raw bytes)], laid out
    as the comment above the reader says (dims innermost first, data aligned to 32), written atomically.
    Values: bool, int (u32, or i64 beyond it), float (f32), str, and lists of str or of int (i32)."""
    def string(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def value(v):  # -> (type code, bytes)
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            return (4, struct.pack("<I", v)) if 0 <= v < 2 ** 32 else (11, struct.pack("<q", v))
        if isinstance(v, float):
            return 6, struct.pack("<f", v)
        if isinstance(v, str):
            return GGUF_STRING, string(v)
        if isinstance(v, (list, tuple)):
            if all(isinstance(x, str) for x in v):
                return GGUF_ARRAY, struct.pack("<IQ", GGUF_STRING, len(v)) + b"".join(string(x) for x in v)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                return GGUF_ARRAY, struct.pack("<IQ", 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
        raise ValueError(f"cannot write GGUF metadata value {v!r:.60}")

    codes = {name: code for code, name in GGML_TYPES.items()}
    head = [GGUF_MAGIC, struct.pack("<IQQ", version, len(tensors), len(meta))]
    for k, v in meta.items():
        code, raw = value(v)
        head += [string(k), struct.pack("<I", code), raw]
    offset, blobs = 0, []
    for name, kind, shape, raw in tensors:
        head += [string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *reversed(shape)),
                 struct.pack("<IQ", codes[kind], offset)]
        pad = -len(raw) % 32
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    header = b"".join(head)
    header += b"\0" * (-len(header) % 32)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header)
            for b in blobs:
                f.write(b)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


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
    """Every weight a floating-point tensor (an integer or boolean one would be cast to a float silently) with
    finite entries."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise CheckpointError(f"{source}: weight {k} is {getattr(v, 'dtype', type(v).__name__)}, expected a "
                                  f"floating-point tensor")
        if not torch.isfinite(v).all():
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
        for f in st_files:
            raw.update(load_safetensors(f))
    elif pt_files:
        for f in pt_files:
            raw.update(torch_load(f))
    else:
        raise CheckpointError(f"{path}: config.json found but no *.safetensors or pytorch_model*.bin")
    shape = hf_args(cfg, path / "config.json")
    n_heads, n_kv = shape.n_heads, shape.n_kv_heads
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in raw and not torch.equal(
            raw["lm_head.weight"], raw.get("model.embed_tokens.weight", raw.get("embed_tokens.weight"))):
        raise CheckpointError(f"{path / 'config.json'}: tie_word_embeddings is true but the files hold an lm_head.weight "
                              f"that differs from embed_tokens.weight; set it false to use the separate output layer")
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
        return atomic_save(sd, folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))
    return atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))


def load_safetensors(path: Path) -> dict:
    """A .safetensors file's tensors; a damaged one is refused like a damaged pickle."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} is a .safetensors file: pip install safetensors to read it")
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated header or body, random bytes
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable .safetensors file, or a damaged one ({first})")


# -----------------------------------------------------------------------------
# PEFT's adapter format for LlamaForCausalLM: adapter_config.json + adapter_model.safetensors (or .bin),
# tensors named base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...
PEFT_PREFIX = "base_model.model.model.layers."
# adapter_config.json fields that change the computation and are not implemented: the values accepted
PEFT_UNSUPPORTED = {"alpha_pattern": (None, {}), "rank_pattern": (None, {}), "use_dora": (None, False),
                    "bias": (None, "none"), "fan_in_fan_out": (None, False), "lora_bias": (None, False),
                    "modules_to_save": (None, []), "layers_to_transform": (None,)}


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
            shift_B, shift_A = m.W0_shift  # the init's (B, A) that W0 was moved by: W0 − s·shift_B shift_A
            A, B = torch.cat([A, shift_A]), torch.cat([B, -shift_B], dim=1)  # s[B, −B'][A; A'] = s(B A − B' A')
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
    for key, value in PEFT_UNSUPPORTED.items():  # fields that change the computation, not implemented here
        if cfg.get(key) not in value:
            raise CheckpointError(f"{folder / 'adapter_config.json'}: {key} = {cfg[key]!r} is not supported here "
                                  f"(only {' or '.join(map(repr, value))})")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise CheckpointError(f"{folder / 'adapter_config.json'}: missing key {key!r}")
    if (folder / "adapter_model.safetensors").is_file():
        raw = load_safetensors(folder / "adapter_model.safetensors")
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
    half = sorted(n for n, ab in lora.items() if set(ab) != {"A", "B"})
    if half:
        raise CheckpointError(f"{folder}: layers with only one of lora_A, lora_B: {', '.join(half)}")
    found = sorted({_META_NAMES[n.split(".", 2)[2]].rsplit(".", 1)[1] for n in lora})
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and sorted(targets) != found:
        raise CheckpointError(f"{folder}: target_modules {sorted(targets)} in adapter_config.json, but the weights "
                              f"hold {found}")
    return {"config": {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "rslora": cfg.get("use_rslora", False),
                       "targets": sorted({n.rsplit(".", 1)[1] for n in lora})},
            "lora": lora, "W0_shift": {}}




# -----------------------------------------------------------------------------
# this project's LoRA files: A, B per layer (and a shifted W0), or a PEFT folder

def save_lora(model: nn.Module, path):
    atomic_save(lora_state(model), path)


def check_adapter(state):
    """An adapter's config and tensors by type and meaning before anything is loaded: r a positive integer,
    lora_alpha a positive finite number, targets a list of names, rslora a bool; each A (r, d_in) and B (d_out, r)
    floating-point, finite and of that r."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or not isinstance(state.get("lora"), dict):
        raise ValueError("not a LoRA adapter: expected a dict with 'config' and 'lora' (this project's adapter.pt)")
    cfg = state["config"]
    checks = {"r": lambda v: type(v) is int and v > 0, "lora_alpha": lambda v: type(v) in (int, float) and
              math.isfinite(v) and v > 0, "targets": lambda v: isinstance(v, (list, tuple)) and v and
              all(isinstance(t, str) for t in v), "rslora": lambda v: type(v) is bool}
    for key, ok in checks.items():
        if key not in cfg or not ok(cfg[key]):
            raise ValueError(f"adapter config {key} = {cfg.get(key)!r:.40} is not valid (r: a positive integer, "
                             f"lora_alpha: a positive number, targets: a list of names, rslora: true or false)")
    for name, layer in state["lora"].items():
        A, B = (layer.get(k) if isinstance(layer, dict) else None for k in ("A", "B"))
        for k, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(f"adapter layer {name}: {k} is {getattr(t, 'dtype', type(t).__name__)}, expected a "
                                 f"2-D floating-point tensor")
            if not torch.isfinite(t).all():
                raise ValueError(f"adapter layer {name}: {k} has NaN or inf entries")
        if A.shape[0] != cfg["r"] or B.shape[1] != cfg["r"]:
            raise ValueError(f"adapter layer {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not have the "
                             f"config's rank r = {cfg['r']}")


def load_lora(model: nn.Module, path_or_state, dropout: float = 0.0, freeze_A: bool = False) -> dict:
    """Add LoRA to a base model as the adapter describes, apply its W0 shift, load A and B."""
    state = path_or_state
    if not isinstance(state, dict):
        if Path(state).is_dir() and (Path(state) / "adapter_config.json").is_file():
            state = read_peft(state, model)  # a PEFT folder (this project's export, or PEFT's own)
        elif not Path(state).is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {state} (a .pt file, or a PEFT folder with "
                                    f"adapter_config.json)")
        else:
            state = torch_load(Path(state))
    check_adapter(state)
    cfg = state["config"]
    layers = lora_layers(model) or add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["targets"], cfg["rslora"],
                                            dropout=dropout, freeze_A=freeze_A)
    if set(layers) != set(state["lora"]):
        missing, extra = sorted(set(layers) - set(state["lora"])), sorted(set(state["lora"]) - set(layers))
        raise ValueError(f"the adapter does not fit the model: missing layers {missing[:4] or 'none'}"
                         f"{' ...' if len(missing) > 4 else ''}, extra layers {extra[:4] or 'none'}"
                         f"{' ...' if len(extra) > 4 else ''}")
    for n, m in layers.items():
        dev = m.lora_A.device
        if n in state.get("W0_shift", {}):
            shift = state["W0_shift"][n]  # the (B, A) the init moved W0 by (PiSSA, MiLoRA, LoRA-GA, CorDA)
            m.init_(shift["A"].to(dev), shift["B"].to(dev), shift_W0=True)
        m.init_(state["lora"][n]["A"].to(dev), state["lora"][n]["B"].to(dev))
    return layers


