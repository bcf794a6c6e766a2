"""What does the product's loop cost against bare PyTorch? (issue 3's overhead benchmark)

    python bench/overhead.py [--steps 200] [--set key=value ...]

Runs the same model on the same batches three ways in one process, after Ray is started, so all
three see the same background load:
  bare     a plain PyTorch loop (batches -> forward -> backward -> clip -> AdamW), nothing else;
  runner   `tunestab.loop.run` without Ray: probes, reports, evals at the default cadence;
  trainer  the same loop in a one-worker Ray `TorchTrainer` (Train V2), with Ray's default
           report blocking (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2) and with ours (0.1).
Steady-state tokens/s is measured between the first and the last report (the bare loop stamps
the same steps), so start-up is excluded from it and printed separately, as is teardown.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import compute, loop, session  # noqa: E402
from tunestab import data as data_mod  # noqa: E402
from tunestab.config import TrialConfig, config_from  # noqa: E402
from tunestab.model import GPT  # noqa: E402


def rate(stamps: list[tuple[int, float]], tokens_per_step: int) -> float:
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    return (s1 - s0) * tokens_per_step / (t1 - t0)


def bare(cfg: TrialConfig) -> list[tuple[int, float]]:
    torch.manual_seed(cfg.seed)
    train_tokens, _ = data_mod.load_splits(cfg.data, cfg.tokenizer, data_mod.cache_dir(cfg), cfg.val_fraction)
    batches = data_mod.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(compute.param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    stamps = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = loop.lr_at(step, cfg)
        x, y = batches.next()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.report_every == 0:
            loss.item()
            stamps.append((step + 1, time.perf_counter()))
    return stamps


class StampedSession(session.LocalSession):
    def __init__(self):
        super().__init__(out=open(os.devnull, "w"))
        self.stamps = []

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        self.stamps.append((metrics["step"], time.perf_counter()))


class StampedRaySession(session.RaySession):
    def __init__(self, stamp_file: str):
        super().__init__()
        self.stamp_file = stamp_file

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        with open(self.stamp_file, "a") as f:  # same machine: wall clock comparable with the driver's
            f.write(json.dumps([metrics["step"], time.time()]) + "\n")


def stamped_loop(config: dict) -> None:
    loop.run(TrialConfig(**config["trial"]), StampedRaySession(config["stamp_file"]))


def trainer(cfg: TrialConfig) -> tuple[list, float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stamp_file = tempfile.mktemp(suffix=".jsonl")
    t_start = time.time()
    TorchTrainer(
        stamped_loop,
        train_loop_config={"trial": cfg.to_dict(), "stamp_file": stamp_file},
        # The worker gets the whole machine, as the bare loop does (torch threads = CPUs).
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count()}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="overhead"),
    ).fit()
    t_end = time.time()
    stamps = [tuple(json.loads(line)) for line in open(stamp_file)]
    return stamps, t_start, t_end


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--health-check-s",
        default="0.1",
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S values to try besides Ray's default 2 (comma-separated)",
    )
    args = ap.parse_args()
    cfg = config_from(
        {"steps": str(args.steps), "checkpoint_every": "0", **dict(kv.split("=", 1) for kv in args.overrides)}
    )
    cfg = loop.model_config(cfg)
    tps = cfg.batch_size * cfg.seq_len
    print(
        f"config: n_layer={cfg.n_layer} d_model={cfg.d_model} seq_len={cfg.seq_len} batch_size={cfg.batch_size} "
        f"steps={cfg.steps} report_every={cfg.report_every} eval_every={cfg.eval_every} torch threads="
        f"{torch.get_num_threads()}"
    )

    import ray

    results = {}
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S is read by the Train controller actor, so each setting
    # needs its own Ray session; the local loops run inside the last one, beside Ray's idle
    # processes, as a user's search would.
    healths = ["2"] + args.health_check_s.split(",")
    for i, health in enumerate(healths):
        ray.init(
            runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": health}},
            include_dashboard=False,
            log_to_driver=False,
        )
        if i == len(healths) - 1:
            results["bare"] = (rate(bare(cfg), tps), None, None)
            stamped = StampedSession()
            loop.run(cfg, stamped)
            results["runner"] = (rate(stamped.stamps, tps), None, None)
        stamps, t_start, t_end = trainer(cfg)
        ray.shutdown()
        steady = rate(stamps, tps)
        startup = stamps[0][1] - t_start - stamps[0][0] * tps / steady
        name = f"trainer (health check {health} s{', Ray default' if health == '2' else ''})"
        results[name] = (steady, startup, t_end - stamps[-1][1])
    base = results["bare"][0]
    print(f"{'way':28s} {'tokens/s':>10s} {'/ bare':>8s} {'start-up s':>11s} {'teardown s':>11s}")
    for name, (steady, startup, teardown) in results.items():
        extra = f"{startup:11.1f} {teardown:11.1f}" if startup is not None else ""
        print(f"{name:28s} {steady:10.0f} {steady / base:8.3f} {extra}")


if __name__ == "__main__":
    main()
