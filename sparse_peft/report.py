"""`python -m sparse_peft.report <dir> [<dir> ...] [--split eval|test] [--metric NAME] [--group-by method,task,...] [--out DIR]`

Finds every run's `metrics.json` below each <dir> (single runs and Hydra sweeps alike; several dirs make one table,
e.g. a comparison whose shared cell ran in another sweep) and writes, to stdout and with `--out DIR` to files:
- `report.md`: the metric as mean ± std over seeds (n) per group (rows: the group-by keys other than `task`;
  columns: tasks) with the GLUE average (over the seeds that ran every task; "(n=k)" when some task ran more), then
  the retained parameters per group and task with their share of the base model, then the incomplete or failed
  runs (listed, never averaged in); a commonsense/all run's per-task scores (`<task>_accuracy`) are columns of
  their own, averaged as the LLM-Adapters tables do;
- `summary.csv` (one row per group and task) and `runs.csv` (one row per run: the per-seed values, train time and
  peak memory);
- `retained_vs_metric.png`: one point per run, one colour per row group, a panel per task;
- `convergence.md` and `validation_curves.png`: each run's validation metric at every evaluation, its best and
  what the last third of the evaluations added to the best before them (had the curve flattened?; a run on a
  sparsity schedule counts only its evaluations at the target sparsity);
- `stages_<run>.png` for every run whose `curve.jsonl` holds sparsifying-scheduler stages (SoRA's
  generalization / memorization against retained parameters).
Group-by keys are `method`, `task`, `model`, or any dotted config key (`method.sparse_lambda`, `trainer.lr`).
`--stages DIR` instead treats <dir> as one scheduler run: its per-stage table and plot (stages.md, stages.png).
`--choose KEY` (e.g. `trainer.lr`) selects KEY per method and task on the validation metric (mean over seeds) and
writes `choice.md`: every value's mean, the chosen one marked (and flagged when it is the grid's edge or the
only value tried); a value whose model answers one class is marked and passed over. `--chosen-on KEY=VALUE`
chooses on the matching runs' means (e.g. the seed the grid ran on) while a value that answers one class on any seed
is still passed over; `--where KEY=VALUE` keeps only the matching runs (`KEY=A|B`: either value; e.g. one method
against its baseline in a `--baseline` table).
`--baseline KEY=VALUE[,KEY=VALUE]` adds `paired.md`: every row minus the baseline row per task over the seeds both
ran, with a paired t-test's p (repeat it with `task=...` in each for a per-task baseline; values as the table prints
them). `KEY=chosen` (e.g. `method=lora,trainer.lr=chosen`) takes, per task, the value that `--choose KEY` (with the
same `--chosen-on`) picks: the baseline at its own rate; `--paired-only` prints just that pairing (a second
baseline's, beside paired.md). With `--out`, SoRA runs also get
`gate_diagnostics.png`: the share of surviving ranks that were among the largest initial gates, against chance,
and the gates that grew between evaluations (is the sparsity data-driven?).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

TOP_LEVEL = ("method", "task", "model", "seed")


def collect(*roots: Path) -> tuple[list[dict], list[Path]]:
    """Completed runs (metrics.json + the run's config under `config`) and the run dirs without a completed
    metrics.json, below any of the roots. A run dir is a dir holding our `config.yaml`; one below two of the roots
    (nested roots) counts once."""
    done, incomplete, seen = [], [], set()
    for cfg in (c for root in roots for c in sorted(root.rglob("config.yaml"))):
        run_dir = cfg.parent
        key = run_dir.resolve()
        if run_dir.name in (".hydra", ".hydra_launch") or key in seen:
            continue
        seen.add(key)
        try:
            m = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            m = {}
        if m.get("status") == "completed":
            config = OmegaConf.to_container(OmegaConf.load(cfg), resolve=False)
            done.append({**m, "dir": str(run_dir), "config": config})
        else:
            incomplete.append(run_dir)
    return done, incomplete


def per_task(runs: list[dict], split: str) -> list[dict]:
    """A multi-task run (commonsense/all) scores every test set as `<task>_accuracy`: one entry per task, so the
    table has the benchmark's columns (BoolQ ... OBQA) and their average, as the LLM-Adapters tables do."""
    out = []
    for r in runs:
        parts = {k[:-len("_accuracy")]: v for k, v in (r.get(split) or {}).items() if k.endswith("_accuracy")}
        if len(parts) > 1:
            out += [{**r, "task": t, split: {"accuracy": v}, "selection_metric": "accuracy"} for t, v in parts.items()]
        else:
            out.append(r)
    return out


def key_value(run: dict, key: str):
    if key in TOP_LEVEL:
        return run[key]
    node = run.get("config", {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def row_of(run: dict, keys: list[str]) -> tuple:
    """The run's values of `keys`: its row in a table grouped by them."""
    return tuple(key_value(run, k) for k in keys)


def value_order(values: tuple) -> tuple:
    """Sort key for a tuple of config values whose types mix: numbers in numeric order (1e-05, 3e-05, 0.0001),
    then everything else as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in values)


def run_order(keys: list[str]):
    """Sort key for runs: their `keys` (value_order), then the seed."""
    return lambda run: (value_order(row_of(run, keys)), run["seed"])


def metric_of(run: dict, metric: str | None, split: str):
    scores = run.get(split) or {}
    return scores.get(metric or run["selection_metric"])


def mean_std(values: list[float], scale: float = 100.0) -> tuple[float, float]:
    mean = statistics.fmean(values) * scale
    return mean, (statistics.stdev(values) * scale if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values, scale)
    if scale == 1:
        return f"{mean:,.0f} ± {std:,.0f} (n={len(values)})" if len(values) > 1 else f"{mean:,.0f}"
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})" if len(values) > 1 else f"{mean:.2f}"


def summarize(runs: list[dict], group_by: list[str], metric: str | None, split: str):
    """{(row key, task): [runs]}, the row keys in order, the tasks, and the metric name per task."""
    row_keys = [k for k in group_by if k != "task"]
    cells = defaultdict(list)
    for r in runs:
        if metric_of(r, metric, split) is not None:
            cell = cells[(row_of(r, row_keys), r["task"])]
            twin = next((o for o in cell if o["seed"] == r["seed"]), None)
            if twin is not None:  # a mean over "seeds" would count one seed twice
                keys = ", ".join(differing_keys(twin.get("config"), r.get("config"))[:4]) or "none in config.yaml"
                raise SystemExit(f"error: {twin['dir']} and {r['dir']} fall in one cell on the same seed "
                                 f"{r['seed']}: add the key that tells them apart to --group-by ({keys}) "
                                 "or keep one with --where")
            cell.append(r)
    rows = sorted({row for row, _ in cells}, key=value_order)
    tasks = sorted({t for _, t in cells})
    names = {t: metric or next(r["selection_metric"] for r in runs if r["task"] == t) for t in tasks}
    return row_keys, rows, tasks, names, cells


def differing_keys(a, b, prefix: str = "") -> list[str]:
    """The dotted config keys whose values differ between two configs (nested dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def by_seed(cells, row, task, metric, split) -> dict:
    """{seed: metric} of one cell of `summarize`."""
    return {r["seed"]: metric_of(r, metric, split) for r in cells.get((row, task), [])}


def average(cells, row, tasks, metric, split) -> str:
    """The tasks' mean over the seeds that ran every task: averaging a 3-seed mean with a 1-seed value would mix
    seeds. "(n=k)" marks an average over fewer seeds than some task's cell holds."""
    by_task = [by_seed(cells, row, t, metric, split) for t in tasks]
    common = set.intersection(*(set(d) for d in by_task))
    if not common:
        return "–"
    avg = statistics.fmean(statistics.fmean(d[s] for s in common) for d in by_task) * 100
    return f"{avg:.2f}" if all(len(d) == len(common) for d in by_task) else f"{avg:.2f} (n={len(common)})"


def tables(runs: list[dict], group_by: list[str], metric: str | None = None, split: str = "eval") -> str:
    row_keys, rows, tasks, names, cells = summarize(runs, group_by, metric, split)
    if not rows:
        return f"no completed run has `{split}` metrics\n"
    head = " | ".join(row_keys)
    lines = [f"| {head} | " + " | ".join(f"{t} ({names[t]})" for t in tasks) + " | avg |",
             "|" + "---|" * (len(row_keys) + len(tasks) + 1)]
    for row in rows:
        out = [fmt(vals) if (vals := [metric_of(r, metric, split) for r in cells.get((row, t), [])]) else "–"
               for t in tasks]
        avg = average(cells, row, tasks, metric, split)
        lines.append("| " + " | ".join(map(str, row)) + " | " + " | ".join(out) + f" | {avg} |")
    lines += ["", "Retained parameters (mean ± std over seeds; share of the base model's parameters):", "",
              f"| {head} | " + " | ".join(tasks) + " |", "|" + "---|" * (len(row_keys) + len(tasks))]
    for row in rows:
        out = []
        for t in tasks:
            rs = cells.get((row, t), [])
            share = statistics.fmean(r["retained_params"] / r["total_params"] for r in rs) * 100 if rs else 0
            out.append(f"{fmt([r['retained_params'] for r in rs], scale=1)} ({share:.2f}%)" if rs else "–")
        lines.append("| " + " | ".join(map(str, row)) + " | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def seeds_table(runs: list[dict], group_by: list[str], metric: str | None = None, split: str = "eval") -> str:
    """The values behind report.md's means: one column per seed, for each cell that ran on more than one."""
    row_keys, rows, tasks, _, cells = summarize(runs, group_by, metric, split)
    multi = [(row, t) for row in rows for t in tasks if len(cells.get((row, t), [])) > 1]
    if not multi:
        return "no cell ran on more than one seed\n"
    seeds = sorted({r["seed"] for key in multi for r in cells[key]})
    lines = [f"`{split}` x100 of each seed, for the cells that ran on more than one:", "",
             "| " + " | ".join(row_keys) + " | task | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|" + "---|" * (len(row_keys) + len(seeds) + 2)]
    for row, t in multi:
        values = by_seed(cells, row, t, metric, split)
        lines.append("| " + " | ".join(map(str, row)) + f" | {t} | "
                     + " | ".join(f"{values[s] * 100:.2f}" if s in values else "–" for s in seeds)
                     + f" | {fmt(list(values.values()))} |")
    return "\n".join(lines) + "\n"


def paired(runs: list[dict], group_by: list[str], baselines: list[str], metric: str | None = None,
           split: str = "eval", chosen_on: tuple[str, ...] = ()) -> str:
    """Every row against the baseline, per task, on the seeds both ran: the mean difference (x100) and the two-sided
    p of a paired t-test (n >= 2). Pairing by seed: runs on one seed share the data order and the head's init, so the
    seed's share of the variance cancels. A baseline is KEY=VALUE[,KEY=VALUE] over the row keys and `task`; repeat it
    for a per-task baseline: it must match one row per task. `KEY=chosen` matches the row whose KEY `choose` picks
    (on the runs matching every `chosen_on` KEY=VALUE) among the rows that agree on every other key."""
    from scipy.stats import ttest_rel

    row_keys, rows, tasks, names, cells = summarize(runs, group_by, metric, split)
    specs = []
    for spec in baselines:
        conds = dict(c.partition("=")[::2] for c in spec.split(","))
        bad = [k for k, v in conds.items() if not v or k not in [*row_keys, "task"] or (k == "task" and v == "chosen")]
        if bad:
            raise SystemExit(f"error: --baseline {spec}: expected KEY=VALUE over the group-by keys "
                             f"({', '.join([*row_keys, 'task'])}), e.g. --baseline method=lora")
        specs.append(conds)
    index = {k: i for i, k in enumerate(row_keys)}
    on = matching(runs, chosen_on, "--chosen-on")
    chosen = {k: choose(runs, k, metric, [o for o in row_keys if o != k], on=on)[1]
              for k in {k for c in specs for k, v in c.items() if v == "chosen"}}
    rest = lambda row, k, t: (*(x for o, x in zip(row_keys, row) if o != k), t)  # noqa: E731  the row without k

    def at_chosen(row, k, t):
        r = rest(row, k, t)
        return r in chosen[k] and row[index[k]] == chosen[k][r]

    def matches(c, row, t):
        return all(at_chosen(row, k, t) if v == "chosen" else str(t if k == "task" else row[index[k]]) == v
                   for k, v in c.items())
    base = {}
    for t in tasks:
        hits = {row for row in rows if (row, t) in cells for c in specs if matches(c, row, t)}
        if len(hits) > 1:
            found = "; ".join(" ".join(map(str, h)) for h in sorted(hits, key=value_order))
            raise SystemExit(f"error: --baseline matches {len(hits)} rows on {t} ({found}): name one, e.g. add "
                             "trainer.lr=..., or give one --baseline per task with task=...")
        if hits:
            base[t] = hits.pop()
    if not base:
        raise SystemExit(f"error: --baseline {' '.join(baselines)} matches no row with `{split}` metrics")
    head = " | ".join(row_keys)
    how = f"; `chosen` on {' and '.join(chosen_on)}" if chosen and chosen_on else ""
    lines = [f"Each row minus the baseline ({'; '.join(baselines)}{how}), `{split}` x100, mean over the seeds both ran",
             "(n) and the two-sided paired t-test p; the last line names each task's baseline row."
             + (f" Bold: the row at its own chosen {', '.join(sorted(chosen))} (the comparison the table is for)."
                if chosen else ""), "",
             f"| {head} | " + " | ".join(f"{t} ({names[t]})" for t in tasks) + " |",
             "|" + "---|" * (len(row_keys) + len(tasks))]
    for row in rows:
        out = []
        for t in tasks:
            if row == base.get(t):
                out.append("baseline")
                continue
            mine, ref = by_seed(cells, row, t, metric, split), by_seed(cells, base.get(t), t, metric, split)
            common = sorted(set(mine) & set(ref))
            if not common:
                out.append("–")
                continue
            a, b = [mine[s] for s in common], [ref[s] for s in common]
            text = f"{(statistics.fmean(a) - statistics.fmean(b)) * 100:+.2f} (n={len(common)}"
            p = ttest_rel(a, b).pvalue if len(common) > 1 else float("nan")
            text += f", p={p:.3f})" if p == p else ")"  # nan: one seed, or identical differences
            out.append(f"**{text}**" if chosen and all(at_chosen(row, k, t) for k in chosen) else text)
        lines.append("| " + " | ".join(map(str, row)) + " | " + " | ".join(out) + " |")
    named = [" ".join(map(str, base[t])) if t in base else "–" for t in tasks]
    lines.append("| baseline | " + " | ".join(named) + " |")
    return "\n".join(lines) + "\n"


def write_csvs(runs: list[dict], group_by: list[str], metric: str | None, split: str, out: Path) -> None:
    row_keys, rows, tasks, names, cells = summarize(runs, group_by, metric, split)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*row_keys, "task", "metric", "split", "mean", "std", "n", "retained_mean", "retained_share"])
        for (row, task), rs in sorted(cells.items(), key=lambda kv: (value_order(kv[0][0]), kv[0][1])):
            mean, std = mean_std([metric_of(r, metric, split) for r in rs])
            kept = statistics.fmean(r["retained_params"] for r in rs)
            w.writerow([*row, task, names[task], split, f"{mean:.4f}", f"{std:.4f}", len(rs), f"{kept:.0f}",
                        f"{statistics.fmean(r['retained_params'] / r['total_params'] for r in rs):.6f}"])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*row_keys, "task", "seed", "metric", "eval", "test", "retained_params", "trainable_params",
                    "total_params", "steps", "train_time_s", "peak_memory_mb", "dir"])
        for r in sorted(runs, key=run_order([*row_keys, "task"])):
            name = metric or r["selection_metric"]
            w.writerow([*row_of(r, row_keys), r["task"], r["seed"], name, (r.get("eval") or {}).get(name),
                        (r.get("test") or {}).get(name), r["retained_params"], r["trainable_params"],
                        r["total_params"], r["steps"], r.get("train_time_s"), r.get("peak_memory_mb"), r["dir"]])


def plot_retained(runs: list[dict], group_by: list[str], metric: str | None, split: str, path: Path) -> None:
    plt = pyplot()
    row_keys, rows, tasks, names, cells = summarize(runs, group_by, metric, split)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    colours = {row: plt.cm.tab10(i % 10) for i, row in enumerate(rows)}
    for ax, task in zip(axes[0], tasks):
        for row in rows:
            rs = cells.get((row, task), [])
            ax.scatter([r["retained_params"] for r in rs], [metric_of(r, metric, split) * 100 for r in rs],
                       color=colours[row], label=",".join(map(str, row)), s=18)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("retained parameters")
        ax.set_ylabel(f"{split} {names[task]} x 100")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one `type` ("eval", "stage") in a run's curve.jsonl, in order."""
    lines = (run_dir / "curve.jsonl").read_text().splitlines() if (run_dir / "curve.jsonl").exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("type") == kind]


