"""The per-worker pre-training loop, and `python -m tunestab.train` to run one trial.

    python -m tunestab.train                                   # baseline, CPU, offline data, no Ray
    python -m tunestab.train --variant qk_norm_cap --set lr=3e-2 --set n_layer=8
    python -m tunestab.train --workers 2                       # the same loop in a Ray TorchTrainer

`train_loop_per_worker` is what Ray Train runs on every worker of a trial. Without Ray the same
`run()` runs in-process with a `LocalSession`, printing each report as one JSON line.

One step: next batch -> forward (+ probes on report steps) -> backward -> clip -> AdamW.
Every `report_every` steps, and on checkpoint steps and the last step, the worker reduces its
metrics across ranks (mean loss, max of norms) and reports them. Divergence ends the trial
cleanly, with a finite last report: see `Divergence` below and DESIGN.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as data_mod
from .config import ConfigError, TrialConfig, config_from
from .model import GPT
from .probes import model_probes

CHECKPOINT_FILE = "checkpoint.pt"
# Metrics that hold a finite stand-in when the real value is NaN/inf (DESIGN.md: never NaN).
FINITE_CAP = 1e30
# Ray Train V2's controller takes one report off each worker's size-1 queue per poll, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), so reports faster than that block the worker:
# 0.42x bare-loop speed at 2 s. Polling every 0.1 s costs CPU on small machines (0.80-0.88x);
# 0.5 s gave 0.89-0.93x for ~1 s more teardown. Measurements: docs/overhead.md.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Checkpoints Ray Train keeps per trial: the latest, and the one before it to fall back on when
# the latest cannot be read. All of them would fill a disk (GPT-2 small with AdamW state: 1.5 GB
# each).
KEEP_CHECKPOINTS = 2

# Peak dense bf16 FLOP/s per accelerator, matched against torch.cuda.get_device_name().
# The H100 value is the SXM part; PCIe H100s are slower, so their MFU reads low, never above 100%.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of those to resume from can be read."""


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def training_flops_per_token(model, cfg: TrialConfig) -> float:
    """6N for the matmuls with weights (N without the position embedding, which is a lookup),
    plus 12·L·d·T for attention's two T×T products (PaLM, appendix B): the MFU numerator."""
    return 6 * (model.num_params() - model.wpe.weight.numel()) + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len


def lr_at(step: int, cfg: TrialConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def finite(x: float) -> float:
    return x if math.isfinite(x) else FINITE_CAP


# --------------------------------------------------------------------------------------------
# where reports and checkpoints go


class LocalSession:
    """One process, no Ray: reports become JSON lines; checkpoints are copied to checkpoint_dir."""

    rank, world_size = 0, 1

    def __init__(self, checkpoint_dir: str | None = None, resume_from: str | None = None, out=None):
        self.checkpoint_dir, self.resume_from = checkpoint_dir, resume_from
        self.out = out or sys.stdout
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        print(json.dumps(metrics), file=self.out, flush=True)
        if checkpoint_dir and self.checkpoint_dir:
            target = Path(self.checkpoint_dir) / f"step_{metrics['step']:06d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)

    def checkpoints_to_resume(self):
        """resume_from, then the older step_NNNNNN folders beside it, newest first."""
        if not self.resume_from:
            return
        chosen = Path(self.resume_from)
        yield str(chosen)
        if chosen.name.startswith("step_"):
            yield from (str(p) for p in sorted(chosen.parent.glob("step_*"), reverse=True) if p.name < chosen.name)


class RaySession:
    """Inside a Ray Train worker: ray.train.report, ray.train.get_checkpoint."""

    def __init__(self, echo: bool = False):
        import ray.train

        self._train, self.echo = ray.train, echo
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._tmp = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        if self.echo and self.rank == 0:
            print(json.dumps(metrics), flush=True)
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            self._train.report(metrics, checkpoint=ckpt)
        except OSError as e:  # the upload to storage: a full disk, a lost mount
            raise CheckpointError(f"cannot store the checkpoint of step {metrics['step']}: {e}; "
                                  "the previous checkpoint is untouched") from e

    def checkpoints_to_resume(self):
        """Ray Train's latest checkpoint, then the older ones of the same run (CheckpointConfig
        keeps KEEP_CHECKPOINTS), newest first, each copied to a local folder only when asked for,
        so that loading does not depend on the storage backend."""
        latest = self._train.get_checkpoint()
        if latest is None:
            return
        for checkpoint in [latest, *older_checkpoints(latest)]:
            # Removed with the session (TemporaryDirectory cleans up when collected or at exit).
            tmp = tempfile.TemporaryDirectory(prefix="tunestab-resume-")
            self._tmp.append(tmp)
            try:
                checkpoint.to_directory(tmp.name)
            except OSError as e:
                print(f"warning: cannot fetch checkpoint {checkpoint.path}: {e}", file=sys.stderr)
                continue
            yield tmp.name


def older_checkpoints(latest):
    """The checkpoints of the same Ray Train run older than `latest`, newest first. Ray Train
    names them checkpoint_<timestamp>, so their names sort by age; a checkpoint whose upload
    failed sorts after `latest` and is never offered."""
    import pyarrow.fs
    from ray.train import Checkpoint

    parent, name = os.path.split(latest.path.rstrip("/"))
    try:
        infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((os.path.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory), reverse=True)
    return [Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem) for n in names
            if n.startswith("checkpoint_") and n < name]


