"""Bad input, as a table: each row is a command (train.py or sample.py) with one thing wrong, the exit it must
end with, and a fragment of the one-line message that says what was expected. No row may end in a traceback,
and no refused run may leave an output folder behind."""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

FAST = ["--train-limit", "60", "--eval-limit", "8", "--steps", "2", "--batch-size", "4", "--init-samples", "4",
        "--stats-batch-size", "4", "--eval-interval", "0"]


class Evil:
    """A pickle that would run code when loaded without weights_only."""
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, data):
    """Every broken file a row needs, made once."""
    d = tmp_path_factory.mktemp("bad")
    blob = (data / "stories260K" / "stories260K.bin").read_bytes()
    for n in (0, 27, 5000, len(blob) - 100):
        (d / f"cut{n}.bin").write_bytes(blob[:n])
    (d / "random.bin").write_bytes(os.urandom(4096))
    nan = bytearray(blob)
    offset = 28 + 4 * (512 * 64 + 5 * 64)  # header, embedding, attention norms: the first weight of layers.0.wq
    nan[offset:offset + 4] = bytes.fromhex("0000c07f")  # a float32 NaN
    (d / "nan.bin").write_bytes(bytes(nan))
    (d / "tok.model").write_bytes(os.urandom(2048))
    (d / "empty.model").write_bytes(b"")
    for name, params in {"badjson": "{not json", "nokey": json.dumps({"n_layers": 5}),
                         "heads": json.dumps({"dim": 64, "n_layers": 5, "n_heads": 6, "vocab_size": 512}),
                         "pickle": json.dumps({"dim": 64, "n_layers": 5, "n_heads": 8, "vocab_size": 512})}.items():
        (d / name).mkdir()
        (d / name / "params.json").write_text(params)
        shard = {"tok_embeddings.weight": torch.zeros(512, 64)} if name != "pickle" else {"x": Evil()}
        torch.save(shard, d / name / "consolidated.00.pth")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    torch.save({"model.embed_tokens.weight": torch.zeros(512, 64)}, d / "hf" / "pytorch_model.bin")
    # data folders: the real model and tokenizer beside a broken SST-2 file
    for name, train, dev in (("headeronly", "sentence\tlabel\n", None), ("utf8", b"sentence\tlabel\ngood\t1\nbad \xff\t0\n", None),
                             ("emptysentence", "sentence\tlabel\ngood\t1\n \t0\n", None)):
        (d / name / "sst2").mkdir(parents=True)
        shutil.copytree(data / "stories260K", d / name / "stories260K")
        path = d / name / "sst2" / "train.tsv"
        path.write_bytes(train if isinstance(train, bytes) else train.encode())
        shutil.copy(data / "sst2" / "dev.tsv", d / name / "sst2" / "dev.tsv")
    (d / "empty_data").mkdir()
    (d / "a_file").write_text("x")
    # Hugging Face folders of the real model with one field this project does not implement
    import checkpoints
    stories = checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin")
    for name, change in {"rope_scaling": {"rope_scaling": {"type": "linear", "factor": 4.0}},
                         "attention_bias": {"attention_bias": True}, "tied_but_lm_head": {"tie_word_embeddings": True},
                         "gelu": {"hidden_act": "gelu"}}.items():
        checkpoints.save_hf_checkpoint(stories, d / name)
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(json.dumps({**config, **change}))
        if name == "tied_but_lm_head":  # a separate output layer that tie_word_embeddings would silently drop
            # in the format save_hf_checkpoint chose (model.safetensors when safetensors is installed)
            st, pt = d / name / "model.safetensors", d / name / "pytorch_model.bin"
            sd = checkpoints.load_safetensors(st) if st.is_file() else torch.load(pt, weights_only=True)
            sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}
            if st.is_file():
                from safetensors.torch import save_file
                save_file(sd, str(st))
            else:
                torch.save(sd, pt)
    (d / "long.txt").write_text("once upon a time " * 3000 + "\nthe end\n")  # one line of ~12k tokens
    return d


def cli(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)