def stage_records(run_dir: Path) -> list[dict]:
    return curve_records(run_dir, "stage")


class Point(NamedTuple):
    epoch: float
    value: float
    settled: bool  # a candidate for the run's checkpoint (a sparsity schedule: at its target)


def validation_curve(run: dict, metric: str | None = None) -> list[Point]:
    """The run's validation metric at each of its evaluations."""
    name = metric or run["selection_metric"]
    records = [r for r in curve_records(Path(run["dir"]), "eval") if name in (r.get("eval") or {})]
    final = records[-1].get("sparsity") if records else None
    # runs from before the loop logged `settled`: the cubic schedule only rises, so its final sparsity marks them
    return [Point(r.get("epoch") or r["step"], r["eval"][name], r.get("settled", r.get("sparsity") == final))
            for r in records]


def convergence(curves: list[tuple[dict, list]], group_by: list[str]) -> str:
    """Had each run's validation curve flattened by the end? Per run: the metric at every evaluation, the best and
    its epoch, and what the last third of the evaluations added to the best before them (small or negative: flat).
    A run on a sparsity schedule (PST, magnitude pruning) counts only its evaluations at the target sparsity, where
    it chooses its checkpoint: its dense peak says nothing about convergence at the target."""
    keys = [k for k in group_by if k != "seed"] + ["seed"]
    lines = ["Validation metric at every evaluation (x100), the best and its epoch, and the last third's gain: "
             "best of the last third of the evaluations minus best of those before (small or negative: the curve "
             "had flattened by the end of the budget). A run on a sparsity schedule counts, for both, only its "
             "evaluations at the target sparsity (from the epoch in brackets after its gain), where it chooses "
             "its checkpoint.", "",
             f"| {' | '.join(keys)} | per evaluation | best (epoch) | last-third gain |", "|" + "---|" * (len(keys) + 3)]
    order = run_order(keys[:-1])
    for r, curve in sorted(curves, key=lambda rc: order(rc[0])):
        first = next((i for i, p in enumerate(curve) if p.settled), 0)
        values = [p.value * 100 for p in curve]
        counted = values[first:]
        best = first + max(range(len(counted)), key=counted.__getitem__)
        last = max(1, len(counted) // 3)
        gain = f"{max(counted[-last:]) - max(counted[:-last]):+.2f}" if len(counted) > 1 else "–"
        gain += f" (from {curve[first].epoch:g})" if first else ""
        lines.append(f"| {' | '.join(map(str, row_of(r, keys)))} | {' '.join(f'{v:.2f}' for v in values)} | "
                     f"{values[best]:.2f} ({curve[best].epoch:g}) | {gain} |")
    return "\n".join(lines) + "\n"


def plot_validation_curves(curves: list[tuple[dict, list]], group_by: list[str], metric: str | None,
                           path: Path) -> None:
    """One panel per task, one line per run (colour: its row group), validation metric against epoch."""
    tasks = sorted({r["task"] for r, _ in curves})
    row_keys = [k for k in group_by if k != "task"]
    groups = sorted({row_of(r, row_keys) for r, _ in curves}, key=value_order)
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    panel = dict(zip(tasks, axes[0]))
    labelled = set()
    order = run_order(row_keys)
    for r, curve in sorted(curves, key=lambda rc: order(rc[0])):  # the legend in row order
        g = row_of(r, row_keys)
        first = (r["task"], g) not in labelled
        panel[r["task"]].plot([p.epoch for p in curve], [p.value for p in curve], marker=".", color=colours[g],
                              label=" ".join(map(str, g)) if first else None)
        labelled.add((r["task"], g))
    for task, ax in panel.items():
        name = metric or next(r["selection_metric"] for r, _ in curves if r["task"] == task)
        ax.set(title=task, xlabel="epoch", ylabel=f"validation {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stages_report(run_dir: Path, out_dir: Path, plot_name: str = "stages.png") -> str:
    """A sparsifying-scheduler run: one row per stage (its best checkpoint) -> stages.md and a plot of the
    validation and training-subset metric against retained parameters (SoRA's Figure 3 style)."""
    stages = stage_records(run_dir)
    if not stages:
        raise SystemExit(f"error: {run_dir}/curve.jsonl has no stage records; run with scheduler=linear|log_linear|exp_linear")
    metric = json.loads((run_dir / "metrics.json").read_text())["selection_metric"]
    lines = [f"| stage | xi | retained params | validation {metric} | train-subset {metric} | generalization | "
             "memorization | best step |", "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['lambda']:.3g} | {s['retained_params']:,} | {s['eval'][metric] * 100:.2f} | "
                     f"{s['train'][metric] * 100:.2f} | {s['generalization']:.1f} | {s['memorization']:.1f} | "
                     f"{s['best_step']} |")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    if plot_name == "stages.png":
        (out_dir / "stages.md").write_text(text)
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    kept = [s["retained_params"] for s in stages]
    ax.plot(kept, [s["eval"][metric] * 100 for s in stages], "o-", label=f"validation {metric}")
    ax.plot(kept, [s["train"][metric] * 100 for s in stages], "s--", label=f"training subset {metric}")
    for s in stages:
        ax.annotate(f"xi={s['lambda']:.2g}", (s["retained_params"], s["eval"][metric] * 100), fontsize=7,
                    textcoords="offset points", xytext=(3, 5))
    ax.set_ylabel(f"{metric} x 100")
    ax2.plot(kept, [s["generalization"] for s in stages], "o-", label="generalization")
    ax2.plot(kept, [s["memorization"] for s in stages], "s--", label="memorization")
    ax2.set_ylabel("% of stage 0's best")
    for a in (ax, ax2):
        a.set_xlabel("retained parameters")
        a.invert_xaxis()  # sparser to the right, as the schedule proceeds
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: sparsifying scheduler stages")
    fig.tight_layout()
    fig.savefig(out_dir / plot_name, dpi=120)
    plt.close(fig)
    return text


ONE_CLASS_SHARE = 0.99  # no GLUE validation set is this skewed: a model naming one class this often ignores its input


def one_class(scores: dict) -> bool:
    """Did the run answer (nearly) one class for every validation input? From `majority_share` where recorded;
    runs written before it from binary F1 and accuracy: all-positive has precision = accuracy and recall 1, so
    F1 = 2a / (1 + a), and all-negative has F1 0 (as has a model that finds no positive, no better a choice)."""
    if "majority_share" in scores:
        return scores["majority_share"] >= ONE_CLASS_SHARE
    f1, acc = scores.get("f1"), scores.get("accuracy")
    return f1 is not None and acc is not None and (f1 == 0 or abs(f1 - 2 * acc / (1 + acc)) < 1e-9)


GRID_MARKS = {"edge": "(edge): the chosen value is the smallest or largest of those tried, so a wider grid may "
                       "choose another",
              "only value": "(only value): one value ran, nothing was chosen"}


def choose(runs: list[dict], key: str, metric: str | None = None, group_by=("method", "task"),
           on: list[dict] | None = None) -> tuple[str, dict]:
    """Per group (default: method and task): the value of `key` with the best mean validation metric over seeds,
    and a table of every value's mean ± std (n), the chosen one in bold. A value where any seed's model answers one
    class (`one_class`) is marked and chosen only if every value is: on MRPC the all-positive F1 (81) beats a model
    that learned something but overfits, and a constant is not a usable rate. `on`: the runs whose means choose (e.g.
    the seed a grid ran on); a value that answers one class on any of `runs` is still passed over. A choice at the
    edge of the values tried, or of the only one, is flagged: the grid has not bracketed the best value."""
    group_by = list(group_by) + (["task"] if "task" not in group_by else [])
    mine = {r["dir"] for r in (runs if on is None else on)}
    cells, flat, ran = defaultdict(list), defaultdict(int), defaultdict(int)
    for r in runs:
        value = metric_of(r, metric, "eval")
        if value is not None:
            cell = (row_of(r, group_by), key_value(r, key))
            if r["dir"] in mine:
                cells[cell].append(value)
            flat[cell] += one_class(r.get("eval") or {})
            ran[cell] += 1
    chosen = {}
    rank = lambda c: (not flat[c], statistics.fmean(cells[c]))  # noqa: E731  usable first, then the metric
    for (g, v) in cells:
        if g not in chosen or rank((g, v)) > rank((g, chosen[g])):
            chosen[g] = v
    values = sorted({v for _, v in cells}, key=lambda v: value_order((v,)))
    lines = [f"Selection of `{key}` on the validation metric (mean ± std over seeds, x100); chosen in bold.", "",
             f"| {' | '.join(group_by)} | " + " | ".join(map(str, values)) + " | chosen |",
             "|" + "---|" * (len(group_by) + len(values) + 1)]
    marks = set()
    for g in sorted(chosen, key=value_order):
        out = []
        for v in values:
            vals = cells.get((g, v))
            text = fmt(vals) if vals else "–"
            text += f" (one class: {flat[(g, v)]}/{ran[(g, v)]})" if vals and flat[(g, v)] else ""
            out.append(f"**{text}**" if vals and v == chosen[g] else text)
        tried = [v for v in values if cells.get((g, v))]
        mark = "only value" if len(tried) == 1 else "edge" if chosen[g] in (tried[0], tried[-1]) else ""
        if mark:
            marks.add(mark)
            mark = f" ({mark})"
        lines.append(f"| {' | '.join(map(str, g))} | " + " | ".join(out) + f" | {chosen[g]}{mark} |")
    if marks:  # a choice at a grid's edge, or of a lone value, is not yet a choice: widen the grid first
        lines += ["", "; ".join(GRID_MARKS[m] for m in sorted(marks)) + "."]
    if any(flat.values()):
        lines += ["", f"(one class: k/n): in k of the n runs (any seed) the model answered one class for at least "
                  f"{ONE_CLASS_SHARE:.0%} of the validation inputs; such a value is chosen only if every value is."]
    return "\n".join(lines) + "\n", chosen


def plot_gate_diagnostics(runs: list[dict], path: Path) -> bool:
    """SoRA runs' `gate_overlap` (vs `gate_overlap_chance`) and `gates_grown` over training steps."""
    curves = []
    for r in runs:
        recs = [x for x in curve_records(Path(r["dir"]), "eval") if x.get("gate_overlap") is not None]
        if recs:
            curves.append((r, recs))
    if not curves:
        return False
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r, recs in curves:
        label = f"{r['method']} {r['task']} s{r['seed']}"
        steps = [x["step"] for x in recs]
        line, = ax1.plot(steps, [x["gate_overlap"] for x in recs], label=label)
        ax1.plot(steps, [x["gate_overlap_chance"] for x in recs], ":", color=line.get_color())
        ax2.plot(steps, [x["gates_grown"] for x in recs], color=line.get_color())
    ax1.set(xlabel="step", ylabel="kept ranks among the top initial |g|", ylim=(0, 1.05),
            title="overlap with the initial draw (dotted: chance)")
    ax2.set(xlabel="step", ylabel="gates whose |g| grew since the last evaluation", title="gates that grew")
    if len(curves) <= 12:
        ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def matching(runs: list[dict], conds: list[str], flag: str) -> list[dict]:
    """The runs whose every KEY (any group-by key) equals its VALUE, or one of VALUE|VALUE, as the table prints it."""
    for cond in conds:
        key, sep, value = cond.partition("=")
        if not sep:
            raise SystemExit(f"error: {flag} {cond}: expected KEY=VALUE, e.g. {flag} trainer.seed=42")
        runs = [r for r in runs if str(key_value(r, key)) in value.split("|")]
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparse_peft.report", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", type=Path, nargs="+", metavar="root")
    p.add_argument("--split", choices=("eval", "test"), default="eval",
                   help="eval: validation metrics; test: the held-out test split (split protocol sora)")
    p.add_argument("--metric", default=None, help="a metric name (default: each task's selection metric)")
    p.add_argument("--group-by", default="method,task", help="comma-separated keys (default: method,task)")
    p.add_argument("--out", type=Path, default=None, help="write report.md, summary.csv, runs.csv and plots here")
    p.add_argument("--choose", default=None, metavar="KEY",
                   help="select KEY (e.g. trainer.lr) per method and task on the validation metric; writes choice.md")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs whose KEY (any group-by key) equals VALUE (or one of A|B), e.g. choose on one "
                        "seed: --where trainer.seed=42; repeatable")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also write paired.md: every row minus this row per task over shared seeds, paired t-test p "
                        "(e.g. method=lora,trainer.lr=0.0003; repeat with task=... for a per-task baseline)")
    p.add_argument("--paired-only", action="store_true",
                   help="with --baseline: print only the pairing, write no files (a second baseline beside paired.md)")
    p.add_argument("--chosen-on", action="append", default=[], metavar="KEY=VALUE",
                   help="the runs whose validation means choose (--choose, a baseline's KEY=chosen), e.g. the seed "
                        "the grid ran on: --chosen-on trainer.seed=0; repeatable (default: every run)")
    p.add_argument("--stages", type=Path, default=None, metavar="DIR",
                   help="root is one scheduler run: write its per-stage table and plot (stages.md, stages.png) to DIR")
    a = p.parse_args(argv)
    if a.stages:
        if len(a.roots) != 1:
            raise SystemExit("error: --stages takes one scheduler run's dir")
        print(stages_report(a.roots[0], a.stages), end="")
        return
    group_by = [k.strip() for k in a.group_by.split(",") if k.strip()]
    if "task" not in group_by:
        group_by.append("task")
    runs, incomplete = collect(*a.roots)
    runs = matching(runs, a.where, "--where")
    if not runs:
        where = f" matching {' and '.join(a.where)}" if a.where else ""
        raise SystemExit(f"error: no completed run (metrics.json with status completed){where} below "
                         + ", ".join(map(str, a.roots)))
    if a.choose:
        if a.baseline:
            raise SystemExit("error: --baseline compares the table's rows; run it without --choose")
        on = matching(runs, a.chosen_on, "--chosen-on")
        if not on:
            raise SystemExit(f"error: --chosen-on {' and '.join(a.chosen_on)} matches no completed run")
        text, _ = choose(runs, a.choose, a.metric, group_by, on=on)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "choice.md").write_text(text)
        print(text, end="")
        return
    completed = runs  # one entry per run (per_task splits a multi-task run into its tasks' columns)
    if a.metric is None:
        runs = per_task(runs, a.split)
    text = tables(runs, group_by, a.metric, a.split)
    pairs = paired(runs, group_by, a.baseline, a.metric, a.split, a.chosen_on) if a.baseline else ""
    if a.paired_only:
        if not pairs:
            raise SystemExit("error: --paired-only prints the pairing: give a --baseline KEY=VALUE")
        print(pairs, end="")
        return
    if incomplete:
        text += "\nIncomplete or failed runs (not averaged): " + ", ".join(str(d) for d in incomplete) + "\n"
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "report.md").write_text(text)
        (a.out / "seeds.md").write_text(seeds_table(runs, group_by, a.metric, a.split))
        if pairs:
            (a.out / "paired.md").write_text(pairs)
        else:  # a table regenerated without --baseline must not sit beside an earlier run's pairing
            (a.out / "paired.md").unlink(missing_ok=True)
        write_csvs(runs, group_by, a.metric, a.split, a.out)
        plot_retained(runs, group_by, a.metric, a.split, a.out / "retained_vs_metric.png")
        plot_gate_diagnostics(runs, a.out / "gate_diagnostics.png")
        curves = [(r, c) for r in completed if (c := validation_curve(r, a.metric))]  # each curve.jsonl read once
        (a.out / "convergence.md").write_text(convergence(curves, group_by))
        if curves:
            plot_validation_curves(curves, group_by, a.metric, a.out / "validation_curves.png")
        for r in runs:
            if stage_records(Path(r["dir"])):
                root = next(q for q in a.roots if Path(r["dir"]).is_relative_to(q))
                name = str(Path(r["dir"]).relative_to(root)).replace("/", "_").strip(".") or "run"
                stages_report(Path(r["dir"]), a.out, plot_name=f"stages_{name}.png")
    print(text + ("\n" + pairs if pairs else ""), end="")


if __name__ == "__main__":
    main()