# --------------------------------------------------------------------------------------------
# divergence


class Divergence:
    """The loss-based divergence rule of DESIGN.md, evaluated on reported (all-reduced) values.

    - `nonfinite`: the loss or the gradient norm became NaN/inf (the trial ends);
    - `blowup`: after warm-up, the mean of the last `blowup_window` reported training losses is
      above the initial loss l0 + blowup_margin: worse than untrained (the trial ends);
    - `no_progress`: the final validation loss is not below l0 (Wortsman et al.'s clip; marked at
      the end, the trial has already used its budget).
    l0 is the validation loss at initialisation, measured before the first step.
    """

    def __init__(self, cfg: TrialConfig, loss0: float, recent: list[float] | None = None):
        self.cfg, self.loss0 = cfg, loss0
        self.recent = list(recent or [])

    def after_report(self, step: int, loss: float, nonfinite: bool) -> str | None:
        if nonfinite:
            return "nonfinite"
        if step <= self.cfg.warmup_steps:
            return None  # early spikes while the LR ramps up are not a verdict
        self.recent = (self.recent + [loss])[-self.cfg.blowup_window:]
        smoothed = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.cfg.blowup_window and smoothed > self.loss0 + self.cfg.blowup_margin:
            return "blowup"
        return None

    def at_end(self, val_loss: float) -> str | None:
        return "no_progress" if not val_loss < self.loss0 else None


# --------------------------------------------------------------------------------------------
# the loop


def resolve_device(cfg: TrialConfig, session) -> torch.device:
    if isinstance(session, RaySession):
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def all_reduce(values: dict[str, torch.Tensor], op, world_size: int) -> dict[str, float]:
    """One collective for a dict of 0-d tensors; SUM is turned into a mean."""
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if world_size > 1:
        dist.all_reduce(packed, op=op)
        if op == dist.ReduceOp.SUM:
            packed /= world_size
    return dict(zip(keys, packed.tolist()))


@torch.no_grad()
def evaluate(model: GPT, batches, device, autocast) -> torch.Tensor:
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast():
            total += model(x.to(device), y.to(device))[1].float()
    model.train()
    return total / len(batches)


def save_checkpoint(path: Path, model: GPT, optimizer, step: int, batches, divergence: Divergence,
                    cfg: TrialConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data": batches.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loss0": divergence.loss0,
        "recent_losses": divergence.recent,
        "config": cfg.to_dict(),
    }
    tmp = path.with_suffix(".tmp")
    try:
        # Through a Python file, so that a failed write raises OSError with its errno ("No
        # space left on device"); torch.save(state, path) reports only a position mismatch.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint.pt
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint of step {step} to {path.parent}: {e}; "
                              "the previous checkpoint is untouched") from e


