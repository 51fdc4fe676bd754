"""The GGUF reader and writer (checkpoints.py) and SmolLM2-135M read from it: the block layouts against values
written out by hand, the real file's model against what an independent reader found (the capital of France,
English far more likely than under shuffled weights), the rotary layout, bad files refused in one line, and
an export that reads back."""
import copy
import struct

import pytest
import torch

import bpe
import checkpoints as C
import llama

SMOL = "smollm2-135M/SmolLM2-135M-Instruct.Q4_1.gguf"


def f16(x):
    return struct.pack("<e", x)


# --- dequantization of hand-built blocks: 32 weights a block ---------------------------------------------

def test_q8_0_block_is_scale_times_int8():
    q = list(range(-16, 16))                                  # 32 int8 values
    raw = f16(0.5) + struct.pack("<32b", *q)
    w = C.dequantize("Q8_0", raw, (32,))
    assert w.tolist() == [0.5 * v for v in q]                 # -8.0, -7.5, ..., 7.5


def test_q4_0_block_low_nibbles_first_then_high_minus_eight():
    # byte j = (hi << 4) | lo: weight j = lo - 8, weight j + 16 = hi - 8, times d = 2
    lo, hi = list(range(16)), [15 - j for j in range(16)]
    raw = f16(2.0) + bytes((h << 4) | l for l, h in zip(lo, hi))
    w = C.dequantize("Q4_0", raw, (32,))
    assert w.tolist() == [2.0 * (v - 8) for v in lo + hi]


def test_q4_1_block_is_scale_times_nibble_plus_minimum():
    lo, hi = [j % 16 for j in range(16)], [(3 * j) % 16 for j in range(16)]
    raw = f16(0.25) + f16(-1.0) + bytes((h << 4) | l for l, h in zip(lo, hi))
    w = C.dequantize("Q4_1", raw, (32,))
    assert w.tolist() == [0.25 * v - 1.0 for v in lo + hi]


def test_two_q4_1_blocks_fill_a_row_in_order_and_floats_are_read_as_written():
    b1 = f16(1.0) + f16(0.0) + bytes([0x10] * 16)             # weights 0 (x16), 1 (x16)
    b2 = f16(1.0) + f16(10.0) + bytes([0x21] * 16)            # 11 (x16), 12 (x16)
    w = C.dequantize("Q4_1", b1 + b2, (1, 64))
    assert w[0].tolist() == [0.0] * 16 + [1.0] * 16 + [11.0] * 16 + [12.0] * 16
    assert C.dequantize("F16", f16(1.5) + f16(-2.0), (2,)).tolist() == [1.5, -2.0]
    assert C.dequantize("F32", struct.pack("<2f", 3.25, -0.5), (2,)).tolist() == [3.25, -0.5]
    bf = struct.pack("<2H", 0x3FC0, 0xC000)                   # bf16 1.5 and -2.0: the high halves of the fp32s
    assert C.dequantize("BF16", bf, (2,)).tolist() == [1.5, -2.0]


# --- bad files: one line, what was expected --------------------------------------------------------------

def tiny_file(tmp_path, meta=None, tensors=None, name="m.gguf"):
    base = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 8,
            "llama.feed_forward_length": 16, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
            "llama.context_length": 32, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 10}
    base.update(meta or {})
    base = {k: v for k, v in base.items() if v is not None}
    if tensors is None:
        tensors = [("token_embd.weight", "F32", (10, 8), bytes(10 * 8 * 4))]
    C.write_gguf(tmp_path / name, base, tensors)
    return tmp_path / name


@pytest.mark.parametrize("case,fragment", [
    ("magic", "not a GGUF file (magic b'GGUG'"),
    ("truncated", "truncated GGUF header"),
    ("past the end", "runs past the end of the file"),
    ("unknown type", "is Q4_K; this reader dequantizes F32, F16, BF16, Q8_0, Q4_0, Q4_1 only"),
    ("vocab", "llama.vocab_size 12 disagrees with the token embedding's 10 rows"),
    ("architecture", "general.architecture is 'gemma'; this project reads llama models only"),
    ("version", "GGUF version 7"),
])
def test_bad_gguf_files_are_refused_in_one_line(tmp_path, case, fragment):
    if case == "unknown type":
        path = tiny_file(tmp_path, tensors=[("token_embd.weight", "Q4_K", (10, 256), bytes(10 * 144))])
    elif case == "vocab":
        path = tiny_file(tmp_path, meta={"llama.vocab_size": 12})
    elif case == "architecture":
        path = tiny_file(tmp_path, meta={"general.architecture": "gemma"})
    else:
        path = tiny_file(tmp_path)
        data = bytearray(path.read_bytes())
        if case == "magic":
            data[3:4] = b"G"
        elif case == "truncated":
            data = data[:60]
        elif case == "past the end":
            data = data[:-8]                                    # the last tensor's bytes cut: the header lies
        elif case == "version":
            data[4:8] = struct.pack("<I", 7)
        path.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- the real file -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(data):
    path = data / SMOL
    if not path.is_file():
        pytest.skip(f"{SMOL} not in the data folder (../shared/data/README.md says where it comes from)")
    return path, C.load_checkpoint(path), bpe.BPETokenizer.from_gguf(path)


