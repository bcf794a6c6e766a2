"""Summarise proxy-study runs (bench/collect_runs.py output): per variant and LR, how each seed
ended, its final loss, and its block-0 max attention logit (the logit growth QK-norm targets).

    python bench/proxy_table.py docs/data/proxy/a.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    for path in (argv or sys.argv[1:]):
        runs = load(path)
        by = defaultdict(list)
        for r in runs:
            s = r["settings"]
            by[(s["variant"], s["lr"])].append(r)
        print(f"{path}: {len(runs)} runs")
        print("| variant | lr | ended (per seed) | final loss | block-0 max logit | max logit (all blocks) |")
        print("|---|---|---|---|---|---|")
        for (variant, lr), rs in sorted(by.items()):
            rs.sort(key=lambda r: r["settings"]["seed"])
            ended = " ".join(f"{r['stop_reason']}@{r['reports'][-1]['step']}" for r in rs)
            final = " ".join(f"{r['reports'][-1].get('val_loss', r['reports'][-1]['loss']):.3f}" for r in rs)
            b0 = " ".join(f"{max(x.get('layer_0/attn_logit_max', 0) for x in r['reports']):.3g}" for r in rs)
            allb = " ".join(f"{max(x.get('attn_logit_max', 0) for x in r['reports']):.3g}" for r in rs)
            print(f"| {variant} | {lr:g} | {ended} | {final} | {b0} | {allb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