def load_checkpoint(folders, device) -> tuple[dict, str]:
    """The first readable checkpoint of `folders` (newest first) and its folder. A truncated or
    corrupt one is skipped with a warning: the one before it is still a good place to resume."""
    bad = []
    for folder in folders:
        path = Path(folder) / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            # torch's first sentence says what failed; the rest is advice the message gives anyway.
            why = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
            bad.append(f"{path}: unreadable (truncated or corrupt?): {why}")
            continue
        for line in bad:
            print(f"warning: skipping checkpoint {line}", file=sys.stderr)
        return state, str(folder)
    if bad:
        raise CheckpointError("no readable checkpoint to resume from:\n  - " + "\n  - ".join(bad))
    return None, None


def train_step(model: GPT, step_model, optimizer, x, y, cfg: TrialConfig, autocast, probe: bool):
    """One optimizer step. Returns (loss, grad_norm, probes or None) as device tensors, no sync.

    `step_model` is what runs the step (compiled and/or DDP-wrapped); `model` the plain module
    the probes read. With `probe`, the forward pass also records the per-layer statistics.
    """
    stats = {} if probe else None
    with autocast():
        _, loss = step_model(x, y, stats)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    probes = model_probes(model, stats, cfg.probe_grad_var) if probe else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm, probes


def model_config(cfg: TrialConfig) -> TrialConfig:
    """The resolved config, with vocab_size taken from the tokenizer when it is 0."""
    vocab = cfg.vocab_size or data_mod.get_tokenizer(cfg.tokenizer).n_vocab
    return dataclasses.replace(cfg, vocab_size=vocab).resolved()


def cache_dir(cfg: TrialConfig) -> str:
    return cfg.data_cache or os.path.join(os.path.expanduser("~"), ".cache", "tunestab")


