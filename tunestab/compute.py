"""How a trial computes: its device, precision, attention kernel, compilation, data
parallelism and optimizer, and what a step costs (FLOPs, MFU).

`setup()` is the one place these are decided. Trials (tunestab/loop.py) and benchmarks (bench/)
both call it, so a benchmark measures exactly what a trial runs.

Order matters on GPUs: the model is wrapped in DDP first and the DDP module is compiled, so that
the compiler splits the graph at DDP's gradient buckets and each bucket's all-reduce overlaps the
rest of the backward; compiling first would hide the buckets from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import TrialConfig
from .model import GPT, causal_block_mask

# Peak dense bf16 FLOP/s by torch.cuda.get_device_name(), from the vendors' datasheets. Names are
# matched exactly: a substring match read an L40S as an L4. An unlisted GPU reports no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device))


def training_flops_per_token(model: GPT) -> float:
    """6 FLOPs per weight a token meets in a matmul (2 forward, 4 backward), plus 12·L·d·T for
    attention's two T×T products (PaLM, appendix B): the MFU numerator.

    Lookups are not matmuls: the position embedding never counts, and the token embedding counts
    only when it is tied to the LM head, whose matmul it then is. The LM head counts the real
    vocabulary, not its padding rows."""
    cfg = model.cfg
    weights = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
    weights -= model.wpe.weight.numel()
    weights -= (model.lm_head.weight.size(0) - model.vocab_size) * cfg.d_model
    if not cfg.tie_embeddings:
        weights -= model.wte.weight.numel()
    return 6 * weights + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len


def use_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    return cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"


def use_compile(cfg: TrialConfig, device: torch.device) -> bool:
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def enable_tf32() -> None:
    """fp32 matmuls (what autocast leaves in fp32, and every matmul of a run with bf16 off) on
    the tensor cores in TF32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def param_groups(model: GPT, cfg: TrialConfig) -> list[dict]:
    """AdamW groups: decay matrices and embeddings; not biases, LayerNorm gains or σReparam gamma.

    AdamW multiplies its decay by the current LR: w <- w·(1 - lr_t·wd). Independent decay
    (Wortsman et al. 2023) is w <- w·(1 - λ·lr_t/lr), so its wd is λ/lr, fixed for the trial."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    wd = cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "independent" else cfg.weight_decay
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Setup:
    """Everything a training step needs, built by `setup()`."""

    model: GPT
    """The plain module: probes, checkpoints and evaluation read it."""
    step_model: torch.nn.Module
    """What runs the training step: `model`, DDP-wrapped and/or compiled."""
    optimizer: torch.optim.Optimizer
    device: torch.device
    bf16: bool
    compiled: bool
    ddp: torch.nn.Module | None = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def no_sync(self):
        """Inside it, a backward accumulates gradients without DDP's all-reduce."""
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()


def setup(cfg: TrialConfig, device: torch.device, wrap_ddp=None) -> Setup:
    """Build the model (seeded by cfg.seed, so every rank starts the same), its optimizer and
    its step module on `device`. cfg must have its vocab_size set. `wrap_ddp(model)` returns the
    model wrapped for data parallelism, or is None for one process."""
    cuda = device.type == "cuda"
    if cuda:
        enable_tf32()
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    if cuda and model.cfg.softcap:
        # FlexAttention keeps capped attention fused on GPUs; on the CPU it has no backward.
        model.set_block_mask(causal_block_mask(cfg.seq_len, device))
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cuda
    )
    ddp = wrap_ddp(model) if wrap_ddp is not None else None
    step_model = ddp if ddp is not None else model
    compiled = use_compile(cfg, device)
    if compiled:
        step_model = torch.compile(step_model)
    return Setup(model, step_model, optimizer, device, use_bf16(cfg, device), compiled, ddp)
