"""The per-worker pre-training loop: what every Ray Train worker of a trial runs
(tunestab/ray_trial.py), and what `python -m tunestab.train` runs in this process.

A trial trains a population (`run_population`): members of one variant and size, each a `Member`
with its own model, optimizer, data order, random state and divergence rule, stepped in turn (or
stacked and stepped as one: tunestab/vectorised.py, `engine_for`) and reported together; `run`
is a population of one that reports on its own (docs/design.md, "Populations").

One step: the worker's share of the global batch, in micro-batches -> forward (+ probes on
report steps) -> backward (gradients accumulate; DDP all-reduces on the last micro-batch) ->
probes -> clip -> AdamW. Every `report_every` steps, and on checkpoint steps and the last step,
the worker reduces its metrics across ranks (mean loss, max of norms) and reports them.
Divergence ends a member cleanly, with a finite last report (`Divergence`).

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
from .vectorised import VectorisedEngine

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


def checkpoint_state(s: Setup, step: int, batches, divergence: Divergence, cfg: TrialConfig, rng=None) -> dict:
    """One member's part of a checkpoint: everything its next step depends on."""
    return {
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "step": step,
        "data": batches.state_dict(),
        "rng_cpu": torch.get_rng_state() if rng is None else rng,
        "rng_cuda": torch.cuda.get_rng_state_all() if s.device.type == "cuda" else [],
        "loss0": divergence.loss0,
        "recent_losses": divergence.recent,
        "best_loss": divergence.best,
        "config": cfg.to_dict(),
    }


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each a view of a larger tensor copied out (once per tensor: tied weights
    stay one). The vectorised engine's members hold views into tensors stacked over the whole
    population, and torch.save writes a view's whole storage."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, t in tensors.items():
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
            t = copies.setdefault(key, t.clone())
        out[k] = t
    return out


def engine_for(cfg: TrialConfig, device: torch.device, members: int) -> str:
    """The engine a population runs on (TrialConfig.engine): 'auto' vectorises two members or
    more on CUDA, where one proxy-sized model leaves the device idle, and steps them in turn on
    the CPU, where this engine measured 0.87-0.99x of interleaving at 1-8 members (docs/overhead.md)."""
    if cfg.engine != "auto":
        return cfg.engine
    return "vectorised" if device.type == "cuda" and members > 1 and cfg.dropout == 0 else "interleaved"


def member_states(state: dict) -> dict[str, dict]:
    """A checkpoint's members by id: a population's, or a one-trial checkpoint of an earlier
    version as member "0"."""
    return state["members"] if "members" in state else {"0": state}


def load_member(state: dict, s: Setup, batches, cfg: TrialConfig, unigram: float | None = None) -> Divergence:
    """Load one member's part of a checkpoint into its model, optimizer, data position and the
    global RNG; returns its divergence rule's state."""
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    torch.set_rng_state(state["rng_cpu"])
    if s.device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return Divergence(cfg, state["loss0"], state["recent_losses"], unigram, state.get("best_loss", math.inf))


def restore(
    session, s: Setup, batches, cfg: TrialConfig, unigram: float | None = None
) -> tuple[int, Divergence | None]:
    """Resume a one-member run from the newest readable checkpoint the session offers: (its step,
    the divergence rule's state), or (0, None) on a fresh start. The checkpoint is read to the
    CPU and each tensor copied to its parameter's device by load_state_dict."""
    state, _ = load_checkpoint(session.checkpoints_to_resume())
    if state is None:
        return 0, None
    (member,) = member_states(state).values()
    return state["step"], load_member(member, s, batches, cfg, unigram)