def run(cfg: TrialConfig, session) -> dict:
    """Train one trial on this worker. Returns the last report (rank 0's view)."""
    rank, world = session.rank, session.world_size
    device = resolve_device(cfg, session)
    cuda = device.type == "cuda"
    cfg = model_config(cfg)
    train_tokens, val_tokens = data_mod.load_splits(cfg.data, cfg.tokenizer, cache_dir(cfg), cfg.val_fraction,
                                                    cfg.max_tokens or None)
    batches = data_mod.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    val = data_mod.eval_batches(val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches, rank, world)

    torch.manual_seed(cfg.seed)  # same init on every rank, and the same as a 1-worker run
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cuda)
    use_bf16 = cuda and cfg.bf16

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)

    start, divergence = 0, None
    state, _ = load_checkpoint(session.checkpoints_to_resume(), device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"])
        if cuda and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start = state["step"]
        divergence = Divergence(cfg, state["loss0"], state["recent_losses"])

    step_model = model
    if cuda and cfg.compile:
        step_model = torch.compile(model)
    if world > 1:
        import ray.train.torch

        step_model = ray.train.torch.prepare_model(step_model, move_to_device=False)
    if divergence is None:
        loss0 = all_reduce({"l": evaluate(model, val, device, autocast)}, dist.ReduceOp.SUM, world)["l"]
        divergence = Divergence(cfg, loss0)

    peak = peak_flops(device)
    flops_per_token = training_flops_per_token(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    loss_sum = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    window_steps, window_time, last = 0, 0.0, None
    tick = time.perf_counter()

    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        is_last = step + 1 == cfg.steps
        is_ckpt = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        is_report = (step + 1) % cfg.report_every == 0 or is_last or is_ckpt
        x, y = batches.next()
        loss, grad_norm, probes = train_step(model, step_model, optimizer, x.to(device, non_blocking=True),
                                             y.to(device, non_blocking=True), cfg, autocast, is_report)
        # Accumulated without a host sync: checked once per report, so a GPU never waits per step.
        loss_sum += loss
        bad |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        window_steps += 1
        if not is_report:
            continue

        # ---- report step: everything below is per report, not per step ----
        if cuda:
            torch.cuda.synchronize()
        window_time += time.perf_counter() - tick
        mean = all_reduce({"loss": loss_sum / window_steps, "bad": bad.float()}, dist.ReduceOp.SUM, world)
        maxed = all_reduce({**probes, "grad_norm": grad_norm}, dist.ReduceOp.MAX, world)
        nonfinite = mean["bad"] > 0 or not math.isfinite(mean["loss"])
        reason = divergence.after_report(step + 1, mean["loss"], nonfinite)
        val_loss = None
        if reason is None and ((step + 1) % cfg.eval_every == 0 or is_last):
            val_loss = all_reduce({"v": evaluate(model, val, device, autocast)}, dist.ReduceOp.SUM, world)["v"]
            if not math.isfinite(val_loss):
                reason = "nonfinite"
            elif is_last:
                reason = divergence.at_end(val_loss)

        tokens_per_s = window_steps * tokens_per_step / max(window_time, 1e-9)
        metrics = {k: finite(v) for k, v in maxed.items()}
        metrics.update(
            loss=mean["loss"] if math.isfinite(mean["loss"]) else divergence.loss0,
            loss_init=divergence.loss0,
            step=step + 1,
            tokens=(step + 1) * tokens_per_step,
            lr=lr_at(step, cfg),
            tokens_per_s=tokens_per_s,
            resumed_from=start,  # the checkpoint step this run continued from; 0 on a fresh start
            diverged=int(reason is not None),
            stop_reason=reason or ("completed" if is_last else "running"),
        )
        if val_loss is not None:
            metrics["val_loss"] = finite(val_loss) if reason != "nonfinite" else divergence.loss0
        elif reason is not None:
            # A diverged trial's validation loss is l0 (Wortsman et al.'s clip), never NaN.
            metrics["val_loss"] = divergence.loss0
        if peak:
            metrics["mfu"] = flops_per_token * tokens_per_s / world / peak
        ends = reason in ("nonfinite", "blowup") or is_last

        with tempfile.TemporaryDirectory(prefix="tunestab-ckpt-") as tmp:
            ckpt_dir = None
            if is_ckpt and rank == 0 and not ends:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, model, optimizer, step + 1, batches, divergence, cfg)
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
        last = metrics
        if ends:
            break
        loss_sum.zero_()
        window_steps, window_time = 0, 0.0
        tick = time.perf_counter()
    return last


# --------------------------------------------------------------------------------------------
# Ray Train


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker: config = {"trial": TrialConfig fields, "echo": bool,
    "quiet": bool}."""
    if config.get("quiet"):
        quiet_report_logs()
    run(TrialConfig(**config["trial"]), RaySession(echo=config.get("echo", False)))


def quiet_report_logs() -> None:
    """Ray Train V2 (2.60) logs every report with all its metrics at INFO from a logger named
    after its source file, so `LoggingConfig(log_level=...)`, which filters `ray.train.*`, misses
    it; in a search that is one screen-wide line per report per trial."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray version: the logs are noisy, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_with_ray(cfg: TrialConfig, workers: int, use_gpu: bool, storage: str | None, name: str | None,
                 max_failures: int = 0, loop=train_loop_per_worker, extra: dict | None = None):
    """One trial through TorchTrainer on `workers` workers (Ray started locally if needed).

    A worker failure restarts the worker group up to `max_failures` times; `run` then resumes
    from the last checkpoint reported through Ray Train.
    """
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": RAY_TRAIN_ENV}, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    return torch_trainer(loop, {"trial": cfg.to_dict(), "echo": True, **(extra or {})}, workers,
                         gpus_per_worker=1.0 if use_gpu else 0.0, storage=storage, name=name,
                         max_failures=max_failures).fit()


