"""llama.py: the model reproduces the real checkpoint, its formats agree, its LoRA layers keep their invariants."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import llama
from conftest import ROOT

# the documented greedy sample of stories260K (llama2.c, karpathy/tinyllamas)
GOLDEN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
          "One day, she saw a big, red ball.")


def tiny_args(**kw):
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=32,
                tie_embeddings=False)
    base.update(kw)
    return llama.ModelArgs(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return llama.Transformer(tiny_args(**kw)).eval()


def test_greedy_sample_of_stories260K_matches_its_authors_documented_output(stories, tokenizer):
    ids = tokenizer.encode("Once upon a time", bos=True)
    new = list(stories.generate(torch.tensor([ids]), 60, temperature=0.0,
                                stop_ids=(tokenizer.eos_id, tokenizer.bos_id)))
    text = tokenizer.decode(ids + new)
    assert text.startswith(GOLDEN), text


def test_cli_prints_the_golden_sample_and_refuses_bad_input_in_one_line(data):
    d = data / "stories260K"
    ok = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(d / "stories260K.bin"), "--tokenizer",
                         str(d / "tok512.model"), "--prompt", "Once upon a time", "--max-new-tokens", "40",
                         "--temperature", "0"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(GOLDEN), ok.stderr
    bad = subprocess.run([sys.executable, "sample.py", "--checkpoint", "/nonexistent.bin"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_real_rope_equals_metas_complex_rope():
    # Meta's reference: view pairs as complex numbers and multiply by e^{i m θ}
    hd, T = 16, 10
    x = torch.randn(2, T, 3, hd)
    cos, sin = llama.precompute_freqs(hd, T)
    freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    xc = torch.view_as_complex(x.reshape(2, T, 3, hd // 2, 2))
    ref = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    torch.testing.assert_close(llama.apply_rotary_emb(x, cos, sin), ref, rtol=1e-6, atol=1e-6)


def test_cached_incremental_decoding_equals_full_forward(stories):
    torch.manual_seed(0)
    tokens = torch.randint(3, 512, (2, 40))
    full = stories(tokens)
    # a prefill of 17 tokens, a chunk of 5, then one token at a time
    steps = [stories(tokens[:, :17], start_pos=0), stories(tokens[:, 17:22], start_pos=17)]
    steps += [stories(tokens[:, t:t + 1], start_pos=t) for t in range(22, 40)]
    cached = torch.cat(steps, dim=1)
    # fp32, 5 layers: only summation-order differences are allowed
    assert (cached - full).abs().max().item() < 1e-4


def test_the_cache_holds_what_the_sequence_needs_and_grows_past_it_with_the_same_logits(stories):
    # claim: the key/value cache is sized to the tokens decoded so far (doubling), not to the whole context, so
    # a wide batch at a long context fits in memory; growing it mid-sequence (past 64, then 128 tokens) changes
    # no logit against the full forward
    torch.manual_seed(1)
    tokens = torch.randint(3, 512, (3, 150))
    full = stories(tokens)
    steps = [stories(tokens[:, :10], start_pos=0)]
    layer = stories.layers[0].attention
    assert layer.cache_k.shape[1] == 64 < stories.args.max_seq_len
    steps += [stories(tokens[:, t:t + 1], start_pos=t) for t in range(10, 150)]
    assert layer.cache_k.shape[1] == 256 and layer.cache_v.shape == layer.cache_k.shape
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
    stories(tokens[:1, :5], start_pos=0)  # a new sequence (another batch size) starts a cache of its own
    assert layer.cache_k.shape[:2] == (1, 64)


def test_meta_two_shard_checkpoint_loads_back_with_identical_logits(tmp_path):
    model = tiny_model()
    checkpoints.save_meta_checkpoint(model, tmp_path / "meta", n_shards=2)
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                                    "params.json"]
    # each shard holds half of a column-parallel weight
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (16, 32)
    assert shard["layers.0.attention.wo.weight"].shape == (32, 16)
    loaded = checkpoints.load_checkpoint(tmp_path / "meta")
    tokens = torch.randint(0, 64, (2, 12))
    assert torch.equal(loaded(tokens), model(tokens))


def hf_permute(w, n_heads):
    # Hugging Face's convert_llama_weights_to_hf.py, the forward direction, written independently
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def save_hf(model, folder, use_safetensors=False):
    a = model.args
    folder.mkdir()
    cfg = {"hidden_size": a.dim, "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
           "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len,
           "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    inv = {v: k for k, v in checkpoints._HF_NAMES.items()}
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for k, v in model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod == "attention.wq":
                v = hf_permute(v, a.n_heads)
            elif mod == "attention.wk":
                v = hf_permute(v, a.n_kv_heads)
            sd[f"model.layers.{i}.{inv[mod]}.{leaf}"] = v
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    if use_safetensors:
        from safetensors.torch import save_file
        save_file(sd, str(folder / "model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")


def test_hugging_face_layout_loads_back_with_identical_logits(tmp_path):
    model = tiny_model(seed=1)
    save_hf(model, tmp_path / "hf")
    loaded = checkpoints.load_checkpoint(tmp_path / "hf")
    tokens = torch.randint(0, 64, (2, 12))
    assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.formats
def test_hugging_face_safetensors_load_when_installed(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model(seed=2)
    save_hf(model, tmp_path / "hf", use_safetensors=True)
    tokens = torch.randint(0, 64, (1, 8))
    assert torch.equal(checkpoints.load_checkpoint(tmp_path / "hf")(tokens), model(tokens))


def test_llama2_7b_preset_has_its_parameter_count_and_allocates_nothing():
    with torch.device("meta"):
        model = llama.Transformer(llama.PRESETS["llama2-7b"])
    assert model.num_params() == 6_738_415_616
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tokenizer_round_trips_and_exposes_special_ids(tokenizer):
    ids = tokenizer.encode("Lily saw a ball.", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id == 1 and ids[-1] == tokenizer.eos_id == 2
    assert tokenizer.decode(ids) == "Lily saw a ball."
    # stories260K's tokenizer has no pad piece (sentencepiece says -1), so padding uses EOS
    assert tokenizer.vocab_size == 512 and tokenizer.sp.pad_id() == -1 and tokenizer.pad_id == tokenizer.eos_id


# --- bad input -----------------------------------------------------------------

def test_truncated_llama2c_file_names_the_file_and_byte_counts(data, tmp_path):
    blob = (data / "stories260K" / "stories260K.bin").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(blob[:-100])
    with pytest.raises(ValueError, match=r"cut.bin: \d+ bytes, expected \d+"):
        checkpoints.load_checkpoint(bad)


def test_missing_checkpoint_and_mismatched_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "nope")
    model = tiny_model()
    checkpoints.save_meta_checkpoint(model, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["dim"] = 48  # the weights no longer fit the config
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+\), expected \(\d+, \d+\)"):
        checkpoints.load_checkpoint(tmp_path / "meta")


def test_impossible_ranks_and_unknown_targets_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="need 1 <= r <= 16"):
        llama.add_lora(copy.deepcopy(model), r=17)
    with pytest.raises(ValueError, match="need 1 <= r"):
        llama.add_lora(copy.deepcopy(model), r=0)
    with pytest.raises(ValueError, match=r"unknown LoRA target modules \['q_proj'\]; valid: \['w1', 'w2'"):
        llama.add_lora(copy.deepcopy(model), targets=("q_proj",))


# --- LoRA invariants -----------------------------------------------------------

def test_lora_with_B_zero_leaves_the_output_unchanged():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 10))
    before = model(tokens)
    layers = llama.add_lora(model, r=4, lora_alpha=8)
    assert len(layers) == 2 * 7
    assert all(m.lora_A.abs().max() > 0 and m.lora_B.abs().max() == 0 for m in layers.values())
    assert torch.equal(model(tokens), before)


def test_lora_scaling_is_alpha_over_r_or_alpha_over_sqrt_r():
    lin = torch.nn.Linear(16, 8, bias=False)
    assert llama.LoRALinear(lin, r=4, lora_alpha=8).scaling == 2.0
    assert llama.LoRALinear(lin, r=4, lora_alpha=8, rslora=True).scaling == 4.0
    # h = W0 x + s·B A x, checked against the formula
    layer = llama.LoRALinear(lin, r=4, lora_alpha=8, rslora=True)
    layer.init_(torch.randn(4, 16), torch.randn(8, 4))
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ lin.weight.T + 4.0 * x @ layer.lora_A.T @ layer.lora_B.T)


def test_merged_and_unmerged_outputs_agree_and_merge_is_idempotent():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 10))
    W0 = model.layers[0].attention.wq.weight.clone()
    layers = llama.add_lora(model, r=4, lora_alpha=8, rslora=True)
    for m in layers.values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    unmerged = model(tokens)
    for m in layers.values():
        m.merge()
        m.merge()
    torch.testing.assert_close(model(tokens), unmerged, rtol=1e-5, atol=1e-5)
    for m in layers.values():
        m.unmerge()
    torch.testing.assert_close(model.layers[0].attention.wq.base.weight, W0, rtol=1e-6, atol=1e-6)


def test_only_lora_parameters_get_gradients_and_freeze_A_keeps_A():
    model = tiny_model()
    llama.add_lora(model, r=4, lora_alpha=8, freeze_A=True)
    llama.mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    layers = llama.lora_layers(model)
    A_init = {n: m.lora_A.detach().clone() for n, m in layers.items()}
    W0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 64, (2, 10))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    for n, m in layers.items():
        assert torch.equal(m.lora_A, A_init[n]) and torch.equal(m.base.weight, W0[n])
        assert m.lora_B.abs().max() > 0


def test_adapter_save_load_rebuilds_the_same_model_including_a_W0_shift(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model)
    layers = llama.add_lora(model, r=4, lora_alpha=8, rslora=True, targets=("wq", "w2"))
    for i, m in enumerate(layers.values()):
        m.init_(torch.randn_like(m.lora_A), torch.randn_like(m.lora_B), shift_W0=(i == 0))
        torch.nn.init.normal_(m.lora_B)  # "training" moved B after the init
    checkpoints.save_lora(model, tmp_path / "adapter.pt")
    checkpoints.load_lora(base, tmp_path / "adapter.pt")
    tokens = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(base(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    state = torch.load(tmp_path / "adapter.pt", weights_only=True)
    assert state["config"] == {"r": 4, "lora_alpha": 8, "rslora": True, "scaling": 4.0, "targets": ["w2", "wq"]}


def test_babyllama936K_reads_its_weights_right(data):
    """The second real model (width 128, a 105-character tokenizer, llama2.c legacy .bin): a TinyStories
    sentence costs it 0.077 nats per character, against 22.9 with its own weights shuffled within each
    matrix and 4.65 (ln 105) for a uniform guess; a weight read in the wrong order or layout lands near the
    shuffled or uniform model."""
    d = data / "babyllama936K"
    tok, model = llama.Tokenizer(d / "tok105.model"), checkpoints.load_checkpoint(d / "model5000.bin")
    assert (model.args.dim, model.args.vocab_size, model.args.max_seq_len) == (128, 105, 256)
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She loved to play "
                                   "outside in the park with her friends.")])
    nll = lambda m: F.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:]).item()
    with torch.no_grad():
        real = nll(model)
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=gen)].view_as(p))
        shuffled = nll(model)
    assert real < 0.3 and shuffled > 3.0, (real, shuffled)


def test_written_out_attention_equals_the_fused_kernel_values_and_gradients():
    # 8 query heads over 4 kv heads of width 8 (stories260K's shape): the grouped matmul pairs each query
    # head with its own kv head, and the mask hides every later position
    torch.manual_seed(0)
    B, T, n_kv, n_rep, hd = 3, 11, 4, 2, 8
    xq = torch.randn(B, T, n_kv * n_rep, hd, requires_grad=True)
    xk, xv = (torch.randn(B, T, n_kv, hd, requires_grad=True) for _ in range(2))
    out = llama.causal_attention(xq, xk, xv)
    k, v = (llama.repeat_kv(t, n_rep).transpose(1, 2) for t in (xk, xv))
    ref = F.scaled_dot_product_attention(xq.transpose(1, 2), k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (xq, xk, xv))
    refs = torch.autograd.grad((ref * w).sum(), (xq, xk, xv))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_folded_lora_layer_gives_the_literal_output_and_gradients():
    # in fp64, where float order cannot hide a wrong term
    torch.manual_seed(0)
    layer = llama.LoRALinear(torch.nn.Linear(24, 40, bias=False), r=4, lora_alpha=8, rslora=True).double()
    layer.init_(torch.randn(4, 24), torch.randn(40, 4))
    assert layer.fold  # 960 weights: folded
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    out = {}
    for fold in (True, False):
        layer.fold = fold
        h = layer(x)
        h.pow(2).sum().backward()
        out[fold] = (h.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.zero_grad()
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # h = W0 x + s·B A x, the formula itself
    torch.testing.assert_close(out[True][0], x @ layer.base.weight.T + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T)


def test_only_small_layers_without_dropout_and_at_the_adapters_precision_fold():
    big = torch.nn.Linear(512, 256, bias=False)                      # 131,072 weights > FOLD_MAX
    assert not llama.LoRALinear(big, r=8, lora_alpha=16).fold
    assert not llama.LoRALinear(torch.nn.Linear(64, 64), r=8, lora_alpha=16, dropout=0.1).fold
    # a bf16 base keeps the literal path, so the fp32 adapter is not rounded into bf16 weights
    layer = llama.LoRALinear(torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16), r=8, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    literal = layer.base(x) + (layer.scaling * (x.float() @ layer.lora_A.T @ layer.lora_B.T)).to(torch.bfloat16)
    assert layer.fold and torch.equal(layer(x), literal)


def test_fast_paths_give_the_literal_logits_and_lora_gradients_on_both_real_models(stories, data):
    baby = checkpoints.load_checkpoint(data / "babyllama936K" / "model5000.bin")
    for base, explicit in ((stories, True), (baby, False)):  # heads 8 wide (written out) and 16 wide (the kernel)
        model = copy.deepcopy(base).double()  # fp64: float order cannot hide a wrong term
        layers = llama.add_lora(model, r=8, lora_alpha=16, rslora=True)
        torch.manual_seed(0)
        for m in layers.values():
            m.double()
            torch.nn.init.normal_(m.lora_B, std=0.02)
        llama.mark_only_lora_trainable(model)
        assert all(m.fold for m in layers.values()) and all(b.attention.explicit == explicit for b in model.layers)
        tokens = torch.randint(0, model.args.vocab_size, (4, 40))
        out = {}
        for on in (True, False):
            logits = llama.fast_paths(model, on)(tokens)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            out[on] = [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad(set_to_none=True)
        assert not any(m.fold for m in layers.values()) and not any(b.attention.explicit for b in model.layers)
        # the logits come out in fp32 (Transformer.forward), and the loss's gradient with them
        torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(out[True][1:], out[False][1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_a_tiny_temperature_samples_greedily_instead_of_failing(data):
    """At temperature 1e-45 every logit but the largest divides to −inf (the max is subtracted first), so
    sampling is greedy decoding: the golden sample, not a probability tensor of NaNs."""
    d = data / "stories260K"
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(d / "stories260K.bin"), "--tokenizer",
                        str(d / "tok512.model"), "--max-new-tokens", "40", "--temperature", "1e-45"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(GOLDEN), r.stderr[-2000:]
