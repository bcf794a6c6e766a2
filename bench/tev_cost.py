"""The cost of measuring TEV after every step, against the step itself, side by side.

    python bench/tev_cost.py                       # GPT-2 small, one sequence of 1024 tokens, CPU
    python bench/tev_cost.py --batch 4 --rounds 5

The per-step window reads the |V| x d token embedding twice (TEV_i of every row, and the change
since the last step): O(V·d), whatever the batch.
A training step is O(params x tokens). Each round times one training step (tunestab.loop.train_step
on the setup a trial uses) and then the TEV a report window adds per step
(tunestab.loop.Window.add); the ratio of the medians is the per-step cost. Goal: <= 1% at GPT-2
small on the CPU (issue 16). Figures: docs/scheduler.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import GPT2_SMALL, Stepper  # noqa: E402

from tunestab.config import config_from  # noqa: E402
from tunestab.loop import Window  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    st = Stepper.build("baseline", config_from({**GPT2_SMALL, "batch_size": args.batch}), device)
    window = Window(device)
    st.run(1)  # warm-up
    steps, tevs = [], []
    for _ in range(args.rounds):
        steps.append(st.run(1))
        t0 = time.perf_counter()
        window.add(torch.zeros((), device=device), torch.zeros((), device=device), st.s.model, 1e-3)
        window.max["tev_dispersion_max"].item()  # waits for it
        tevs.append(time.perf_counter() - t0)
    step, t = statistics.median(steps), statistics.median(tevs)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 small, "
        f"batch {args.batch} x {st.cfg.seq_len}, vocabulary {st.s.model.vocab_size} x {st.cfg.d_model}"
    )
    print(
        f"median training step {step * 1e3:.0f} ms; median per-step TEV {t * 1e3:.2f} ms; "
        f"TEV / step = {t / step:.4f} (goal <= 0.01)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
