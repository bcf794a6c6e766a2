"""Training throughput and MFU per variant, measured side by side in one run.

    python bench/throughput.py                                  # GPT-2 124M shape, seq 1024, bf16, compiled
    python bench/throughput.py --variants baseline,softcap,mlra --batch 16 --rounds 5
    python bench/throughput.py --set n_layer=2 --set d_model=64 --set n_head=4 --set seq_len=128  # CPU smoke

Each variant is built by `tunestab.compute.setup` and stepped by `tunestab.loop.train_step`,
exactly what a Ray Train worker runs (bf16 autocast, torch.compile and TF32 on CUDA, AdamW,
clipping), on the GPT-2 small shape: 12 layers, d_model 768, 12 heads, sequence 1024, GPT-2's
vocabulary of 50257 (the model pads it to 50304). Tokens are random: a step's cost does not
depend on the text. The variants take turns, `--steps` steps each per round, so that every
variant sees the same machine noise; a variant's time per step is its median over rounds.
MFU = training FLOPs per token (tunestab.compute.training_flops_per_token) x tokens/s / the
GPU's peak dense bf16 FLOP/s (tunestab.compute.PEAK_BF16_FLOPS). bench/gpu_check.py runs this
as its part (c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import compute  # noqa: E402
from tunestab.config import TrialConfig, config_from  # noqa: E402
from tunestab.loop import train_step  # noqa: E402

GPT2_SMALL = {"n_layer": 12, "d_model": 768, "n_head": 12, "seq_len": 1024, "vocab_size": 50257, "grad_clip": 1.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stepper:
    """One variant, set up as a trial sets it up, stepping on a fixed random batch."""

    name: str
    cfg: TrialConfig
    s: compute.Setup
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def build(cls, name: str, cfg: TrialConfig, device: torch.device) -> "Stepper":
        cfg = cfg.resolved()
        s = compute.setup(cfg, device)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
        return cls(name, cfg, s, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def run(self, n: int) -> float:
        """Seconds for n steps."""
        sync(self.s.device)
        t0 = time.perf_counter()
        for _ in range(n):
            loss, _, _ = train_step(self.s, self.x, self.y, self.cfg, probe=False, micro=self.cfg.micro_batch_size)
        loss.item()  # waits for the last step
        return time.perf_counter() - t0


def interleaved(steppers: dict, warmup: int, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each stepper, the steppers taking turns round by round.
    Anything with `run(n) -> seconds` steps here (bench/gpu_check.py adds nanoGPT's model)."""
    for st in steppers.values():
        st.run(warmup)  # compilation, autotuning, allocator warm-up
    times = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, st in steppers.items():
            times[name].append(st.run(steps) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="baseline,softcap,mlra")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (compilation)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {**GPT2_SMALL, "batch_size": args.batch, **dict(kv.split("=", 1) for kv in args.overrides)}
    variants = args.variants.split(",")
    # One process holds every variant's compiled graph of GPT.forward: more than dynamo's
    # default of 8 per code object would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(8, 2 * len(variants))
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    steppers = {v: Stepper.build(v, config_from({**overrides, "variant": v}), device) for v in variants}
    per_step = interleaved(steppers, args.warmup, args.steps, args.rounds)

    peak = compute.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    first = next(iter(steppers.values()))
    print(
        f"device: {name}; torch {torch.__version__}; batch {args.batch} x seq {first.cfg.seq_len}; "
        f"{args.rounds} rounds x {args.steps} steps per variant, medians"
    )
    print("| variant | params (M) | ms/step | tokens/s | MFU | tokens/s vs first |")
    print("|---|---|---|---|---|---|")
    base = None
    for v, st in steppers.items():
        tps = st.tokens_per_step / per_step[v]
        base = base or tps
        mfu = f"{compute.training_flops_per_token(st.s.model) * tps / peak:.1%}" if peak else "-"
        print(
            f"| {v} | {st.s.model.num_params() / 1e6:.1f} | {per_step[v] * 1e3:.1f} | {tps:,.0f} | {mfu} | "
            f"{tps / base:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
