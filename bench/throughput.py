"""Training throughput and MFU per variant, measured side by side (issue 8).

    python bench/throughput.py                                  # GPT-2 124M shape, seq 1024, bf16, CUDA
    python bench/throughput.py --variants baseline,softcap,mlra --batch 16 --rounds 5
    python bench/throughput.py --set n_layer=2 --set d_model=64 --set n_head=4 --set seq_len=128  # CPU smoke

Runs the product's own `train_step` (what a Ray Train worker runs: AdamW, clipping, bf16 autocast,
torch.compile on CUDA) on the GPT-2 small shape: 12 layers, d_model 768, 12 heads, vocabulary
50304 (50257 padded to a multiple of 128), sequence length 1024. Tokens are random: the cost of a
step does not depend on the text. The variants take turns, `--steps` steps each per round, so
that every variant sees the same machine noise; a variant's tokens/s is its median over rounds.
MFU = training FLOPs per token (tunestab.train.training_flops_per_token) x tokens/s / the GPU's
peak dense bf16 FLOP/s (tunestab.train.PEAK_BF16_FLOPS). Goals on one H100: baseline >= 40% MFU,
softcap within 15% of baseline's tokens/s.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import train  # noqa: E402
from tunestab.config import config_from  # noqa: E402
from tunestab.model import GPT  # noqa: E402

GPT2_SMALL = {"n_layer": 12, "d_model": 768, "n_head": 12, "seq_len": 1024, "vocab_size": 50304, "grad_clip": 1.0}


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
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = {**GPT2_SMALL, "batch_size": args.batch, **dict(kv.split("=", 1) for kv in args.overrides)}

    runs = {}
    for variant in args.variants.split(","):
        cfg = train.model_config(config_from({**overrides, "variant": variant}))
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        step_model = torch.compile(model) if device.type == "cuda" and cfg.compile else model
        opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=1e-4, fused=device.type == "cuda")
        bf16 = device.type == "cuda" and cfg.bf16
        x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
        runs[variant] = (cfg, model, step_model, opt, bf16, x[:, :-1].contiguous(), x[:, 1:].contiguous())

    def steps(variant: str, n: int) -> float:
        cfg, model, step_model, opt, bf16, x, y = runs[variant]

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            loss, _, _ = train.train_step(model, step_model, opt, x, y, cfg, autocast, probe=False)
        loss.item()  # waits for the last step
        return time.perf_counter() - t0

    for v in runs:
        steps(v, args.warmup)
    times = {v: [] for v in runs}
    for _ in range(args.rounds):
        for v in runs:
            times[v].append(steps(v, args.steps))

    peak = train.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch} x seq {runs[next(iter(runs))][0].seq_len}; "
          f"{args.rounds} rounds x {args.steps} steps per variant, medians")
    print("| variant | params (M) | ms/step | tokens/s | MFU | tokens/s vs baseline |")
    print("|---|---|---|---|---|---|")
    base = None
    for v, (cfg, model, *_rest) in runs.items():
        per_step = statistics.median(times[v]) / args.steps
        tps = cfg.batch_size * cfg.seq_len / per_step
        base = base or tps
        mfu = f"{train.training_flops_per_token(model, cfg) * tps / peak:.1%}" if peak else "-"
        print(f"| {v} | {model.num_params() / 1e6:.1f} | {per_step * 1e3:.1f} | {tps:,.0f} | {mfu} | {tps / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
