"""studies/experiments.py: the protocol's machinery on a tiny grid (seconds): runs become JSONs, a rerun skips them,
selection never reads the test set, and the tables hold the right means, intervals and paired differences."""
import json
import math

import pytest
import torch

import tasks
import train
from studies import experiments as E

# the suite's own study: two methods, two rates, one selection seed, two report seeds; seconds per run
TINY = E.Study("sst2", E.plain(("lora", "da")), (1e-3, 3e-3), (101,), (1, 2),
               ("--task", "sst2", "--steps", "4", "--batch-size", "4", "--init-samples", "8", "--eval-interval", "2",
                "--val-size", "16", "--eval-limit", "16", "--train-limit", "300", "--stats-batch-size", "4"))


def test_t_quantiles_match_the_tables():
    # Student's t, two-sided 95%: df 1 → 12.706, 4 → 2.776, 9 → 2.262; large df → the normal's 1.960
    for df, t in ((1, 12.7062), (4, 2.7764), (9, 2.2622), (200, 1.9719)):
        assert E.t_quantile(0.975, df) == pytest.approx(t, abs=2e-3)


def test_mean_ci_and_paired_difference_by_hand():
    # x = 1..5: mean 3, sd √2.5 = 1.5811, se = 0.7071, half-width = 2.7764 × 0.7071 = 1.9632
    m, h = E.mean_ci([1, 2, 3, 4, 5])
    assert m == 3 and h == pytest.approx(1.9632, abs=1e-3)
    # pairing by seed: differences 1, 1, 1, 2 (seed 5 unpaired, ignored) → mean 1.25, sd 0.5, t(3) = 3.1824
    a, b = {1: 3, 2: 4, 3: 5, 4: 7, 5: 100}, {1: 2, 2: 3, 3: 4, 4: 5}
    d, h, n = E.paired(a, b)
    assert n == 4 and d == 1.25 and h == pytest.approx(3.1824 * 0.5 / 2, abs=1e-3)
    assert math.isnan(E.mean_ci([1.0])[1])


def test_validation_split_is_disjoint_from_training_and_fixed(data, tokenizer):
    cfg = train.get_args(["--val-size", "50", "--train-limit", "400", "--eval-limit", "8"])
    task = tasks.Task(cfg, tokenizer, data, 512)
    rows = tasks.read_sst2(data / "sst2" / "train.tsv")[:400]
    assert len(task.val) == 50 and len(task.train) == 350
    held = set(task.val_rows)
    assert task.val == [rows[i] for i in sorted(held)]
    assert task.train == [rows[i] for i in range(400) if i not in held]        # no overlap, nothing lost
    again = tasks.Task(cfg, tokenizer, data, 512)
    assert again.val_rows == task.val_rows                                       # the same split every time