class Member:
    """One model of a population: its config, model and optimizer, data order, divergence rule,
    report window and random state. Members of a population share the data and the step count,
    and nothing else: each steps, reports and ends on its own numbers."""

    def __init__(self, mid: str, cfg: TrialConfig, session, device, data, unigram):
        train_tokens, self.val = data
        rank, world = session.rank, session.world_size
        self.id, self.cfg = mid, cfg
        self.micro = micro_batch(cfg, world)
        self.batches = data_mod.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        self.s = setup(cfg, device, session.wrap_ddp)  # seeds the global RNG with cfg.seed
        self.unigram = unigram
        self.divergence: Divergence | None = None
        self.window = Window(device)
        self.flops_per_token = training_flops_per_token(self.s.model)
        # This member's random state between its steps (dropout draws from it): on the CPU, and
        # on a GPU where dropout draws there, so that a member draws what it would draw alone.
        self.cuda_rng = device.type == "cuda" and cfg.dropout > 0
        self._save_rng()

    def _save_rng(self) -> None:
        self.rng = torch.get_rng_state()
        if self.cuda_rng:
            self.rng_cuda = torch.cuda.get_rng_state()

    def _load_rng(self) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state(self.rng_cuda)

    def resume(self, state: dict) -> None:
        self.divergence = load_member(state, self.s, self.batches, self.cfg, self.unigram)
        self._save_rng()

    def state(self, step: int) -> dict:
        state = checkpoint_state(self.s, step, self.batches, self.divergence, self.cfg, self.rng)
        state["model"] = own_storage(state["model"])
        if self.cuda_rng:  # this member's, not whichever member stepped last
            state["rng_cuda"] = [self.rng_cuda]
        return state

    def step(self, step: int, probe: bool) -> torch.Tensor | None:
        """One optimizer step; returns the probes on a report step. Everything stays on the device."""
        self._load_rng()
        for group in self.s.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        x, y = self.batches.next()
        device = self.s.device
        loss, self.grad_norm, probes = train_step(
            self.s, x.to(device, non_blocking=True), y.to(device, non_blocking=True), self.cfg, probe, self.micro
        )
        # Accumulated without a host sync: checked once per report, so a GPU never waits per step.
        self.window.add(loss, self.grad_norm, self.s.model, lr_at(step, self.cfg))
        self._save_rng()
        return probes

    def report(self, step: int, probes: dict, is_last: bool, world: int) -> tuple[dict, bool]:
        """The member's report at `step` (1-based), and whether it ends there (diverged, or its
        last step)."""
        cfg, divergence, window = self.cfg, self.divergence, self.window
        mean = all_reduce({"loss": window.loss_sum / window.steps, "bad": window.bad.float()}, dist.ReduceOp.SUM, world)
        # Per step summaries: TEV is the same on every rank; loss_max is the largest of any rank's.
        maxed = all_reduce({**probes, **window.maxima(), "grad_norm": self.grad_norm}, dist.ReduceOp.MAX, world)
        nonfinite = mean["bad"] > 0 or not math.isfinite(mean["loss"])
        reason = divergence.after_report(step, mean["loss"], nonfinite)
        val_loss = None
        if reason is None and (step % cfg.eval_every == 0 or is_last):
            val_loss = all_reduce({"v": evaluate(self.s, self.val, self.micro)}, dist.ReduceOp.SUM, world)["v"]
            if not math.isfinite(val_loss):
                reason = NONFINITE
            elif is_last:
                reason = divergence.at_end(val_loss)

        metrics = {k: finite(v) for k, v in maxed.items()}
        metrics.update(
            loss=mean["loss"] if math.isfinite(mean["loss"]) else divergence.loss0,
            loss_init=divergence.loss0,
            loss_floor=divergence.floor,
            step=step,
            tokens=step * cfg.batch_size * cfg.seq_len,
            lr=lr_at(step - 1, cfg),
            diverged=int(reason is not None),
            stop_reason=reason or (StopReason.COMPLETED.value if is_last else StopReason.RUNNING.value),
        )
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
        window.reset()
        return metrics, reason in (NONFINITE, BLOWUP, RANGE_END) or is_last


def check_population(cfgs: dict[str, TrialConfig]) -> None:
    """Members share the data and advance in lockstep: the same data, batch shape and steps."""
    shared = (
        "data",
        "tokenizer",
        "max_tokens",
        "val_fraction",
        "batch_size",
        "seq_len",
        "steps",
        "eval_batches",
        "engine",
    )
    first = next(iter(cfgs.values()))
    bad = [
        f"member {mid}: {k} = {getattr(c, k)!r}, not {getattr(first, k)!r} as the first member"
        for mid, c in cfgs.items()
        for k in shared
        if getattr(c, k) != getattr(first, k)
    ]
    if bad or not cfgs:
        raise ConfigError(bad or ["a population needs at least one member"], "population")


def run(cfg: TrialConfig, session) -> dict:
    """Train one trial on this worker: a population of one whose reports are its own (flat).
    Returns the last report (rank 0's view)."""
    return run_population({"0": cfg}, session, nested=False)["0"]


