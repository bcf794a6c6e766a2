"""The per-worker pre-training loop: what every Ray Train worker of a trial runs
(tunestab/trainer.py), and what `python -m tunestab.train` runs in this process.

One step: the worker's share of the global batch, in micro-batches -> forward (+ probes on
report steps) -> backward (gradients accumulate; DDP all-reduces on the last micro-batch) ->
probes -> clip -> AdamW. Every `report_every` steps, and on checkpoint steps and the last step,
the worker reduces its metrics across ranks (mean loss, max of norms) and reports them.
Divergence ends the trial cleanly, with a finite last report (`Divergence`).

The loop needs torch and numpy only: ray, mlflow, optuna, datasets, pandas and matplotlib may
be absent, as on a bare CUDA image (tests/test_train.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as data_mod
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .compute import Setup, peak_flops, setup, training_flops_per_token
from .config import ConfigError, TrialConfig, batch_split_problem
from .metrics import finite
from .outcome import TEV_DISPERSION, TEV_MEAN, TEV_STD, StopReason, dispersion
from .probes import model_probes, tev_rows

# How the divergence rule ends a trial (plain str values: they travel in every report).
NONFINITE, BLOWUP, NO_PROGRESS, RANGE_END = (
    StopReason.NONFINITE.value,
    StopReason.BLOWUP.value,
    StopReason.NO_PROGRESS.value,
    StopReason.RANGE_END.value,
)


def lr_at(step: int, cfg: TrialConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to lr*min_lr_ratio; in a
    range test (lr_schedule 'range'), lr_range_start * (lr / lr_range_start)^(step / (steps - 1))."""
    if cfg.lr_schedule == "range":
        return cfg.lr_range_start * (cfg.lr / cfg.lr_range_start) ** (step / max(1, cfg.steps - 1))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class Divergence:
    """The loss-based divergence rule (docs/design.md, "Divergence"), evaluated on reported
    (all-reduced) values.

    - `nonfinite`: the loss or the gradient norm became NaN/inf (the trial ends);
    - `blowup`: after warm-up, the mean of the last `blowup_window` reported training losses is
      above the initial loss l0 + blowup_margin: worse than untrained (the trial ends);
    - `no_progress`: the final validation loss is not below the floor (marked at the end, the
      trial has already used its budget): l0 (Wortsman et al.'s clip), or with
      `progress_floor: unigram` the lower of l0 and the unigram entropy of the training tokens.
    - `range_end` (LR range tests only): the reported loss went below l0 and is now above it
      again. The test ends where the model has lost everything it learned, not at 4x the best
      loss as in fastai: a language model at uniform predictions starts at l0 = log V and never
      reaches 4x its best. Before the loss has gone below l0 nothing is judged: the first
      reports of a ramp from a tiny LR sit at l0, above or below it by noise.
    l0 is the validation loss at initialisation, measured before the first step.
    """

    def __init__(
        self,
        cfg: TrialConfig,
        loss0: float,
        recent: list[float] | None = None,
        unigram: float | None = None,
        best: float = math.inf,
    ):
        self.cfg, self.loss0 = cfg, loss0
        self.recent = list(recent or [])
        self.best = best  # the lowest reported loss, for range tests
        self.floor = min(loss0, unigram) if cfg.progress_floor == "unigram" and unigram is not None else loss0

    def after_report(self, step: int, loss: float, nonfinite: bool) -> str | None:
        if nonfinite:
            return NONFINITE
        if self.cfg.lr_schedule == "range":
            self.best = min(self.best, loss)
            if self.best < self.loss0 < loss:
                return RANGE_END
        if step <= self.cfg.warmup_steps:
            return None  # early spikes while the LR ramps up are not a verdict
        self.recent = (self.recent + [loss])[-self.cfg.blowup_window :]
        smoothed = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.cfg.blowup_window and smoothed > self.loss0 + self.cfg.blowup_margin:
            return BLOWUP
        return None

    def at_end(self, val_loss: float) -> str | None:
        if self.cfg.lr_schedule == "range":
            return None  # a range test that reached its top LR ends as `completed`
        return NO_PROGRESS if not val_loss < self.floor else None


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


