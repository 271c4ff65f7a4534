"""The scheduler: inventory declaration and detection, and pure placement of replicas."""

from __future__ import annotations

import os
import pickle
import random
import sys
import types

import pytest

from dataflow.errors import DataflowError
from dataflow.machine import (
    Gpu,
    Inventory,
    SchedulerError,
    SchedulerValueError,
    oom_kills,
    parse_gpus,
    visible_gpus,
)
from dataflow.scheduler import PlacementError, ReplicaRequest, place

R = ReplicaRequest
GiB = 1024  # in MiB


def machine(gpus: str = "none", cpus: int = 2, memory: str = "16GiB") -> Inventory:
    env = {"DATAFLOW_GPUS": gpus, "DATAFLOW_CPUS": str(cpus), "DATAFLOW_MEMORY": memory}
    return Inventory.detect(env)


def placement_error(requests, inventory, **kwargs) -> PlacementError:
    with pytest.raises(PlacementError) as caught:
        place(requests, inventory, **kwargs)
    return caught.value


# -- declaring GPUs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x16GiB", [(0, 16 * GiB), (1, 16 * GiB)]),
        (" 2 X 16 GiB ", [(0, 16 * GiB), (1, 16 * GiB)]),
        ("0:16GiB,1:24GiB", [(0, 16 * GiB), (1, 24 * GiB)]),
        ("3:8GiB, 1:80GB", [(1, 80 * 10**9 // 2**20), (3, 8 * GiB)]),
        ("16GiB,24GiB", [(0, 16 * GiB), (1, 24 * GiB)]),
        ("1x16GiB,2x8GiB", [(0, 16 * GiB), (1, 8 * GiB), (2, 8 * GiB)]),
        ("none", []),
        ("NONE", []),
    ],
)
def test_gpu_declarations(text, expected):
    gpus = parse_gpus(text)
    assert [(g.index, g.memory_mb) for g in gpus] == expected
    assert all(g.name == "declared" and g.uuid is None for g in gpus)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("16", "16 bytes, under 1 MiB; give a unit"),
        ("2x16", "under 1 MiB"),
        ("lots", "'lots' is not a size"),
        ("2x", "not a size"),
        ("0x16GiB", "declares no GPU"),
        ("0:16GiB,24GiB", "mixes INDEX:SIZE with SIZE"),
        ("0:16GiB,0:8GiB", "declares GPU 0 twice"),
        ("16GiB,", "empty entry"),
    ],
)
def test_bad_gpu_declarations_name_the_variable_and_value(text, why):
    with pytest.raises(SchedulerValueError) as caught:
        Inventory.detect({"DATAFLOW_GPUS": text})
    message = str(caught.value)
    assert f"DATAFLOW_GPUS={text!r}" in message and why in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, DataflowError)


def test_the_argument_beats_the_variable_and_is_named_in_errors():
    inventory = Inventory.detect({"DATAFLOW_GPUS": "4x80GiB"}, gpus="1x8GiB")
    assert [g.memory_mb for g in inventory.gpus] == [8 * GiB]
    with pytest.raises(SchedulerValueError, match=r"gpus='8'"):
        Inventory.detect({}, gpus="8")
    given = Inventory.detect({}, gpus=[Gpu(2, "A10", 24 * GiB)])
    assert given.gpus == (Gpu(2, "A10", 24 * GiB),)


def test_cpu_and_memory_overrides():
    inventory = Inventory.detect({"DATAFLOW_CPUS": "8", "DATAFLOW_MEMORY": "32GiB"})
    assert (inventory.cpus, inventory.memory_mb) == (8, 32 * GiB)
    assert Inventory.detect({}, cpus=3, memory_mb=1000).cpus == 3
    with pytest.raises(SchedulerValueError, match=r"DATAFLOW_CPUS='two' is not a number of CPUs"):
        Inventory.detect({"DATAFLOW_CPUS": "two"})
    with pytest.raises(SchedulerValueError, match=r"DATAFLOW_CPUS='0'"):
        Inventory.detect({"DATAFLOW_CPUS": "0"})
    with pytest.raises(SchedulerValueError, match=r"DATAFLOW_MEMORY='plenty'.*16GiB"):
        Inventory.detect({"DATAFLOW_MEMORY": "plenty"})


