"""GPT-2-style pre-LN decoder with composable stability switches.

Every switch is decided once, in `__init__`: a disabled LayerNorm is `nn.Identity()`, a dense QKV
projection and an MLRA one share an interface, and σReparam is a drop-in `nn.Linear`. So the
forward pass reads like the plain GPT-2 block, whatever the variant:

    x = x + post_norm(proj(attend(q_norm(q), k_norm(k), v_norm(v))))   with q, k, v = qkv(ln_1(x))
    x = x + post_norm(fc2(gelu(fc1(ln_2(x)))))

The exact reading of each variant and its paper is in docs/variants.md.

Probes: pass a dict as `stats` and the forward pass records per-layer statistics into it
(output norms of qkv/proj/fc1/fc2, the largest attention logit, each block's output variance).
They are computed from tensors the step computes anyway, plus one q.k^T product per layer for the
logit maximum, so probing never changes which attention kernel the step itself uses.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrialConfig

# --------------------------------------------------------------------------------------------
# attention kernels


def attention_logits(q: torch.Tensor, k: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
    """Scaled (and capped) causal attention logits, masked positions at -inf. Shape (B, H, T, T)."""
    T = q.size(-2)
    z = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if softcap:
        # Cap before the mask, as Gemma 2 and Rybakov et al. do: masked entries stay -inf.
        z = softcap * torch.tanh(z / softcap)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return z.masked_fill(~causal, float("-inf"))


def plain_attention(q, k, v, softcap: float = 0.0) -> torch.Tensor:
    """Reference attention that materialises the logits (used on CPU when a cap is set)."""
    z = attention_logits(q, k, softcap)
    return torch.softmax(z.float(), dim=-1).to(v.dtype) @ v


def causal_block_mask(T: int, device):
    """FlexAttention's causal BlockMask for sequences of T tokens. Built once per model, outside
    any compiled graph (`GPT.set_block_mask`): built inside the forward it would be traced into
    the graph and rebuilt on every step."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # FlexAttention is only fast compiled; inside an already compiled model it is traced as is.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_capped_attention(q, k, v, softcap: float, block_mask, compiled: bool = True) -> torch.Tensor:
    """Fused causal attention with c*tanh(z/c) applied to the scaled logits via FlexAttention."""
    from torch.nn.attention.flex_attention import flex_attention

    def cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, score_mod=cap, block_mask=block_mask)


def one_dtype(q, k, v):
    """q, k and v in one dtype: autocast's when it is on, else v's. Under CUDA autocast a
    LayerNorm returns fp32, so qk_norm hands attention fp32 q and k beside a bf16 v, and
    FlexAttention's backward refuses mixed dtypes."""
    device = v.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attend(q, k, v, softcap: float = 0.0, block_mask=None) -> torch.Tensor:
    """Causal attention on (B, H, T, d_head) tensors with the fastest kernel the variant allows:
    SDPA without a cap; with one, FlexAttention when the model has a block mask (on CUDA:
    FlexAttention has no backward on CPU), else the plain kernel."""
    q, k, v = one_dtype(q, k, v)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if block_mask is not None:
        return flex_capped_attention(q, k, v, softcap, block_mask)
    return plain_attention(q, k, v, softcap)


# --------------------------------------------------------------------------------------------
# layers


