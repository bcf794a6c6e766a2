"""One command that checks the GPU path on a GPU and prints one table.

    python bench/gpu_check.py                          # every part, on the GPU
    python bench/gpu_check.py --parts a,c --nanogpt ~/nanoGPT   # some parts; nanoGPT's model beside ours
    python bench/gpu_check.py --tiny                   # the same code at a toy shape, on a CPU (CI runs it)
    python bench/gpu_check.py --parts f --population-sizes 1,4,8   # (f) alone, at chosen sizes

Needs torch, numpy and what the loop imports (tiktoken); not Ray, MLflow, Optuna or datasets.

(a) every variant at GPT-2 small (12 x 768, T = 1024, batch 16, GPT-2's vocabulary, bf16,
    compiled) trains `--steps` steps through `tunestab.loop.run`, what a Ray Train worker runs:
    every report finite, and the loss falls. Its peak GPU memory is the "fits batch 16 x 1024"
    figure. The text is the offline builtin corpus in bytes (no download), so the model learns
    quickly to use 257 of its 50257 tokens; the shapes and the cost are GPT-2 small's.
(b) FlexAttention with a softcap against the plain kernel that materialises the logits, forward
    and gradients, in fp32 and in bf16, and with fp32 q, k beside a bf16 v (what CUDA autocast
    hands attention under qk_norm).
(c) tokens/s and MFU of baseline, softcap, qk_norm_cap, mlra and sigma_reparam, side by side in
    one run (bench/throughput.py's interleaved rounds), and nanoGPT's GPT-2 model at the same
    shape and settings when `--nanogpt DIR` names a checkout of it (never part of this repo).
(d) a trial checkpoints at step 20, a new one resumes from there, and the losses after it must
    equal the uninterrupted run's.
(e) tiny CPU-proxy-sized trials (the default search's shape) packed k to a GPU as k processes,
    k = 1, 2, 4, 8: the aggregate tokens/s, the figure behind fractional-GPU trials.
(f) populations of K members of the default search's trial shape (`POPULATION`) on one GPU,
    through `tunestab.loop.run_population` (what a Ray Train worker runs): the vectorised engine
    against the interleaved one, and against K processes of one member each, as aggregate
    model-steps/s at K = 1, 8, 32, 128 (processes up to 32: each holds a CUDA context of its
    own). Also: a vectorised population's members report the losses the interleaved engine
    gives them.

Goals on one H100: baseline >= 40% MFU; softcap within 15% of baseline's tokens/s; every
variant fits batch 16 x 1024 in 80 GB; a vectorised population of 32 at >= 10x the
model-steps/s of one member. Results and the command that made them: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import io
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import GPT2_SMALL, Stepper, interleaved, sync  # noqa: E402

from tunestab import compute  # noqa: E402
from tunestab.config import VARIANTS, TrialConfig  # noqa: E402
from tunestab.data import Batches  # noqa: E402
from tunestab.loop import run, run_population, train_step  # noqa: E402
from tunestab.model import attend, causal_block_mask, flex_capped_attention, plain_attention  # noqa: E402
from tunestab.session import LocalSession  # noqa: E402

THROUGHPUT_VARIANTS = ("baseline", "softcap", "qk_norm_cap", "mlra", "sigma_reparam")
# The default search's trial shape (search_spaces/default.yaml): what (e) packs onto one GPU.
PROXY = dict(n_layer=12, n_head=4, d_model=64, seq_len=128, batch_size=16, grad_clip=0.0, lr=0.3)
# The default search's trial now (search_spaces/default.yaml): what (f) trains in populations.
POPULATION = dict(n_layer=2, n_head=2, d_model=128, seq_len=128, batch_size=16, grad_clip=1.0, lr=0.01)
GOAL_MFU, GOAL_SOFTCAP, GOAL_MEMORY, GOAL_POPULATION = 0.40, 0.85, 80e9, 10.0


@dataclasses.dataclass
class Row:
    part: str
    case: str
    ok: bool | None  # None: a measurement with no pass/fail of its own
    figures: str


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fresh(device: torch.device) -> None:
    """Free the last part's models, compiled graphs and cached blocks, and restart the peak."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------