class Window:
    """The steps since the last report, summarised on the device with no host sync per step: the
    mean and the largest training loss, whether anything went non-finite, and, from the token
    embedding after every step, the largest of

    - `tev_dispersion_max`: σ_TEV/μ_TEV, the spread of TEV across tokens;
    - `tev_growth_max`: the one-step growth of μ_TEV;
    - `tev_row_max`: max_i TEV_i / μ_TEV, the most extreme single token;
    - `embed_update_max`: the RMS of the embedding's one-step change over that step's LR (Adam
      moves each entry by about the LR; a far larger or smaller move is unusual).

    The loss and TEV are summarised alike (`loss_max`), so that a stopping rule on either sees
    the same steps: at a report every 10 steps, a lead shorter than a report would otherwise be
    invisible to both. Cost: two passes over the V x d embedding a step (docs/scheduler.md)."""

    NAMES = ("loss_max", "tev_dispersion_max", "tev_growth_max", "tev_row_max", "embed_update_max")

    def __init__(self, device: torch.device):
        self.device = device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.prev_mean = self.prev_embedding = None  # after the previous step, across reports
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.max = {name: torch.full((), -math.inf, device=self.device) for name in self.NAMES}

    def _keep(self, name: str, value: torch.Tensor) -> None:
        self.max[name] = torch.maximum(self.max[name], value)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, model, lr: float) -> None:
        embedding = model.token_embedding().detach()
        rows = tev_rows(embedding)
        mean = rows.mean()
        self.steps += 1
        self.loss_sum += loss
        self._keep("loss_max", loss)
        self._keep("tev_dispersion_max", rows.std(correction=0) / mean)
        self._keep("tev_row_max", rows.max() / mean)
        if self.prev_mean is not None:
            self._keep("tev_growth_max", mean - self.prev_mean)
            # In place in the buffer of the last step's embedding: no allocation a step.
            change = torch.linalg.vector_norm(self.prev_embedding.sub_(embedding)) / embedding.numel() ** 0.5
            self._keep("embed_update_max", change / lr)
            self.prev_embedding.copy_(embedding)
        else:
            self.prev_embedding = embedding.float().clone()
        self.prev_mean = mean
        self.bad |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)

    def maxima(self) -> dict[str, torch.Tensor]:
        """The per-step summaries, for a MAX all-reduce. A NaN stays NaN; a summary no step
        produced (the growth and the update need a step before, as after a resume) is left out."""
        return {k: v for k, v in self.max.items() if self.steps and not bool(v == -math.inf)}


def micro_batch(cfg: TrialConfig, world_size: int) -> int:
    """Sequences per forward/backward on one worker: micro_batch_size, or the worker's share."""
    problem = batch_split_problem(cfg.batch_size, cfg.micro_batch_size, world_size)
    if problem:
        raise ConfigError([problem], "trial config")
    return cfg.micro_batch_size or cfg.batch_size // world_size


@torch.no_grad()
def evaluate(s: Setup, batches, micro: int) -> torch.Tensor:
    """Mean validation loss over `batches`, through the plain model (no compiled graph to build
    for evaluation), in micro-batches as training runs."""
    s.model.eval()
    total = torch.zeros((), device=s.device)
    for x, y in batches:
        xs, ys = x.split(micro), y.split(micro)
        for xm, ym in zip(xs, ys):
            with s.autocast():
                total += s.model(xm.to(s.device), ym.to(s.device))[1].float() / len(xs)
    s.model.train()
    return total / len(batches)


