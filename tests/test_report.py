"""The report on synthetic run dirs: means and stds checked by hand, failed runs listed, CSVs and plots."""
import csv
import json

import pytest

from sparse_peft.report import collect, main


def write_run(d, method, task, seed, value, status="completed", test=None, retained=8, lam=None):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"method:\n  name: {method}\n  sparse_lambda: {lam}\ntrainer:\n  seed: {seed}\n")
    if status:
        (d / "metrics.json").write_text(json.dumps({
            "method": method, "task": task, "seed": seed, "eval": {"accuracy": value},
            "test": {"accuracy": test} if test is not None else None, "selection_metric": "accuracy",
            "trainable_params": 10, "retained_params": retained, "total_params": 1000, "steps": 3,
            "status": status}))


def test_mean_std_and_incomplete_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "lora", "rte", 0, 0.60)
    write_run(tmp_path / "b", "lora", "rte", 1, 0.70)
    write_run(tmp_path / "c", "lora", "rte", 2, 0.0, status=None)  # crashed: no metrics.json
    write_run(tmp_path / "d", "lora", "rte", 3, 0.9, status="running")  # not completed
    runs, incomplete = collect(tmp_path)
    assert len(runs) == 2 and incomplete == [tmp_path / "c", tmp_path / "d"]
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| lora | 65.00 ± 7.07 (n=2) | 65.00 |" in out  # stdev of (60, 70) = 7.07
    assert "| lora | 8 ± 0 (n=2) (0.80%) |" in out  # retained: 8 of 1000 base parameters
    assert f"Incomplete or failed runs (not averaged): {tmp_path / 'c'}, {tmp_path / 'd'}" in out


