"""Stability probes: Token Embedding Variability, gradient statistics, per-layer output norms.

All probes run only on report steps. The per-layer ones are recorded by the model's forward pass
(`GPT.forward(..., stats=dict)`); this module turns them into the metric names of docs/design.md:
the maximum over layers under the bare name (`out_norm_qkv`, `attn_logit_max`, ...) and each
layer's value under `layer_<i>/<name>`.
"""

from __future__ import annotations

import torch

LAYER_METRICS = ("out_norm_qkv", "out_norm_proj", "out_norm_fc1", "out_norm_fc2", "attn_logit_max", "block_out_var")


@torch.no_grad()
def tev(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token Embedding Variability (Chung et al. 2024) of a |V| x d embedding matrix.

    TEV_i is the population standard deviation of the d entries of row i; the result is
    (mu_TEV, sigma_TEV), the mean and population standard deviation of TEV_i over all rows.
    At GPT-2 initialisation (N(0, 0.02^2)) every TEV_i is about 0.02, so (0.02, ~0).
    """
    per_token = embedding.detach().float().std(dim=1, correction=0)
    return per_token.mean(), per_token.std(correction=0)


@torch.no_grad()
def tev_rows(embedding: torch.Tensor) -> torch.Tensor:
    """TEV_i in one pass, for every training step: each row's sum by a matrix-vector product and
    its sum of squares by a norm, so Var = E[x²] - E[x]². Five times faster than tev() on a
    GPT-2 embedding on the CPU; it loses digits only on rows whose mean dwarfs their spread
    (2e-5 relative at a mean of 100 standard deviations), which a stopping rule does not feel.
    Reported TEV (tev_mean, tev_std) comes from tev(). Returns TEV_i of every row."""
    e = embedding.detach().float()
    d = e.size(1)
    mean = e @ torch.full((d,), 1.0 / d, device=e.device, dtype=e.dtype)
    square = torch.linalg.vector_norm(e, dim=1).pow(2) / d
    return (square - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def grad_variance(grad: torch.Tensor) -> torch.Tensor:
    """Variance of the entries of a gradient (for the embedding: the quantity TEV stands in for,
    which costs a full pass over |V| x d gradients every step)."""
    return grad.detach().float().var(correction=0)


def layer_metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer stats plus, for each metric, its maximum over layers under the bare name."""
    out = dict(stats)
    for name in LAYER_METRICS:
        values = [v for k, v in stats.items() if k.endswith("/" + name)]
        if values:
            out[name] = torch.stack(values).amax()
    return out


def model_probes(model, stats: dict[str, torch.Tensor], with_grad_var: bool = False) -> dict[str, torch.Tensor]:
    """Every probe of one report step, as 0-d tensors (to be all-reduced across ranks). Called
    after backward and before gradient clipping, so grad_var_embed is the raw gradient's. Only
    the rows of real tokens count, not the vocabulary's padding (model.padded_vocab)."""
    metrics = layer_metrics(stats)
    metrics["tev_mean"], metrics["tev_std"] = tev(model.token_embedding())
    grad = model.wte.weight.grad
    if with_grad_var and grad is not None:
        metrics["grad_var_embed"] = grad_variance(grad[: model.vocab_size])
    return metrics
