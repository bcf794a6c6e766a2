"""What do the stability probes cost? (issue: probes add at most 2% at the default report cadence)

    python bench/probe_overhead.py [--steps 200] [--set key=value ...]

Runs the product's own `train_step` on the default trial config, alternating plain steps and
probe steps (forward with per-layer stats, TEV, the host sync that reads the values), so that
both see the same machine noise. Prints the median time of each and the overhead of probing
once every `report_every` steps: (report_every * t_plain + (t_probe - t_plain)) / (report_every * t_plain).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import compute, loop  # noqa: E402
from tunestab import data as data_mod  # noqa: E402
from tunestab.config import config_from  # noqa: E402
from tunestab.data import cache_dir  # noqa: E402
from tunestab.loop import all_reduce, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200, help="pairs of (plain, probe) steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = config_from(dict(kv.split("=", 1) for kv in args.overrides))
    cfg = loop.model_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_tokens, _ = data_mod.load_splits(cfg.data, cfg.tokenizer, cache_dir(cfg), cfg.val_fraction)
    batches = data_mod.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    s = compute.setup(cfg, device)  # what a trial runs: precision, compilation, optimizer

    def timed(probe: bool) -> float:
        x, y = (t.to(device) for t in batches.next())
        t0 = time.perf_counter()
        loss, grad_norm, probes = train_step(s, x, y, cfg, probe)
        if probe:
            all_reduce({**probes, "grad_norm": grad_norm}, torch.distributed.ReduceOp.MAX, 1)  # host sync
        else:
            loss.item()  # the same one sync, so the comparison is only the probes
        return time.perf_counter() - t0

    for _ in range(10):  # warm-up (and compilation of both graphs on CUDA)
        timed(False), timed(True)
    plain, probed = [], []
    for _ in range(args.steps):
        plain.append(timed(False))
        probed.append(timed(True))
    t_plain, t_probe = statistics.median(plain), statistics.median(probed)
    k = cfg.report_every
    ratio = (k * t_plain + (t_probe - t_plain)) / (k * t_plain)
    print(
        f"device={device} variant={cfg.variant} n_layer={cfg.n_layer} d_model={cfg.d_model} "
        f"seq_len={cfg.seq_len} batch_size={cfg.batch_size} report_every={k}"
    )
    print(
        f"median step: plain {t_plain * 1e3:.2f} ms, with probes {t_probe * 1e3:.2f} ms "
        f"(probe step / plain step = {t_probe / t_plain:.3f})"
    )
    print(f"probe overhead at report_every={k}: time ratio {ratio:.4f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