# (a) every variant trains


def part_a(shape: dict, device: torch.device, steps: int) -> list[Row]:
    rows = []
    for variant in VARIANTS:
        fresh(device)
        cfg = TrialConfig(
            variant=variant,
            **shape,
            steps=steps,
            warmup_steps=max(1, steps // 10),
            lr=6e-4,
            report_every=max(1, steps // 5),
            eval_every=steps,
            eval_batches=2,
            checkpoint_every=0,
        )
        session = LocalSession(out=io.StringIO())
        t0 = time.perf_counter()
        run(cfg, session)
        wall = time.perf_counter() - t0
        reports = session.reports
        finite = all(math.isfinite(v) for r in reports for v in r.values() if isinstance(v, float))
        falls = reports[-1]["loss"] < reports[0]["loss"]
        completed = reports[-1]["stop_reason"] == "completed"
        cuda = device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        tps, mfu = reports[-1].get("tokens_per_s"), reports[-1].get("mfu")
        rows.append(
            Row(
                "a",
                variant,
                finite and falls and completed and (not cuda or peak < GOAL_MEMORY),
                f"loss {reports[0]['loss']:.2f} -> {reports[-1]['loss']:.2f} over {steps} steps; "
                f"{'%.0f' % tps if tps else '-'} tokens/s{'; MFU %.1f%%' % (100 * mfu) if mfu else ''}"
                f"{'; peak %.1f GB' % (peak / 1e9) if cuda else ''}; {wall:.1f} s with compilation",
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# (b) FlexAttention against the plain kernel


def part_b(device: torch.device, tiny: bool) -> list[Row]:
    rows = []
    B, H, T, D = (2, 2, 64, 16) if tiny else (4, 12, 1024, 64)
    cap = 20.0
    mask = causal_block_mask(T, device)
    backward = device.type == "cuda"  # FlexAttention has no backward on a CPU
    for dtype, bound in ((torch.float32, 2e-3), (torch.bfloat16, 2e-2)):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=device, generator=g, dtype=dtype) * 3 for _ in range(3))
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        fused = flex_capped_attention(q, k, v, cap, mask, compiled=device.type == "cuda")
        ref_in = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
        ref = plain_attention(*ref_in, cap)
        errors = [rel(fused, ref)]
        if backward:
            grad = torch.randn_like(ref)
            fused_grads = torch.autograd.grad(fused, (q, k, v), grad.to(dtype))
            ref_grads = torch.autograd.grad(ref, ref_in, grad)
            errors += [rel(a, b) for a, b in zip(fused_grads, ref_grads)]
        what = "forward and dq, dk, dv" if backward else "forward (no FlexAttention backward on a CPU)"
        rows.append(
            Row(
                "b",
                f"flex softcap vs plain, {str(dtype).removeprefix('torch.')}",
                max(errors) < bound,
                f"{what}: largest relative error {max(errors):.1e} (bound {bound:.0e})",
            )
        )
    # What CUDA autocast hands attention under qk_norm: fp32 q, k (from LayerNorm) and a bf16 v.
    g = torch.Generator(device=device).manual_seed(1)
    q, k = (torch.randn(B, H, T, D, device=device, generator=g).requires_grad_(backward) for _ in range(2))
    v = torch.randn(B, H, T, D, device=device, generator=g).bfloat16().requires_grad_(backward)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = attend(q, k, v, cap, mask)
    if backward:
        y.float().sum().backward()
    ok = y.dtype == torch.bfloat16 and all(t.grad is None or torch.isfinite(t.grad).all() for t in (q, k, v))
    rows.append(
        Row(
            "b",
            "fp32 q, k + bf16 v under autocast",
            ok,
            f"output {str(y.dtype).removeprefix('torch.')}{', gradients finite' if backward else ''}",
        )
    )
    return rows


# --------------------------------------------------------------------------------------------
# (c) throughput side by side


class NanoGPTStepper:
    """nanoGPT's GPT-2 model (github.com/karpathy/nanoGPT, model.py, loaded from a checkout the
    user names) stepped the way it trains itself, at our shape and settings: bf16 autocast,
    torch.compile, its fused AdamW, clipping at 1.0."""

    def __init__(self, folder: str, shape: dict, batch: int, device: torch.device):
        spec = importlib.util.spec_from_file_location("nanogpt_model", Path(folder).expanduser() / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        # nanoGPT pads GPT-2's vocabulary to a multiple of 64 (50304), as its own config does.
        config = module.GPTConfig(
            block_size=shape["seq_len"],
            vocab_size=-(-shape["vocab_size"] // 64) * 64,
            n_layer=shape["n_layer"],
            n_head=shape["n_head"],
            n_embd=shape["d_model"],
            dropout=0.0,
            bias=True,
        )
        self.model = module.GPT(config).to(device)
        self.opt = self.model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
        self.step_model = torch.compile(self.model) if device.type == "cuda" else self.model
        self.device, self.bf16 = device, device.type == "cuda"
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (batch, shape["seq_len"] + 1), generator=g).to(device)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.tokens_per_step = batch * shape["seq_len"]

    def run(self, n: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                _, loss = self.step_model(self.x, self.y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0


def part_c(shape: dict, device: torch.device, nanogpt: str | None, rounds: int, steps: int) -> list[Row]:
    fresh(device)
    torch._dynamo.config.recompile_limit = 16  # one graph of GPT.forward per variant, in one process
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    steppers = {v: Stepper.build(v, TrialConfig(variant=v, **shape), device) for v in THROUGHPUT_VARIANTS}
    if nanogpt:
        steppers["nanoGPT (baseline's shape)"] = NanoGPTStepper(nanogpt, shape, shape["batch_size"], device)
    per_step = interleaved(steppers, warmup=3, steps=steps, rounds=rounds)
    peak = compute.peak_flops(device)
    # nanoGPT's model is our baseline's architecture: the same FLOPs per token.
    flops = {
        name: compute.training_flops_per_token(st.s.model) for name, st in steppers.items() if isinstance(st, Stepper)
    }
    base = steppers["baseline"].tokens_per_step / per_step["baseline"]
    rows = []
    for name, st in steppers.items():
        tps = st.tokens_per_step / per_step[name]
        mfu = flops.get(name, flops["baseline"]) * tps / peak if peak else None
        ok = None  # the goals are an H100's; elsewhere these are measurements only
        if name == "baseline" and mfu is not None:
            ok = mfu >= GOAL_MFU
        elif name == "softcap" and device.type == "cuda":
            ok = tps / base >= GOAL_SOFTCAP
        rows.append(
            Row(
                "c",
                name,
                ok,
                f"{tps:,.0f} tokens/s; {per_step[name] * 1e3:.1f} ms/step; "
                f"{'MFU %.1f%%; ' % (100 * mfu) if mfu is not None else ''}{tps / base:.3f}x baseline",
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# (d) checkpoint, resume, same losses


def part_d(shape: dict, device: torch.device, variant: str = "qk_norm_cap") -> list[Row]:
    fresh(device)
    cfg = TrialConfig(
        variant=variant,
        **shape,
        steps=40,
        warmup_steps=5,
        lr=6e-4,
        report_every=10,
        eval_every=40,
        eval_batches=2,
        checkpoint_every=20,
    )
    with tempfile.TemporaryDirectory() as folder:
        whole = LocalSession(checkpoint_dir=folder, out=io.StringIO())
        run(cfg, whole)
        fresh(device)
        resumed = LocalSession(resume_from=str(Path(folder) / "step_000020"), out=io.StringIO())
        run(cfg, resumed)
    after = [r for r in whole.reports if r["step"] > 20]
    pairs = [(a["loss"], b["loss"]) for a, b in zip(after, resumed.reports)]
    same = [r["step"] for r in resumed.reports] == [30, 40] and all(a == b for a, b in pairs)
    worst = max(abs(a - b) / abs(a) for a, b in pairs) if pairs else math.nan
    return [
        Row(
            "d",
            f"{variant}: checkpoint at 20, resume",
            same,
            f"losses at steps 30, 40: {' '.join('%.6f' % a for a, _ in pairs)} uninterrupted, "
            f"{' '.join('%.6f' % b for _, b in pairs)} resumed; largest relative difference {worst:.1e}",
        )
    ]


# --------------------------------------------------------------------------------------------
# (e) k small trials on one GPU


def packed_trial(rank: int, device_name: str, steps: int, barrier, results, shape: dict) -> None:
    """One tiny trial in its own process: set up and warm up (compile), wait for the others,
    then time `steps` steps."""
    device = torch.device(device_name)
    torch.set_num_threads(1)
    cfg = TrialConfig(**shape, seed=rank, vocab_size=257).resolved()
    s = compute.setup(cfg, device)
    tokens = torch.randint(
        0, 257, (cfg.batch_size * (cfg.seq_len + 1) * 64,), generator=torch.Generator().manual_seed(rank)
    )
    batches = Batches(tokens.numpy().astype("uint16"), cfg.batch_size, cfg.seq_len, cfg.seed)
    for _ in range(5):
        train_step(s, *(t.to(device) for t in batches.next()), cfg, probe=False)
    sync(device)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = train_step(s, *(t.to(device) for t in batches.next()), cfg, probe=False)
    loss.item()
    results.put((rank, t0, time.perf_counter(), steps * cfg.batch_size * cfg.seq_len))


def packed(device: torch.device, k: int, steps: int, shape: dict) -> float:
    """Aggregate tokens/s of k one-model trials of `shape`, each in its own process."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=packed_trial, args=(r, str(device), steps, barrier, results, shape)) for r in range(k)]
    for p in procs:
        p.start()
    done = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    start, end = min(d[1] for d in done), max(d[2] for d in done)
    return sum(d[3] for d in done) / (end - start)


def part_e(device: torch.device, ks: list[int], steps: int) -> list[Row]:
    fresh(device)
    rows, one = [], None
    for k in ks:
        aggregate = packed(device, k, steps, PROXY)
        one = one or aggregate
        rows.append(
            Row(
                "e",
                f"{k} tiny trial{'s' if k > 1 else ''} on one {'GPU' if device.type == 'cuda' else 'CPU'}",
                None,
                f"{aggregate:,.0f} tokens/s in all; {aggregate / one:.2f}x one trial",
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# (f) populations on one GPU


def population(k: int, engine: str, shape: dict, steps: int, lr: float = POPULATION["lr"]) -> LocalSession:
    """K members of one variant (seeds 0..K-1, LRs spread over 3x from `lr`) trained by
    run_population."""
    cfgs = {
        str(i): TrialConfig(
            **{
                **POPULATION,
                **shape,
                "variant": "qk_norm",
                "seed": i,
                "lr": lr * 3 ** (i / max(1, k - 1)),
                "engine": engine,
                "steps": steps,
                "warmup_steps": steps // 4,
                "report_every": steps // 2,
                "eval_every": steps,
                "eval_batches": 1,
                "tokenizer": "bytes",
            }
        )
        for i in range(k)
    }
    session = LocalSession(out=io.StringIO())
    run_population(cfgs, session)
    return session


def model_steps_per_s(session: LocalSession, tokens_per_step: int) -> float:
    """Members x steps per second over the last report's window (compiling steps left out)."""
    last = session.reports[-1]["members"]
    return next(iter(last.values()))["tokens_per_s"] / tokens_per_step * len(last)


def part_f(device: torch.device, ks: list[int], procs: list[int], steps: int, shape: dict) -> list[Row]:
    rows, one = [], None
    full = {**POPULATION, **shape}
    per_step = full["batch_size"] * full["seq_len"]
    for k in ks:
        rates = {}
        for engine in ("interleaved", "vectorised"):
            fresh(device)
            rates[engine] = model_steps_per_s(population(k, engine, shape, steps), per_step)
        one = one or rates["interleaved"]
        figures = (
            f"interleaved {rates['interleaved']:,.1f}, vectorised {rates['vectorised']:,.1f} model-steps/s "
            f"({rates['vectorised'] / one:.1f}x one member; vectorised/interleaved "
            f"{rates['vectorised'] / rates['interleaved']:.2f})"
        )
        if k in procs:
            fresh(device)
            figures += f"; {k} processes {packed(device, k, steps, full) / per_step:,.1f}"
        goal = device.type == "cuda" and k == 32
        ok = rates["vectorised"] >= GOAL_POPULATION * one if goal else None
        rows.append(Row("f", f"population of {k}", ok, figures))
    # The two engines agree: 4 members, losses at the last report, over 20 steps at LRs that do
    # not spike (1e-3 to 3e-3), as tests/test_vectorised.py compares them: at the timed LRs,
    # float rounding differences grow with the steps (8.7e-4 after 60 steps on the CPU, fp32).
    fresh(device)
    a, b = (population(4, e, shape, 20, lr=1e-3).reports[-1]["members"] for e in ("interleaved", "vectorised"))
    gap = max(abs(a[m]["loss"] - b[m]["loss"]) / abs(a[m]["loss"]) for m in a)
    bf16 = shape.get("bf16", device.type == "cuda")
    rows.append(
        Row(
            "f",
            "vectorised = interleaved (4 members)",
            gap < (2e-2 if bf16 else 1e-4),
            f"largest loss gap {gap:.1e} relative",
        )
    )
    return rows


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,b,c,d,e,f", help="which parts to run, e.g. a,c")
    ap.add_argument("--nanogpt", help="a checkout of github.com/karpathy/nanoGPT, to time its model beside ours")
    ap.add_argument("--steps", type=int, default=50, help="(a): training steps per variant")
    ap.add_argument("--tiny", action="store_true", help="a toy shape that runs on a CPU in a minute (CI)")
    ap.add_argument("--population-sizes", help="(f): the K to time, e.g. 1,4,8 (default 1,8,32,128)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        shape = dict(
            n_layer=2,
            n_head=2,
            d_model=64,
            seq_len=64,
            batch_size=4,
            vocab_size=300,
            bf16=True,
            compile=device.type == "cuda",
        )
        steps, rounds, ks, pack_steps = min(args.steps, 10), 2, [1, 2], 20
        # (f) at the tiny shape, eager, on whatever device there is: the code path, not a figure.
        pop_shape = dict(n_layer=2, d_model=64, seq_len=64, batch_size=4, compile=False)
        pop_ks, pop_procs, pop_steps = [1, 2], [2], 8
    else:
        shape = {**GPT2_SMALL, "batch_size": 16, "bf16": True, "compile": True}
        steps, rounds, ks, pack_steps = args.steps, 5, [1, 2, 4, 8], 300
        pop_shape, pop_ks, pop_procs, pop_steps = {}, [1, 8, 32, 128], [8, 32], 60
    t0 = time.perf_counter()
    rows: list[Row] = []
    if "a" in parts:
        rows += part_a(shape, device, steps)
    if "b" in parts:
        rows += part_b(device, args.tiny)
    if "c" in parts:
        rows += part_c(shape, device, args.nanogpt, rounds, 10 if not args.tiny else 2)
    if "d" in parts:
        rows += part_d(shape, device)
    if "e" in parts:
        rows += part_e(device, ks, pack_steps)
    if args.population_sizes:
        pop_ks = [int(k) for k in args.population_sizes.split(",")]
    if "f" in parts:
        rows += part_f(device, pop_ks, pop_procs, pop_steps, pop_shape)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\ndevice: {name}; torch {torch.__version__}; shape: {', '.join(f'{k}={v}' for k, v in shape.items())}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| part | case | result | figures |\n|---|---|---|---|")
    for r in rows:
        result = "-" if r.ok is None else ("ok" if r.ok else "FAIL")
        print(f"| {r.part} | {r.case} | {result} | {r.figures} |")
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
