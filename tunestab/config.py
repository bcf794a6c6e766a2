"""One trial's configuration: model shape, stability switches, training budget, probes.

The same field names are used in search-space YAML, in `--set key=value` and as MLflow params,
so this dataclass is the single source of truth for them.

A *variant* (`baseline`, `qk_norm`, ...) is a preset of the composable stability switches. A switch
left at `None` takes the variant's value; a switch set explicitly wins, so `variant=mlra,
softcap=30` is MLRA with capped attention logits. `resolved()` returns the config with every
switch made concrete; the model and the logs only ever see resolved configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """An impossible configuration. The message lists every problem found, one per line."""

    def __init__(self, problems: list[str], where: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where} ({len(self.problems)} problem(s)):\n{lines}")


# Which paper each preset reproduces, and our exact reading of it (see docs/variants.md).
VARIANTS: dict[str, dict] = {
    # GPT-2 pre-LN block, nothing added.
    "baseline": {},
    # Rybakov et al. 2024 / Dehghani et al. 2023: LayerNorm on q and on k, per head.
    "qk_norm": {"qk_norm": True},
    # Rybakov et al. 2024 (Gemma 2 value): attention logits z <- c*tanh(z/c), c = 50.
    "softcap": {"softcap": 50.0},
    # Rybakov et al. 2024: qk_norm + softcap (one of the two 1.5x-LR remedies).
    "qk_norm_cap": {"qk_norm": True, "softcap": 50.0},
    # Rybakov et al. 2024: qk_norm + LayerNorm after the attention projection and after FC2.
    "qk_fc_norm": {"qk_norm": True, "post_norm": True},
    # Rybakov et al. 2024: LayerNorm on q, k, v after the QKV projection, no pre-attention LN.
    "qkv_norm": {"qkv_norm": True},
    # Chung et al. 2024, our reading: per-head W_Q, W_K, W_V = A.B of rank r.
    # "parity" = the rank at which MLRA has as many QKV weights as dense attention.
    "mlra": {"mlra_rank": "parity"},
    # Zhai et al. 2023, a baseline in Chung et al. 2024: W_hat = gamma/sigma(W) * W.
    "sigma_reparam": {"sigma_reparam": True},
}

# String fields with a fixed set of values.
CHOICES = {
    "weight_decay_mode": ("independent", "coupled"),
    "mlra_init": ("matched", "factors"),
    "sigma_reparam_gamma": ("matched", "one"),
    "progress_floor": ("uniform", "unigram"),
    "lr_schedule": ("cosine", "range"),
    "engine": ("auto", "interleaved", "vectorised"),
}

# Switches that variants set; None means "whatever the variant says", and off when it says nothing.
SWITCH_OFF = {
    "qk_norm": False,
    "softcap": 0.0,
    "post_norm": False,
    "qkv_norm": False,
    "mlra_rank": 0,
    "sigma_reparam": False,
}


@dataclass(frozen=True)
class TrialConfig:
    # --- model shape (GPT-2 style, pre-LN) ---
    variant: str = "baseline"
    """Named preset of stability switches: one of VARIANTS."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; d_model must be divisible by it."""
    d_model: int = 128
    """Residual stream width; the MLP is 4*d_model wide."""
    seq_len: int = 128
    """Tokens per training sequence (also the size of the learned positional table)."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the tokenizer."""
    bias: bool = True
    """Biases in linear layers and LayerNorms, as in GPT-2."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head (GPT-2; TEV then measures the tied matrix)."""
    dropout: float = 0.0
    """Dropout on attention and residual branches; off for stability studies."""

    # --- stability switches (None: take the variant's value) ---
    qk_norm: bool | None = None
    """LayerNorm on q and on k, per head, before q.k^T."""
    softcap: float | None = None
    """Attention-logit cap c in z <- c*tanh(z/c); 0 is off."""
    post_norm: bool | None = None
    """LayerNorm on the attention-projection and FC2 outputs, before each residual add."""
    qkv_norm: bool | None = None
    """LayerNorm on q, k and v after the QKV projection, and no pre-attention LayerNorm."""
    mlra_rank: int | None = None
    """Rank r of the per-head factorised W_Q, W_K, W_V (MLRA); 0 is dense attention."""
    mlra_init: str = "matched"
    """'matched': A and B drawn so that each head's W = A·B has the dense init's std (0.02);
    'factors': A and B each N(0, 0.02²), whose product has std 0.02²·√r (50-100× smaller)."""
    sigma_reparam: bool | None = None
    """Spectral reparametrisation of the block linear layers."""
    sigma_reparam_gamma: str = "matched"
    """'matched': γ starts at σ(W), so each layer's effective weight equals the dense init
    (residual scaling included); 'one': γ = 1 (Zhai et al.), which cancels the init's scale."""
    z_loss: float = 0.0
    """Coefficient of the z-loss, coef*(log Z)^2 per token (Wortsman et al.); 0 is off."""
    final_softcap: float = 0.0
    """Cap on the LM-head logits, c*tanh(logits/c) (Gemma 2 uses 30); 0 is off."""

    # --- optimisation ---
    steps: int = 300
    """Optimizer steps in the trial's budget."""
    batch_size: int = 16
    """Global batch in sequences, split evenly across data-parallel workers."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on a worker; gradients of the worker's share of the batch
    are accumulated over its micro-batches. 0: the worker's whole share at once."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 30
    """Steps of linear warm-up from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr*min_lr_ratio."""
    lr_schedule: str = "cosine"
    """'cosine': linear warm-up to lr, then cosine decay to lr*min_lr_ratio. 'range': an LR range
    test (Smith 2017; fastai's lr_find, Lightning's LR finder): the LR grows exponentially from
    lr_range_start at the first step to lr at the last, with no warm-up, and the run ends at the
    first report whose loss, having gone below l0 (the loss at initialisation), is above it again;
    its last report carries `range_lr`, the LR it ended at."""
    lr_range_start: float = 1e-4
    """The first step's LR in an `lr_schedule: range` run."""
    weight_decay: float = 1e-4
    """Weight decay λ of matrices and embeddings (not biases, norms or gains); see weight_decay_mode."""
    weight_decay_mode: str = "independent"
    """'independent': w <- w·(1 - λ·lr_t/lr) per step, following the schedule but not the LR
    (Wortsman et al. 2023); 'coupled': AdamW's w <- w·(1 - lr_t·λ), whose strength moves with
    the LR searched (λ = 0.1 at LR 1 shrinks every weight by 10% a step)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""

    # --- data ---
    data: str = "builtin"
    """'builtin' (offline stdlib docs + sources), 'hf:<dataset>[:<config>]', or a local file/dir."""
    tokenizer: str = "bytes"
    """'bytes' (offline, 257 tokens) or a tiktoken encoding name such as 'gpt2'."""
    max_tokens: int = 0
    """Cap on tokens read from the source; 0 reads it all (hub sources need a cap)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    data_cache: str = ""
    """Directory for tokenised caches; empty uses ~/.cache/tunestab."""

    # --- cadence, probes, checkpoints ---
    report_every: int = 10
    """Steps between metric reports; probes run only on these steps."""
    eval_every: int = 100
    """Steps between validation-loss evaluations (and at the last step)."""
    eval_batches: int = 4
    """Global batches in the fixed validation set."""
    checkpoint_every: int = 100
    """Steps between checkpoints; 0 turns checkpoints off."""
    probe_grad_var: bool = False
    """Also report grad_var_embed, the variance of the embedding gradient."""

    # --- divergence rule (recorded with the results) ---
    blowup_window: int = 3
    """Reports averaged into the smoothed training loss for the blow-up rule."""
    blowup_margin: float = 0.0
    """Blow-up when the smoothed loss exceeds the initial loss by more than this, after warm-up."""
    progress_floor: str = "uniform"
    """The final validation loss a trial must beat, or it ends `no_progress`: 'uniform' is the
    loss at initialisation l0 (Wortsman et al.'s clip); 'unigram' the entropy of the training
    tokens' frequencies, what a model that ignores context reaches, and where a model whose
    attention collapsed (logits of 1e4 and more) ends up."""

    # --- hardware ---
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    compile: bool | None = None
    """torch.compile the training step (inductor); None: on for CUDA, off on CPU."""
    bf16: bool | None = None
    """bf16 autocast, weights and optimizer state in fp32; None: on for CUDA, off on CPU."""
    engine: str = "auto"
    """How a population's members are stepped (tunestab/loop.py): 'interleaved', each member's
    model in turn; 'vectorised', all members as one model with a member dimension
    (torch.func, tunestab/vectorised.py; no dropout); 'auto', vectorised for two members or
    more on CUDA, interleaved on the CPU, where vectorising measured slower
    (docs/overhead.md)."""

    # ----------------------------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def problems(self) -> list[str]:
        """Every reason this config cannot be trained, as `key: what is wrong` lines."""
        p: list[str] = []
        if self.variant not in VARIANTS:
            p.append(f"variant: unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in (
            "n_layer",
            "n_head",
            "d_model",
            "seq_len",
            "steps",
            "batch_size",
            "report_every",
            "eval_every",
            "eval_batches",
            "blowup_window",
        ):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("vocab_size", "warmup_steps", "checkpoint_every", "max_tokens", "seed", "micro_batch_size"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size > 0 and self.batch_size >= 1:
            p += [q for q in [batch_split_problem(self.batch_size, self.micro_batch_size, 1)] if q]
        if self.n_head >= 1 and self.d_model >= 1 and self.d_model % self.n_head:
            p.append(f"d_model: {self.d_model} is not divisible by n_head={self.n_head}")
        if self.mlra_rank is not None:
            if self.mlra_rank < 0 or self.mlra_rank > max(self.d_model, 0):
                p.append(f"mlra_rank: must be between 1 and d_model={self.d_model}, got {self.mlra_rank}")
            elif self.mlra_rank == 0 and self.variant == "mlra":
                p.append("mlra_rank: variant 'mlra' needs a rank >= 1 (0 turns MLRA off)")
        for name in ("softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                p.append(f"{name}: the cap must be > 0 (0 turns it off), got {value}")
        if self.softcap == 0 and self.variant in ("softcap", "qk_norm_cap"):
            p.append(f"softcap: variant {self.variant!r} needs a cap > 0")
        if self.lr_schedule == "range" and not 0 < self.lr_range_start < self.lr:
            p.append(
                f"lr_range_start: a range test climbs from lr_range_start to lr, so it must be in "
                f"(0, lr={self.lr}), got {self.lr_range_start}"
            )
        for name in ("lr", "eps"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                p.append(f"{name}: must be a finite number > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "z_loss", "blowup_margin"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                p.append(f"{name}: must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "dropout", "min_lr_ratio"):
            if not 0 <= getattr(self, name) < 1 + (name == "min_lr_ratio"):
                p.append(f"{name}: must be in [0, 1{']' if name == 'min_lr_ratio' else ')'}, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            p.append(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                p.append(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.engine == "vectorised" and self.dropout > 0:
            p.append(
                f"engine: the vectorised engine runs without dropout (under vmap a member would draw "
                f"other numbers than alone), got dropout = {self.dropout}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            p.append(f"device: must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        return p

    def validate(self, where: str = "config") -> TrialConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, where)
        return self

    def resolved(self) -> TrialConfig:
        """The config with the variant's preset applied to every switch left at None."""
        self.validate()
        preset = VARIANTS[self.variant]
        concrete = {}
        for name, off in SWITCH_OFF.items():
            value = getattr(self, name)
            if value is None:
                value = preset.get(name, off)
            if value == "parity":
                # Dense QKV has 3*d^2 weights; per-head MLRA has 3*r*d*(n_head+1).
                value = max(1, self.d_model // (self.n_head + 1))
            concrete[name] = value
        return dataclasses.replace(self, **concrete)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(TrialConfig))


def _annotation(name: str) -> str:
    return str(next(f.type for f in fields(TrialConfig) if f.name == name))


def _type_ok(name: str, value) -> bool:
    """Whether a YAML value has the field's type (ints are fine where floats are expected)."""
    annotation = _annotation(name)
    if value is None:
        return "None" in annotation
    if annotation.startswith("bool"):
        return isinstance(value, bool)
    if annotation.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _parse_value(name: str, text: str):
    """Turn a `--set key=value` string into the field's type."""
    annotation = _annotation(name)
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    if annotation.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if annotation.startswith("int"):
        return int(text)
    if annotation.startswith("float"):
        return float(text)
    return text


def config_from(values: dict, where: str = "config", base: TrialConfig | None = None) -> TrialConfig:
    """Build and validate a TrialConfig from a mapping (YAML or parsed `--set` pairs).

    Values may be strings (from the command line), converted by field type. Unknown keys and
    unparsable values are reported together with every other problem.
    """
    problems: list[str] = []
    kwargs = {}
    for key, value in values.items():
        if key not in FIELD_NAMES:
            problems.append(f"{key}: unknown config key")
            continue
        if isinstance(value, str) and not _annotation(key).startswith("str"):
            try:
                value = _parse_value(key, value)
            except ValueError as e:
                problems.append(f"{key}: {e}")
                continue
        elif not _type_ok(key, value):
            problems.append(f"{key}: expected {_annotation(key)}, got {type(value).__name__} {value!r}")
            continue
        kwargs[key] = value
    config = dataclasses.replace(base or TrialConfig(), **kwargs)
    problems += config.problems()
    if problems:
        raise ConfigError(problems, where)
    return config


def batch_split_problem(batch_size: int, micro_batch_size: int, workers: int) -> str | None:
    """Why `batch_size` sequences do not split over `workers` DDP ranks in micro-batches of
    `micro_batch_size` (0: each rank's whole share), or None. The one statement of the rule: the
    config, the space checker and the loop all ask it."""
    share = batch_size // workers
    micro = micro_batch_size or share
    if batch_size % workers:
        return f"batch_size: {batch_size} sequences do not split evenly over {workers} workers"
    if not micro or share % micro:
        return (
            f"micro_batch_size: {micro} does not divide the {share} sequences each of {workers} "
            f"worker{'s' if workers > 1 else ''} takes of batch_size={batch_size}"
        )
    return None