def test_the_runner_writes_skips_and_aggregates_and_selection_never_reads_the_test_set(tmp_path, monkeypatch, data):
    monkeypatch.setenv("LORA_DA_DATA", str(data))
    read = []
    reader, files = tasks.TASK_FILES["sst2"]
    monkeypatch.setitem(tasks.TASK_FILES, "sst2", (lambda path: read.append(path.name) or reader(path), files))
    monkeypatch.setattr(E, "_SETUPS", {})
    study = TINY
    sel = [(E.run_name(m, lr, s, "select"), E.run_args(study, m, lr, s, "select"), tmp_path)
           for m, lr, s in E.grid(study, "select")]
    E.run_all(sel, tmp_path, 1, "selection")
    assert "dev.tsv" not in read and "train.tsv" in read                    # the test set was never read
    runs = E.load_runs(tmp_path)
    assert set(runs) == {n for n, _, _ in sel} and all(r["metrics"]["final"]["split"] == "val" for r in runs.values())
    chosen = E.select_lrs(study, runs)
    for m in study.methods:  # the rate with the best validation accuracy, read back from the JSONs
        by_lr = {lr: runs[E.run_name(m, lr, 101, "select")]["metrics"]["final"]["accuracy"] for lr in study.lrs}
        assert by_lr[chosen[m]] == max(by_lr.values())
    # a rerun skips every finished run: nothing is rewritten
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").iterdir()}
    E.run_all(sel, tmp_path, 1, "selection")
    assert stamps == {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").iterdir()}
    # the report runs and the tables
    E.run_study("tiny", study, tmp_path, 1)
    assert "dev.tsv" in read
    runs = E.load_runs(tmp_path)
    acc = E.report_scores(study, runs, chosen, "accuracy")
    assert set(acc) == {"lora", "da"} and all(len(v) == 2 for v in acc.values())
    table = E.aggregate("tiny", study, tmp_path)
    m, h = E.mean_ci(list(acc["da"].values()))
    assert f"{100 * m:.2f} ± {100 * h:.2f}" in table
    d, h, n = E.paired(acc["da"], acc["lora"])
    assert f"| da − lora | {100 * d:+.2f} ± {100 * h:.2f} |" in table
    assert (tmp_path / "table.md").read_text() == table and (tmp_path / "selection.png").stat().st_size > 0
    # a study with explicit pairs: the same difference under "a − b", and its per-cell plot
    table = E.aggregate("tiny", E.dataclasses.replace(study, pairs=(("da", "lora"),)), tmp_path)
    assert f"| da − lora | {100 * d:+.2f} ± {100 * h:.2f} |" in table and (tmp_path / "tiny.png").stat().st_size > 0


def test_paired_p_values_and_holm_by_hand():
    # differences 1, 1, 1, 2: t = 1.25 / (0.5 / √4) = 5 with 3 df, two-sided p = 0.0154 (tables)
    assert E.paired_p({1: 3, 2: 4, 3: 5, 4: 7}, {1: 2, 2: 3, 3: 4, 4: 5}) == pytest.approx(0.0154, abs=2e-4)
    # Holm at 0.05 over three: 0.01 <= 0.05/3 and 0.02 <= 0.05/2, but 0.06 > 0.05; a failure stops the rest,
    # so 0.03 after a failed 0.026 (against 0.025) is not resolved although 0.03 <= 0.05
    assert E.holm({"a": 0.01, "b": 0.02, "c": 0.06}) == {"a": True, "b": True, "c": False}
    assert E.holm({"a": 0.01, "b": 0.026, "c": 0.03}) == {"a": True, "b": False, "c": False}


def test_rates_within_a_point_get_tie_seeds_and_the_mean_over_all_seeds_decides():
    # one selection seed: 1e-3 leads 3e-3 by 0.5 points, a tie; seeds 102, 103 favour 3e-3, so it is chosen
    study = E.Study("sst2", E.plain(("da",)), (1e-3, 3e-3, 1e-2), (101,), (1,), (), tie_seeds=(102, 103))
    val = lambda a: {"metrics": {"final": {"split": "val", "accuracy": a}}}
    runs = {E.run_name("da", lr, 101, "select"): val(a) for lr, a in ((1e-3, 0.560), (3e-3, 0.555), (1e-2, 0.52))}
    assert E.tie_grid(study, runs) == [("da", lr, s) for lr in (1e-3, 3e-3) for s in (102, 103)]
    assert E.select_lrs(study, runs) == {}  # undecided until the tie seeds are in
    runs.update({E.run_name("da", lr, s, "select"): val(a) for lr, a in ((1e-3, 0.55), (3e-3, 0.58)) for s in (102, 103)})
    assert E.select_lrs(study, runs) == {"da": 3e-3}
    # a lead of more than a point is not a tie: no extra seeds, the best single-seed rate stands
    runs[E.run_name("da", 1e-3, 101, "select")] = val(0.57)
    assert E.tie_grid(study, runs) == [] and E.select_lrs(study, runs) == {"da": 1e-3}


def test_a_run_that_predicts_one_class_is_counted_as_collapsed():
    run = lambda p: {"metrics": {"final": {"predicted_positive": p}}}
    assert E.collapsed(run(0.97)) and E.collapsed(run(0.0)) and not E.collapsed(run(0.6))
    assert not E.collapsed({"failed": "loss became nan"})


def test_a_diverged_run_is_recorded_and_scores_worst():
    rec = {"failed": "loss became nan at step 3"}
    assert E.score(rec, "accuracy") == 0.0 and E.score(rec, "loss") == float("inf")


def test_cells_train_at_their_rate_groups_rate():
    # claim: a cell's report run uses the rate chosen for its group; a scarcity cell's group is its N,
    # so every N gets its own rate, and β variants share LoRA-DA's rate at that N
    study = E.STUDIES["scarcity"]
    chosen = {g: 1e-3 * (i + 1) for i, g in enumerate(study.groups)}
    for name, lr, seed in E.grid(study, "report", chosen):
        cell = study.cell(name)
        assert lr == chosen[cell.group]
        args = E.run_args(study, name, lr, seed, "report")
        assert args[args.index("--lr") + 1] == f"{lr:g}" and "--no-test-eval" not in args
    assert study.cell("da-N64-beta1").group == study.cell("da-N64").group == "da-N64" != study.cell("da-N256").group
    sel = E.run_args(study, "da-N64", 1e-3, 101, "select")
    assert "--no-test-eval" in sel and sel[sel.index("--train-size") + 1] == "64" and "--beta" not in sel
    # and a rank cell's group is its r: r sets LoRA-DA's initial step, so every r is selected at that r
    rank = E.STUDIES["rank"]
    assert rank.cell("da-r4").group == "da-r4" != rank.cell("da-r16").group and rank.cell("da").group == "da"
    sel = E.run_args(rank, "da-r4", 1e-3, 101, "select")
    assert sel[sel.index("--rank") + 1] == "4"
    # the grids cover every cell with at least 5 report seeds, and LoRA-GA never at a rank it cannot take
    for name, s in E.STUDIES.items():
        if s.cells and name not in ("convergence", "gsm8k"):
            assert len(s.seeds) >= 5 and not set(s.seeds) & set(s.select_seeds)
            assert all(a in {c.name for c in s.cells} and b in {c.name for c in s.cells} for a, b in s.pairs)
    assert "ga-r32" not in {c.name for c in E.STUDIES["rank"].cells}


def test_report_runs_go_seed_by_seed_and_cover_every_cell_at_its_seeds():
    # claim: the report grid is each cell at each of its seeds, once (headline cells at their extra seeds too),
    # ordered seed by seed, so that a study stopped part-way has every cell at about the same number of seeds
    for name in ("baselines", "smollm2", "controls"):
        study = E.STUDIES[name]
        chosen = {g: 1e-3 for g in study.groups}
        runs = E.grid(study, "report", chosen)
        assert sorted((c, s) for c, _, s in runs) == sorted((c.name, s) for c in study.cells for s in study.seeds_of(c.name))
        rank = [study.seeds_of(c).index(s) for c, _, s in runs]
        assert rank == sorted(rank)
        first = {c for c, _, s in runs[:len(study.cells)]}
        assert first == {c.name for c in study.cells}
    # a cell whose group has no rate yet is left out, the others keep their order
    study = E.STUDIES["smollm2"]
    runs = E.grid(study, "report", {"lora": 1e-3, "da": 3e-3})
    assert [c for c, _, _ in runs[:2]] == ["lora", "da"] and {c for c, _, _ in runs} == {"lora", "da"}
    assert len(runs) == 2 * len(study.seeds_of("lora")) and all(lr == {"lora": 1e-3, "da": 3e-3}[c] for c, lr, _ in runs)


def test_t_bar_is_the_mean_tokens_of_the_study_init_samples(data):
    # claim: the ablation's β = T̄ is the mean counted tokens per init sequence of the studies' training set (±2%)
    cfg = train.get_args(list(E.SCALE))
    setup = train.load(cfg, lambda *a: None)
    samples = setup.task.samples(256, setup.tok.pad_id)
    t_bar = sum(int(s["attention_mask"].sum()) for s in samples) / len(samples)
    assert t_bar == pytest.approx(E.T_BAR, rel=0.02)


def test_label_shuffled_init_samples_keep_the_sentences_and_the_label_counts_not_the_pairing(data):
    # the controls' `--shuffle-labels`: the same prompts, the answers a fixed permutation of the same answers
    cfg = train.get_args(list(E.SCALE))
    setup = train.load(cfg, lambda *a: None)
    own, mixed = (setup.task.samples(256, setup.tok.pad_id, shuffle) for shuffle in (False, True))
    label = lambda s: tuple(s["targets"][s["targets"] != -100].tolist())
    assert all(torch.equal(a["tokens"][a["targets"] == -100], b["tokens"][b["targets"] == -100])
               for a, b in zip(own, mixed) if label(a) == label(b))
    assert sorted(map(label, own)) == sorted(map(label, mixed))
    assert 0.3 < sum(label(a) != label(b) for a, b in zip(own, mixed)) / 256 < 0.7


def test_a_run_another_study_already_made_is_copied_not_rerun(tmp_path, monkeypatch, data):
    # setup: the tiny study's selection runs finished in one results folder
    monkeypatch.setenv("LORA_DA_DATA", str(data))
    monkeypatch.setattr(E, "_SETUPS", {})
    study = TINY
    first = tmp_path / "results" / "first"
    jobs = [(E.run_name(m, lr, s, "select"), E.run_args(study, m, lr, s, "select"), first)
            for m, lr, s in E.grid(study, "select")][:2]
    E.run_all(jobs, first, 1, "first")
    # claim: the same settings (flags in another order) in a second study are copied, with their source named,
    # and nothing is trained again
    second = tmp_path / "results" / "second"
    def seed_first(args):
        i = args.index("--seed")
        return args[i:i + 2] + args[:i] + args[i + 2:]
    moved = [(name, seed_first(args), second) for name, args, _ in jobs]
    assert E.config_key(moved[0][1]) == E.config_key(jobs[0][1])
    monkeypatch.setattr(E, "execute", lambda job: pytest.fail(f"{job[0]} was rerun"))
    E.run_all(moved, second, 1, "second", shared=tmp_path / "results")
    for name, _, _ in jobs:
        a = E.load_runs(first)[name]
        b = E.load_runs(second)[name]
        assert b["metrics"] == a["metrics"] and b["copied_from"] == f"first/runs/{name}.json"
    # and a copy is never itself a source
    assert not any("second" in str(p) for p in E.finished_runs([tmp_path / "results"]).values())


def test_a_worker_reuses_its_loaded_data_only_for_the_same_data_settings(monkeypatch):
    # claim: every setting that changes what train.load reads gives its own setup (a stale one would train
    # a scarcity cell on the wrong training set)
    monkeypatch.setattr(E, "_SETUPS", {})
    monkeypatch.setattr(train, "load", lambda cfg, log: object())
    base = train.get_args([])
    assert E._setup(base, None) is E._setup(train.get_args(["--lr", "1"]), None)  # not a data setting
    for change in (["--train-size", "64"], ["--init-data", "x.txt", "--init-only"], ["--val-size", "10"], ["--train-limit", "9"],
                   ["--max-len", "64"], ["--eval-limit", "5"], ["--task", "gsm8k"], ["--no-test-eval"],
                   ["--model", "babyllama936K"], ["--tokenizer", "t.model"]):
        assert E._setup(train.get_args(change), None) is not E._setup(base, None), change


def test_a_run_json_that_is_not_the_run_its_name_says_is_named_and_skipped(tmp_path, capsys):
    """Before a table reads a run, its JSON must parse, name itself, and carry the arguments and seed the study
    gives that name; GSM8K's decoding limit on SST-2 changes no number and is not a difference. A broken file in
    another study's folder is named and skipped when runs are looked up for reuse, never fatal."""
    st = E.STUDIES["baselines"]
    runs = tmp_path / "baselines" / "runs"
    runs.mkdir(parents=True)

    def write(name, args, seed, **extra):
        rec = {"name": name, "args": args, "config": {"seed": seed}, "metrics": {"seed": seed, "final": {}}, **extra}
        (runs / f"{name}.json").write_text(json.dumps(rec))
    good = E.run_args(st, "da", 1e-3, 101, "select")
    write("select-da-lr0.001-s101", good, 101)
    older = E.run_args(st, "lora", 1e-3, 101, "select")
    assert older[-2:] == ["--decode-limit", "0"]
    write("select-lora-lr0.001-s101", older[:-2], 101)                            # older runs lack the flag
    write("select-da-lr0.001-s102", good, 101)                                    # the arguments say seed 101
    write("select-da-lr0.003-s101", good, 101)                                    # ... and rate 1e-3
    write("report-da-lr0.001-s1", E.run_args(st, "da", 1e-3, 1, "report"), 2)     # metrics of seed 2
    write("report-da-lr0.001-s2", E.run_args(st, "da", 1e-3, 2, "report") + ["--rank", "4"], 2)
    write("report-da-lr0.001-s3", E.run_args(st, "da", 1e-3, 3, "report") + ["--rank", "0"], 3)  # not even valid
    (runs / "select-da-lr0.01-s101.json").write_text('{"name": "select-da-lr0.01-s1')  # cut off mid-write
    write("report-da-lr0.001-s4", E.run_args(st, "da", 1e-3, 4, "report"), 4)
    rec = json.loads((runs / "report-da-lr0.001-s4.json").read_text())
    del rec["metrics"]["final"]
    (runs / "report-da-lr0.001-s4.json").write_text(json.dumps(rec))
    loaded = E.load_runs(tmp_path / "baselines", st)
    assert sorted(loaded) == ["select-da-lr0.001-s101", "select-lora-lr0.001-s101"]
    err = capsys.readouterr().err
    for name, why in (("select-da-lr0.001-s102", "seed differ"), ("select-da-lr0.003-s101", "lr differ"),
                      ("report-da-lr0.001-s1", "its config is not seed 1's"), ("report-da-lr0.001-s2", "rank differ"),
                      ("report-da-lr0.001-s3", "train.py refuses its arguments"),
                      ("report-da-lr0.001-s4", "no final evaluation"),
                      ("select-da-lr0.01-s101", "skipping")):
        line = next(x for x in err.splitlines() if name + ".json" in x)
        assert why in line, line
    assert len(E.load_runs(tmp_path / "baselines")) == 8  # without the study: only names are checked
    index = E.finished_runs([tmp_path])
    assert "select-da-lr0.01-s101.json" in capsys.readouterr().err and len(index) >= 1


def test_two_best_rates_exactly_one_point_apart_are_a_tie_despite_float_rounding():
    """58.5% against 57.5% is 0.010000000000000009 in floats: the rule says within 1 point, so it is a tie."""
    study = E.Study("sst2", E.plain(("one",)), (1e-3, 3e-3, 1e-2), (101,), (1,), (), tie_seeds=(102, 103))
    assert 0.585 - 0.575 > 0.01  # the trap
    assert E.tied(study, {1e-3: 0.575, 3e-3: 0.585, 1e-2: 0.5}) == (3e-3, 1e-3)
    assert E.tied(study, {1e-3: 0.574, 3e-3: 0.585, 1e-2: 0.5}) == ()


def test_the_sign_flip_test_against_hand_counted_patterns():
    # 1, 2, 3: of the 8 sign patterns only +++ and --- reach |sum| 6
    assert E.sign_flip_p([1, 2, 3]) == 2 / 8
    # 0.5, −0.2, 0.3, 0.4 (sum 1.0, which floats round): |sum| >= 1.0 for ±(+ + + +) and ±(+ − + +): 4 of 16
    assert E.sign_flip_p([0.5, -0.2, 0.3, 0.4]) == 4 / 16
    assert E.sign_flip_p([1.0] * 5) == 2 / 32 and E.sign_flip_p([1.0] * 10) == 2 / 1024  # the floors at 5 and 10
    assert E.sign_flip_p([0.0, 0.0]) == 1.0 and math.isnan(E.sign_flip_p([]))


def test_the_rule_says_wins_only_where_both_tests_and_holm_agree():
    c = lambda p_t, p_s, holm, d=0.03, floor="": E.Comparison(d, 0.01, 10, p_t, p_s, holm, floor)
    assert c(0.001, 0.002, True).word(True, "LoRA-DA") == "LoRA-DA wins"
    assert c(0.001, 0.002, True, d=-0.03).word(True, "LoRA-DA") == "LoRA-DA loses"
    assert c(0.001, 0.002, True, d=0.03).word(False, "LoRA-DA") == "LoRA-DA loses"  # a loss: lower is better
    assert c(0.001, 0.002, False).word() == "resolved (unadjusted: t and sign-flip)"
    assert c(0.001, 0.0625, True).word() == "resolved (unadjusted: t)"
    assert c(0.2, 0.3, False).word() == "no difference shown"
    assert c(0.2, 0.3, False, floor="da-FA").word() == "no difference shown; da-FA at the collapse floor"
    # the family: Holm on the larger p of each comparison, over every comparison of the study
    scores = {"da": {s: 0.60 + 0.01 * s for s in range(1, 11)}, "lora": {s: 0.50 for s in range(1, 11)},
              "one": {s: 0.60 + 0.01 * s + (0.001 if s % 2 else -0.001) for s in range(1, 11)}}
    fam = E.family(scores, [("da", "lora"), ("da", "one")], floor={"one"})
    assert fam["da", "lora"].p_sign == 2 / 1024 and fam["da", "lora"].holm  # 0.002 <= 0.05 / 2
    assert not fam["da", "one"].holm and fam["da", "one"].floor == "one"
    assert fam["da", "lora"].word(True, "LoRA-DA") == "LoRA-DA wins"


def test_a_table_flags_a_rate_chosen_at_the_grids_edge_and_states_the_rule(tmp_path):
    study = E.Study("sst2", E.plain(("lora", "da")), (1e-3, 3e-3, 1e-2), (101,), (1, 2), ())
    runs = tmp_path / "runs"
    runs.mkdir()

    def put(name, seed, final, phase):
        args = E.run_args(study, name.split("-")[1], float(name.split("-lr")[1].split("-s")[0]), seed, phase)
        metrics = {"seed": seed, "final": final, "step0": {"loss": 1.0}, "init_seconds": 0.1}
        (runs / f"{name}.json").write_text(json.dumps({"name": name, "args": args, "config": {"seed": seed},
                                                        "metrics": metrics, "wall_seconds": 1.0}))
    for m, best in (("lora", 3e-3), ("da", 1e-3)):  # da's best is the smallest rate: an edge
        for lr in study.lrs:
            put(E.run_name(m, lr, 101, "select"), 101, {"split": "val", "accuracy": 0.7 if lr == best else 0.6,
                                                        "loss": 1.0}, "select")
        for s in study.seeds:
            put(E.run_name(m, best, s, "report"), s, {"split": "test", "accuracy": 0.6 + 0.01 * s,
                                                      "loss": 1.0, "predicted_positive": 0.5}, "report")
    text = E.aggregate("tiny", study, tmp_path)
    assert "| da | " in text and "0.001 (grid edge) |" in text and "0.003 (grid edge)" not in text
    assert "Holm's step-down over all 1 comparisons of this study" in text and "no difference shown" in text


def test_a_grid_extended_for_one_group_asks_that_group_alone_for_the_new_rate_and_then_clears_its_edge(tmp_path):
    # setup: da chose 1e-3, the lower edge of (1e-3, 3e-3, 1e-2); its grid alone goes down to 3e-4
    study = E.Study("sst2", E.plain(("lora", "da")), (1e-3, 3e-3, 1e-2), (101,), (1, 2), (),
                    more_lrs=(("da", (3e-4,)),))
    assert study.lrs_of("da") == (3e-4, 1e-3, 3e-3, 1e-2) and study.lrs_of("lora") == study.lrs
    sel = E.grid(study, "select")
    assert ("da", 3e-4, 101) in sel and ("lora", 3e-4, 101) not in sel and len(sel) == 7
    runs = tmp_path / "runs"
    runs.mkdir()

    def put(m, lr, acc):
        name = E.run_name(m, lr, 101, "select")
        (runs / f"{name}.json").write_text(json.dumps({
            "name": name, "args": E.run_args(study, m, lr, 101, "select"), "config": {"seed": 101},
            "metrics": {"seed": 101, "final": {"split": "val", "accuracy": acc, "loss": 1.0}, "step0": {"loss": 1.0},
                        "init_seconds": 0.1}, "wall_seconds": 1.0}))
    for m, best in (("lora", 3e-3), ("da", 1e-3)):
        for lr in study.lrs:
            put(m, lr, 0.7 if lr == best else 0.6)
    # claim: until the new rate's run exists, da has no rate (and so no report runs); lora is unaffected
    assert E.select_lrs(study, E.load_runs(tmp_path)) == {"lora": 3e-3}
    put("da", 3e-4, 0.55)
    # claim: with it, da keeps 1e-3, now inside its own grid: no edge flag, and the table has the new column
    assert E.select_lrs(study, E.load_runs(tmp_path)) == {"lora": 3e-3, "da": 1e-3}
    text = E.aggregate("tiny", study, tmp_path)
    assert "| lr 0.0003 | lr 0.001 |" in text and "(grid edge)" not in text
    assert any(line.startswith("| da | 55.00 | **70.00** |") for line in text.splitlines())


def test_the_three_model_table_quotes_each_studys_own_numbers_and_verdicts(tmp_path):
    # claim: the side-by-side table is each study's own section 3, not a recomputation under other settings: every
    # LoRA-DA row carries the same Δ ± h and the same verdict as the committed table of the study it names
    text = E.three_models(tmp_path)
    quoted = 0
    for model, name in E.THREE:
        own = (E.RESULTS / name / "table.md").read_text().splitlines()
        for line in text.splitlines():
            if line.startswith(f"| {model} | da"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                pair, delta, verdict = cells[1], cells[2], cells[-1]
                row = next(r for r in own if r.startswith(f"| {pair} | "))
                assert delta in row and row.rstrip(" |").endswith(verdict), (line, row)
                quoted += 1
    assert quoted >= 10 and (tmp_path / "table.md").read_text() == text


def test_a_selection_widened_to_three_seeds_names_what_one_seed_chose_and_flags_a_change(tmp_path):
    # setup: seed 101 alone prefers 1e-3 by 2 points (no tie); seeds 102, 103 prefer 3e-3 by 3 points, so over
    # all three 3e-3 leads (59.0 against 57.7): the three-seed selection changes da's rate and keeps lora's
    study = E.Study("sst2", E.plain(("lora", "da")), (3e-4, 1e-3, 3e-3), (101, 102, 103), (1, 2), (),
                    tie_seeds=(104, 105), earlier=((101,), (102, 103)))
    val = {("da", 101): (0.50, 0.60, 0.58), ("da", 102): (0.50, 0.57, 0.60), ("da", 103): (0.50, 0.56, 0.59),
           **{("lora", s): (0.50, 0.65, 0.55) for s in (101, 102, 103)}}
    runs = tmp_path / "runs"
    runs.mkdir()
    for (m, s), accs in val.items():
        for lr, acc in zip(study.lrs, accs):
            name = E.run_name(m, lr, s, "select")
            (runs / f"{name}.json").write_text(json.dumps({
                "name": name, "args": E.run_args(study, m, lr, s, "select"), "config": {"seed": s},
                "metrics": {"seed": s, "final": {"split": "val", "accuracy": acc, "loss": 1.0},
                            "step0": {"loss": 1.0}, "init_seconds": 0.1}, "wall_seconds": 1.0}))
    loaded = E.load_runs(tmp_path)
    # claim: the earlier view reads seed 101 only (1e-3 for both); the full one reads all three
    assert E.select_lrs(study.earlier_study(), loaded) == {"lora": 1e-3, "da": 1e-3}
    assert E.select_lrs(study, loaded) == {"lora": 1e-3, "da": 3e-3}
    text = E.aggregate("tiny", study, tmp_path)
    assert "| chosen | chosen on seeds 101 (ties: 102, 103) |" in text
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| da |", "| lora |"))}
    assert lines["| da"].endswith("| – | 0.003 (grid edge) | 0.001 (changed) |")
    assert lines["| lora"].endswith("| – | 0.001 | 0.001 |")