def run_population(cfgs: dict[str, TrialConfig], session, nested: bool = True) -> dict[str, dict]:
    """Train a population on this worker: members advance in lockstep, each on its own numbers,
    and one report per report step carries every member still training (`nested`:
    {"step", "members": {id: metrics}, ...}; else the one member's metrics). A member ends when
    it diverges, completes, or the session says it was stopped (`session.stopped`); a member that
    ended costs nothing more. Returns each member's last report."""
    began = time.perf_counter()  # for loop_s: the trial's own time, without the Ray start-up before it
    rank, world = session.rank, session.world_size
    cfgs = {mid: model_config(c) for mid, c in cfgs.items()}
    check_population(cfgs)
    first = next(iter(cfgs.values()))
    device = session.device(first)
    cuda = device.type == "cuda"
    train_tokens, val_tokens = data_mod.load_splits(
        first.data, first.tokenizer, data_mod.cache_dir(first), first.val_fraction, first.max_tokens or None
    )
    val = data_mod.eval_batches(val_tokens, first.batch_size, first.seq_len, first.eval_batches, rank, world)
    unigram = data_mod.unigram_entropy(train_tokens) if first.progress_floor == "unigram" else None
    members = {mid: Member(mid, c, session, device, (train_tokens, val), unigram) for mid, c in cfgs.items()}

    start = 0
    state, _ = load_checkpoint(session.checkpoints_to_resume())
    if state is not None:
        start, saved = state["step"], member_states(state)
        # A member missing from the checkpoint had ended before it: it is not trained again.
        members = {mid: m for mid, m in members.items() if mid in saved}
        for mid, m in members.items():
            m.resume(saved[mid])
    for m in members.values():
        if m.divergence is None:
            loss0 = all_reduce({"l": evaluate(m.s, val, m.micro)}, dist.ReduceOp.SUM, world)["l"]
            m.divergence = Divergence(m.cfg, loss0, unigram=unigram)
    active = dict(members)
    active = {mid: m for mid, m in active.items() if mid not in session.stopped(list(active))}
    vector = VectorisedEngine() if engine_for(first, device, len(members)) == "vectorised" else None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    peak = peak_flops(device)
    tokens_per_step = first.batch_size * first.seq_len
    timed_steps, timed_s, last = 0, 0.0, {}
    # The first step of each kind (with probes or without) builds its compiled graph, and on a
    # GPU initialises its kernels: it is left out of tokens_per_s and mfu.
    warm: set[bool] = set()
    tick = time.perf_counter()

    for step in range(start, first.steps):
        if not active:
            break
        is_last = step + 1 == first.steps
        is_ckpt = first.checkpoint_every and (step + 1) % first.checkpoint_every == 0
        is_report = (step + 1) % first.report_every == 0 or is_last or is_ckpt
        cold = is_report not in warm
        if cold:
            sync()
            timed_s += time.perf_counter() - tick
        if vector is not None:
            probes = vector.step(active, [lr_at(step, m.cfg) for m in active.values()], is_report, world)
        else:
            probes = {mid: m.step(step, is_report) for mid, m in active.items()}
        if cold:
            sync()
            warm.add(is_report)
            tick = time.perf_counter()
        else:
            timed_steps += 1
        if not is_report:
            continue

        # ---- report step: everything below is per report, not per step ----
        sync()
        timed_s += time.perf_counter() - tick
        reports, ended = {}, []
        for mid, m in active.items():
            metrics, ends = m.report(step + 1, probes[mid], is_last, world)
            if timed_steps:  # a window of compiling steps only has no throughput to report
                # How fast this member advanced: the population's steps, each carrying every member.
                metrics["tokens_per_s"] = timed_steps * tokens_per_step / max(timed_s, 1e-9)
                if peak:
                    metrics["mfu"] = m.flops_per_token * metrics["tokens_per_s"] * len(active) / world / peak
            metrics["resumed_from"] = start  # the checkpoint step this run continued from; 0 on a fresh start
            reports[mid] = metrics
            if ends:
                ended.append(mid)
        if nested:
            out = {
                "step": step + 1,
                "members": reports,
                "active": len(reports),  # members that trained to this step
                "population": len(members),
                # Seconds since this process entered the loop: data, models, steps, evals,
                # checkpoints. What the trial would cost without Ray; bench/search_overhead.py
                # sets it against the search's wall time.
                "loop_s": time.perf_counter() - began,
                "resumed_from": start,
            }
        else:
            (out,) = reports.values()
            out.update(loop_s=time.perf_counter() - began)
        for mid in ended:
            del active[mid]
        last.update(reports)

        with tempfile.TemporaryDirectory(prefix="tunestab-ckpt-") as tmp:
            ckpt_dir = None
            if is_ckpt and rank == 0 and active:
                if vector is not None:
                    vector.before_checkpoint()
                state = {"step": step + 1, "members": {mid: m.state(step + 1) for mid, m in active.items()}}
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, state, step + 1)
                ckpt_dir = tmp
            session.report(out, ckpt_dir)
        # Members the driver stopped (the TEV scheduler) since the last report end here.
        for mid in session.stopped(list(active)):
            del active[mid]
        timed_steps, timed_s = 0, 0.0
        tick = time.perf_counter()
    return last
