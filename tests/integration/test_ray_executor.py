"""The Ray executor on a real Ray cluster of two nodes on loopback (no mocks): the same
results as the local executor, refusal of what the cluster cannot hold, actors that die.

One cluster for the module (Ray's start-up takes seconds): a head node with 4 CPUs and a
custom resource ``head``, and a second node with 2 CPUs and a custom resource ``second``.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from cli import dataflow
from deadlines import HANG, wait_until
from engine_stages import BrokenPrepare, Load, Scale, make_jobs, total
from ray_stages import (
    AlwaysExit,
    Attempts,
    ExitOnce,
    Fill,
    HoldJob,
    LateReader,
    Where,
    without_times,
)

from dataflow.execution.local import LocalExecutor, StageDef
from dataflow.execution.state import Limits
from dataflow.scheduler import PlacementError

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from dataflow.execution.rayexec import RayExecutor, RayResources  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GEOMETRY = Path(__file__).parent / "harness_data" / "geometry.yaml"

NODE = {
    "node_ip_address": "127.0.0.1",
    "include_dashboard": False,
    "object_store_memory": 100 << 20,
}


def default_route() -> bool:
    """Whether this network namespace has a default route (``/proc/net/route``)."""
    with open("/proc/net/route") as f:
        return any(line.split()[1] == "00000000" for line in list(f)[1:])


@pytest.fixture(scope="module")
def cluster():
    if default_route():  # else ray.init would try the host's outward address for minutes
        pytest.fail(
            "a default route: Ray 2.60 rewrites the cluster's 127.0.0.1 to this host's outward "
            "address and cannot join it; run the Ray tests in a loopback-only network namespace "
            "(unshare --net, as CI does: docs/ray.md, 'Loopback')"
        )
    # a dead node noticed in about a second (with Ray's default health checks the node test
    # took 17 s here rather than 2.5 s)
    quick = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    head = {**NODE, "num_cpus": 4, "resources": {"head": 1}, "_system_config": quick}
    with pytest.MonkeyPatch.context() as env:
        # Ray's default, whatever a runtime started earlier in this process left behind
        # (RAY_AUTH_MODE=token): with it the cluster wants a token the `dataflow` processes
        # the tests start do not send (and RAY_AUTH_MODE=disabled made actors die here)
        env.delenv("RAY_AUTH_MODE", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args=head)
        second = cluster.add_node(**NODE, num_cpus=2, resources={"second": 1})
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        try:
            yield {
                "address": cluster.address, "cluster": cluster, "node": second,
                "second": second.node_id,
            }  # fmt: skip
        finally:
            ray.shutdown()
            cluster.shutdown()


def fan_in():
    return [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("x2", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 2}),
        StageDef(
            "x5", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 5, "fail_on": 3}
        ),
        StageDef("sum", total, {"a": ("x2", "vec"), "b": ("x5", "vec")}, ("total",)),
        StageDef("keep", Scale, {"vec": ("x2", "vec")}, ("vec",), arguments={"factor": 7}),
    ]


def summary(results):
    """What a user gets of each result: job, ok, failing stage and reason, and the outputs
    (arrays as bytes, dtype and shape, with their metadata)."""
    out = []
    for r in results:
        outputs = {}
        for key, value in r.outputs.items():
            if isinstance(value, tuple):
                array, meta = value
                value = (array.tobytes(), str(array.dtype), array.shape, meta)
            outputs[key] = value
        out.append((r.job, r.ok, r.stage, r.reason, outputs))
    return out


def test_same_results_as_the_local_executor(cluster, tmp_path):
    sizes = [1, 10, 3, 300_000]  # 300 000 int64: 2.4 MB, through Ray's shared object store
    local = LocalExecutor(fan_in(), output_root=tmp_path / "local")
    expected = local.run(make_jobs(tmp_path / "in", sizes))
    executor = RayExecutor(fan_in(), output_root=tmp_path / "ray")
    results = executor.run(make_jobs(tmp_path / "in2", sizes))
    assert summary(results) == summary(expected)
    assert [r.ok for r in results] == [True, True, False, True]
    array, meta = results[3].outputs[("keep", "vec")]
    np.testing.assert_array_equal(array, np.full(300_000, 14))
    assert meta == {"n": 300_000, "job": "job3"}  # metadata travels beside the Ray object
    # job2's x2 and keep may or may not have run before its x5 failed (its other stages stop)
    assert {k: executor.stage_jobs[k] for k in ("load", "x5", "sum")} == {
        "load": 4, "x5": 3, "sum": 3,
    }  # fmt: skip


def test_a_pipeline_larger_than_the_cluster_is_refused_before_it_starts(cluster, tmp_path):
    stages = fan_in()
    stages[1] = StageDef("x2", Scale, {"vec": ("load", "vec")}, ("vec",), replicas=2)
    big = {"x5": RayResources(num_cpus=3), "sum": RayResources(custom={"scanner": 1})}
    with pytest.raises(PlacementError) as refused:
        RayExecutor(stages, output_root=tmp_path / "out", resources=big)
    message = str(refused.value)
    assert message.startswith("cannot place 6 replicas on the Ray cluster (2 nodes:")
    assert "stage 'sum' replica 0 asks for 1 CPU, 512 MiB memory, 1 'scanner': no node" in message
    # 7 CPUs asked of 6: x5's 3 placed first, then the 1-CPU replicas until none is left
    assert refused.value.problems[1:] == (
        "stage 'x2' replica 1 asks for 1 CPU, 512 MiB memory: taken by the replicas above",
    )
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("placement", [None, "strict-pack"])
def test_an_actor_that_dies_is_restarted_and_its_job_retried(cluster, tmp_path, placement):
    marker = tmp_path / "crashed"
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("once", ExitOnce, {"vec": ("load", "vec")}, ("vec",), {"marker": str(marker)}),
    ]
    executor = RayExecutor(stages, output_root=tmp_path / "out", placement=placement)
    results = executor.run(make_jobs(tmp_path / "in", [2, 3]))  # restarted in its bundle
    assert marker.exists()  # the first job's actor did die
    assert [(r.job, r.ok) for r in results] == [("job0", True), ("job1", True)]
    assert [r.outputs[("once", "vec")][0].tolist() for r in results] == [[2, 2], [2, 2, 2]]


def test_an_actor_killed_mid_job_is_restarted_and_the_job_run_again(cluster, tmp_path):
    log, never = tmp_path / "attempts.log", tmp_path / "never"
    arguments = {"log": str(log), "until": str(never), "seconds": HANG}
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", Attempts, {"vec": ("load", "vec")}, ("vec",), arguments),
    ]
    executor = RayExecutor(stages, output_root=tmp_path / "out")
    done: list = []
    runner = threading.Thread(
        target=lambda: done.append(executor.run(make_jobs(tmp_path / "in", [4]))), daemon=True
    )
    runner.start()
    wait_until(log.exists, "the job to start in its actor")
    ray.kill(executor.actors["slow#0"], no_restart=False)  # as a crash: Ray may restart it
    runner.join(HANG)
    assert not runner.is_alive()
    [result] = done[0]
    assert result.ok, result.reason
    assert result.outputs[("slow", "vec")][0].tolist() == [10] * 4
    pids = log.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # run again, in a new process


def test_each_job_ends_once_when_restarts_run_out(cluster, tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("crash", AlwaysExit, {"vec": ("load", "vec")}, ("vec",)),
    ]
    limits = Limits(max_restarts=1, restart_backoff=0.01, restart_backoff_max=0.02)
    executor = RayExecutor(stages, output_root=tmp_path / "out", limits=limits)
    results = executor.run(make_jobs(tmp_path / "in", [1, 2, 3]))
    assert [r.job for r in results] == ["job0", "job1", "job2"]
    assert all(not r.ok and r.stage == "crash" for r in results)
    assert "actor died" in results[0].reason


def test_a_stage_timeout_kills_the_actor_and_fails_that_job_only(cluster, tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("scale", Scale, {"vec": ("load", "vec")}, ("vec",), {"sleep_on": 2}, timeout=1),
    ]
    results = RayExecutor(stages, output_root=tmp_path / "out").run(
        make_jobs(tmp_path / "in", [1, 2, 3])
    )  # job 2 sleeps for ever: the run does not wait for it
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "stage 'scale' timed out after 1 s"


def test_a_stage_that_cannot_start_fails_its_jobs_with_the_reason(cluster, tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("model", BrokenPrepare, {"vec": ("load", "vec")}, ("vec",)),
    ]
    executor = RayExecutor(stages, output_root=tmp_path / "out", limits=Limits(max_restarts=1))
    results = executor.run(make_jobs(tmp_path / "in", [1, 2]))
    assert [(r.ok, r.stage) for r in results] == [(False, "model"), (False, "model")]
    assert "RuntimeError: model file missing" in results[0].reason
    assert "Traceback" in results[0].details


@pytest.mark.parametrize("placement", [None, "pack"])  # pack: Ray moves the lost bundle
def test_a_node_that_dies_mid_job_has_its_job_run_again_on_a_node_that_replaces_it(
    cluster, tmp_path, placement
):
    log, never = tmp_path / "attempts.log", tmp_path / "never"
    arguments = {"log": str(log), "until": str(never), "seconds": HANG}
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", Attempts, {"vec": ("load", "vec")}, ("vec",), arguments),
    ]
    pinned = {"slow": RayResources(custom={"second": 1})}
    executor = RayExecutor(
        stages, output_root=tmp_path / "out", resources=pinned, placement=placement
    )
    done: list = []
    runner = threading.Thread(
        target=lambda: done.append(executor.run(make_jobs(tmp_path / "in", [4]))), daemon=True
    )
    runner.start()
    wait_until(log.exists, "the job to start on the second node")
    c = cluster["cluster"]
    c.remove_node(cluster["node"], allow_graceful=False)  # the node dies with its actor
    cluster["node"] = c.add_node(**NODE, num_cpus=2, resources={"second": 1})
    cluster["second"] = cluster["node"].node_id
    runner.join(HANG)
    assert not runner.is_alive()
    [result] = done[0]
    assert result.ok, result.reason
    assert result.outputs[("slow", "vec")][0].tolist() == [10] * 4
    assert len(log.read_text().split()) == 2  # run again, once


def test_an_array_lost_with_its_node_has_its_job_run_again_from_its_payload(cluster, tmp_path):
    """Every stage on the second node: once its actors are up (after job0), ``load``'s
    array is kept in that node's store (all its readers are there). ``sum`` reads it only
    after ``slow`` is done, and the node dies meanwhile: the array is lost with it, and
    job1 runs again from its payload, on the node that replaces it."""
    log, go = tmp_path / "runs.log", tmp_path / "go"
    arguments = {"log": str(log), "hold": "job1", "go": str(go), "seconds": HANG}
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", HoldJob, {"vec": ("load", "vec")}, ("vec",), arguments),
        StageDef("sum", total, {"a": ("load", "vec"), "b": ("slow", "vec")}, ("total",)),
    ]
    there = RayResources(num_cpus=0.5, custom={"second": 0.3})
    executor = RayExecutor(
        stages, output_root=tmp_path / "out", limits=Limits(max_jobs=1),
        resources=dict.fromkeys(("load", "slow", "sum"), there),
    )  # fmt: skip
    done: list = []
    jobs = make_jobs(tmp_path / "in", [20_000, 20_000])  # 160 kB: kept (smaller go inline)
    runner = threading.Thread(target=lambda: done.append(executor.run(jobs)), daemon=True)
    runner.start()
    wait_until(lambda: log.exists() and "job1 " in log.read_text(), "job1 in slow")
    c = cluster["cluster"]
    c.remove_node(cluster["node"], allow_graceful=False)  # its store goes with it
    cluster["node"] = c.add_node(**NODE, num_cpus=2, resources={"second": 1})
    cluster["second"] = cluster["node"].node_id
    go.touch()
    runner.join(HANG)
    assert not runner.is_alive()
    assert [(r.job, r.ok) for r in done[0]] == [("job0", True), ("job1", True)], done[0]
    assert [r.outputs[("sum", "total")] for r in done[0]] == [220_000, 220_000]
    assert executor.runs_again == 1
    runs = log.read_text().split("\n")
    assert sum(line.startswith("job1 ") for line in runs) == 2  # the whole job again


@pytest.mark.parametrize("placement", [None, "pack"])
def test_a_stage_pinned_to_the_second_node_runs_there(cluster, tmp_path, placement):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("where", Where, {"vec": ("load", "vec")}, ("node", "vec")),
        StageDef("back", Scale, {"vec": ("where", "vec")}, ("vec",)),
    ]
    pinned = {"where": RayResources(custom={"second": 1})}
    executor = RayExecutor(
        stages, output_root=tmp_path / "out", resources=pinned, placement=placement
    )
    results = executor.run(make_jobs(tmp_path / "in", [200_000]))  # 1.6 MB there and back
    [result] = results
    assert result.ok, result.reason
    assert result.outputs[("where", "node")] == cluster["second"]
    np.testing.assert_array_equal(result.outputs[("back", "vec")][0], np.full(200_000, 6))


def test_arrays_made_before_their_reader_is_ready_go_out_whole(cluster, tmp_path):
    """Until its reader's actor is ready, where it will run is not known, so a stage's array
    goes back through Ray's object store, which copies it after the call returned: it must
    not be in our node store then (the call gave that allocation back, and another actor
    could write there: ct-segmentation on Ray lost segments this way in 2 of 12 studies)."""
    done = tmp_path / "done"
    done.mkdir()
    stages = [
        StageDef("fill", Fill, {"payload": None}, ("vec", "shared"), arguments={"done": str(done)}),
        StageDef(
            "read", LateReader, {"vec": ("fill", "vec")}, ("intact",),
            arguments={"done": str(done), "count": 2, "seconds": HANG},
        ),
    ]  # fmt: skip
    executor = RayExecutor(stages, output_root=tmp_path / "out", limits=Limits(max_jobs=8))
    sizes = [200_000 + k for k in range(6)]  # 1.6 MB each: never inline
    results = executor.run(make_jobs(tmp_path / "in", sizes))
    assert [r.ok for r in results] == [True] * 6, [r.reason for r in results]
    assert all(r.outputs[("read", "intact")] for r in results)
    early = [r for r in results if r.job in ("job0", "job1")]  # made while read was starting
    assert [r.outputs[("fill", "shared")] for r in early] == [0, 0]


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the run's summary (it holds times), by relative path;
    each job's provenance record without its times."""
    return {
        str(p.relative_to(root)): (
            without_times(p.read_bytes()) if p.name == "provenance.json" else p.read_bytes()
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def test_dataflow_run_with_the_ray_executor_writes_the_same_files(cluster, tmp_path):
    for i, values in enumerate(([1.5, 2.0, 3.0], list(range(50_000)))):
        (tmp_path / "in" / f"study{i}").mkdir(parents=True)
        np.save(tmp_path / "in" / f"study{i}" / "v.npy", np.array(values))
    local = dataflow("run", GEOMETRY, "-i", tmp_path / "in", "-o", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    ray_run = dataflow(
        "run", GEOMETRY, "-i", tmp_path / "in", "-o", tmp_path / "ray",
        "--executor", "ray", "--address", cluster["address"],
    )  # fmt: skip
    assert ray_run.returncode == 0, ray_run.stderr
    written = files(tmp_path / "ray")
    assert written == files(tmp_path / "local")
    assert any(name.endswith("report.json") for name in written)


def too_big(folder: Path, requests: str = "{cpu: 9}") -> Path:
    """The geometry pipeline, its ``double`` stage asking for ``requests`` (9 CPUs), in
    ``folder``."""
    pipeline = folder / "big.yaml"
    text = GEOMETRY.read_text().replace(
        "  stage: geometry_stages:Double",
        f"  stage: geometry_stages:Double\n  requests: {requests}",
    )
    pipeline.write_text(text)
    (folder / "geometry_stages.py").write_bytes(
        (GEOMETRY.parent / "geometry_stages.py").read_bytes()
    )
    return pipeline


def test_dataflow_run_refuses_a_pipeline_the_cluster_cannot_hold(cluster, tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "v.npy", np.ones(3))
    pipeline = too_big(tmp_path)
    out = dataflow(
        "run", pipeline, "-i", tmp_path / "in", "-o", tmp_path / "out",
        "--executor", "ray", "--address", cluster["address"],
    )  # fmt: skip
    assert out.returncode == 2
    assert "cannot place 3 replicas on the Ray cluster" in out.stderr
    assert "stage 'double' replica 0 asks for 9 CPU, 512 MiB memory: no node has as much" in (
        out.stderr
    )


def test_dataflow_plan_shows_each_replica_on_a_node_of_the_cluster(cluster):
    out = dataflow("plan", GEOMETRY, "--executor", "ray", "--address", cluster["address"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"on the Ray cluster at {cluster['address']}: 2 nodes" in lines
    nodes = [line for line in lines if line.startswith("  node ")]
    assert len(nodes) == 2  # in Ray's order (the second node may come first, once replaced)
    assert sum("1 'second'" in node for node in nodes) == 1  # the second node's own resource
    assert sum(": 4 CPU, " in node for node in nodes) == 1  # the head
    table = lines[lines.index(next(x for x in lines if x.startswith("stage "))) :]
    assert sorted(row.split()[0] for row in table[1:4]) == ["double", "report", "source"]
    assert all(row.split()[2] in ("0", "1") for row in table[1:4])  # each on a node


def test_dataflow_plan_refuses_what_run_refuses_and_an_address_where_nothing_answers(
    cluster, tmp_path
):
    pipeline = too_big(tmp_path)
    out = dataflow("plan", pipeline, "--executor", "ray", "--address", cluster["address"])
    assert out.returncode == 2
    assert "stage 'double' replica 0 asks for 9 CPU, 512 MiB memory: no node has as much" in (
        out.stderr
    )
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = dataflow("plan", GEOMETRY, "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert f"error: --address 127.0.0.1:{port}: no Ray cluster to connect to (nothing " in (
        out.stderr
    )


def test_a_custom_resource_in_the_pipeline_file_pins_a_stage_to_the_node_that_has_it(
    cluster, tmp_path
):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "v.npy", np.arange(5.0))
    pipeline = too_big(tmp_path, "{resources: {second: 1}}")
    out = dataflow("plan", pipeline, "--executor", "ray", "--address", cluster["address"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    second = next(
        i for i, x in enumerate(x for x in lines if x.startswith("  node ")) if "'second'" in x
    )
    table = lines[lines.index(next(x for x in lines if x.startswith("stage "))) :]
    [double] = [row.split() for row in table[1:] if row.startswith("double ")]
    assert double[2] == str(second) and double[-1] == "second=1"
    ran = {}
    for executor in ("local", "ray"):
        options = (
            ("--executor", "ray", "--address", cluster["address"]) if executor == "ray" else ()
        )
        run = dataflow("run", pipeline, "-i", tmp_path / "in", "-o", tmp_path / executor, *options)
        assert run.returncode == 0, run.stderr  # the local executor, one machine, ignores it
        ran[executor] = files(tmp_path / executor)
    assert ran["ray"] == ran["local"] and ran["local"]
    nowhere = too_big(tmp_path, "{resources: {scanner-room: 1}}")
    out = dataflow("plan", nowhere, "--executor", "ray", "--address", cluster["address"])
    assert out.returncode == 2
    assert "stage 'double' replica 0 asks for 1 CPU, 512 MiB memory, 1 'scanner-room'" in out.stderr


def plan_rows(stdout: str) -> tuple[list[str], list[list[str]]]:
    """``dataflow plan --executor ray``'s node lines and its table's rows (split)."""
    lines = stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("stage "))) + 1 :]
    rows = [row.split() for row in table if row and not row.startswith(("on ", "  ", "Ray"))]
    return [x for x in lines if x.startswith("  node ")], rows


def test_placement_strict_pack_reserves_every_replica_on_one_node(cluster, tmp_path):
    ray_ = ("--executor", "ray", "--address", cluster["address"], "--placement", "strict-pack")
    out = dataflow("plan", GEOMETRY, *ray_)
    assert out.returncode == 0, out.stderr
    _, rows = plan_rows(out.stdout)
    assert sorted(row[0] for row in rows) == ["double", "report", "source"]
    assert len({row[2] for row in rows}) == 1 and rows[0][2] in ("0", "1")  # Ray's: one node
    assert "a placement group, placement strict-pack: STRICT_PACK" in out.stdout
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "v.npy", np.arange(4.0))
    for name, options in (("local", ()), ("ray", ray_)):
        run = dataflow("run", GEOMETRY, "-i", tmp_path / "in", "-o", tmp_path / name, *options)
        assert run.returncode == 0, run.stderr
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_a_placement_no_set_of_nodes_can_hold_is_refused_before_it_starts(cluster, tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "v.npy", np.ones(3))
    spread = ("--executor", "ray", "--address", cluster["address"], "--placement", "strict-spread")
    # three replicas, each on a node of its own: the cluster has two nodes
    for out in (
        dataflow("plan", GEOMETRY, *spread),
        dataflow("run", GEOMETRY, "-i", tmp_path / "in", "-o", tmp_path / "out", *spread),
    ):
        assert out.returncode == 2
        assert (
            "cannot reserve 3 replicas together on the Ray cluster with placement strict-spread "
            "(STRICT_SPREAD): no set of its nodes can hold them"
        ) in out.stderr
    assert not list((tmp_path / "out").glob("*/"))  # no job folder: nothing ran
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_a_placement_that_is_not_one_is_a_usage_error(tmp_path):
    out = dataflow("plan", GEOMETRY, "--executor", "ray", "--placement", "sprad")
    assert out.returncode == 2
    assert "--placement 'sprad': expected pack, spread, strict-pack, strict-spread" in out.stderr
    assert "did you mean 'spread'?" in out.stderr
    out = dataflow("plan", GEOMETRY, "--placement", "pack")
    assert out.returncode == 2
    assert "--placement is the Ray cluster's: give it with --executor ray" in out.stderr
