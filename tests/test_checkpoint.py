"""Checkpoints: written atomically with a clear error on a full disk, read newest first past a
corrupt one, and loaded to the CPU whatever device the trial runs on."""

import io

import pytest
import torch
from test_loop import tiny

from tunestab import checkpoint, compute, data
from tunestab.checkpoint import CHECKPOINT_FILE, CheckpointError
from tunestab.data import cache_dir
from tunestab.loop import model_config, restore, run
from tunestab.session import LocalSession
from tunestab.train import main


# Loading into meta parameters copies nothing, and torch says so once per tensor: expected here.
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_a_checkpoint_resumes_onto_another_device(tmp_path):
    """On a GPU, checkpoints were mapped to CUDA, so the RNG state became a CUDA tensor and
    torch.set_rng_state refused it: every resume and worker restart failed. The meta device
    stands in for CUDA here: a model there accepts the state, and the RNG state stays on the CPU.
    (Untied embeddings: moving a model to meta unties them, which moving it to CUDA does not.)"""
    cfg = tiny(checkpoint_every=10, steps=20, variant="sigma_reparam", tie_embeddings=False)
    run(cfg, LocalSession(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO()))
    saved, _ = checkpoint.load_checkpoint([str(tmp_path / "ckpt" / "step_000010")])
    assert saved["step"] == 10 and list(saved["members"]) == ["0"]  # a lone trial: a population of one
    state = saved["members"]["0"]
    assert state["rng_cpu"].device.type == "cpu" and state["rng_cpu"].dtype == torch.uint8
    assert all(t.device.type == "cpu" for t in state["model"].values())

    mcfg = model_config(cfg)
    s = compute.setup(mcfg, torch.device("meta"))
    train_tokens, _ = data.load_splits(mcfg.data, mcfg.tokenizer, cache_dir(mcfg), mcfg.val_fraction)
    batches = data.Batches(train_tokens, mcfg.batch_size, mcfg.seq_len, mcfg.seed)
    torch.manual_seed(1234)
    step, divergence = restore(LocalSession(resume_from=str(tmp_path / "ckpt" / "step_000010")), s, batches, mcfg)
    assert step == 10 and divergence.loss0 == state["loss0"]
    assert torch.equal(torch.get_rng_state(), state["rng_cpu"])
    assert next(s.model.parameters()).device.type == "meta"
    assert batches.state_dict() == state["data"]


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_still_resumes(tmp_path):
    import resource

    cfg = tiny(checkpoint_every=10)
    uninterrupted = LocalSession(out=io.StringIO())
    run(cfg, uninterrupted)

    class DiskFillsUp(LocalSession):
        """Once the step-10 checkpoint is safely stored, no file on this machine may grow past
        half a checkpoint: the kernel fails the next checkpoint's write part-way (EFBIG), as a
        full disk fails it (ENOSPC). Python ignores SIGXFSZ, so the write raises instead."""

        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir:
                size = (tmp_path / "ckpt" / "step_000010" / CHECKPOINT_FILE).stat().st_size
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(CheckpointError) as e:
            run(cfg, DiskFillsUp(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO()))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert "checkpoint of step 20" in str(e.value) and "File too large" in str(e.value)
    assert "previous checkpoint is untouched" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000010"]

    resumed = LocalSession(resume_from=str(tmp_path / "ckpt" / "step_000010"), out=io.StringIO())
    run(cfg, resumed)
    assert [r["step"] for r in resumed.reports] == [20, 30, 40]
    assert resumed.reports[-1]["val_loss"] == uninterrupted.reports[-1]["val_loss"]


def test_a_truncated_checkpoint_is_named_and_the_one_before_it_is_used(tmp_path, capsys):
    cfg = tiny(checkpoint_every=10)
    full = LocalSession(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO())
    run(cfg, full)
    latest = tmp_path / "ckpt" / "step_000030" / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    resumed = LocalSession(resume_from=str(latest.parent), out=io.StringIO())
    run(cfg, resumed)
    assert f"skipping checkpoint {latest}" in capsys.readouterr().err
    assert [r["step"] for r in resumed.reports] == [30, 40]  # from step 20, the one before
    assert resumed.reports[-1]["val_loss"] == full.reports[-1]["val_loss"]

    # With no good checkpoint left: one message naming each file, exit 2, no training.
    for step in ("step_000010", "step_000020"):
        (tmp_path / "ckpt" / step / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    args = ["--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2", "--resume-from", str(latest.parent)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no readable checkpoint" in err
    assert all(f"step_0000{n}0/checkpoint.pt" in err for n in (1, 2, 3))
