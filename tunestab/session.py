"""Where a worker's reports and checkpoints go, and where it finds checkpoints to resume from.

`LocalSession`: one process, no Ray; reports are JSON lines, checkpoints are copied to a folder.
`RaySession`: inside a Ray Train worker; `ray.train.report` and `ray.train.get_checkpoint`, and
DDP across the trial's workers. The loop (tunestab/loop.py) sees only this interface:
`rank`, `world_size`, `device(cfg)`, `wrap_ddp`, `report(metrics, checkpoint_dir)`,
`checkpoints_to_resume()` and `stopped(member_ids)`, the members of a population the driver has
stopped since (the TEV scheduler's verdicts, through tunestab/stop_board.py). Ray is imported
only by RaySession.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import TrialConfig


def local_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class LocalSession:
    """One process, no Ray: reports become JSON lines; checkpoints are copied to checkpoint_dir."""

    rank, world_size = 0, 1
    wrap_ddp = None  # one process: nothing to synchronise

    def __init__(self, checkpoint_dir: str | None = None, resume_from: str | None = None, out=None, stop=None):
        self.checkpoint_dir, self.resume_from = checkpoint_dir, resume_from
        self.out = out or sys.stdout
        self.reports: list[dict] = []
        # {member id: step}: stop that member once a report at or after that step has been made,
        # as a driver that saw that report would (tests stand in for the TEV scheduler with it).
        self.stop = dict(stop or {})

    def stopped(self, members: list[str]) -> set[str]:
        step = self.reports[-1]["step"] if self.reports else 0
        return {m for m in members if m in self.stop and step >= self.stop[m]}

    def device(self, cfg: TrialConfig) -> torch.device:
        return local_device(cfg)

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
    """Inside a Ray Train worker: ray.train.report, ray.train.get_checkpoint, DDP."""

    def __init__(self, echo: bool = False, board: str | None = None, trial_id: str | None = None):
        import ray.train

        self._train, self.echo = ray.train, echo
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._tmp = []
        self.wrap_ddp = self._wrap_ddp if self.world_size > 1 else None
        self.board, self.trial_id = board, trial_id

    def stopped(self, members: list[str]) -> set[str]:
        """The members the search's stop board lists for this trial. Every rank drops the same
        members at the same step (rank 0 asks and broadcasts), or DDP would wait forever."""
        if not self.board or not members:
            return set()
        from .stop_board import ask

        found = ask(self.board, self.trial_id) if self.rank == 0 else None
        if self.world_size > 1:
            import torch.distributed as dist

            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return set(members) & set(found or ())

    def device(self, cfg: TrialConfig) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @staticmethod
    def _wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        if self.echo and self.rank == 0:
            print(json.dumps(metrics), flush=True)
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            self._train.report(metrics, checkpoint=ckpt)
        except OSError as e:  # the upload to storage: a full disk, a lost mount
            raise CheckpointError(
                f"cannot store the checkpoint of step {metrics['step']}: {e}; the previous checkpoint is untouched"
            ) from e

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
    return [
        Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem)
        for n in names
        if n.startswith("checkpoint_") and n < name
    ]
