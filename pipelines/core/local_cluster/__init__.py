"""A cluster on this machine, on 127.0.0.1, made of the parts a real one has: an S3-compatible object store, an
MLflow tracking server that keeps its artifacts there, and a Ray head with worker nodes. For the tests, and for
trying the cluster path by hand (docs/cluster.md, "Try the cluster path on one machine").

    with LocalCluster(workers=2) as cluster:
        env = cluster.client_env(os.environ)   # S3, MLflow and Ray settings: what a user of a real cluster sets
        subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/..."], env=env)

    python -m pipelines.core.local_cluster up --dir .cluster     # the same, left running: source .cluster/env.sh
    python -m pipelines.core.local_cluster status --dir .cluster
    python -m pipelines.core.local_cluster down --dir .cluster

The parts, each usable alone, one module each (each module's doc says what the next person needs to know):
- object_store.py    LocalObjectStore: moto's S3 server, reached through AWS_ENDPOINT_URL like a real bucket
- tracking_server.py LocalTrackingServer: `mlflow server`, SQLite backend, artifacts proxied to the store
- ray_nodes.py       LocalRayCluster: a Ray head and worker nodes with one resource each, token-authenticated
- cluster.py         LocalCluster: the three together, with state.json and env.sh in one private directory
- processes.py       what they share: free ports, waiting for a server, finding and ending process trees
- cli.py             `up` / `status` / `down` (run through __main__.py)
"""

from pipelines.core.local_cluster.cli import main
from pipelines.core.local_cluster.cluster import ENV_FILE, STATE_FILE, LocalCluster, env_script, stop_recorded
from pipelines.core.local_cluster.object_store import LocalObjectStore
from pipelines.core.local_cluster.processes import _process_tree as _process_tree  # the tests read these two
from pipelines.core.local_cluster.processes import _processes_using as _processes_using
from pipelines.core.local_cluster.processes import free_port, wait_for_http
from pipelines.core.local_cluster.ray_nodes import LocalRayCluster
from pipelines.core.local_cluster.tracking_server import LocalTrackingServer

__all__ = ["ENV_FILE", "STATE_FILE", "LocalCluster", "LocalObjectStore", "LocalRayCluster", "LocalTrackingServer",
           "env_script", "free_port", "main", "stop_recorded", "wait_for_http"]