def test_smollm2_metadata_becomes_its_model_args(smol):
    _, model, tok = smol
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, llama.ffn_hidden_dim(a), a.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert (a.rope_theta, a.norm_eps, a.max_seq_len, a.tie_embeddings) == (100000.0, 1e-5, 8192, True)
    assert model.num_params() == 134_515_008 and tok.vocab_size == a.vocab_size


def test_smollm2_answers_the_capital_of_france_greedily(smol):
    _, model, tok = smol
    new = list(model.generate(torch.tensor([tok.chat("What is the capital of France?")]), 16, 0.0,
                              stop_ids=(tok.eos_id,)))
    assert tok.decode(new) == "The capital of France is Paris."  # an independent reader's answer (data README)


ENGLISH = ("The film is a charming and often affecting journey. It was raining, so we stayed inside and read "
           "books all afternoon. Water boils at one hundred degrees Celsius at sea level, and it freezes at zero. "
           "The children walked to school together every morning, talking about the games they would play.")


def mean_loss(model, tok):
    """Mean cross-entropy per token of the passage, in nats, each token predicted from the ones before it."""
    ids = torch.tensor([tok.encode(ENGLISH, bos=False)])
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()


def test_english_is_far_more_likely_than_under_shuffled_weights_or_the_other_rotary_layout(smol):
    """Measured on this passage (61 tokens): 4.02 nats/token as read (a uniform guess: ln 49,152 = 10.8); 25.5
    with every weight matrix's entries shuffled; 5.55 with wq, wk put in Hugging Face's half-split rotary
    layout. So GGUF holds Meta's interleaved pairs, the layout llama.py's RoPE uses, and is read as stored.
    The margins are a third of the measured gaps or less: a broken reader lands far beyond them."""
    _, model, tok = smol
    real = mean_loss(model, tok)
    shuffled = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in shuffled.parameters():
            if p.dim() == 2:
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.layers:
            layer.attention.wq.weight.copy_(C.hf_permute(layer.attention.wq.weight, 9))
            layer.attention.wk.weight.copy_(C.hf_permute(layer.attention.wk.weight, 3))
    wrong_shuffle, wrong_layout = mean_loss(shuffled, tok), mean_loss(other, tok)
    assert real < 4.5, real
    assert wrong_shuffle > real + 7, (real, wrong_shuffle)
    assert wrong_layout > real + 0.5, (real, wrong_layout)


# --- export ------------------------------------------------------------------------------------------------

def spec_header(path):
    """An independent read of a GGUF file's header, straight from the format's specification (ggml/docs/gguf.md):
    magic, version, counts, then each metadata key and value type, then each tensor's name, dims, type, offset."""
    b = path.read_bytes()
    assert b[:4] == b"GGUF"
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    pos, keys = 24, {}

    def string():
        nonlocal pos
        (n,), pos = struct.unpack_from("<Q", b, pos), pos + 8
        s, pos = b[pos:pos + n].decode(), pos + n
        return s

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(t):
        nonlocal pos
        if t == 8:
            string()
        elif t == 9:
            (et, n), pos = struct.unpack_from("<IQ", b, pos), pos + 12
            for _ in range(n):
                skip(et)
        else:
            pos += sizes[t]
    for _ in range(n_kv):
        k = string()
        (t,), pos = struct.unpack_from("<I", b, pos), pos + 4
        keys[k] = t
        skip(t)
    tensors = {}
    for _ in range(n_t):
        name = string()
        (nd,), pos = struct.unpack_from("<I", b, pos), pos + 4
        dims, pos = struct.unpack_from(f"<{nd}Q", b, pos), pos + 8 * nd
        (t, off), pos = struct.unpack_from("<IQ", b, pos), pos + 12
        tensors[name] = (dims, t, off)
    return version, keys, tensors, (pos + 31) // 32 * 32, len(b)


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_a_merged_model_exported_as_gguf_reads_back_with_the_same_logits(stories, tmp_path, dtype):
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.normal_(0, 0.05)
            m.merge()
    for name, m in list(layers.items()):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, m.base)
    path = C.save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    version, keys, tensors, data_start, size = spec_header(path)
    assert version == 3 and keys["general.alignment"] == 4 and keys["llama.rope.freq_base"] == 6
    assert tensors["token_embd.weight"][0] == (64, 512)           # innermost first
    assert tensors["blk.0.attn_q.weight"][1] == {"F32": 0, "F16": 1}[dtype] and tensors["output_norm.weight"][1] == 0
    assert all(off % 32 == 0 for _, _, off in tensors.values())
    assert data_start + max(off for _, _, off in tensors.values()) < size
    back = C.load_checkpoint(path)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (back(tokens) - model(tokens)).abs().max().item()
    assert gap < (1e-5 if dtype == "F32" else 5e-2), gap       # F16 rounds each weight to 11 bits


def test_the_smollm2_tokenizer_travels_with_an_export(smol, tmp_path):
    path, model, tok = smol
    meta = tok.gguf_metadata()
    out = C.write_gguf(tmp_path / "tok.gguf", {"general.architecture": "llama", **meta}, [])
    back = bpe.BPETokenizer.from_gguf(out)
    text = "Review: a gorgeous, witty, seductive movie.\nSentiment: 12345 apples"
    assert back.encode(text) == tok.encode(text) and back.pieces == tok.pieces and back.eos_id == tok.eos_id