class SigmaReparamLinear(nn.Linear):
    """σReparam (Zhai et al. 2023): W_hat = (gamma / sigma(W)) * W, gamma a learnable scalar (init 1).

    sigma(W) is the spectral norm, estimated by power iteration on persistent vectors u, v: one
    iteration per training forward, 15 after (re-)initialisation, no gradient through u and v
    (the gradient flows through W in sigma = u^T W v).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.gamma = nn.Parameter(torch.ones(()))
        self.register_buffer("u", torch.zeros(out_features))
        self.register_buffer("v", torch.zeros(in_features))
        self.reset_power_iteration()

    def fp32(self):
        """Autocast off (see sigma()); a model on the meta device (counted, not run: tunestab/
        scaling.py) has no autocast to turn off."""
        return (
            contextlib.nullcontext() if self.weight.is_meta else torch.autocast(self.weight.device.type, enabled=False)
        )

    @torch.no_grad()
    def power_iteration(self, steps: int = 1) -> None:
        with self.fp32():
            for _ in range(steps):
                self.v.copy_(F.normalize(self.weight.t() @ self.u, dim=0))
                self.u.copy_(F.normalize(self.weight @ self.v, dim=0))

    @torch.no_grad()
    def reset_power_iteration(self, steps: int = 15) -> None:
        self.u.copy_(F.normalize(torch.randn_like(self.u), dim=0))
        self.power_iteration(steps)

    def sigma(self) -> torch.Tensor:
        """sigma(W) = u^T W v, in fp32 with autocast off: under bf16 autocast the matmuls would
        round u, v and sigma to bf16 (and torch.dot refuses an fp32 u beside a bf16 product),
        and sigma divides every weight of the layer."""
        with self.fp32():
            return torch.dot(self.u, self.weight @ self.v)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * (self.gamma / self.sigma())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.power_iteration(1)
        return F.linear(x, self.effective_weight(), self.bias)


def linear(in_features: int, out_features: int, bias: bool, sigma_reparam: bool) -> nn.Linear:
    cls = SigmaReparamLinear if sigma_reparam else nn.Linear
    return cls(in_features, out_features, bias=bias)


def norm(on: bool, dim: int, bias: bool) -> nn.Module:
    return nn.LayerNorm(dim, bias=bias) if on else nn.Identity()


class MLRAProjection(nn.Module):
    """Multi-head Low-Rank Attention projection, our reading of Chung et al. 2024.

    For each head h and each of q, k, v: W^h = A^h B^h with A^h in R^{d x r}, B^h in R^{r x d_head}.
    All A^h are one (d -> 3*H*r) linear layer, all B^h one (3H, r, d_head) tensor. Output layout
    matches the dense projection ([q | k | v], heads contiguous), so the attention code is shared.
    Weights: 3*r*d*(H+1) (+ 3d bias) against 3*d^2 for dense QKV.
    """

    def __init__(self, d_model: int, n_head: int, rank: int, bias: bool, sigma_reparam: bool):
        super().__init__()
        self.n_head, self.rank, self.d_head = n_head, rank, d_model // n_head
        self.down = linear(d_model, 3 * n_head * rank, bias=False, sigma_reparam=sigma_reparam)
        self.up = nn.Parameter(torch.empty(3 * n_head, rank, self.d_head))
        self.bias = nn.Parameter(torch.zeros(3 * d_model)) if bias else None

    def head_weight(self, which: int, head: int) -> torch.Tensor:
        """Effective d x d_head weight of one head; which: 0 = q, 1 = k, 2 = v."""
        g = which * self.n_head + head
        A = self.down.weight[g * self.rank : (g + 1) * self.rank].t()
        return A @ self.up[g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        a = self.down(x).view(B, T, 3 * self.n_head, self.rank)
        y = torch.einsum("btgr,grd->btgd", a, self.up).reshape(B, T, -1)
        return y + self.bias if self.bias is not None else y


class Attention(nn.Module):
    def __init__(self, cfg: TrialConfig, index: int):
        super().__init__()
        d, self.n_head, self.softcap, self.index = cfg.d_model, cfg.n_head, cfg.softcap, index
        if cfg.mlra_rank:
            self.qkv = MLRAProjection(d, cfg.n_head, cfg.mlra_rank, cfg.bias, cfg.sigma_reparam)
        else:
            self.qkv = linear(d, 3 * d, cfg.bias, cfg.sigma_reparam)
        # qk_norm and qkv_norm both normalise q and k per head (affine shared across heads).
        self.q_norm = norm(cfg.qk_norm or cfg.qkv_norm, cfg.d_head, cfg.bias)
        self.k_norm = norm(cfg.qk_norm or cfg.qkv_norm, cfg.d_head, cfg.bias)
        self.v_norm = norm(cfg.qkv_norm, cfg.d_head, cfg.bias)
        self.proj = linear(d, d, cfg.bias, cfg.sigma_reparam)
        self.post_norm = norm(cfg.post_norm, d, cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, stats: dict | None = None, block_mask=None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in qkv.split(C, dim=2))
        q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        if self.dropout and self.training:
            q, k, v = one_dtype(q, k, v)
            y = (
                F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout)
                if not self.softcap
                else F.dropout(plain_attention(q, k, v, self.softcap), self.dropout)
            )
        else:
            y = attend(q, k, v, self.softcap, block_mask)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))
        if stats is not None:
            with torch.no_grad():
                # The uncapped logit: its growth is the instability signal (Wortsman et al.).
                z = (q @ k.transpose(-2, -1)).tril() * (1.0 / math.sqrt(q.size(-1)))  # masked -> 0
                stats[f"layer_{self.index}/attn_logit_max"] = z.abs().amax().float()  # NaN stays NaN
            record_norm(stats, self.index, "qkv", qkv)
            record_norm(stats, self.index, "proj", y)
        return F.dropout(self.post_norm(y), self.dropout, self.training)


def record_norm(stats: dict, index: int, name: str, y: torch.Tensor) -> None:
    """Mean over tokens of the L2 norm of a layer's output vector (independent of batch size)."""
    stats[f"layer_{index}/out_norm_{name}"] = y.detach().float().norm(dim=-1).mean()