def torch_trainer(loop, loop_config: dict, workers: int, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0, storage: str | None = None, name: str | None = None,
                  max_failures: int = 0, callbacks=(), log_level: str = "INFO"):
    """The TorchTrainer of one trial: `workers` ranks (gloo on CPU, NCCL on GPUs), restarted from
    the last checkpoint up to `max_failures` times. `log_level` filters Ray Train's console logs
    (at INFO every worker prints each report with all its metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = float(gpus_per_worker)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": float(cpus_per_worker),
                                                           **({"GPU": gpus} if gpus else {})}),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(storage_path=storage, name=name, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             callbacks=list(callbacks), logging_config=LoggingConfig(log_level=log_level)),
    )


def trial_driver(config: dict) -> None:
    """One Ray Tune trial: a small driver that runs the trial's TorchTrainer (Ray Train V2).

    `config` holds TrialConfig fields (what the search samples, flat, so that Optuna and MLflow
    see plain names) and `runner`: {"workers", "cpus_per_worker", "gpus_per_worker",
    "max_failures", "storage"}. Rank 0's reports reach Tune through TuneReportCallback.

    The Train run lives at `<runner.storage>/<trial id>`, a path that outlives this process: Tune
    hands a function trial a staging directory under the Ray session (`get_trial_dir()`), which
    a new session after `--resume` does not have, so a restored trial would start from scratch
    instead of from its last checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    runner = dict(config.get("runner") or {})
    cfg = config_from({k: v for k, v in config.items() if k != "runner"}, "trial config")
    torch_trainer(train_loop_per_worker, {"trial": cfg.to_dict(), "quiet": True}, int(runner.get("workers", 1)),
                  cpus_per_worker=runner.get("cpus_per_worker", 1), gpus_per_worker=runner.get("gpus_per_worker", 0),
                  storage=runner.get("storage") or ray.tune.get_context().get_trial_dir(),
                  name=ray.tune.get_context().get_trial_id(),
                  max_failures=int(runner.get("max_failures", 0)), callbacks=[TuneReportCallback()],
                  # Tune's progress table and MLflow show the metrics; one line per report per
                  # trial in the console would bury them.
                  log_level="WARNING").fit()


# --------------------------------------------------------------------------------------------
# command line


def parse_overrides(pairs: list[str]) -> dict:
    out, bad = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            bad.append(f"--set {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    if bad:
        raise ConfigError(bad, "command line")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tunestab.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default=None, help="baseline, qk_norm, softcap, qk_norm_cap, qk_fc_norm, "
                                                    "qkv_norm, mlra or sigma_reparam (default baseline)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any TrialConfig field, e.g. --set lr=3e-2 --set n_layer=8 (repeatable)")
    ap.add_argument("--workers", type=int, default=0,
                    help="run through Ray TorchTrainer on N workers (0: in this process, no Ray)")
    ap.add_argument("--gpu", action="store_true", help="with --workers: one GPU per worker")
    ap.add_argument("--checkpoint-dir", help="without Ray: copy each checkpoint here (step_NNNNNN/)")
    ap.add_argument("--resume-from", help="without Ray: a step_NNNNNN checkpoint directory to resume from")
    ap.add_argument("--storage", help="with --workers: Ray Train storage path (default ~/ray_results)")
    args = ap.parse_args(argv)

    try:
        values = parse_overrides(args.overrides)
        if args.variant:
            values["variant"] = args.variant
        cfg = config_from(values, "trial config")
        if args.workers < 0:
            raise ConfigError([f"--workers: must be >= 0, got {args.workers}"], "command line")
        if args.resume_from and not (Path(args.resume_from) / CHECKPOINT_FILE).is_file():
            raise ConfigError([f"--resume-from: no {CHECKPOINT_FILE} in {args.resume_from}"], "command line")
        if args.resume_from:
            try:
                load_checkpoint(LocalSession(resume_from=args.resume_from).checkpoints_to_resume(), "cpu")
            except CheckpointError as e:
                raise ConfigError([f"--resume-from: {e}"], "command line") from None
        # Fail on data and tokenizer problems here, before any training or Ray start-up; the
        # tokenised result is cached, so workers load it instead of tokenising again.
        data_mod.load_splits(cfg.data, cfg.tokenizer, cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None)
    except (ConfigError, data_mod.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.workers:
        result = run_with_ray(cfg, args.workers, args.gpu, args.storage, None)
        if result.error:
            print(f"error: trial failed: {result.error}", file=sys.stderr)
            return 1
        return 0
    try:
        run(cfg, LocalSession(args.checkpoint_dir, args.resume_from))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
