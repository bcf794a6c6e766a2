"""The vectorised engine: a population's members stepped as one model with a member dimension.

Each member keeps its own model, optimizer, data order and divergence rule (`loop.Member`), but
its parameters and buffers become views into tensors stacked over the active members, with the
member first. One step is then one forward and one backward over all members at once,
`torch.func.vmap` of `functional_call` on the stacked tensors, followed by a per-member
gradient clip and AdamW written on the stacked tensors, with each member's LR and weight decay.
On a GPU this launches the kernels of one model for K models; a proxy-sized model alone leaves
the device nearly idle (not measured yet: bench/gpu_check.py part f). On a 2-core CPU it
measured 0.87-0.99x of stepping the members in turn at 1-8 members (docs/overhead.md), so there
the interleaved engine is the default.

What a member sees is what it would see alone, up to float rounding: the same initialisation,
data, clipping and AdamW (torch's single-tensor AdamW, reproduced per member), and every probe
of its own. Nothing is shared between members: a member that goes NaN changes no other's
numbers. The members' own optimizers are kept in step only when a checkpoint is written
(`member_state`), so a checkpoint has the interleaved engine's format, and either engine
resumes it. Dropout is refused (config.py): under vmap a member would draw other numbers than
alone.

Capped attention runs the plain kernel here (FlexAttention does not vmap), and scaled dot
product attention on the CPU takes vmap's slow per-member fallback: the CPU is not where this
engine is for.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.distributed as dist
from torch.func import functional_call, vmap

from .probes import model_probes

# vmap's note that CPU attention has no batching rule (it loops over members): expected here.
SDPA_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"


def _views(module: torch.nn.Module, stacked: dict[str, torch.Tensor], k: int, buffers: bool) -> None:
    """Point a member's parameters (or buffers) at its slice of the stacked tensors."""
    named = module.named_buffers() if buffers else module.named_parameters()
    for name, t in named:
        if name in stacked:
            t.data = stacked[name].data[k]