class MLP(nn.Module):
    def __init__(self, cfg: TrialConfig, index: int):
        super().__init__()
        self.index = index
        self.fc1 = linear(cfg.d_model, 4 * cfg.d_model, cfg.bias, cfg.sigma_reparam)
        self.fc2 = linear(4 * cfg.d_model, cfg.d_model, cfg.bias, cfg.sigma_reparam)
        self.post_norm = norm(cfg.post_norm, cfg.d_model, cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        h = self.fc1(x)
        y = self.fc2(F.gelu(h, approximate="tanh"))
        if stats is not None:
            record_norm(stats, self.index, "fc1", h)
            record_norm(stats, self.index, "fc2", y)
        return F.dropout(self.post_norm(y), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: TrialConfig, index: int):
        super().__init__()
        self.index = index
        # qkv_norm moves the attention input normalisation after the projection.
        self.ln_1 = norm(not cfg.qkv_norm, cfg.d_model, cfg.bias)
        self.attn = Attention(cfg, index)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg, index)

    def forward(self, x: torch.Tensor, stats: dict | None = None, block_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), stats, block_mask)
        x = x + self.mlp(self.ln_2(x), stats)
        if stats is not None:
            stats[f"layer_{self.index}/block_out_var"] = x.detach().float().var()
        return x


# --------------------------------------------------------------------------------------------
# the loss


