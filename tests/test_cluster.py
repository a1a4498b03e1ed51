"""The job on a multi-node Ray cluster simulated on this machine: model copies on several nodes."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import ray
from conftest import after_first_commit
from corpus import jsonl_bytes, make_docs
from ray.cluster_utils import Cluster
from ray.data import DataContext

from pipeline.config import load_config
from pipeline.job import run_embedding_job


@pytest.fixture()
def cluster(tmp_path_factory):
    """A head and two worker nodes, each with its own raylet and object store."""
    ray.shutdown()  # leave the tests' shared local Ray; ray_local restarts it when next needed
    # Cluster() writes its address file into Ray's default temp folder without creating it first.
    default_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    os.makedirs(os.path.join(default_tmp, "ray"), exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            # A spare CPU on the head: a retried read task must not wait behind the actors' CPUs.
            "num_cpus": 2,
            "object_store_memory": 100 * 2**20,
            "temp_dir": str(tmp_path_factory.getbasetemp() / "ray-cluster"),
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        # One embed slot per worker node, as one GPU per node would be: actors that ask for it spread.
        cluster.add_node(num_cpus=2, resources={"embed_slot": 1}, object_store_memory=100 * 2**20)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.timeout(240)
def test_actors_on_more_than_one_node_embed_every_document_once(cluster, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    docs = {}
    for shard in range(4):
        part = make_docs(150, seed=20 + shard, prefix=f"n{shard}")
        docs |= {d["id"]: d["text"] for d in part}
        (tmp_path / "in" / f"part-{shard}.jsonl").write_bytes(jsonl_bytes(part))
    config = load_config(
        None,
        {
            "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"),
            "model": str(tiny_checkpoint),
            "id_field": "id",
            "tokens_per_batch": 256,
            "rows_per_tokenize_batch": 64,
            # One embed slot each: the two model copies must sit on the two worker nodes.
            "actors": {"min_actors": 2, "max_actors": 2, "resources_per_actor": {"embed_slot": 1}},
        },
    )
    # Hand out blocks only once both actors are up, or the first one can take the whole corpus.
    context = DataContext.get_current()
    saved_wait, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    # And by load alone: by locality, the actor beside the one read task's blocks could take them all.
    options = context.execution_options
    saved_locality, options.actor_locality_enabled = options.actor_locality_enabled, False
    try:
        summary = run_embedding_job(config)
    finally:
        context.wait_for_min_actors_s = saved_wait
        options.actor_locality_enabled = saved_locality
    assert len(ray.nodes()) == 3
    worker_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("embed_slot")}
    # The two model copies sat on the two worker nodes. Which of them Ray Data hands each block to is
    # its own affair: in a loaded run, one copy can be free every time a block arrives.
    embedders = [a for a in ray._private.state.actors().values() if a["ActorClassName"].endswith("(EmbedStage))")]
    assert {a["Address"]["NodeID"] for a in embedders} == worker_nodes, embedders
    assert summary.embed_nodes and set(summary.embed_nodes) <= worker_nodes
    ids = pq.read_table(tmp_path / "out" / "parts").column("id").to_pylist()
    assert sorted(ids) == sorted(docs)


@pytest.mark.timeout(300)
def test_a_worker_node_removed_mid_job_loses_and_duplicates_nothing(cluster, tmp_path, tiny_checkpoint):
    """The job finishes, or fails cleanly and a re-run finishes; verify passes either way."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.io.layout import COMMITS
    from pipeline.verify import verify_output

    (tmp_path / "in").mkdir()
    docs = {}
    for shard in range(6):
        part = make_docs(300, seed=60 + shard, prefix=f"r{shard}")
        docs |= {d["id"]: d["text"] for d in part}
        (tmp_path / "in" / f"part-{shard}.jsonl").write_bytes(jsonl_bytes(part))
    settings = {
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"),
        "model": str(tiny_checkpoint),
        "id_field": "id",
        "tokens_per_batch": 256,
        "rows_per_tokenize_batch": 32,
        "target_file_mb": 0.03,
        "actors": {"min_actors": 2, "max_actors": 2},
    }
    victim = cluster.list_all_nodes()[-1]
    remover, removed = after_first_commit(
        LocalFileSystem(), str(tmp_path / "out" / COMMITS), lambda: cluster.remove_node(victim)
    )
    try:
        run_embedding_job(load_config(None, settings))
    except Exception as err:  # a clean failure is allowed; the re-run below must finish the job
        print(f"first run failed after the node removal: {type(err).__name__}: {err}")
        run_embedding_job(load_config(None, settings))
    remover.join(timeout=5)
    assert removed.is_set(), "the worker node was removed mid-job"
    report = verify_output(str(tmp_path / "out"))
    assert report.ok, report.problems
    ids = pq.read_table(tmp_path / "out" / "parts").column("id").to_pylist()
    assert sorted(ids) == sorted(docs)