STORIES = "stories260K/stories260K.bin"
TOK = "stories260K/tok512.model"
ROWS = [  # id, script, args (with {bad}, {data}, {out} filled in), a fragment of the message
    ("data-dir empty", "train.py", ["--data-dir", "{bad}/empty_data"], "data files not found in {bad}/empty_data"),
    ("data-dir missing", "train.py", ["--data-dir", "{bad}/nowhere"], "data files not found in {bad}/nowhere"),
    ("gamma inf", "train.py", ["--gamma", "inf"], "argument --gamma: must be a finite number"),
    ("beta nan", "train.py", ["--beta", "nan"], "argument --beta: must be a finite number"),
    ("damping nan", "train.py", ["--damping", "nan"], "argument --damping: must be a finite number"),
    ("alpha inf", "train.py", ["--alpha", "inf"], "argument --alpha: must be a finite number"),
    ("N negative", "train.py", ["--N", "-5"], "argument --N: must be >= 0 (0: off or all), got -5"),
    ("duplicate init", "train.py", ["--init", "lora,lora"], "names ['lora'] twice"),
    ("lr 0", "train.py", ["--lr", "0"], "argument --lr: must be positive"),
    ("lr negative", "train.py", ["--lr", "-1"], "argument --lr: must be positive"),
    ("lr nan", "train.py", ["--lr", "nan"], "argument --lr: must be a finite number"),
    ("steps 0", "train.py", ["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    ("unknown init", "train.py", ["--init", "dora"], "choose from lora, gaussian, pissa, milora, ga, one, corda, eva, da"),
    ("rank 0", "train.py", ["--rank", "0"], "argument --rank: must be a positive integer"),
    ("rank too large", "train.py", ["--rank", "1000"] + FAST, "need 1 <= r <= 32"),
    ("max-len too small", "train.py", ["--max-len", "2"] + FAST, "--max-len 2 leaves no room"),
    ("out-dir unwritable", "train.py", ["--out-dir", "/proc/lora_da_out"], "cannot write in /proc"),
    ("export to an unwritable folder", "train.py", ["--export-peft", "/proc/lora_da_peft"] + FAST,
     "--export-peft /proc/lora_da_peft: cannot write in /proc"),
    ("out-dir under a file", "train.py", ["--out-dir", "{bad}/a_file/out"], "is a file, not a folder"),
    ("header-only train.tsv", "train.py", ["--data-dir", "{bad}/headeronly"] + FAST, "train.tsv: no examples after the header"),
    ("invalid utf-8", "train.py", ["--data-dir", "{bad}/utf8"] + FAST, "train.tsv:3: not valid UTF-8"),
    ("empty sentence", "train.py", ["--data-dir", "{bad}/emptysentence"] + FAST, "train.tsv:3: empty sentence"),
    ("dry run, unknown target", "train.py", ["--dry-run", "--targets", "foo"], "--targets 'foo': unknown ['foo']"),
    ("tokenizer not sentencepiece", "train.py", ["--tokenizer", "{bad}/tok.model"] + FAST, "not a sentencepiece .model file"),
    ("tokenizer empty", "sample.py", ["--tokenizer", "{bad}/empty.model"], "not a sentencepiece .model file"),
    ("empty checkpoint", "sample.py", ["--checkpoint", "{bad}/cut0.bin"], "cut0.bin: 0 bytes, too short"),
    ("checkpoint 27 bytes", "sample.py", ["--checkpoint", "{bad}/cut27.bin"], "cut27.bin: 27 bytes, too short"),
    ("checkpoint 5000 bytes", "train.py", ["--checkpoint", "{bad}/cut5000.bin"], "cut5000.bin: 5000 bytes, expected"),
    ("checkpoint 100 bytes short", "sample.py", ["--checkpoint", "{bad}/cut{cutlast}.bin"], "bytes, expected"),
    ("random bytes", "sample.py", ["--checkpoint", "{bad}/random.bin"], "not a llama2.c legacy .bin"),
    ("NaN weight", "sample.py", ["--checkpoint", "{bad}/nan.bin"], "weight layers.0.attention.wq.weight has NaN or inf"),
    ("malicious pickle", "sample.py", ["--checkpoint", "{bad}/pickle"], "consolidated.00.pth: not a weights-only PyTorch checkpoint"),
    ("params.json bad json", "train.py", ["--checkpoint", "{bad}/badjson", "--tokenizer", "{data}/" + TOK], "params.json: not valid JSON"),
    ("params.json missing key", "sample.py", ["--checkpoint", "{bad}/nokey"], "params.json: missing key 'dim'"),
    ("config.json missing key", "sample.py", ["--checkpoint", "{bad}/hf"], "config.json: missing key 'hidden_size'"),
    ("heads do not divide", "sample.py", ["--checkpoint", "{bad}/heads"], "dim 64 is not divisible by n_heads 6"),
    ("temperature nan", "sample.py", ["--temperature", "nan"], "argument --temperature: must be a finite number"),
    ("prompt fills the context", "sample.py", ["--prompt", "Once upon a time " * 200], "fills the model's context of 512"),
    ("device cuda", "train.py", ["--device", "cuda"] + FAST, "no CUDA device"),
    ("device cuda (sample)", "sample.py", ["--device", "cuda"], "no CUDA device"),
    ("device foo", "train.py", ["--device", "foo"], "--device 'foo' is not a device"),
    ("device foo (sample)", "sample.py", ["--device", "foo"], "--device 'foo' is not a device"),
    ("dropout 1", "train.py", ["--dropout", "1.0"], "argument --dropout: must be a probability in [0, 1), got 1.0"),
    ("dropout 1.5", "train.py", ["--dropout", "1.5"], "argument --dropout: must be a probability in [0, 1), got 1.5"),
    ("lora-alpha 0", "train.py", ["--lora-alpha", "0"], "argument --lora-alpha: must be positive, in [1e-06, 1e+09], got 0"),
    ("lora-alpha -1", "train.py", ["--lora-alpha", "-1"], "argument --lora-alpha: must be positive, in [1e-06, 1e+09], got -1"),
    ("init-data without init-only", "train.py", ["--init-data", "{bad}/long.txt"], "add --init-only"),
    ("a control without --init da", "train.py", ["--init", "lora", "--direction", "random"], "use them with --init da"),
    ("HF rope_scaling", "sample.py", ["--checkpoint", "{bad}/rope_scaling"], "rope_scaling = {{'type': 'linear'"),
    ("HF attention_bias", "train.py", ["--checkpoint", "{bad}/attention_bias", "--tokenizer", "{data}/" + TOK] + FAST,
     "attention_bias = True is not implemented"),
    ("HF hidden_act", "sample.py", ["--checkpoint", "{bad}/gelu"], "hidden_act = 'gelu' is not implemented"),
    ("HF tied but lm_head", "sample.py", ["--checkpoint", "{bad}/tied_but_lm_head"],
     "tie_word_embeddings is true but the files hold an lm_head.weight"),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0], marks=[pytest.mark.formats] if r[0].startswith("HF") else [])
                                 for r in ROWS])
