"""The Ray executor's placement check and plan, pure (no Ray runtime): where each replica
goes on a cluster's nodes, and every reason a set of replicas does not fit."""

from __future__ import annotations

import pytest

from dataflow.execution.rayexec import (
    MIB,
    RayNode,
    RayPlan,
    RayResources,
    address_problem,
    check_fits,
)
from dataflow.scheduler import PlacementError

HEAD = {"CPU": 4.0, "memory": 8192.0 * MIB, "node:127.0.0.1": 1.0}
SECOND = {"CPU": 2.0, "memory": 4096.0 * MIB, "second": 1.0}


def test_pinned_replicas_go_to_the_node_with_their_resource_the_rest_first_fit():
    replicas = [
        ("load", 0, RayResources()),
        ("model", 0, RayResources(num_cpus=2, custom={"second": 1})),
        ("write", 0, RayResources(num_cpus=3)),
    ]
    placed = check_fits(replicas, [HEAD, SECOND])
    assert {(stage, node) for stage, _, _, node in placed} == {
        ("model", 1), ("write", 0), ("load", 0),
    }  # fmt: skip


def test_the_plan_names_each_node_and_what_is_requested_there():
    nodes = [RayNode("a" * 56, "127.0.0.1", HEAD), RayNode("b" * 56, "127.0.0.1", SECOND)]
    placed = [
        ("load", 0, RayResources(), 0),
        ("model", 0, RayResources(num_cpus=2, custom={"second": 1}), 1),
    ]
    text = RayPlan("the Ray cluster at 127.0.0.1:6379", nodes, placed).format().splitlines()
    assert text[0].split() == ["stage", "replica", "node", "cpu", "gpus", "memory", "custom"]
    assert text[1].split() == ["load", "0", "0", "1", "0", "512", "MiB", "-"]
    assert text[2].split() == ["model", "0", "1", "2", "0", "512", "MiB", "second=1"]
    assert text[3] == "on the Ray cluster at 127.0.0.1:6379: 2 nodes"
    assert text[4] == (
        "  node 0: aaaaaaaaaaaa at 127.0.0.1: 4 CPU, 8192 MiB memory; requested here: "
        "1 of 4 CPU, 512 MiB memory"
    )
    assert "2 of 2 CPU, 512 MiB memory" in text[5] and "1 'second'" in text[5]


def test_what_does_not_fit_is_refused_with_every_reason():
    replicas = [
        ("a", 0, RayResources(num_cpus=3)),
        ("b", 0, RayResources(num_cpus=3)),
        ("c", 0, RayResources(custom={"scanner": 1})),
    ]
    with pytest.raises(PlacementError) as refused:
        check_fits(replicas, [HEAD, SECOND])
    assert refused.value.problems == (
        "stage 'c' replica 0 asks for 1 CPU, 512 MiB memory, 1 'scanner': no node has as much",
        "stage 'b' replica 0 asks for 3 CPU, 512 MiB memory: taken by the replicas above",
    )


@pytest.mark.parametrize(
    ("address", "ok"),
    [("auto", True), ("127.0.0.1:6379", True), ("ray://head:10001", True),
     ("127.0.0.1", False), ("http://head:6379", False), ("head:port", False),
     ("head:70000", False), ("", False)],
)  # fmt: skip
def test_addresses_ray_init_takes(address, ok):
    assert (address_problem(address) is None) is ok
