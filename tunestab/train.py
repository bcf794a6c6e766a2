"""`python -m tunestab.train`: one trial, in this process or through a Ray TorchTrainer.

    python -m tunestab.train                                   # baseline, offline data, no Ray
    python -m tunestab.train --variant qk_norm_cap --set lr=3e-2 --set n_layer=8
    python -m tunestab.train --set bf16=true --set compile=true  # the GPU code path, on a CPU
    python -m tunestab.train --workers 2                       # the same loop in a Ray TorchTrainer

Without `--workers` the loop (tunestab/loop.py) runs here with a LocalSession, printing each
report as one JSON line, and needs neither Ray nor MLflow. Bad input is one message listing every
problem, with exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import data as data_mod
from .checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from .config import ConfigError, config_from
from .loop import micro_batch, run
from .session import LocalSession


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
    ap = argparse.ArgumentParser(
        prog="python -m tunestab.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--variant",
        default=None,
        help="baseline, qk_norm, softcap, qk_norm_cap, qk_fc_norm, qkv_norm, mlra or sigma_reparam (default baseline)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrialConfig field, e.g. --set lr=3e-2 --set n_layer=8 (repeatable)",
    )
    ap.add_argument(
        "--workers", type=int, default=0, help="run through Ray TorchTrainer on N workers (0: in this process, no Ray)"
    )
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
        micro_batch(cfg, max(args.workers, 1))
        if args.resume_from and not (Path(args.resume_from) / CHECKPOINT_FILE).is_file():
            raise ConfigError([f"--resume-from: no {CHECKPOINT_FILE} in {args.resume_from}"], "command line")
        if args.resume_from:
            try:
                load_checkpoint(LocalSession(resume_from=args.resume_from).checkpoints_to_resume())
            except CheckpointError as e:
                raise ConfigError([f"--resume-from: {e}"], "command line") from None
        # Fail on data and tokenizer problems here, before any training or Ray start-up; the
        # tokenised result is cached, so workers load it instead of tokenising again.
        data_mod.load_splits(cfg.data, cfg.tokenizer, data_mod.cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None)
    except (ConfigError, data_mod.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.workers:
        from .ray_trial import run_with_ray

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
