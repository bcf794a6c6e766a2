"""Each variant's output scale at initialisation against the baseline's: the confound check.

    python bench/init_scale.py                     # 4 layers x width 128, one batch of the builtin corpus

A variant whose layers start at another scale than the baseline's is compared at a different
starting point, whatever its remedy does. Prints, per variant and init option, the ratio of each
layer's mean output norm (QKV, proj, FC1, FC2) and of its largest attention logit to the
baseline's, on the same batch; the first and the last block. docs/results.md cites it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import data  # noqa: E402
from tunestab.config import TrialConfig  # noqa: E402
from tunestab.model import GPT  # noqa: E402

SHAPE = dict(vocab_size=257, n_layer=4, d_model=128, n_head=4, seq_len=128)
NAMES = ("out_norm_qkv", "out_norm_proj", "out_norm_fc1", "out_norm_fc2", "attn_logit_max")


def stats(x: torch.Tensor, **kw) -> dict:
    torch.manual_seed(0)
    model = GPT(TrialConfig(**SHAPE, **kw))
    out = {}
    with torch.no_grad():
        model(x, None, out)
    return {k: v.item() for k, v in out.items()}


def main() -> int:
    tokens, _ = data.load_splits("builtin", "bytes", str(Path.home() / ".cache" / "tunestab"), 0.05)
    x = torch.from_numpy(tokens[: 16 * 129].astype("int64")).view(16, 129)[:, :128]
    base = stats(x)
    last = SHAPE["n_layer"] - 1
    print(
        f"ratio to the baseline at initialisation, {SHAPE['n_layer']} layers x width {SHAPE['d_model']}, "
        f"one batch of 16 x 128 bytes (block 0 / block {last})\n"
    )
    print("| variant | init | " + " | ".join(NAMES) + " |")
    print("|---|---|" + "---|" * len(NAMES))
    for variant, inits in (("mlra", ("matched", "factors")), ("sigma_reparam", ("matched", "one"))):
        key = "mlra_init" if variant == "mlra" else "sigma_reparam_gamma"
        for init in inits:
            s = stats(x, variant=variant, **{key: init})
            cells = [
                f"{s[f'layer_0/{n}'] / base[f'layer_0/{n}']:.2f} / {s[f'layer_{last}/{n}'] / base[f'layer_{last}/{n}']:.2f}"
                for n in NAMES
            ]
            print(f"| {variant} | {key}: {init} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