# -- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kept"),
    [("1", [1]), ("2,0", [0, 2]), ("", []), ("-1", []), ("0,5,1", [0]), ("1,1", [1])],
)
def test_cuda_visible_devices_narrows_declared_gpus(value, kept):
    env = {"DATAFLOW_GPUS": "3x16GiB", "CUDA_VISIBLE_DEVICES": value}
    inventory = Inventory.detect(env)
    assert [g.index for g in inventory.gpus] == kept
    assert f"CUDA_VISIBLE_DEVICES={value!r}" in inventory.gpu_source


def test_cuda_visible_devices_stops_where_cuda_does_and_says_so():
    gpus, note = visible_gpus(parse_gpus("2x16GiB"), "0,5,1")
    assert [g.index for g in gpus] == [0]
    assert "keeps 0" in note and "ignores '5'" in note


def test_cuda_visible_devices_by_uuid_prefix_and_mig_refused():
    gpus = (Gpu(0, "A10", 24 * GiB, "GPU-aaaa-1111"), Gpu(1, "A10", 24 * GiB, "GPU-bbbb-2222"))
    kept, _ = visible_gpus(gpus, "GPU-bbbb")
    assert [g.index for g in kept] == [1]
    with pytest.raises(SchedulerValueError, match=r"CUDA_VISIBLE_DEVICES='MIG-1'.*DATAFLOW_GPUS"):
        visible_gpus(gpus, "MIG-1")


# -- detection --------------------------------------------------------------------------------


def test_detect_without_nvml_reports_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    inventory = Inventory.detect({})
    assert inventory.gpus == ()
    assert "nvidia-ml-py is not installed" in inventory.gpu_source
    assert 1 <= inventory.cpus <= len(os.sched_getaffinity(0))
    assert inventory.memory_mb > 0
    error = placement_error([R("segment", 0, gpu=1)], inventory)
    assert "needs 1 exclusive GPU; the machine has no GPU" in str(error)
    assert "nvidia-ml-py is not installed" in str(error)


class _NVMLError(Exception):
    pass