class Stack:
    """The active members of a population as stacked tensors, and their AdamW state."""

    def __init__(self, members: list) -> None:
        self.members = members
        first = members[0]
        # The function's module: a copy of the first member, its own weights swapped out for the
        # stacked ones at each call; tied weights stay tied (functional_call's tie_weights), and
        # no FlexAttention mask (it does not vmap).
        self.template = copy.deepcopy(first.s.model)
        self.template.set_block_mask(None)
        self.names = [n for n, _ in first.s.model.named_parameters()]  # a tied weight once
        self.buffer_names = [n for n, _ in first.s.model.named_buffers()]
        self.bf16, self.device = first.s.bf16, first.s.device
        # With `compile`, the vmapped forward is compiled as a whole (once with probes, once
        # without), as the interleaved engine compiles each member's model.
        self.compiled, self.functions = first.s.compiled, {}
        self.params = {n: self._stack(m.s.model.get_parameter(n) for m in members).requires_grad_() for n in self.names}
        self.buffers = {n: self._stack(m.s.model.get_buffer(n) for m in members) for n in self.buffer_names}
        self.exp_avg, self.exp_avg_sq, self.steps = self._adam_state()
        for k, m in enumerate(members):
            _views(m.s.model, self.params, k, buffers=False)
            _views(m.s.model, self.buffers, k, buffers=True)
        # Which parameters decay, and by how much per member: param_groups' rule (matrices and
        # embeddings), with each member's own weight decay.
        self.decays = {n: first.s.model.get_parameter(n).dim() >= 2 for n in self.names}
        self.weight_decay = [m.s.optimizer.param_groups[0]["weight_decay"] for m in members]
        group = first.s.optimizer.param_groups[0]
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]

    @staticmethod
    def _stack(tensors) -> torch.Tensor:
        return torch.stack([t.detach() for t in tensors])

    def _adam_state(self):
        """Each member's AdamW moments and step count, from its own optimizer (a fresh one has
        none yet: zeros, step 0)."""
        avg, sq, steps = {}, {}, []
        for m in self.members:
            state = m.s.optimizer.state
            p0 = m.s.model.get_parameter(self.names[0])
            steps.append(int(state[p0]["step"]) if p0 in state else 0)
        for n in self.names:
            ps = [m.s.model.get_parameter(n) for m in self.members]
            states = [m.s.optimizer.state.get(p) for m, p in zip(self.members, ps)]
            avg[n] = torch.stack([s["exp_avg"] if s else torch.zeros_like(p) for s, p in zip(states, ps)])
            sq[n] = torch.stack([s["exp_avg_sq"] if s else torch.zeros_like(p) for s, p in zip(states, ps)])
        return avg, sq, steps

    def _loss(self, probe: bool):
        """(params, buffers, xs, ys) -> (each member's loss (K,), its probes' stats (K,) each)."""
        if probe not in self.functions:

            def one(params, buffers, x, y):
                stats = {} if probe else None
                _, loss = functional_call(self.template, (params, buffers), (x, y, stats))
                return loss, stats or {}

            fn = vmap(one, in_dims=(0, 0, 0, 0), randomness="error")
            self.functions[probe] = torch.compile(fn) if self.compiled else fn
        return self.functions[probe]

    def _per_member(self, values) -> torch.Tensor:
        """Per-member floats as one (K,) tensor, rounded to fp32 once, as a Python scalar is when
        it multiplies a tensor. `rows` shapes it to broadcast over a stacked tensor."""
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    @staticmethod
    def rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(K,) values as (K, 1, ...): one per member row of `like`."""
        return values.view(-1, *[1] * (like.dim() - 1))

    def step(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor,
        lrs: list[float],
        clip: list[float],
        probe: bool,
        micro: int,
        world: int,
    ):
        """One optimizer step of every member on its batch (xs[k], ys[k]), in micro-batches of
        `micro` sequences. Returns (losses (K,), gradient norms before clipping (K,), each
        member's probes or None)."""
        K = len(self.members)
        n = xs.size(1)
        micro = micro or n
        total = torch.zeros(K, device=xs.device)
        stats = None
        for g in self.params.values():
            g.grad = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SDPA_FALLBACK)
            for s in range(0, n, micro):
                last = s + micro >= n
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, st = self._loss(probe and last)(
                        self.params, self.buffers, xs[:, s : s + micro], ys[:, s : s + micro]
                    )
                (loss.sum() / math.ceil(n / micro)).backward()
                total += loss.detach()
                if probe and last:
                    stats = st
        # A parameter the loss did not reach has no gradient, and AdamW leaves it alone, as
        # torch's does.
        grads = {name: p.grad for name, p in self.params.items() if p.grad is not None}
        if world > 1:  # data parallel: every rank holds every member; average their gradients
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= world
        probes = None
        if probe:
            probes = []
            for k, m in enumerate(self.members):
                for name, p in m.s.model.named_parameters():
                    p.grad = grads[name][k] if name in grads else None
                probes.append(model_probes(m.s.model, {key: v[k] for key, v in stats.items()}, m.cfg.probe_grad_var))
                for p in m.s.model.parameters():
                    p.grad = None
        norms = self._clip(grads, clip)
        self._adamw(grads, lrs)
        return total / math.ceil(n / micro), norms, probes

    @torch.no_grad()
    def _clip(self, grads: dict[str, torch.Tensor], clip: list[float]) -> torch.Tensor:
        """clip_grad_norm_ per member: the norm over all of a member's gradients, each scaled
        by min(1, max_norm / (norm + 1e-6))."""
        per_param = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads.values()], dim=1)
        norms = torch.linalg.vector_norm(per_param, dim=1)
        coef = (self._per_member(clip) / (norms + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(self.rows(coef, g))
        return norms

    @torch.no_grad()
    def _adamw(self, grads: dict[str, torch.Tensor], lrs: list[float]) -> None:
        """torch.optim.AdamW's single-tensor update, each member with its own LR, decay and step
        count; the coefficients in double per member, as torch computes them from Python floats."""
        self.steps = [s + 1 for s in self.steps]
        b1, b2 = self.beta1, self.beta2
        # Each member's coefficients, built once a step (not once a parameter: on a GPU each is
        # a host-to-device copy).
        decay = self._per_member([1 - lr * wd for lr, wd in zip(lrs, self.weight_decay)])
        step_size = self._per_member([-lr / (1 - b1**s) for lr, s in zip(lrs, self.steps)])
        bias2_sqrt = self._per_member([(1 - b2**s) ** 0.5 for s in self.steps])
        for name, g in grads.items():
            p, avg, sq = self.params[name], self.exp_avg[name], self.exp_avg_sq[name]
            if self.decays[name]:
                p.mul_(self.rows(decay, p))
            avg.lerp_(g, 1 - b1)
            sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (sq.sqrt() / self.rows(bias2_sqrt, sq)).add_(self.eps)
            p.add_(self.rows(step_size, p) * avg / denom)

    def sync_optimizers(self) -> None:
        """Write the stacked AdamW state into each member's own optimizer, in its format, so
        that its checkpoint is the interleaved engine's."""
        for k, m in enumerate(self.members):
            for name in self.names:
                p = m.s.model.get_parameter(name)
                m.s.optimizer.state[p] = {
                    "step": torch.tensor(float(self.steps[k])),
                    "exp_avg": self.exp_avg[name][k].clone(),
                    "exp_avg_sq": self.exp_avg_sq[name][k].clone(),
                }

    def release(self) -> None:
        """Give every member back weights and optimizer state of its own (copies of its slices),
        before the stack is rebuilt for fewer members."""
        self.sync_optimizers()
        for m in self.members:
            for _, t in list(m.s.model.named_parameters()) + list(m.s.model.named_buffers()):
                t.data = t.data.clone()


class VectorisedEngine:
    """Steps the active members of a population as one; rebuilt when the active set changes."""

    def __init__(self) -> None:
        self.stack: Stack | None = None

    def _for(self, members: list) -> Stack:
        if self.stack is None or [m.id for m in self.stack.members] != [m.id for m in members]:
            if self.stack is not None:
                self.stack.release()
            self.stack = Stack(members)
        return self.stack

    def step(self, members: dict, lrs: list[float], probe: bool, world: int) -> dict:
        """One step of every member in `members` (id -> loop.Member) at its LR (`lrs`, in the
        same order); returns id -> probes (or None), and leaves each member's loss and gradient
        norm in its report window."""
        ms = list(members.values())
        stack = self._for(ms)
        device = stack.device
        batches = [m.batches.next() for m in ms]
        xs = torch.stack([x for x, _ in batches]).to(device, non_blocking=True)
        ys = torch.stack([y for _, y in batches]).to(device, non_blocking=True)
        clip = [m.cfg.grad_clip if m.cfg.grad_clip > 0 else math.inf for m in ms]
        losses, norms, probes = stack.step(xs, ys, lrs, clip, probe, ms[0].micro, world)
        out = {}
        for k, m in enumerate(ms):
            m.grad_norm = norms[k]
            m.window.add(losses[k], norms[k], m.s.model, lrs[k])
            out[m.id] = probes[k] if probes is not None else None
        return out

    def before_checkpoint(self) -> None:
        if self.stack is not None:
            self.stack.sync_optimizers()
