"""Adapters and merged models the rest of the ecosystem loads: PEFT's adapter folder and Hugging Face's
LlamaForCausalLM layout, checked by round trips on the real stories260K (no transformers or peft needed);
and, where peft and transformers are installed, PEFT's own CorDA and EVA against ours."""
import copy
import json

import pytest
import torch

import checkpoints
import llama
import lora_da as L
import peers as P
import train

pytestmark = pytest.mark.formats  # every test here changes with safetensors, transformers or peft installed

TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def trained(stories, method, steps=3):
    """stories260K with rank-4 LoRA on all seven projections, initialized by `method`, after a few AdamW steps."""
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=8, rslora=True)
    g = torch.Generator().manual_seed(1)
    samples = [{"tokens": t, "targets": torch.cat([t[1:], torch.tensor([-100])]), "attention_mask": torch.ones(24, dtype=torch.bool)}
               for t in torch.randint(3, 512, (8, 24), generator=g)]
    P.initialize_model(model, method, samples, cfg=L.DAConfig(N=1000, stats_batch_size=4))
    llama.mark_only_lora_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = L.collate(samples)
    for _ in range(steps):
        L.causal_lm_losses(model, batch).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


# PEFT's names for LlamaForCausalLM, written from its documented format (not from our exporter):
# base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight; lora_A (r, in), lora_B (out, r)
def peft_fixture(r, n_layers=5, dim=64, kv=32, hidden=172):
    shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv, dim), "self_attn.v_proj": (kv, dim),
              "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (hidden, dim), "mlp.up_proj": (hidden, dim),
              "mlp.down_proj": (dim, hidden)}
    out = {}
    for i in range(n_layers):
        for mod, (d_out, d_in) in shapes.items():
            out[f"base_model.model.model.layers.{i}.{mod}.lora_A.weight"] = (r, d_in)
            out[f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"] = (d_out, r)
    return out


PEFT_CONFIG_KEYS = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
                    "lora_dropout": 0.0, "use_rslora": True,
                    "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}


def read_tensors(folder):
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "adapter_model.safetensors"))
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def test_lora_da_adapter_round_trips_through_the_peft_format(stories, tmp_path):
    model = trained(stories, "da")
    checkpoints.save_peft(model, tmp_path / "peft", base_model="stories260K")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in PEFT_CONFIG_KEYS} == PEFT_CONFIG_KEYS
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(8.0) and cfg["base_model_name_or_path"] == "stories260K"
    sd = read_tensors(tmp_path / "peft")
    assert {k: tuple(v.shape) for k, v in sd.items()} == peft_fixture(4)
    back = copy.deepcopy(stories)
    checkpoints.load_lora(back, tmp_path / "peft")
    diff = (logits(back) - logits(model)).abs().max().item()
    print(f"\nLoRA-DA PEFT round trip: max logit difference {diff:.2e}")
    assert diff == 0.0  # the same numbers, written and read back: identical


def test_q_and_k_rows_are_permuted_as_hugging_face_stores_them(stories):
    # W_hf = hf_permute(W_meta), so B_hf must be hf_permute(B_meta) for s·B_hf A = hf_permute(s·B A)
    model = trained(stories, "da", steps=1)
    m = llama.lora_layers(model)["layers.2.attention.wk"]
    B_hf = checkpoints.hf_permute(m.lora_B.detach(), 4)
    torch.testing.assert_close(B_hf @ m.lora_A.detach(), checkpoints.hf_permute(m.lora_B.detach() @ m.lora_A.detach(), 4))
    assert not torch.equal(B_hf, m.lora_B.detach())
    torch.testing.assert_close(checkpoints.hf_unpermute(B_hf, 4), m.lora_B.detach())


def test_pissa_exports_at_rank_2r_onto_the_original_weights(stories, tmp_path):
    model = trained(stories, "pissa")
    checkpoints.save_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and "rank 8 = 2 x 4" in (tmp_path / "peft" / "README.md").read_text()
    assert {k: tuple(v.shape) for k, v in read_tensors(tmp_path / "peft").items()} == peft_fixture(8)
    back = copy.deepcopy(stories)  # the ORIGINAL W0: no shift anywhere
    layers = checkpoints.load_lora(back, tmp_path / "peft")
    assert all(m.W0_shift is None for m in layers.values())
    diff = (logits(back) - logits(model)).abs().max().item()
    print(f"\nPiSSA rank-2r PEFT round trip: max logit difference {diff:.2e}")
    assert diff < 1e-5