# A chunk of the loss holds this many fp32 logits (1 GiB): 5336 tokens at GPT-2's vocabulary.
LOSS_CHUNK_ELEMENTS = 2**28


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(z_i, t_i) + z_loss * mean_i logsumexp(z_i)^2, with z = cap(h @ W^T) over the
    first `vocab` columns, without keeping z for backward.

    Autograd would save the fp32 logits (and their log-softmax) of every token until backward:
    at 64 x 1024 tokens and GPT-2's vocabulary, 13 GB each. Here forward runs over chunks of
    tokens and computes each chunk's loss *and* its gradients (dz = softmax - onehot, then
    dh = dz W and dW = dz^T h: the three matmuls autograd would run), so only dh (N x d) and
    dW (V x d) are kept, and backward scales them by the incoming gradient. The matmuls run in
    `dtype` (the autocast dtype under autocast); the softmax and the sums in fp32 (or wider).

    Written for torch.func.vmap too (the vectorised engine, tunestab/vectorised.py): forward
    returns the gradients as outputs for `setup_context` to keep, and builds every tensor from
    its inputs, out of place, so that under vmap each has the member dimension its inputs have.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h, weight, targets, vocab: int, z_loss: float, cap: float, dtype, want: bool):
        n = h.size(0)
        rows = max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        losses, grad_hs, grad_w = [], [], None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, rows):
                hc, tc = h[s : s + rows].to(dtype), targets[s : s + rows]
                z = (hc @ w.t())[:, :vocab].to(acc)
                if cap:
                    tanh = torch.tanh(z / cap)
                    z = cap * tanh
                lse = torch.logsumexp(z, dim=-1)
                chunk = (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
                if z_loss:
                    chunk = chunk + z_loss * lse.pow(2).sum()
                losses.append(chunk)
                if not want:
                    continue
                dz = torch.exp(z - lse[:, None])  # softmax
                if z_loss:
                    dz = dz * (1 + 2 * z_loss * lse)[:, None]
                dz = dz.scatter_add(1, tc[:, None], -torch.ones_like(tc[:, None], dtype=dz.dtype))
                if cap:
                    dz = dz * (1 - tanh * tanh)
                dz = (dz / n).to(dtype)
                grad_hs.append((dz @ w[:vocab]).to(h.dtype))
                part = (dz.t() @ hc).to(acc)
                grad_w = part if grad_w is None else grad_w + part
        loss = torch.stack(losses).sum() / n
        if not want:
            return loss, None, None
        # The LM head's padding rows (padded_vocab) never enter the loss: their gradient is 0.
        grad_w = F.pad(grad_w, (0, 0, 0, weight.size(0) - vocab)).to(weight.dtype)
        return loss, torch.cat(grad_hs), grad_w

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_h, grad_w = output
        if grad_h is not None:
            ctx.mark_non_differentiable(grad_h, grad_w)
            ctx.save_for_backward(grad_h, grad_w)

    @staticmethod
    def backward(ctx, grad, _grad_h, _grad_w):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad.to(grad_h.dtype), grad_w * grad.to(grad_w.dtype), None, None, None, None, None, None


def linear_cross_entropy(h, weight, targets, vocab: int, z_loss: float = 0.0, cap: float = 0.0):
    """The LM loss of hidden states h (N, d) under the LM head `weight` (V_padded, d); see
    LinearCrossEntropy. Under autocast its matmuls run in the autocast dtype, as lm_head's would."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    # Inside a Function's forward, grad mode is always off, so whether backward will come is
    # decided here: with grad mode on (training) the gradients are computed with the loss, and
    # an evaluation (under no_grad) runs one matmul a chunk instead of three. Grad mode, not
    # `requires_grad`: under vmap an input's requires_grad reads False.
    want = torch.is_grad_enabled()
    loss, _, _ = LinearCrossEntropy.apply(h, weight, targets, vocab, float(z_loss), float(cap), dtype, want)
    return loss


# --------------------------------------------------------------------------------------------
# the model


def padded_vocab(n: int) -> int:
    """The embedding and LM-head rows actually allocated: n rounded up to a multiple of 128, so
    that the LM head's matmul runs on tensor-core-friendly shapes (GPT-2's 50257 -> 50304).
    The extra rows never enter the loss, TEV or a token id."""
    return -(-n // 128) * 128


class GPT(nn.Module):
    def __init__(self, cfg: TrialConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size < 1:
            raise ValueError("vocab_size must be set (>= 1) before building the model")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.wte = nn.Embedding(padded_vocab(cfg.vocab_size), cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, padded_vocab(cfg.vocab_size), bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # FlexAttention's mask for capped attention, when the model runs on CUDA (set_block_mask).
        self.block_mask = None
        self.apply(self._init_weights)
        # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * n_layer).
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for m in self.modules():
            if isinstance(m, SigmaReparamLinear):
                m.reset_power_iteration()
                if cfg.sigma_reparam_gamma == "matched":
                    # gamma/sigma(W) = 1: the layer starts as the dense layer it replaces.
                    with torch.no_grad():
                        m.gamma.copy_(m.sigma())

    def set_block_mask(self, block_mask) -> None:
        """Use FlexAttention with this BlockMask (`causal_block_mask`) for capped attention. A
        module attribute is lifted into a compiled graph as an input, not rebuilt in it."""
        self.block_mask = block_mask

    def token_embedding(self) -> torch.Tensor:
        """The embedding rows of real tokens (what TEV measures), without the padding rows."""
        return self.wte.weight[: self.vocab_size]

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MLRAProjection):
            nn.init.normal_(m.up, std=0.02)
            if self.cfg.mlra_init == "matched":
                # Each entry of A·B sums r products: its variance is r·std_A²·std_B². Equal stds
                # with r·std⁴ = 0.02² give the product the dense projection's std.
                std = math.sqrt(0.02 / math.sqrt(m.rank))
                nn.init.normal_(m.down.weight, std=std)
                nn.init.normal_(m.up, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, stats: dict | None = None):
        """Without targets: (logits (B, T, vocab) in fp32, None). With targets: (None, the mean
        cross-entropy (+ z-loss) in fp32), computed by `linear_cross_entropy` so that training
        never holds the (B*T, vocab) logits through backward."""
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        x = F.dropout(x, self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x, stats, self.block_mask)
        h = self.ln_f(x)
        cap = self.cfg.final_softcap
        if targets is None:
            logits = self.lm_head(h)[..., : self.vocab_size].float()
            return (cap * torch.tanh(logits / cap) if cap else logits), None
        loss = linear_cross_entropy(
            h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), self.vocab_size, self.cfg.z_loss, cap
        )
        return None, loss
