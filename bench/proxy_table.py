"""Summarise proxy-study runs (bench/collect_runs.py output): per variant and LR, how each seed
ended, its final loss, and its block-0 max attention logit (the growth QK-norm targets); then per
variant the max stable LR with its 90% interval (tunestab/boundary.py) read two ways: by the
loop's loss rule with the floor at l0 (a run fails when it blows up above its initial loss), and
with the floor at the unigram entropy of the training tokens (it also fails when it ends no
better than a model that ignores context).

    python bench/proxy_table.py docs/data/proxy/a.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import boundary, data  # noqa: E402
from tunestab.config import config_from  # noqa: E402
from tunestab.data import cache_dir  # noqa: E402

# Every variant against the baseline, then Rybakov et al.'s comparisons against QK-norm alone.
PAIRS = [
    (v, "baseline") for v in ("qk_norm", "softcap", "qk_norm_cap", "qk_fc_norm", "qkv_norm", "mlra", "sigma_reparam")
] + [(v, "qk_norm") for v in ("qk_norm_cap", "qk_fc_norm", "qkv_norm")]


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_loss(run: dict) -> float:
    last = run["reports"][-1]
    return last.get("val_loss", last["loss"])


def unigram_floor(settings: dict) -> float:
    cfg = config_from(settings)
    train, _ = data.load_splits(cfg.data, cfg.tokenizer, cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None)
    return data.unigram_entropy(train)


def failed(run: dict, floor: float | None) -> bool:
    """Blew up, or ended no better than l0 (with a floor: no better than the floor either).

    A run collected with the unigram floor that ended `no_progress` is read again here: under
    the l0 rule it failed only if it also ended no better than l0."""
    if run["stop_reason"] not in ("completed", "no_progress"):
        return True
    return not final_loss(run) < (run["loss_init"] if floor is None else min(floor, run["loss_init"]))


def boundaries(runs: list[dict], floor: float | None) -> dict[str, boundary.Boundary]:
    by = defaultdict(list)
    for r in runs:
        by[r["settings"]["variant"]].append(r)
    return {
        v: boundary.fit(
            [r["settings"]["lr"] for r in rs],
            [failed(r, floor) for r in rs],
            [r["settings"].get("seed", 0) for r in rs],
        )
        for v, rs in by.items()
    }


def fmt(b: boundary.Boundary) -> str:
    if not b.found:
        return "-"
    return (
        f"{b.lr:.3g} (no interval below {boundary.MIN_SEEDS} seeds)"
        if math.isnan(b.low)
        else f"{b.lr:.3g} [{b.low:.3g}, {b.high:.3g}]"
    )


def main(argv=None) -> int:
    for path in argv or sys.argv[1:]:
        runs = load(path)
        by = defaultdict(list)
        for r in runs:
            s = r["settings"]
            by[(s["variant"], s["lr"])].append(r)
        floor = unigram_floor(runs[0]["settings"])
        print(f"{path}: {len(runs)} runs; unigram entropy of the training tokens {floor:.3f} nats")
        print("| variant | lr | ended (per seed) | final val loss | block-0 max logit | max logit (all blocks) |")
        print("|---|---|---|---|---|---|")
        for (variant, lr), rs in sorted(by.items()):
            rs.sort(key=lambda r: r["settings"].get("seed", 0))
            ended = " ".join(f"{r['stop_reason']}@{r['reports'][-1]['step']}" for r in rs)
            final = " ".join(f"{final_loss(r):.3f}" for r in rs)
            b0 = " ".join(f"{max(x.get('layer_0/attn_logit_max', 0) for x in r['reports']):.3g}" for r in rs)
            allb = " ".join(f"{max(x.get('attn_logit_max', 0) for x in r['reports']):.3g}" for r in rs)
            print(f"| {variant} | {lr:g} | {ended} | {final} | {b0} | {allb} |")
        l0, uni = boundaries(runs, None), boundaries(runs, floor)
        seeds = {v: len({r["settings"].get("seed", 0) for r in runs if r["settings"]["variant"] == v}) for v in l0}
        print(f"\n| variant | seeds | max stable LR, floor l0 [90%] | max stable LR, floor unigram {floor:.2f} [90%] |")
        print("|---|---|---|---|")
        for v in l0:
            print(f"| {v} | {seeds[v]} | {fmt(l0[v])} | {fmt(uni[v])} |")
        print("\nRatios of max stable LRs, with their 90% intervals:")
        print("| ratio | floor unigram [90%] | floor l0 [90%] |")
        print("|---|---|---|")
        for a, b in PAIRS:
            if a in l0 and b in l0:
                cells = []
                for fits in (uni, l0):
                    r, lo, hi = boundary.ratio(fits[a], fits[b])
                    cells.append(
                        "-" if math.isnan(r) else f"{r:.3g}" if math.isnan(lo) else f"{r:.3g} [{lo:.3g}, {hi:.3g}]"
                    )
                print(f"| {a} / {b} | {cells[0]} | {cells[1]} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