def test_bad_input_gets_one_line_and_leaves_nothing(row, bad, data, tmp_path):
    name, script, args, fragment = row
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    size = (data / STORIES).stat().st_size
    fill = lambda t: t.format(bad=bad, data=data, out=tmp_path / "out", cutlast=size - 100)
    args = [fill(a) for a in args]
    if script == "train.py" and "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "out")]
    r = cli(script, *args)
    assert r.returncode != 0, r.stdout[-500:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert fill(fragment) in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 or (lines[0].startswith("usage:") and lines[-1].startswith(f"{script}: error:")), r.stderr
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind
    assert "this must never run" not in r.stdout + r.stderr


# --- resume: the previous checkpoint, changed settings, totals across sittings ---------------

RESUME = FAST[:4] + ["--steps", "9", "--batch-size", "4", "--init-samples", "4", "--stats-batch-size", "4",
                     "--eval-interval", "3", "--log-interval", "3", "--init", "lora"]


def test_resume_from_a_corrupt_latest_checkpoint_uses_the_previous_one(tmp_path, data):
    out = tmp_path / "run"
    whole = cli("train.py", *RESUME, "--out-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    cut = cli("tests/killed_run.py", "6", *RESUME, "--out-dir", str(out))
    assert cut.returncode != 0
    assert torch.load(out / "ckpt.prev.pt", weights_only=True)["step"] == 3
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:1000])   # the latest is damaged
    r = cli("train.py", *RESUME, "--out-dir", str(out), "--resume", "--log-interval", "1")  # logging may change
    assert r.returncode == 0, r.stderr
    assert "resuming from the previous checkpoint ckpt.prev.pt (step 3)" in r.stdout
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["final"] == b["final"] and a["history"] == b["history"]
    # totals add up across sittings: every step's tokens are counted once, whichever sitting ran it
    assert b["train_tokens"] == a["train_tokens"]
    assert b["train_seconds"] > 0 and math.isclose(b["tokens_per_second"], b["train_tokens"] / b["train_seconds"])