def test_group_by_a_hyper_parameter_test_split_csv_and_plot(tmp_path, capsys):
    for i, (lam, acc, test, kept) in enumerate([(0.1, 0.6, 0.5, 100), (0.1, 0.7, 0.7, 200), (1.0, 0.8, 0.9, 50)]):
        write_run(tmp_path / "runs" / str(i), "sora", "rte", i, acc, test=test, retained=kept, lam=lam)
    write_run(tmp_path / "runs" / "x", "sora", "mrpc", 0, 0.5, test=0.4, lam=0.1)
    write_run(tmp_path / "runs" / "y", "sora", "mrpc", 1, 0.5, test=0.6, lam=0.1)
    main([str(tmp_path / "runs"), "--split", "test", "--group-by", "method,method.sparse_lambda", "--out",
          str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "| method | method.sparse_lambda | mrpc (accuracy) | rte (accuracy) | avg |" in out
    assert "| sora | 0.1 | 50.00 ± 14.14 (n=2) | 60.00 ± 14.14 (n=2) | 55.00 |" in out  # test split: mean of 50, 70
    assert "| sora | 1.0 | – | 90.00 | – |" in out  # no mrpc run at 1.0: no average
    assert "| sora | 0.1 | 8 ± 0 (n=2) (0.80%) | 150 ± 71 (n=2) (15.00%) |" in out
    rows = list(csv.DictReader(open(tmp_path / "rep" / "summary.csv")))
    rte = next(r for r in rows if r["task"] == "rte" and r["method.sparse_lambda"] == "0.1")
    assert (rte["mean"], rte["std"], rte["n"], rte["retained_mean"]) == ("60.0000", "14.1421", "2", "150")
    per_seed = list(csv.DictReader(open(tmp_path / "rep" / "runs.csv")))
    assert len(per_seed) == 5 and {r["seed"] for r in per_seed} == {"0", "1", "2"}
    assert (tmp_path / "rep" / "retained_vs_metric.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "report.md").read_text() == out
    seeds = (tmp_path / "rep" / "seeds.md").read_text()  # the values behind each mean, by seed
    assert "| method | method.sparse_lambda | task | seed 0 | seed 1 | mean ± std |" in seeds  # seed 2: 1.0 only
    assert "| sora | 0.1 | rte | 50.00 | 70.00 | 60.00 ± 14.14 (n=2) |" in seeds
    assert "| sora | 0.1 | mrpc | 40.00 | 60.00 |" in seeds and "| sora | 1.0 |" not in seeds  # one seed: no row


def test_seeds_md_lists_the_seeds_in_numeric_order(tmp_path):
    for seed, value in ((100, 0.6), (21, 0.7), (0, 0.8)):
        write_run(tmp_path / "runs" / str(seed), "lora", "rte", seed, value)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    seeds = (tmp_path / "rep" / "seeds.md").read_text()
    assert "| method | task | seed 0 | seed 21 | seed 100 | mean ± std |" in seeds  # as runs.csv orders them
    assert "| lora | rte | 80.00 | 70.00 | 60.00 | 70.00 ± 10.00 (n=3) |" in seeds
    assert [r["seed"] for r in csv.DictReader(open(tmp_path / "rep" / "runs.csv"))] == ["0", "21", "100"]


def test_rows_order_a_rate_by_value_not_as_text(tmp_path, capsys):
    for i, lam in enumerate((1e-4, 3e-5, 1e-5)):  # as text: "0.0001" < "1e-05" < "3e-05"
        write_run(tmp_path / "runs" / str(i), "sora", "rte", 0, 0.5 + i / 10, lam=lam)
    main([str(tmp_path / "runs"), "--group-by", "method,method.sparse_lambda", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert out.index("| sora | 1e-05 |") < out.index("| sora | 3e-05 |") < out.index("| sora | 0.0001 |")
    lams = [r["method.sparse_lambda"] for r in csv.DictReader(open(tmp_path / "rep" / "runs.csv"))]
    assert lams == ["1e-05", "3e-05", "0.0001"]


def test_the_average_needs_the_same_seeds_in_every_task(tmp_path, capsys):
    """A 3-seed MRPC mean beside a 1-seed RTE value is no paper average: the row averages the seed both ran."""
    for seed, value in ((0, 0.8), (21, 0.9), (42, 0.7)):
        write_run(tmp_path / f"mrpc{seed}", "lora", "mrpc", seed, value)
    write_run(tmp_path / "rte0", "lora", "rte", 0, 0.5)
    main([str(tmp_path)])
    assert "| lora | 80.00 ± 10.00 (n=3) | 50.00 | 65.00 (n=1) |" in capsys.readouterr().out  # seed 0: 80, 50
    write_run(tmp_path / "rte21", "lora", "rte", 21, 0.7)
    main([str(tmp_path)])  # seeds 0 and 21: (80 + 90) / 2 and (50 + 70) / 2
    assert "| lora | 80.00 ± 10.00 (n=3) | 60.00 ± 14.14 (n=2) | 72.50 (n=2) |" in capsys.readouterr().out
    write_run(tmp_path / "rte42", "lora", "rte", 42, 0.6)
    main([str(tmp_path)])
    assert "| lora | 80.00 ± 10.00 (n=3) | 60.00 ± 10.00 (n=3) | 70.00 |" in capsys.readouterr().out


def test_a_multi_task_run_gets_a_column_per_task(tmp_path, capsys):
    """commonsense/all: the test split's `<task>_accuracy` become the table's columns, their mean the average."""
    for i, (boolq, piqa) in enumerate([(0.6, 0.5), (0.8, 0.7)]):
        d = tmp_path / str(i)
        write_run(d, "lora", "all", i, 0.55)
        m = json.loads((d / "metrics.json").read_text())
        m.update(test={"accuracy": (boolq + piqa) / 2, "boolq_accuracy": boolq, "piqa_accuracy": piqa},
                 peak_memory_mb=123.0)
        (d / "metrics.json").write_text(json.dumps(m))
    main([str(tmp_path), "--split", "test", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "| method | boolq (accuracy) | piqa (accuracy) | avg |" in out
    assert "| lora | 70.00 ± 14.14 (n=2) | 60.00 ± 14.14 (n=2) | 65.00 |" in out
    assert {r["peak_memory_mb"] for r in csv.DictReader(open(tmp_path / "rep" / "runs.csv"))} == {"123.0"}
    main([str(tmp_path)])  # validation: one accuracy per run, one column
    assert "| method | all (accuracy) | avg |" in capsys.readouterr().out


def test_convergence_shows_each_runs_validation_curve_and_the_last_thirds_gain(tmp_path):
    """convergence.md: every evaluation's validation metric, the best and its epoch, and the last third's best
    minus the best before it (a rising curve gains, a flat one does not); validation_curves.png beside it."""
    for name, seed, curve in (("rising", 0, [0.5, 0.6, 0.7, 0.8]), ("flat", 1, [0.8, 0.82, 0.81, 0.81]),
                              ("late", 100, [0.6, 0.6, 0.6, 0.6]), ("mid", 21, [0.6, 0.6, 0.6, 0.6])):
        d = tmp_path / "runs" / name
        write_run(d, "lora", "rte", seed, max(curve))
        (d / "curve.jsonl").write_text("".join(
            json.dumps({"type": "eval", "step": 10 * e, "epoch": float(e), "eval": {"accuracy": v}}) + "\n"
            + json.dumps({"type": "train", "step": 10 * e + 1, "loss": 0.1}) + "\n"
            for e, v in enumerate(curve, start=1)))
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "convergence.md").read_text()
    assert "| lora | rte | 0 | 50.00 60.00 70.00 80.00 | 80.00 (4) | +10.00 |" in text
    assert "| lora | rte | 1 | 80.00 82.00 81.00 81.00 | 82.00 (2) | -1.00 |" in text
    assert text.index("| lora | rte | 21 |") < text.index("| lora | rte | 100 |")  # seeds in numeric order
    assert (tmp_path / "rep" / "validation_curves.png").stat().st_size > 1000


def test_convergence_of_a_sparsity_schedule_counts_the_evaluations_at_its_target(tmp_path):
    """PST and magnitude pruning choose their checkpoint at the target sparsity: a dense peak before it is neither
    their best nor the baseline of their last-third gain. The loop marks those evaluations `settled`; a run logged
    before that field existed is read from its sparsity (the cubic schedule only rises)."""
    curve = [(0.9, 0.0), (0.8, 0.3), (0.5, 0.6), (0.55, 0.9), (0.6, 0.9), (0.62, 0.9), (0.63, 0.9)]
    for seed, fields in ((0, lambda s: {"sparsity": s}), (1, lambda s: {"settled": s == 0.9})):
        d = tmp_path / "runs" / f"pst{seed}"
        write_run(d, "pst", "rte", seed, 0.63)
        (d / "curve.jsonl").write_text("".join(
            json.dumps({"type": "eval", "step": 10 * e, "epoch": float(e), "eval": {"accuracy": v}, **fields(s)})
            + "\n" for e, (v, s) in enumerate(curve, start=1)))
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "convergence.md").read_text()
    for seed in (0, 1):
        assert f"| pst | rte | {seed} | 90.00 80.00 50.00 55.00 60.00 62.00 63.00 | 63.00 (7) | +1.00 (from 4) |" in text


def test_where_keeps_the_matching_runs(tmp_path, capsys):
    """--where trainer.seed=0: the choice and the table see seed 0's runs only; a key nothing matches is an error;
    KEY=A|B keeps either value."""
    write_run(tmp_path / "a", "lora", "rte", 0, 0.60)
    write_run(tmp_path / "b", "lora", "rte", 1, 0.70)
    main([str(tmp_path), "--where", "trainer.seed=0"])
    assert "| lora | 60.00 | 60.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="matching trainer.seed=7"):
        main([str(tmp_path), "--where", "trainer.seed=7"])
    write_run(tmp_path / "c", "sora", "rte", 0, 0.80)
    main([str(tmp_path), "--where", "trainer.seed=0|1", "--where", "method=lora|bitfit"])  # either value
    out = capsys.readouterr().out
    assert "| lora | 65.00 ± 7.07 (n=2) | 65.00 |" in out and "| sora |" not in out


def test_several_roots_make_one_table(tmp_path, capsys):
    """A comparison whose shared cell ran in another sweep: both dirs' runs are averaged in one row, and a dir's
    incomplete run is listed."""
    write_run(tmp_path / "sweep1" / "a", "lora", "rte", 0, 0.60)
    write_run(tmp_path / "sweep2" / "b", "lora", "rte", 1, 0.70)
    write_run(tmp_path / "sweep2" / "c", "lora", "rte", 2, 0.0, status=None)
    main([str(tmp_path / "sweep1"), str(tmp_path / "sweep2")])
    out = capsys.readouterr().out
    assert "| lora | 65.00 ± 7.07 (n=2) | 65.00 |" in out
    assert f"Incomplete or failed runs (not averaged): {tmp_path / 'sweep2' / 'c'}" in out
    main([str(tmp_path), str(tmp_path / "sweep2")])  # nested roots: a run below both counts once
    assert "| lora | 65.00 ± 7.07 (n=2) | 65.00 |" in capsys.readouterr().out


def test_baseline_pairs_each_row_by_seed_with_a_t_test(tmp_path, capsys):
    """paired.md: sora - lora on the seeds both ran. Differences (10, 20, 0) x100: mean 10, sd 10, t = sqrt(3),
    two-sided p with 2 df = 0.225; a seed only one side ran is left out; an ambiguous baseline is an error."""
    for seed, lora, sora in ((0, 0.50, 0.60), (1, 0.60, 0.80), (2, 0.70, 0.70)):
        write_run(tmp_path / f"lora{seed}", "lora", "rte", seed, lora)
        write_run(tmp_path / f"sora{seed}", "sora", "rte", seed, sora)
    write_run(tmp_path / "sora3", "sora", "rte", 3, 0.99)  # no lora run on seed 3: not paired
    write_run(tmp_path / "lora_mrpc", "lora", "mrpc", 0, 0.8)
    write_run(tmp_path / "sora_mrpc", "sora", "mrpc", 0, 0.7)
    main([str(tmp_path), "--baseline", "method=lora", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "| sora | -10.00 (n=1) | +10.00 (n=3, p=0.225) |" in out  # one seed on mrpc: no p
    assert "| lora | baseline | baseline |" in out and "| baseline | lora | lora |" in out
    assert (tmp_path / "rep" / "paired.md").read_text() in out
    main([str(tmp_path), "--baseline", "method=lora", "--paired-only"])  # just the pairing: no table, no files
    assert capsys.readouterr().out == (tmp_path / "rep" / "paired.md").read_text()
    with pytest.raises(SystemExit, match="--paired-only prints the pairing: give a --baseline"):
        main([str(tmp_path), "--paired-only"])
    main([str(tmp_path), "--out", str(tmp_path / "rep")])  # regenerated without --baseline: no stale pairing
    assert not (tmp_path / "rep" / "paired.md").exists()
    capsys.readouterr()
    main([str(tmp_path), "--baseline", "method=sora,task=mrpc", "--baseline", "method=lora,task=rte"])
    assert "| lora | +10.00 (n=1) | baseline |" in capsys.readouterr().out  # a baseline per task
    with pytest.raises(SystemExit, match="matches 2 rows on mrpc"):
        main([str(tmp_path), "--baseline", "task=mrpc"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE over the group-by keys"):
        main([str(tmp_path), "--baseline", "trainer.lr=1"])
    with pytest.raises(SystemExit, match="without --choose"):
        main([str(tmp_path), "--baseline", "method=lora", "--choose", "trainer.lr"])


def test_a_chosen_baseline_is_the_rate_choose_picks(tmp_path, capsys):
    """`--baseline method=lora,method.sparse_lambda=chosen`: lora's value with the best validation mean (0.1: 65 vs
    62.5), or the best on the runs `--chosen-on` keeps (seed 1: 1.0, 75 vs 70); `task=chosen` is an error. Paired
    differences (20, 15): t = 7, 1 df, p = 1 - 2 atan(7) / pi = 0.090; (30, 10): t = 2, p = 0.295. A row at its own
    chosen value is bold (sora's only value); lora's other value is not ((-10, 5): t = 1/3, p = 0.795)."""
    for name, lam, seed, value in (("l1a", 0.1, 0, 0.60), ("l1b", 0.1, 1, 0.70), ("l2a", 1.0, 0, 0.50),
                                   ("l2b", 1.0, 1, 0.75), ("sa", 0.1, 0, 0.80), ("sb", 0.1, 1, 0.85)):
        write_run(tmp_path / name, "sora" if name[0] == "s" else "lora", "rte", seed, value, lam=lam)
    args = [str(tmp_path), "--group-by", "method,method.sparse_lambda", "--baseline",
            "method=lora,method.sparse_lambda=chosen"]
    main(args)
    out = capsys.readouterr().out
    assert "| sora | 0.1 | **+17.50 (n=2, p=0.090)** |" in out and "| baseline | lora 0.1 |" in out
    assert "| lora | 1.0 | -2.50 (n=2, p=0.795) |" in out
    assert "Bold: the row at its own chosen method.sparse_lambda" in out
    main([*args, "--chosen-on", "trainer.seed=1"])
    out = capsys.readouterr().out
    assert "| sora | 0.1 | **+20.00 (n=2, p=0.295)** |" in out and "| baseline | lora 1.0 |" in out
    assert "| lora | 0.1 | +2.50 (n=2, p=0.795) |" in out
    assert "(method=lora,method.sparse_lambda=chosen; `chosen` on trainer.seed=1)" in out
    with pytest.raises(SystemExit, match="expected KEY=VALUE over the group-by keys"):
        main([*args[:3], "--baseline", "method=lora,task=chosen"])


def test_two_runs_on_one_seed_in_a_cell_are_an_error_naming_the_key(tmp_path):
    """Grouped by method alone, lora at two lambdas on seed 0 would be averaged as two seeds."""
    write_run(tmp_path / "a", "lora", "rte", 0, 0.60, lam=0.1)
    write_run(tmp_path / "b", "lora", "rte", 0, 0.70, lam=1.0)
    with pytest.raises(SystemExit, match=r"on the same seed 0: add the key .* \(method.sparse_lambda\)"):
        main([str(tmp_path)])
    main([str(tmp_path), "--group-by", "method,method.sparse_lambda"])


def test_chosen_on_one_seed_still_passes_over_a_value_that_collapses_on_another(tmp_path, capsys):
    """The grid ran on seed 0, where 1.0 leads (70 vs 60); on seed 1 it answered one class: 0.1 is chosen, as the
    dense adapter's MRPC rate was (2e-3 best on seed 0, all-positive on seed 21)."""
    write_run(tmp_path / "a", "lora", "rte", 0, 0.60, lam=0.1)
    write_run(tmp_path / "b", "lora", "rte", 0, 0.70, lam=1.0)
    write_run(tmp_path / "c", "lora", "rte", 1, 0.50, lam=1.0)
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    m["eval"]["majority_share"] = 1.0
    (tmp_path / "c" / "metrics.json").write_text(json.dumps(m))
    main([str(tmp_path), "--choose", "method.sparse_lambda", "--chosen-on", "trainer.seed=0"])
    assert "| lora | rte | **60.00** | 70.00 (one class: 1/2) | 0.1 (edge) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--chosen-on trainer.seed=7 matches no completed run"):
        main([str(tmp_path), "--choose", "method.sparse_lambda", "--chosen-on", "trainer.seed=7"])
