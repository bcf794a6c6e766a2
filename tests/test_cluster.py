"""Scale-out: cluster.yaml passes Ray's own cluster-config schema and keeps its ports private; the
concurrency follows the cluster's largest size; and a search submitted with `ray job submit` to
a two-node Ray cluster on loopback runs trials on both nodes and logs to a real `mlflow server`."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_http

from tunestab import cluster, search, spec

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"


def test_cluster_yaml_passes_rays_cluster_config_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))
    # The same check catches a typo, so passing it means something.
    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["available_node_types"]["gpu_1x"]["max_worker"] = 3
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_binds_services_to_localhost_and_installs_a_cuda_torch():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert re.search(r"mlflow server --host 127\.0\.0\.1 ", head)
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    setup = " ".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and "pip install --quiet -e /home/ray/tunestab" in setup
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-")  # the Ray pyproject.toml pins
    types = config["available_node_types"]
    assert types["head"]["resources"]["GPU"] == 0
    assert {"gpu_1x", "gpu_8x"} <= set(types) and all(types[t]["min_workers"] == 0 for t in ("gpu_1x", "gpu_8x"))


def test_no_credentials_in_the_repository():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|BEGIN (RSA|OPENSSH) PRIVATE KEY")
    git = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    # Outside a git checkout, every file that is not in a hidden folder or a cache.
    tracked = (
        git.stdout.split()
        if git.returncode == 0
        else [
            str(f.relative_to(ROOT))
            for f in ROOT.rglob("*")
            if f.is_file()
            and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(ROOT).parts)
        ]
    )
    assert tracked
    hits = [f for f in tracked if (ROOT / f).is_file() and secret.search((ROOT / f).read_text(errors="ignore"))]
    assert hits == []


def test_max_concurrent_follows_the_clusters_largest_size(tmp_path):
    # What `ray up` writes on the head: node types with the resources the launcher filled in.
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(
        yaml.safe_dump(
            {
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 8, "GPU": 0}, "max_workers": 0},
                    "gpu_1x": {
                        "resources": {"CPU": 4, "GPU": 1, "accelerator_type:L40S": 1},
                        "min_workers": 0,
                        "max_workers": 8,
                    },
                    "gpu_8x": {
                        "resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                        "min_workers": 0,
                        "max_workers": 2,
                    },
                },
            }
        )
    )
    now = [{"CPU": 8.0}]  # only the head is up: no GPU yet

    def concurrent(**resources):
        s = spec.parse(
            {
                "name": "g",
                "strategy": "max_lr",
                "variants": ["baseline"],
                "params": {"lr": {"loguniform": [1e-3, 1.0]}},
                "resources": resources,
            }
        )
        return cluster.max_concurrent(s, now, str(bootstrap))

    assert concurrent(gpus_per_worker=1) == 24  # 8 x 1 + 2 x 8 GPUs
    assert concurrent(gpus_per_worker=0.25) == 96  # four small trials per GPU
    assert concurrent(workers=8, gpus_per_worker=1) == 3  # DDP trials of 8 GPUs
    assert concurrent(gpus_per_worker=1, max_concurrent=5) == 5  # the space decides when it says
    # ... but never more than fit: each extra trial's Train controller would wait, time out and
    # retry while holding resources (the placement-group deadlock of docs/reliability.md).
    assert concurrent(gpus_per_worker=1, max_concurrent=50) == 24
    # A space sized for one GPU counts only that GPU's nodes: 2 x 8 H100s, or 8 L40Ss.
    assert concurrent(gpus_per_worker=1, accelerator_type="H100") == 16
    assert concurrent(gpus_per_worker=0.5, accelerator_type="L40S") == 16
    assert concurrent(gpus_per_worker=1, accelerator_type="A100") == 1  # none: one trial waits for a node
    space = spec.parse(
        {"name": "c", "strategy": "max_lr", "variants": ["baseline"], "params": {"lr": {"loguniform": [1e-3, 1.0]}}}
    )
    assert cluster.max_concurrent(space, [{"CPU": 2.0}], str(tmp_path / "none.yaml")) == 2  # no autoscaler: what is up
    live = [
        {"CPU": 8.0},
        {"CPU": 4.0, "GPU": 1.0, "accelerator_type:L40S": 1.0},
        {"CPU": 96.0, "GPU": 8.0, "accelerator_type:H100": 1.0},
    ]
    gpu_space = dataclasses.replace(space, resources=spec.Resources(gpus_per_worker=1, accelerator_type="H100"))
    assert cluster.max_concurrent(gpu_space, live, str(tmp_path / "none.yaml")) == 8


def test_bad_train_storage_is_refused_before_ray(tmp_path, capsys):
    import ray

    space = tmp_path / "s.yaml"
    space.write_text(
        yaml.safe_dump(
            {"name": "t", "strategy": "max_lr", "variants": ["baseline"], "params": {"lr": {"loguniform": [1e-3, 1.0]}}}
        )
    )
    argv = ["--space", str(space), "--storage", str(tmp_path / "r")]
    assert search.main(argv + ["--train-storage", "ftp://host/x"]) == 2
    assert "train_storage: 'ftp://host/x': unknown scheme 'ftp'" in capsys.readouterr().err
    assert search.main(argv + ["--train-storage", "/proc/nope"]) == 2
    assert "train_storage: cannot write to /proc/nope" in capsys.readouterr().err
    assert search.main(argv + ["--train-storage", "s3://bucket/prefix", "--dry-run"]) == 0
    assert "train storage: s3://bucket/prefix" in capsys.readouterr().out
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------
# two nodes on loopback, a real mlflow server, `ray job submit`


@pytest.fixture
def two_node_cluster(monkeypatch):
    # `ray start --head` turns token auth on when ~/.ray/auth_token exists (earlier local
    # ray.init() calls leave one), but `ray start --address` does not, and is then refused
    # (Ray 2.60). This loopback cluster tests placement and tracking, not auth: off for all.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dashboard = free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"]
    # The head holds the trial drivers (no CPU) and room for one 1-CPU Train worker; the second
    # node has room for one more. Two trials at once therefore need both nodes.
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            *common,
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [ray_bin, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"second": 1}', *common],
            check=True,
            capture_output=True,
        )
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 60)
        yield ray_bin, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)


@pytest.mark.slow
def test_search_submitted_to_a_two_node_cluster_logs_to_an_mlflow_server(tmp_path, two_node_cluster, mlflow_server):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors, list_nodes

    ray_bin, gcs, dashboard = two_node_cluster
    tracking, artifact_store = mlflow_server.uri, mlflow_server.artifacts
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "cluster",
                "strategy": "max_lr",
                "variants": ["baseline", "qk_norm"],
                "trial": {
                    "n_layer": 2,
                    "n_head": 2,
                    "d_model": 32,
                    "seq_len": 32,
                    "batch_size": 4,
                    "steps": 60,
                    "warmup_steps": 5,
                    "report_every": 10,
                    "eval_every": 60,
                    "checkpoint_every": 30,
                    "eval_batches": 2,
                },
                "params": {"lr": {"loguniform": [1e-3, 30.0]}},
                "max_lr": {"ratio": 1.25, "slots": 1, "max_trials": 2, "seeds": 0},
                # one 1-CPU Train worker per trial, two trials at once: one on each node
                "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent": 2},
            }
        )
    )
    submit = [
        ray_bin,
        "job",
        "submit",
        "--address",
        dashboard,
        "--",
        sys.executable,
        "-m",
        "tunestab.search",
        "--space",
        str(space),
        "--tracking-uri",
        tracking,
        "--storage",
        str(tmp_path / "results"),
    ]
    # On a loaded machine the head's job agent can register a minute after the dashboard answers;
    # until then the dashboard refuses the job ("No available agent to submit job, please try
    # again later"), and nothing has run, so asking again is what a user would do.
    deadline = time.monotonic() + 180
    while True:
        job = subprocess.run(submit, capture_output=True, text=True, timeout=900)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout and "| baseline |" in job.stdout

    nodes = {n.node_id for n in list_nodes(address=dashboard)}
    workers = list_actors(
        address=dashboard,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        limit=1000,
        raise_on_missing_output=False,
    )
    assert len(nodes) == 2 and {w.node_id for w in workers} == nodes, "trials did not run on both nodes"

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all(client.get_metric_history(r.info.run_id, "loss") for r in children)
    assert "summary.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    # Artifacts went through the server into its own store, not to a path on the client side.
    assert list(artifact_store.rglob("summary.md"))
    assert (
        json.loads(next((tmp_path / "results").glob("cluster-*/tunestab_search.json")).read_text())["tracking_uri"]
        == tracking
    )
