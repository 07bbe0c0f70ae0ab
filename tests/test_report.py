import json

from sparse_peft.report import collect, main


def write_run(d, method, task, seed, value, status="completed"):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("x: 1\n")
    if status:
        (d / "metrics.json").write_text(json.dumps({
            "method": method, "task": task, "seed": seed, "eval": {"accuracy": value}, "selection_metric": "accuracy",
            "trainable_params": 10, "retained_params": 8, "status": status}))


def test_mean_std_and_incomplete_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "lora", "rte", 0, 0.60)
    write_run(tmp_path / "b", "lora", "rte", 1, 0.70)
    write_run(tmp_path / "c", "lora", "rte", 2, 0.0, status=None)  # crashed: no metrics.json
    runs, incomplete = collect(tmp_path)
    assert len(runs) == 2 and incomplete == [tmp_path / "c"]
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| lora | 65.00 ± 7.07 (n=2) | 65.00 | 10 | 8 |" in out  # stdev of (60, 70) = 7.07
    assert "Incomplete or failed runs (not averaged): " + str(tmp_path / "c") in out


def test_test_split_and_retained_table(tmp_path, capsys):
    for i, (acc, test, kept) in enumerate([(0.6, 0.5, 100), (0.7, 0.7, 200)]):
        write_run(tmp_path / str(i), "sora", "rte", i, acc)
        m = json.loads((tmp_path / str(i) / "metrics.json").read_text())
        m.update(test={"accuracy": test}, retained_params=kept)
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(m))
    main([str(tmp_path), "--split", "test", "--retained"])
    out = capsys.readouterr().out
    assert "| sora | 60.00 ± 14.14 (n=2) | 60.00 |" in out  # test: mean of 50, 70
    assert "| sora | 150 ± 71 (n=2) |" in out