def test_hf_merged_model_loads_back_equal_to_the_meta_merged_model(stories, tmp_path, data):
    base = ["--data-dir", str(data), "--train-limit", "40", "--eval-limit", "8", "--steps", "2", "--batch-size", "4",
            "--init-samples", "4", "--stats-batch-size", "4", "--init", "ga", "--save-merged"]
    train.main(base + ["--out-dir", str(tmp_path / "meta")])
    train.main(base + ["--out-dir", str(tmp_path / "hf"), "--merged-format", "hf"])
    meta, hf = checkpoints.load_checkpoint(tmp_path / "meta" / "merged"), checkpoints.load_checkpoint(tmp_path / "hf" / "merged")
    cfg = json.loads((tmp_path / "hf" / "merged" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 4 and cfg["intermediate_size"] == 172
    torch.testing.assert_close(logits(hf), logits(meta), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_init_only_writes_a_peft_adapter_from_the_users_own_samples(tmp_path, data, kind):
    path = tmp_path / ("samples.txt" if kind == "text" else "samples.jsonl")
    if kind == "text":
        path.write_text("Once upon a time there was a cat.\nThe dog ran to the park.\nLily saw a big red ball.\n")
    else:
        path.write_text("\n".join(json.dumps({"prompt": f"Q: {q}\nA:", "answer": f" {a}"})
                                  for q, a in (("Who ran?", "The dog."), ("What was red?", "The ball."))))
    out = tmp_path / "run"
    train.main(["--data-dir", str(data), "--init", "da", "--init-only", "--init-data", str(path),
                "--export-peft", str(tmp_path / "peft"), "--out-dir", str(out), "--stats-batch-size", "2"])
    assert (out / "init_adapter.pt").is_file() and not (out / "ckpt.pt").exists()   # no training happened
    model = checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin")
    checkpoints.load_lora(model, tmp_path / "peft")
    ref = checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin")
    checkpoints.load_lora(ref, out / "init_adapter.pt")
    assert (logits(model) - logits(ref)).abs().max().item() == 0.0
    assert json.loads((out / "config.json").read_text())["N"] == (3 if kind == "text" else 2)


def test_peft_itself_loads_the_export_when_it_is_installed(stories, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = trained(stories, "da")
    checkpoints.save_peft(model, tmp_path / "peft")
    merged_base = copy.deepcopy(stories)
    checkpoints.save_hf_checkpoint(merged_base, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, logits(model), rtol=1e-4, atol=1e-4)


# --- CorDA and EVA against PEFT's own implementations (skipped without peft and transformers) ----------------

HF_LEAF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
           "w3": "up_proj"}


def peft_factors(stories, tmp_path, method, samples, r=4, alpha=16):
    """PEFT's lora_A, lora_B for each of our layer names, initialized by PEFT's `method` on the HF export of
    stories260K. PEFT's q/k rows are in HF's rotary order (checkpoints.hf_permute), their inputs are ours."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    checkpoints.save_hf_checkpoint(stories, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    kw = dict(r=r, lora_alpha=alpha, use_rslora=True, target_modules=list(HF_LEAF.values()))
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda
        cfg = peft.LoraConfig(**kw, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

        def run_model():  # CorDA's hook wants batch size 1 and no padding
            for s in samples:
                hf(input_ids=s["tokens"][None, :int(s["attention_mask"].sum())])
        preprocess_corda(hf, cfg, run_model=run_model)
        model = peft.get_peft_model(hf, cfg)
    else:
        cfg = peft.LoraConfig(**kw, init_lora_weights="eva",
                              eva_config=peft.EvaConfig(rho=1.0, use_label_mask=False))  # ρ = 1: r per layer
        model = peft.get_peft_model(hf, cfg, low_cpu_mem_usage=True)
        batch = {"input_ids": torch.stack([s["tokens"] for s in samples]),
                 "attention_mask": torch.stack([s["attention_mask"] for s in samples]).long()}
        peft.initialize_lora_eva_weights(model, [batch])  # one batch: its incremental PCA is one PCA of all tokens
    mods = dict(model.named_modules())
    out = {}
    for name in llama.add_lora(copy.deepcopy(stories), r=r):
        _, i, block, leaf = name.split(".")
        m = mods[f"base_model.model.model.layers.{i}.{'self_attn' if block == 'attention' else 'mlp'}.{HF_LEAF[leaf]}"]
        out[name] = (m.lora_A["default"].weight.detach().double(), m.lora_B["default"].weight.detach().double())
    return out


def test_corda_equals_peft_corda(stories, tmp_path):
    from helpers import padded_samples
    samples = padded_samples(32)
    theirs = peft_factors(stories, tmp_path, "corda", samples)
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    P.initialize_model(model, "corda", samples, cfg=L.DAConfig(N=1000))
    for name, m in layers.items():
        A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
        Ap, Bp = theirs[name]
        assert L.principal_angle(A, Ap) < 0.2, name  # measured: at most 0.03° (PEFT's SVD is fp32)
        if not name.endswith(("wq", "wk")):         # the same rows: s·B A agrees to fp32 round-off
            assert (B @ A - Bp @ Ap).norm() / (B @ A).norm() < 2e-3, name  # measured: at most 2.4e-4


def test_eva_captures_the_input_variance_peft_eva_captures(stories, tmp_path):
    """PEFT's randomized incremental PCA approximates the exact PCA used here: on near-equal eigenvalues its
    components differ (principal angles up to ~40°), but the centred input variance they capture is within
    0.1% of the maximum that the exact components reach (Ky Fan), which PEFT's never exceed."""
    from helpers import padded_samples
    samples = padded_samples(32)
    theirs = peft_factors(stories, tmp_path, "eva", samples)
    model = copy.deepcopy(stories)
    layers = llama.add_lora(model, r=4, lora_alpha=16, rslora=True)
    P.initialize_model(model, "eva", samples, cfg=L.DAConfig(N=1000), peer=P.PeerConfig(eva_token_mask="all"))
    stats = P.input_statistics(stories, samples, L.causal_lm_losses,
                               {n: dict(stories.named_modules())[n] for n in layers}, token_mask="all")
    angles = []
    for name, m in layers.items():
        cov = stats[name]["cov"]

        def captured(A):
            Q = torch.linalg.qr(A.T).Q
            return torch.trace(Q.T @ cov @ Q).item()
        ratio = captured(theirs[name][0]) / captured(m.lora_A.detach().double())
        assert 0.998 < ratio < 1 + 1e-9, name   # measured: 0.9990 to 0.999999
        assert theirs[name][1].abs().max() == 0 and m.lora_B.abs().max() == 0
        angles.append(L.principal_angle(m.lora_A, theirs[name][0]))
    assert sorted(angles)[len(angles) // 2] < 3   # measured median: 1.4°