def fake_nvml(devices, *, init_error: str | None = None) -> types.ModuleType:
    """A stand-in for pynvml: devices are (name, total bytes, uuid); names come back as bytes."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError
    nvml.calls = []

    def init():
        nvml.calls.append("init")
        if init_error:
            raise _NVMLError(init_error)

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nvml.nvmlDeviceGetName = lambda h: h[0].encode()
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h[1])
    nvml.nvmlDeviceGetUUID = lambda h: h[2]
    return nvml


def test_detect_reads_nvml_and_respects_cuda_visible_devices(monkeypatch):
    nvml = fake_nvml(
        [("NVIDIA A10", 24 * 2**30, "GPU-aaaa"), ("NVIDIA L4", 23 * 2**30, "GPU-bbbb")]
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    inventory = Inventory.detect({})
    assert inventory.gpus == (
        Gpu(0, "NVIDIA A10", 24 * GiB, "GPU-aaaa"),
        Gpu(1, "NVIDIA L4", 23 * GiB, "GPU-bbbb"),
    )
    assert inventory.gpu_source == "NVML" and nvml.calls == ["init", "shutdown"]
    narrowed = Inventory.detect({"CUDA_VISIBLE_DEVICES": "GPU-bbbb"})
    assert [g.name for g in narrowed.gpus] == ["NVIDIA L4"]
    declared = Inventory.detect({"DATAFLOW_GPUS": "1x8GiB"})  # a declaration skips NVML
    assert [g.memory_mb for g in declared.gpus] == [8 * GiB]


def test_detect_with_nvml_but_no_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error="Driver Not Loaded"))
    inventory = Inventory.detect({})
    assert inventory.gpus == () and "NVML: Driver Not Loaded" in inventory.gpu_source


def _fake_root(tmp_path, cgroup: str, files: dict[str, str]):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       16777216 kB\nMemFree: 1 kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def test_detect_honours_cgroup_v2_limits(tmp_path):
    root = _fake_root(
        tmp_path,
        "0::/jobs/one\n",
        {
            "jobs/memory.max": str(2 * 2**30),
            "jobs/one/memory.max": "max",
            "jobs/one/cpu.max": "100000 100000",
        },
    )
    inventory = Inventory.detect({"DATAFLOW_GPUS": "none"}, root=root)
    assert (inventory.cpus, inventory.memory_mb) == (1, 2 * GiB)


def test_detect_honours_cgroup_v1_limits_and_meminfo(tmp_path):
    root = _fake_root(
        tmp_path,
        "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n",
        {
            "memory/memory.limit_in_bytes": str(3 * 2**30),  # the container's own, mounted at /
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
        },
    )
    inventory = Inventory.detect({"DATAFLOW_GPUS": "none"}, root=root)
    assert inventory.memory_mb == 3 * GiB
    assert inventory.cpus == len(os.sched_getaffinity(0))
    unlimited = _fake_root(tmp_path / "plain", "", {})
    assert Inventory.detect({"DATAFLOW_GPUS": "none"}, root=unlimited).memory_mb == 16 * GiB


def test_oom_kills_are_read_from_the_memory_cgroups_v2_and_v1(tmp_path):
    events = "low 0\nhigh 0\nmax 3\noom 2\noom_kill {}\noom_group_kill 0"
    v2 = _fake_root(tmp_path / "v2", "0::/svc\n", {"svc/memory.events": events.format(2)})
    assert oom_kills(v2) == 2
    (v2 / "sys/fs/cgroup/svc/memory.events").write_text(events.format(3))
    assert oom_kills(v2) == 3  # the executor compares before and after a SIGKILL
    control = "oom_kill_disable 0\nunder_oom 0\noom_kill 1"
    v1 = _fake_root(tmp_path / "v1", "4:memory:/x\n", {"memory/x/memory.oom_control": control})
    assert oom_kills(v1) == 1
    assert oom_kills(_fake_root(tmp_path / "none", "", {})) == 0


# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"gpu": 1, "gpu_memory_mb": 4096}, "ask for one or the other"),
        ({"gpu": -1}, "gpu is a number of whole GPUs"),
        ({"gpu": True}, "gpu is a number of whole GPUs"),
        ({"cpu": -0.5}, "cpu is a number of cores"),
        ({"cpu": float("nan")}, "cpu is a number of cores"),
        ({"gpu_memory_mb": 0}, "gpu_memory_mb is MiB >= 1"),
        ({"memory_mb": 1.5}, "memory_mb is MiB >= 0"),
    ],
)
def test_bad_requests(kwargs, why):
    with pytest.raises(SchedulerValueError, match=why) as caught:
        R("segment", 0, **kwargs)
    assert "stage 'segment' replica 0" in str(caught.value)


def test_a_replica_requested_twice_is_refused():
    with pytest.raises(SchedulerValueError, match="stage 'a' replica 0 is requested twice"):
        place([R("a", 0), R("a", 0)], machine())


# -- placement --------------------------------------------------------------------------------


def test_exclusive_gpus_across_two_declared_gpus():
    plan = place([R("segment", 0, gpu=1), R("segment", 1, gpu=1)], machine("2x16GiB"))
    first, second = plan.assignments
    assert (first.gpus, second.gpus) == ((0,), (1,))
    assert first.env == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert second.env["CUDA_VISIBLE_DEVICES"] == "1" and second.gpu_memory_mb is None


def test_larger_exclusive_requests_are_placed_first():
    plan = place([R("small", 0, gpu=1), R("big", 0, gpu=2)], machine("3x16GiB"))
    assert plan.assignment("big", 0).gpus == (0, 1)
    assert plan.assignment("small", 0).gpus == (2,)
    assert plan.assignment("big", 0).env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_cpu_only_replicas_see_no_gpu():
    plan = place([R("load", 0), R("segment", 0, gpu=1)], machine("1x16GiB"))
    assert plan.assignment("load", 0).gpus == ()
    assert plan.assignment("load", 0).env == {"CUDA_VISIBLE_DEVICES": ""}


def test_two_exclusive_replicas_on_one_gpu_are_refused_before_anything_starts():
    error = placement_error([R("segment", 0, gpu=1), R("segment", 1, gpu=1)], machine("1x16GiB"))
    assert (
        "stage 'segment' replica 1 needs 1 exclusive GPU; the machine has 1 GPU (0: 16384 MiB), "
        "already given to stage 'segment' replica 0"
    ) in str(error)
    assert str(error).startswith(
        "cannot place 2 replicas on this machine (2 CPUs, 16384 MiB memory, 1 GPU"
    )
    assert len(error.problems) == 1


def test_too_many_gpus_for_one_replica():
    error = placement_error([R("segment", 0, gpu=3)], machine("2x16GiB"))
    assert error.problems == (
        "stage 'segment' replica 0 needs 3 exclusive GPUs; "
        "the machine has 2 GPUs (0: 16384 MiB, 1: 16384 MiB)",
    )


def test_partly_free_gpus_name_their_holders():
    requests = [R("a", 0, gpu=1), R("b", 0, gpu=2)]
    error = placement_error(requests, machine("2x16GiB"))
    assert error.problems == (
        "stage 'a' replica 0 needs 1 exclusive GPU; the machine has 2 GPUs (0: 16384 MiB, "
        "1: 16384 MiB), already given to stage 'b' replica 0 (GPUs 0, 1)",
    )
    error = placement_error([R("a", 0, gpu=2), R("b", 0, gpu=2)], machine("3x16GiB"))
    assert error.problems[0].startswith("stage 'b' replica 0 needs 2 exclusive GPUs")
    assert error.problems[0].endswith(
        "; only 1 is free, the others went to stage 'a' replica 0 (GPUs 0, 1)"
    )


def test_gpu_memory_that_fits_no_gpu():
    error = placement_error([R("infer", 0, gpu_memory_mb=32 * GiB)], machine("0:16GiB,1:24GiB"))
    assert error.problems == (
        "stage 'infer' replica 0 needs 32768 MiB on one GPU; "
        "the machine has 2 GPUs (0: 16384 MiB, 1: 24576 MiB)",
    )


def test_gpu_memory_that_fits_no_longer_says_who_holds_what():
    requests = [
        R("segment", 0, gpu=1),
        R("infer", 0, gpu_memory_mb=20000),
        R("infer", 1, gpu_memory_mb=20000),
    ]
    error = placement_error(requests, machine("0:16GiB,1:24GiB"))
    assert error.problems == (
        "stage 'infer' replica 1 needs 20000 MiB on one GPU; the machine has 2 GPUs "
        "(0: 16384 MiB, 1: 24576 MiB), and GPU 0 is given to stage 'segment' replica 0; "
        "GPU 1 has 4576 MiB left beside stage 'infer' replica 0 (20000 MiB)",
    )


def test_memory_over_the_machine():
    error = placement_error([R("big", 0, memory_mb=64 * GiB), R("small", 0)], machine())
    assert error.problems == (
        "stage 'big' replica 0 needs 65536 MiB of memory; the machine has 16384 MiB",
    )
    error = placement_error([R("s", i, memory_mb=6 * GiB) for i in range(3)], machine())
    assert error.problems == (
        "together 3 replicas need 18432 MiB of memory; the machine has 16384 MiB "
        "(stage 's': 3 x 6144 MiB)",
    )


def test_every_problem_is_listed_at_once():
    requests = [
        R("segment", 0, gpu=1),
        R("segment", 1, gpu=1),
        R("infer", 0, gpu_memory_mb=64 * GiB),
        R("write", 0, memory_mb=64 * GiB),
    ]
    error = placement_error(requests, machine("1x16GiB"))
    assert [p.split(" needs")[0] for p in error.problems] == [
        "stage 'segment' replica 1",
        "stage 'infer' replica 0",
        "stage 'write' replica 0",
    ]
    assert str(error).count("\n  - ") == 3
    assert isinstance(error, SchedulerError) and isinstance(error, DataflowError)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.problems == error.problems


def test_shared_gpu_memory_spreads_replicas_over_gpus():
    requests = [R("infer", 0, gpu_memory_mb=4 * GiB), R("infer", 1, gpu_memory_mb=4 * GiB)]
    plan = place(requests, machine("2x16GiB"))
    assert [a.gpus for a in plan.assignments] == [(0,), (1,)]
    assert plan.assignments[0].gpu_memory_mb == 4 * GiB


def test_shared_gpu_memory_shares_one_gpu_when_it_fits():
    requests = [R("a", 0, gpu_memory_mb=6 * GiB), R("b", 0, gpu_memory_mb=10 * GiB)]
    plan = place(requests, machine("1x16GiB"))
    assert [a.gpus for a in plan.assignments] == [(0,), (0,)]
    assert plan.assignment("a", 0).env["CUDA_VISIBLE_DEVICES"] == "0"
    error = placement_error([*requests, R("c", 0, gpu_memory_mb=1)], machine("1x16GiB"))
    assert "GPU 0 has 0 MiB left beside stage 'b' replica 0 (10240 MiB), stage 'a'" in str(error)


def test_shared_gpu_memory_packs_best_fit_when_spreading_fails():
    # Spreading puts 16 on GPU 0 (24) and 12 on GPU 1 (16): the last 12 fits nowhere.
    # Best fit puts 16 on GPU 1 exactly, and both 12s on GPU 0.
    requests = [R("a", 0, gpu_memory_mb=16 * GiB)] + [
        R("b", i, gpu_memory_mb=12 * GiB) for i in range(2)
    ]
    plan = place(requests, machine("0:24GiB,1:16GiB"))
    assert [a.gpus for a in plan.assignments] == [(1,), (0,), (0,)]


def test_shares_never_land_on_an_exclusive_gpu():
    requests = [R("infer", 0, gpu_memory_mb=1 * GiB), R("segment", 0, gpu=1)]
    plan = place(requests, machine("2x16GiB"))
    assert plan.assignment("segment", 0).gpus == (0,)
    assert plan.assignment("infer", 0).gpus == (1,)


def test_placement_is_deterministic_and_ignores_input_order():
    requests = [
        R("load", 0, cpu=0.5),
        *(R("infer", i, gpu_memory_mb=(3 + i) * GiB) for i in range(4)),
        R("segment", 0, gpu=1),
        R("segment", 1, gpu=1),
        R("write", 0),
    ]
    inventory = machine("4x16GiB", cpus=16)
    plan = place(requests, inventory)
    assert [(a.stage, a.replica) for a in plan.assignments] == [
        (r.stage, r.replica) for r in requests
    ]
    assert place(requests, inventory) == plan
    mapping = {(a.stage, a.replica): a for a in plan.assignments}
    shuffled = list(requests)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        again = place(shuffled, inventory)
        assert {(a.stage, a.replica): a for a in again.assignments} == mapping


def test_cpu_oversubscription_is_a_warning_by_default():
    requests = [R(stage, 0) for stage in ("load", "window", "segment", "write")]
    plan = place(requests, machine(cpus=2))
    assert len(plan.assignments) == 4
    assert plan.warnings == (
        "CPU requests add up to 4 cores on a machine with 2 (stage 'load': 1 x 1, stage 'window': "
        "1 x 1, stage 'segment': 1 x 1, stage 'write': 1 x 1): replicas will share cores "
        "(slower, not wrong)",
    )
    assert "warning: CPU requests add up to 4 cores" in plan.format()


def test_cpu_oversubscription_can_be_refused():
    requests = [R("load", 0, cpu=0.5), R("segment", 0, cpu=4)]
    error = placement_error(requests, machine(cpus=2), allow_cpu_oversubscription=False)
    assert error.problems[0] == "stage 'segment' replica 0 asks for 4 CPUs; the machine has 2"
    assert "add up to 4.5 cores" in error.problems[1]
    assert (
        place([R("load", 0, cpu=0.5)], machine(), allow_cpu_oversubscription=False).warnings == ()
    )


def test_plan_format_is_a_table():
    requests = [R("load", 0, cpu=0.5), R("segment", 0, gpu=1), R("infer", 0, gpu_memory_mb=4096)]
    text = place(requests, machine("2x16GiB", cpus=4)).format()
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "replica", "gpus", "cpu", "memory"]
    assert lines[1].split() == ["load", "0", "-", "0.5", "512", "MiB"]
    assert lines[2].split() == ["segment", "0", "0", "(exclusive)", "1", "512", "MiB"]
    assert lines[3].split() == ["infer", "0", "1", "(4096", "MiB", "shared)", "1", "512", "MiB"]
    assert "requested: 2.5 of 4 CPUs, 1536 of 16384 MiB memory" in text
    assert "machine: 4 CPUs, 16384 MiB memory, 2 GPUs" in text


def test_plan_lookup():
    plan = place([R("load", 0)], machine())
    assert plan.assignment("load", 0).memory_mb == 512
    with pytest.raises(KeyError, match="no replica 1 of stage 'load'"):
        plan.assignment("load", 1)