def test_resume_refuses_changed_results_settings_and_fails_in_one_line_without_a_good_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    cut = cli("tests/killed_run.py", "3", *RESUME, "--out-dir", str(out))
    assert cut.returncode != 0 and not (out / "ckpt.prev.pt").exists()
    r = cli("train.py", *RESUME, "--out-dir", str(out), "--resume", "--lr", "1e-3")
    assert r.returncode != 0 and "written with other settings (lr)" in r.stderr and "Traceback" not in r.stderr
    (out / "ckpt.pt").write_bytes(b"")
    r = cli("train.py", *RESUME, "--out-dir", str(out), "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "ckpt.pt is unreadable" in r.stderr and "no earlier checkpoint" in r.stderr


def test_config_records_the_data_folder_actually_read(tmp_path, data):
    r = cli("train.py", *FAST, "--init", "lora", "--data-dir", str(data), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(data.resolve())


def test_help_shows_every_default():
    for script in ("train.py", "sample.py"):
        r = cli(script, "--help")
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        options = [w for w in r.stdout.split() if w.startswith("--") and w not in ("--help",)]
        assert text.count("(default:") >= len({o.split("=")[0] for o in options if not o.startswith("--no-")}) // 2
    assert "(default: 0.03)" in " ".join(cli("train.py", "--help").stdout.split())


# --- PEFT adapters that would load wrong: refused by name -------------------------------------

def peft_folder(tmp_path, stories, change=None, drop=None, add=None):
    import checkpoints
    import llama
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=8, targets=("wq", "w2"))
    folder = checkpoints.save_peft(model, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(change or {})
    for k in [k for k in config if change and change.get(k) == "DELETE"]:
        del config[k]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    st = folder / "adapter_model.safetensors"  # written when safetensors is installed, else adapter_model.bin
    sd = checkpoints.load_safetensors(st) if st.is_file() else torch.load(folder / "adapter_model.bin", weights_only=True)
    sd = {k: v for k, v in sd.items() if not (drop and drop in k)}
    for key, shape in (add or {}).items():
        sd[key] = torch.zeros(shape)
    if st.is_file():
        from safetensors.torch import save_file
        save_file(sd, str(st))
    else:
        torch.save(sd, folder / "adapter_model.bin")
    return folder


PEFT_ROWS = [  # id, what is changed, the message fragment
    ("alpha_pattern", dict(change={"alpha_pattern": {"q_proj": 32}}), "alpha_pattern = {'q_proj': 32} is not supported"),
    ("rank_pattern", dict(change={"rank_pattern": {"q_proj": 2}}), "rank_pattern = {'q_proj': 2} is not supported"),
    ("use_dora", dict(change={"use_dora": True}), "use_dora = True is not supported"),
    ("no lora_alpha", dict(change={"lora_alpha": "DELETE"}), "missing key 'lora_alpha'"),
    ("target_modules", dict(change={"target_modules": ["q_proj", "k_proj"]}),
     "target_modules ['k_proj', 'q_proj'] in adapter_config.json, but the weights hold ['down_proj', 'q_proj']"),
    ("a layer without lora_B", dict(drop="layers.1.mlp.down_proj.lora_B"),
     "only one of lora_A, lora_B: layers.1.feed_forward.w2"),
    ("an extra layer", dict(add={"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (4, 64),
                                 "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (32, 4)}),
     "but the weights hold ['down_proj', 'q_proj', 'v_proj']"),
]


@pytest.mark.formats
@pytest.mark.parametrize("row", PEFT_ROWS, ids=[r[0] for r in PEFT_ROWS])
def test_a_peft_adapter_that_would_load_wrong_is_refused_by_name(row, stories, tmp_path):
    import checkpoints
    name, change, fragment = row
    folder = peft_folder(tmp_path, stories, **change)
    with pytest.raises(ValueError) as e:
        checkpoints.load_lora(copy.deepcopy(stories), folder)
    assert fragment in str(e.value), str(e.value)


def test_an_adapter_for_other_layers_names_the_missing_and_the_extra_ones(stories):
    import checkpoints
    import llama
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=8, targets=("wq",))
    state = llama.lora_state(model)
    state["lora"]["layers.0.attention.wk"] = state["lora"].pop("layers.4.attention.wq")
    with pytest.raises(ValueError, match=r"missing layers \['layers.4.attention.wq'\], extra layers "
                                         r"\['layers.0.attention.wk'\]"):
        checkpoints.load_lora(model, state)


# --- faults: interrupts, a full disk, a second writer, a long custom sample ----------------

LONG = FAST[:4] + ["--steps", "400", "--batch-size", "4", "--init-samples", "4", "--stats-batch-size", "4",
                   "--eval-interval", "5", "--eval-limit", "8", "--log-interval", "5", "--init", "lora"]


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupt_ends_in_one_line_with_the_checkpoint_intact(tmp_path, data, sig, code, name):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *LONG, "--out-dir", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({name}): the latest checkpoint is"), err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]  # intact: it loads
    assert f"(step {step})" in lines[0] and "--resume" in lines[0]
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()


def test_a_full_disk_names_the_file_keeps_the_previous_one_and_leaves_no_temp(tmp_path, monkeypatch):
    import checkpoints
    path = tmp_path / "ckpt.pt"
    checkpoints.atomic_save({"step": 3}, path)
    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OSError) as e:
        checkpoints.atomic_save({"step": 6}, path, keep_previous=tmp_path / "ckpt.prev.pt")
    assert str(e.value).startswith(f"could not write {path} (the previous one is kept): ") and "MiB free there" in str(e.value)
    assert torch.load(path, weights_only=True) == {"step": 3} and not list(tmp_path.glob("*.tmp"))


def test_a_second_writer_on_the_same_out_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # a live process holds it: this test
    r = cli("train.py", *FAST, "--init", "lora", "--out-dir", str(out))
    assert r.returncode == 2 and f"is in use by process {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / ".lock").write_text(str(gone.pid))  # its process has exited: a stale lock
    r = cli("train.py", *FAST, "--init", "lora", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()


def test_a_multi_run_locks_each_run_folder_and_refuses_one_in_use(tmp_path, data, monkeypatch):
    """Several runs share one --out-dir: the folder and each run's subfolder are locked before anything is
    written, so a run started by hand in a subfolder cannot be overwritten (compare.md would report it lost)."""
    import train
    out = tmp_path / "multi"
    (out / "da-s9").mkdir(parents=True)
    (out / "da-s9" / ".lock").write_text(str(os.getpid()))  # a live process (this test) runs there
    r = cli("train.py", *FAST, "--init", "lora,da", "--out-dir", str(out))
    assert r.returncode == 2 and f"{out / 'da-s9'} is in use by process {os.getpid()}" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["da-s9"] and not (out / ".lock").exists()  # nothing left
    (out / "da-s9" / ".lock").unlink()
    seen = {}

    def load(cfg, *a, **k):  # stands in for loading the model: look at the locks held at that moment
        seen.update({str(p.relative_to(out)): int(p.read_text()) for p in out.rglob(".lock")})
        raise ValueError("stop here")
    monkeypatch.setattr(train, "load", load)
    with pytest.raises(ValueError, match="stop here"):
        train.main_of(train.get_args([*FAST, "--init", "lora,da", "--seeds", "2", "--out-dir", str(out)]))
    assert seen == {n: os.getpid() for n in (".lock", "lora-s9/.lock", "lora-s10/.lock", "da-s9/.lock",
                                             "da-s10/.lock")}
    assert not list(out.rglob(".lock"))


def test_resume_after_the_training_data_changed_is_refused(tmp_path, data):
    """The same settings, the same folder, other data: config.json keeps the data's fingerprint."""
    d = tmp_path / "data"
    shutil.copytree(data / "stories260K", d / "stories260K")
    (d / "sst2").mkdir()
    shutil.copy(data / "sst2" / "dev.tsv", d / "sst2" / "dev.tsv")
    rows = (data / "sst2" / "train.tsv").read_text().splitlines()[:61]
    (d / "sst2" / "train.tsv").write_text("\n".join(rows) + "\n")
    args = [*FAST, "--init", "lora", "--data-dir", str(d), "--out-dir", str(tmp_path / "run")]
    assert cli("train.py", *args).returncode == 0
    first = json.loads((tmp_path / "run" / "config.json").read_text())["data_sha256"]
    r = cli("train.py", *args, "--resume")  # the same data: the finished run is continued (nothing to do)
    assert r.returncode == 0, r.stderr
    (d / "sst2" / "train.tsv").write_text("\n".join(rows[:1] + [rows[2], rows[1]] + rows[3:]) + "\n")  # two swapped
    r = cli("train.py", *args, "--resume")
    assert r.returncode == 2 and "other settings (the data (its fingerprint data_sha256))" in r.stderr, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_sha256"] == first  # nothing written


def test_a_custom_init_sample_cut_to_max_len_is_counted(tmp_path, bad, data):
    r = cli("train.py", "--init", "da", "--init-only", "--init-data", str(bad / "long.txt"), "--max-len", "64",
            "--stats-batch-size", "2", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "truncated to --max-len 64 from the left of the prompt: 1 train examples" in r.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["truncated"]["train"] == 1


@pytest.mark.formats
def test_a_damaged_safetensors_file_is_refused_like_a_damaged_pickle(stories, tmp_path):
    pytest.importorskip("safetensors")
    import checkpoints
    import llama
    checkpoints.save_hf_checkpoint(stories, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # cut mid-tensor
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable .safetensors file, or a damaged one"):
        checkpoints.load_checkpoint(tmp_path / "hf")
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4, lora_alpha=8)
    folder = checkpoints.save_peft(model, tmp_path / "peft")
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable .safetensors file"):
        checkpoints.load_lora(copy.deepcopy(stories), folder)