def train_step(s: Setup, x, y, cfg: TrialConfig, probe: bool, micro: int = 0):
    """One optimizer step on the worker's batch (x, y), in micro-batches of `micro` sequences
    (0: all at once). Returns (mean loss, gradient norm before clipping, probes or None) as
    device tensors, with no host sync.

    Gradients accumulate over the micro-batches, each loss scaled by 1/n so that the sum is the
    batch mean; DDP all-reduces only in the last backward. With `probe`, the last micro-batch's
    forward records the per-layer statistics, and the probes are read after backward and before
    clipping (grad_var_embed is the raw gradient's variance).
    """
    xs, ys = (x.split(micro), y.split(micro)) if micro else ((x,), (y,))
    total = torch.zeros((), device=x.device)
    stats = None
    for i, (xm, ym) in enumerate(zip(xs, ys)):
        last = i == len(xs) - 1
        stats = {} if probe and last else None
        with contextlib.nullcontext() if last else s.no_sync():
            with s.autocast():
                _, loss = s.step_model(xm, ym, stats)
            (loss / len(xs)).backward()
        total += loss.detach()
    probes = model_probes(s.model, stats, cfg.probe_grad_var) if probe else None
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), max_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total / len(xs), grad_norm, probes


def model_config(cfg: TrialConfig) -> TrialConfig:
    """The resolved config, with vocab_size taken from the tokenizer when it is 0."""
    vocab = cfg.vocab_size or data_mod.get_tokenizer(cfg.tokenizer).n_vocab
    return dataclasses.replace(cfg, vocab_size=vocab).resolved()


def checkpoint_state(s: Setup, step: int, batches, divergence: Divergence, cfg: TrialConfig) -> dict:
    return {
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "step": step,
        "data": batches.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if s.device.type == "cuda" else [],
        "loss0": divergence.loss0,
        "recent_losses": divergence.recent,
        "best_loss": divergence.best,
        "config": cfg.to_dict(),
    }


def restore(
    session, s: Setup, batches, cfg: TrialConfig, unigram: float | None = None
) -> tuple[int, Divergence | None]:
    """Resume from the newest readable checkpoint the session offers: (its step, the divergence
    rule's state), or (0, None) on a fresh start. The checkpoint is read to the CPU and each
    tensor copied to its parameter's device by load_state_dict."""
    state, _ = load_checkpoint(session.checkpoints_to_resume())
    if state is None:
        return 0, None
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    torch.set_rng_state(state["rng_cpu"])
    if s.device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], Divergence(
        cfg, state["loss0"], state["recent_losses"], unigram, state.get("best_loss", math.inf)
    )


