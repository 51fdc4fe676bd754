"""train.py end to end, on the real stories260K model and the real SST-2 and GSM8K files, with tiny budgets."""
import json
import subprocess
import sys

import pytest
import torch

import checkpoints
import llama
import lora_da
import tasks
import train
from conftest import ROOT

TINY = ["--steps", "4", "--batch-size", "4", "--init-samples", "8", "--eval-limit", "16", "--train-limit", "300",
        "--eval-interval", "2", "--log-interval", "2", "--stats-batch-size", "4"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)


def killed_run(step, *args):
    """train.py ARGS, killed (SIGKILL) right after the checkpoint of `step` is written."""
    return subprocess.run([sys.executable, "tests/killed_run.py", str(step), *args], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("task", ["sst2", "gsm8k"])
def test_every_init_runs_on_both_tasks_and_writes_its_outputs(tmp_path, task, data):
    extra = ["--max-len", "160", "--eval-limit", "1"] if task == "gsm8k" else []  # greedy decoding is the slow part
    train.main(["--init", "all", "--task", task, "--out-dir", str(tmp_path), "--data-dir", str(data)] + TINY + extra)
    for method in train.METHODS:
        d = tmp_path / f"{method}-s9"
        m = json.loads((d / "metrics.json").read_text())
        for key in ("zero_shot", "step0", "final"):
            assert 0.0 <= m[key]["accuracy"] <= 1.0 and m[key]["loss"] > 0
        assert m["evals"][-1]["step"] == 4 and len(m["history"]["loss"]) == 4
        assert m["init_seconds"] > 0 and m["train_seconds"] > 0 and m["tokens_per_second"] > 0
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["init"] == method and cfg["task"] == task and cfg["N"] == 300
        adapter = torch.load(d / "adapter.pt", weights_only=True)
        assert len(adapter["lora"]) == 35 and bool(adapter["W0_shift"]) == (method in ("pissa", "milora", "ga", "corda"))
        assert (d / "loss.png").stat().st_size > 0
    assert "| da |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_step0_moves_only_for_lora_one_and_lora_da(tmp_path, data):
    train.main(["--init", "lora,pissa,da", "--out-dir", str(tmp_path), "--data-dir", str(data)] + TINY)
    m = {k: json.loads((tmp_path / f"{k}-s9" / "metrics.json").read_text()) for k in ("lora", "pissa", "da")}
    for k in ("lora", "pissa"):
        assert m[k]["step0"]["loss"] == pytest.approx(m[k]["zero_shot"]["loss"], abs=1e-4)
    assert abs(m["da"]["step0"]["loss"] - m["da"]["zero_shot"]["loss"]) > 1e-3


def test_a_run_killed_midway_and_resumed_ends_with_the_same_metrics(tmp_path, data):
    args = ["--init", "da", "--data-dir", str(data), "--steps", "12", "--batch-size", "4", "--init-samples", "8",
            "--eval-limit", "32", "--eval-interval", "4", "--log-interval", "4"]
    whole = run_cli(*args, "--out-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = killed_run(4, *args, "--out-dir", str(tmp_path / "cut"))
    assert killed.returncode != 0 and not (tmp_path / "cut" / "metrics.json").exists()
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 4  # the last checkpoint
    resumed = run_cli(*args, "--out-dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for key in ("zero_shot", "step0", "final", "evals", "history"):
        assert a[key] == b[key], key
    wa = torch.load(tmp_path / "whole" / "adapter.pt", weights_only=True)["lora"]
    wb = torch.load(tmp_path / "cut" / "adapter.pt", weights_only=True)["lora"]
    assert all(torch.equal(wa[n]["B"], wb[n]["B"]) and torch.equal(wa[n]["A"], wb[n]["A"]) for n in wa)


def test_save_merged_writes_a_meta_checkpoint_equal_to_base_plus_adapter(tmp_path, data, stories):
    train.main(["--init", "pissa", "--out-dir", str(tmp_path), "--data-dir", str(data), "--save-merged"] + TINY)
    merged = checkpoints.load_checkpoint(tmp_path / "merged")
    model = checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin")
    checkpoints.load_lora(model, tmp_path / "adapter.pt")
    tokens = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_dry_run_of_llama2_7b_reports_its_size_without_allocating(capsys):
    train.main(["--dry-run", "--checkpoint", "llama2-7b", "--dtype", "bf16", "--layers-per-pass", "8",
                "--max-len", "1024", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "12.551 GiB" in out  # 6.74e9 bf16 weights
    for stage in ("G, 8 blocks per pass", "Z + Y", "LoRA r=8", "activations", "peak, training"):
        assert stage in out


def test_truncation_is_from_the_left_of_the_prompt_and_counted(data):
    tok = llama.Tokenizer(data / "stories260K" / "tok512.model")
    q, a = tasks.read_gsm8k(data / "gsm8k" / "train.jsonl")[0]
    full = tok.encode(f"Q: {q}\nA: ", bos=True)
    answer = tok.encode(a, bos=False, eos=True)
    room = len(answer) + 12  # the answer fits, the prompt does not
    cfg = train.get_args(["--task", "gsm8k", "--max-len", str(room), "--eval-limit", "3", "--train-limit", "1"])
    task = tasks.Task(cfg, tok, data, 512)
    prompt, kept = task.encode("train", 0)
    assert kept == answer and len(prompt) == 12 and prompt[0] == tok.bos_id
    assert prompt[1:] == full[-11:]  # the end of the prompt (up to "\nA: ") survives, its start is cut
    assert task.truncated["train"] == 1
    assert tasks.final_number("so 3 + 4 = 7\n#### 1,234") == 1234.0


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/model.bin"], "checkpoint not found"),
    (["--tokenizer", "/nonexistent/tok.model"], "tokenizer not found"),
    (["--rank", "65"], "need 1 <= r <= 32"),
    (["--lr", "0"], "argument --lr: must be positive"),
    (["--batch-size", "-1"], "argument --batch-size: must be a positive integer"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--init", "dora"], "choose from lora, gaussian, pissa, milora, ga, one, corda, eva, da"),
    (["--task", "mnli"], "invalid choice: 'mnli' (choose from 'sst2', 'gsm8k')"),
])
def test_bad_input_ends_with_one_line_and_a_nonzero_exit(args, message, tmp_path):
    r = run_cli(*args, "--out-dir", str(tmp_path))
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("usage:") or r.stderr.count("\n") == 1  # argparse: usage line + error line


def test_missing_data_lists_each_file_with_its_url_and_sha256(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "data_dirs", lambda cfg: [tmp_path])
    cfg = train.get_args(["--task", "gsm8k"])
    with pytest.raises(tasks.UsageError) as e:
        tasks.find_data(cfg, ["gsm8k/train.jsonl", "gsm8k/test.jsonl"])
    msg = str(e.value)
    assert "gsm8k/train.jsonl  from https://raw.githubusercontent.com/openai/grade-school-math" in msg
    assert "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465" in msg and "--download" in msg


def test_corrupt_checkpoint_and_nan_loss_fail_cleanly_and_keep_the_earlier_checkpoint(tmp_path, data):
    bad = tmp_path / "cut.bin"
    bad.write_bytes((data / "stories260K" / "stories260K.bin").read_bytes()[:5000])
    r = run_cli("--checkpoint", str(bad), "--out-dir", str(tmp_path / "a"))
    assert r.returncode != 0 and "cut.bin: 5000 bytes, expected" in r.stderr and r.stderr.count("\n") == 1
    # a learning rate that blows up: the run stops at the first non-finite loss, the checkpoint before it stays
    out = tmp_path / "b"
    r = run_cli("--lr", "1e20", "--grad-clip", "0", "--warmup", "0", "--steps", "60", "--eval-interval", "1",
                "--batch-size", "4", "--eval-limit", "8", "--init-samples", "8", "--out-dir", str(out))
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "loss became nan" in r.stderr or "became non-finite" in r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v["B"]).all() for v in ckpt["adapter"]["lora"].values())


def test_decode_limit_decodes_only_the_first_problems_and_keeps_the_loss(data, tokenizer, stories):
    # claim: --decode-limit changes which GSM8K problems are decoded, never the loss over the whole split
    cfg = train.get_args(["--task", "gsm8k", "--max-len", "160", "--eval-limit", "3", "--train-limit", "1"])
    task = tasks.Task(cfg, tokenizer, data, 512)
    full = tasks.evaluate(stories, task, "test", tokenizer, "cpu", decode=True, decode_limit=-1)
    one = tasks.evaluate(stories, task, "test", tokenizer, "cpu", decode=True, decode_limit=1)
    none = tasks.evaluate(stories, task, "test", tokenizer, "cpu", decode=True, decode_limit=0)
    assert full["decoded"] == 3 and one["decoded"] == 1 and "decoded" not in none
    assert none["accuracy"] is None and 0 <= one["accuracy"] <= 1
    assert full["loss"] == one["loss"] == none["loss"]


def test_train_size_trains_on_the_head_of_what_the_validation_split_leaves(data, tokenizer):
    # claim: --train-size N keeps the same validation split and trains on the first N of the remaining rows
    base = tasks.Task(train.get_args(["--val-size", "50", "--train-limit", "400", "--eval-limit", "8"]), tokenizer, data, 512)
    small = tasks.Task(train.get_args(["--val-size", "50", "--train-limit", "400", "--eval-limit", "8",
                                       "--train-size", "64"]), tokenizer, data, 512)
    assert small.val == base.val and small.train == base.train[:64]
    with pytest.raises(train.UsageError, match="--train-size 351 is more than the 350 training examples"):
        tasks.Task(train.get_args(["--val-size", "50", "--train-limit", "400", "--train-size", "351"]), tokenizer, data, 512)


def test_a_run_records_how_far_A_moved_and_frozen_A_does_not_move(tmp_path, data):
    # claim: the A drift is the principal angle between init and final A: > 0 when A trains, 0 when frozen
    for frozen in (False, True):
        out = tmp_path / f"frozen{frozen}"
        train.main(["--init", "da", "--out-dir", str(out), "--data-dir", str(data), "--no-zero-shot",
                    "--train-size", "100"] + TINY + (["--freeze-A"] if frozen else []))
        m = json.loads((out / "metrics.json").read_text())
        assert "zero_shot" not in m and json.loads((out / "config.json").read_text())["N"] == 100
        drift = m["A_drift_degrees"]
        assert len(drift["layers"]) == 35 and drift["max"] == max(drift["layers"].values())
        if frozen:
            assert drift["max"] < 1e-3
        else:
            assert drift["mean"] > 1.0


def test_whole_word_verbalizer_scores_the_sum_of_the_words_tokens_and_unk_is_counted_never_a_target(data):
    """With babyllama936K's character tokenizer, ' sad' and ' happy' share their first token, so SST-2 is scored
    by log p(word | prompt) summed over the word's tokens. Checked against one full forward per example and
    word; every <unk> (the prompt's newline is outside the 105-character alphabet) is counted, none a target."""
    cfg = train.get_args(["--model", "babyllama936K", "--train-limit", "40", "--eval-limit", "24", "--data-dir", str(data)])
    setup = train.load(cfg, log=lambda *a: None)
    task, tok, model = setup.task, setup.tok, setup.base
    assert [len(w) for w in task.words] == [4, 6] and task.whole_word
    assert task.max_len == 256 and task.unknown["test"] >= len(task.test)  # one newline per prompt at least
    idx = list(range(8))
    logp, n = tasks.word_logprobs(model, task, "test", idx, tok.pad_id, "cpu")
    logp = logp.T
    assert n.tolist() == [[4, 6]] * len(idx)
    with torch.no_grad():
        for j in idx:
            prompt, _ = task.encode("test", j)
            for k in (0, 1):
                seq = torch.tensor([prompt + task.words[k]])
                lp = torch.log_softmax(model(seq[:, :-1])[0].float(), -1)
                hand = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(task.words[k]))
                assert logp[k][j].item() == pytest.approx(hand, abs=1e-4)
    ev = tasks.evaluate(model, task, "test", tok, "cpu")
    # the accuracy is the hand count of examples whose own label word has the larger summed log-probability
    every = list(range(len(task.test)))
    lp_all = tasks.word_logprobs(model, task, "test", every, tok.pad_id, "cpu")[0]   # (n, 2)
    hand = sum(int((lp_all[j, 1] > lp_all[j, 0]).item()) == task.test[j][1] for j in every) / len(every)
    assert ev["accuracy"] == hand and 0 < hand < 1
    assert ev["predicted_positive"] == sum(int((lp_all[j, 1] > lp_all[j, 0]).item()) for j in every) / len(every)
    # the loss is the answer word's mean negative log-probability, as a pass with the answers scores it
    b = task.batch("test", range(len(task.test)), tok.pad_id)
    with torch.no_grad():
        reference = lora_da.scored_losses(model(b["tokens"], at=b["targets"] != -100), b["targets"]).mean()
    assert ev["loss"] == pytest.approx(reference.item(), rel=1e-5)
    b = task.batch("train", range(len(task.train)), tok.pad_id)
    assert (b["tokens"] == tok.unk_id).any() and not (b["targets"] == tok.unk_id).any()


def test_words_with_distinct_first_tokens_are_scored_by_them_as_in_every_committed_study(data, tokenizer, stories):
    """On stories260K ' sad' is two tokens ('▁sa', 'd') and ' happy' one: their first tokens differ, so accuracy
    compares those two logits at the answer position (the rule of the committed stories260K studies), and the
    prompts keep the room they always had; babyllama936K's words begin alike and are scored whole (above)."""
    cfg = train.get_args(["--train-limit", "40", "--eval-limit", "32"])
    task = tasks.Task(cfg, tokenizer, data, 512)
    assert [len(w) for w in task.words] == [2, 1] and not task.whole_word and task.max_len == 128
    assert task.unknown == {"train": 0, "val": 0, "test": 0}  # byte fallback: nothing is unknown
    b = task.batch("test", range(32), tokenizer.pad_id)
    scored = b["targets"] != -100
    logits = stories(b["tokens"], at=scored)
    first = scored.sum(1).cumsum(0) - scored.sum(1)
    pred = (logits[first][:, task.words[1][0]] > logits[first][:, task.words[0][0]]).long()
    correct = int((pred == torch.tensor([y for _, y in task.test[:32]])).sum())
    assert tasks.evaluate(stories, task, "test", tokenizer, "cpu")["accuracy"] == correct / 32


def test_fast_paths_train_to_the_same_losses_as_the_literal_layers(tmp_path, data, monkeypatch):
    # 20 steps at the default rate, folded LoRA layers and written-out attention vs the literal forms
    args = ["--init", "lora", "--data-dir", str(data), "--steps", "20", "--batch-size", "16", "--eval-limit", "16",
            "--eval-interval", "0", "--no-zero-shot", "--train-limit", "2000"]
    train.main(args + ["--out-dir", str(tmp_path / "fast")])
    monkeypatch.setattr(llama, "FOLD_MAX", 0)
    monkeypatch.setattr(llama, "EXPLICIT_BELOW", 0)
    train.main(args + ["--out-dir", str(tmp_path / "literal")])
    fast, literal = (json.loads((tmp_path / k / "metrics.json").read_text())["history"]["loss"]
                     for k in ("fast", "literal"))
    assert len(fast) == 20 and max(abs(a - b) for a, b in zip(fast, literal)) < 5e-5


def test_a_finished_out_dir_is_not_overwritten_by_another_run(tmp_path, data):
    """The second run of another --init into a finished --out-dir is refused in one line and the first run's
    files are left as they were; --resume with other settings is refused; --overwrite replaces it."""
    out = str(tmp_path / "run")
    first = run_cli(*TINY, "--init", "lora", "--data-dir", str(data), "--out-dir", out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    for extra in ([], ["--resume"]):
        again = run_cli(*TINY, "--init", "da", *extra, "--data-dir", str(data), "--out-dir", out)
        assert again.returncode != 0 and again.stderr.count("\n") == 1, again.stderr[-2000:]
        assert ("already holds a run" if not extra else "holds a run with other settings") in again.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    replaced = run_cli(*TINY, "--init", "da", "--overwrite", "--data-dir", str(data), "--out-dir", out)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "da"


def test_a_lr_scale_moves_A_by_that_fraction_of_Bs_step(stories):
    """--a-lr-scale k: AdamW's first step moves every entry by the rate (the gradient's sign times lr), so A's
    entries move by k·lr and B's by lr; k = 1 keeps the single group (the default runs' optimizer unchanged)."""
    import copy
    import llama
    model = copy.deepcopy(stories)
    llama.add_lora(model, r=4)
    llama.mark_only_lora_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = train.get_args(["--a-lr-scale", "0.1"])
    assert train.param_groups(model, params, train.get_args([])) is params
    groups = train.param_groups(model, params, cfg)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_scale"]
    before = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in llama.lora_layers(model).items()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for n, m in llama.lora_layers(model).items():
        dA, dB = (m.lora_A - before[n][0]).abs(), (m.lora_B - before[n][1]).abs()
        assert torch.allclose(dA, torch.full_like(dA, 1e-3), rtol=1e-3) and torch.allclose(dB, torch.full_like(dB, 1e-2), rtol=1e-3)
