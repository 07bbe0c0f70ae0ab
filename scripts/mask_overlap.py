"""Pairwise overlap of SparseAdapter masks: for runs a and b (run dirs with method_state.pt), the share of a's pruned
adapter weights that b prunes too (two unrelated masks at sparsity s: s), plus each run's magnitude_overlap (saved
with the masks since 561f951; '-' before) and the min-max density of its weight matrices. Markdown on stdout.

    python scripts/mask_overlap.py rand=<run dir> mag=<run dir> snip=<run dir> ...   (unlabelled: the dir's name)
"""
import sys
from pathlib import Path

import torch


def main(args: list[str]) -> None:
    names, pruned, rows = [], {}, {}
    for arg in args:
        # `label=<dir>` or a bare dir; Hydra's run dirs hold '=' themselves, so a label is a plain word before the first
        name, sep, path = arg.partition("=")
        if not (sep and name.isidentifier()) or Path(arg).exists():
            name, path = Path(arg).name, arg
        run = Path(path)
        state = torch.load(run / "method_state.pt", weights_only=True)
        masks, overlap = state["masks"], state.get("magnitude_overlap")
        density = [float(m.float().mean()) for m in masks.values()]
        names.append(name)
        pruned[name] = torch.cat([~m.flatten() for m in masks.values()])
        rows[name] = (overlap, min(density), max(density))
    print("| | " + " | ".join(names) + " | magnitude_overlap | matrix density, min-max |")
    print("|---" * (len(names) + 3) + "|")
    for a in names:
        shares = [int((pruned[a] & pruned[b]).sum()) / max(int(pruned[a].sum()), 1) for b in names]
        overlap, lo, hi = rows[a]
        print(f"| {a} | " + " | ".join(f"{x:.3f}" for x in shares)
              + f" | {'-' if overlap is None else f'{overlap:.3f}'} | {lo:.2f}-{hi:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