def run(cfg: TrialConfig, session) -> dict:
    """Train one trial on this worker. Returns the last report (rank 0's view)."""
    began = time.perf_counter()  # for loop_s: the trial's own time, without the Ray start-up before it
    rank, world = session.rank, session.world_size
    device = session.device(cfg)
    cuda = device.type == "cuda"
    cfg = model_config(cfg)
    micro = micro_batch(cfg, world)
    train_tokens, val_tokens = data_mod.load_splits(
        cfg.data, cfg.tokenizer, data_mod.cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None
    )
    batches = data_mod.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    val = data_mod.eval_batches(val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches, rank, world)

    s = setup(cfg, device, session.wrap_ddp)
    unigram = data_mod.unigram_entropy(train_tokens) if cfg.progress_floor == "unigram" else None
    start, divergence = restore(session, s, batches, cfg, unigram)
    if divergence is None:
        loss0 = all_reduce({"l": evaluate(s, val, micro)}, dist.ReduceOp.SUM, world)["l"]
        divergence = Divergence(cfg, loss0, unigram=unigram)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    peak = peak_flops(device)
    flops_per_token = training_flops_per_token(s.model)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    window = Window(device)
    timed_steps, timed_s, last = 0, 0.0, None
    # The first step of each kind (with probes or without) builds its compiled graph, and on a
    # GPU initialises its kernels: it is left out of tokens_per_s and mfu.
    warm: set[bool] = set()
    tick = time.perf_counter()

    for step in range(start, cfg.steps):
        for group in s.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        is_last = step + 1 == cfg.steps
        is_ckpt = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        is_report = (step + 1) % cfg.report_every == 0 or is_last or is_ckpt
        cold = is_report not in warm
        if cold:
            sync()
            timed_s += time.perf_counter() - tick
        x, y = batches.next()
        loss, grad_norm, probes = train_step(
            s, x.to(device, non_blocking=True), y.to(device, non_blocking=True), cfg, is_report, micro
        )
        if cold:
            sync()
            warm.add(is_report)
            tick = time.perf_counter()
        else:
            timed_steps += 1
        # Accumulated without a host sync: checked once per report, so a GPU never waits per step.
        window.add(loss, grad_norm, s.model, lr_at(step, cfg))
        if not is_report:
            continue

        # ---- report step: everything below is per report, not per step ----
        sync()
        timed_s += time.perf_counter() - tick
        mean = all_reduce({"loss": window.loss_sum / window.steps, "bad": window.bad.float()}, dist.ReduceOp.SUM, world)
        # Per step summaries: TEV is the same on every rank; loss_max is the largest of any rank's.
        maxed = all_reduce({**probes, **window.maxima(), "grad_norm": grad_norm}, dist.ReduceOp.MAX, world)
        nonfinite = mean["bad"] > 0 or not math.isfinite(mean["loss"])
        reason = divergence.after_report(step + 1, mean["loss"], nonfinite)
        val_loss = None
        if reason is None and ((step + 1) % cfg.eval_every == 0 or is_last):
            val_loss = all_reduce({"v": evaluate(s, val, micro)}, dist.ReduceOp.SUM, world)["v"]
            if not math.isfinite(val_loss):
                reason = NONFINITE
            elif is_last:
                reason = divergence.at_end(val_loss)

        metrics = {k: finite(v) for k, v in maxed.items()}
        metrics.update(
            loss=mean["loss"] if math.isfinite(mean["loss"]) else divergence.loss0,
            loss_init=divergence.loss0,
            loss_floor=divergence.floor,
            step=step + 1,
            tokens=(step + 1) * tokens_per_step,
            lr=lr_at(step, cfg),
            resumed_from=start,  # the checkpoint step this run continued from; 0 on a fresh start
            # Seconds since this process entered the loop: data, model, steps, evals, checkpoints.
            # What the trial would cost without Ray; bench/search_overhead.py sets it against the
            # search's wall time.
            loop_s=time.perf_counter() - began,
            diverged=int(reason is not None),
            stop_reason=reason or (StopReason.COMPLETED.value if is_last else StopReason.RUNNING.value),
        )
        if timed_steps:  # a window of compiling steps only has no throughput to report
            metrics["tokens_per_s"] = timed_steps * tokens_per_step / max(timed_s, 1e-9)
            if peak:
                metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / world / peak
        if metrics.get(TEV_MEAN):  # the scheduler's and the charts' sigma/mu, computed once, here
            metrics[TEV_DISPERSION] = dispersion(metrics[TEV_MEAN], metrics[TEV_STD])
        if val_loss is not None:
            metrics["val_loss"] = finite(val_loss) if reason != NONFINITE else divergence.loss0
        elif reason is not None:
            # A diverged trial's validation loss is l0 (Wortsman et al.'s clip), never NaN.
            metrics["val_loss"] = divergence.loss0
        if cfg.lr_schedule == "range" and (reason is not None or is_last):
            # Where the range test ended: the LR of this report's last step.
            metrics["range_lr"] = metrics["lr"]
        ends = reason in (NONFINITE, BLOWUP, RANGE_END) or is_last

        with tempfile.TemporaryDirectory(prefix="tunestab-ckpt-") as tmp:
            ckpt_dir = None
            if is_ckpt and rank == 0 and not ends:
                save_checkpoint(
                    Path(tmp) / CHECKPOINT_FILE, checkpoint_state(s, step + 1, batches, divergence, cfg), step + 1
                )
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
        last = metrics
        if ends:
            break
        window.reset()
        timed_steps, timed_s = 0, 0.0
        tick = time.perf_counter()
    return last
