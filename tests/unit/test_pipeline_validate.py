"""Validating pipelines: Python stages, links, cycles, port types, the DAG, machine warnings."""

import os
import sys
import textwrap
from pathlib import Path

import pytest

from dataflow.pipeline import (
    Edge,
    Location,
    PipelineError,
    check_pipeline,
    compatible,
    import_stage,
    load_graph,
    load_pipeline,
    topological_order,
    validate,
)
from dataflow.pipeline.stages import StageImportError
from dataflow.stage import Port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = "pipelines_data.stages"


@pytest.fixture(autouse=True)
def _importable_test_stages(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.delenv("DATAFLOW_GPUS", raising=False)
    monkeypatch.delenv("DATAFLOW_CONTAINER_ENGINE", raising=False)


@pytest.fixture
def no_container_runtime(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_docker(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\n")
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def write(directory: Path, text: str, name: str = "p.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors(path: Path, **kwargs) -> list[str]:
    return [d.format() for d in check_pipeline(path, **kwargs).errors]


# --------------------------------------------------------------------------- reference files

REFERENCE = sorted((REPO / "pipelines").glob("**/*.yaml"))


def test_there_are_reference_pipelines():
    assert {p.name for p in REFERENCE} >= {
        "covid19.yaml",
        "fastio-passthrough.yaml",
        "lung-lesion.yaml",
    }


@pytest.mark.parametrize("path", REFERENCE, ids=[str(p.relative_to(REPO)) for p in REFERENCE])
def test_every_reference_pipeline_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    report = check_pipeline(path.relative_to(REPO), gpus_available=0)
    assert report.ok, report.format()
    assert report.graph is not None and len(report.graph.order) == len(report.graph.spec.operators)


def test_covid_pipeline_graph(no_container_runtime):
    graph = load_graph(REPO / "pipelines/clara/covid19.yaml", gpus_available=1)
    assert graph.order == (
        "dicom-reader",
        "lung-segmentation",
        "dicom-writer",
        "register-volume-images-for-rendering",
        "register-dicom-output",
        "classification-covid-19",
    )
    # Untyped 0.4.0 I/O: inputs keyed by their mount path, the job's payload where no `from`.
    assert graph.job_inputs == (("dicom-reader", "/input"), ("dicom-writer", "/dicom"))
    assert {(e.source, e.output, e.input) for e in graph.upstream("classification-covid-19")} == {
        ("lung-segmentation", "segmentation", "/label_image"),
        ("dicom-reader", None, "/input"),
    }
    assert graph.node("dicom-writer").inputs == {"/input": None, "/dicom": None}
    report = check_pipeline(REPO / "pipelines/clara/covid19.yaml")
    # the two model images: no docker or podman here, and no bundled stage can stand in
    # (the reader, writer and register-results run as bundled stages: test_clara_images.py)
    assert len(report.warnings) == 2
    warning = report.warnings[0].format()
    assert warning.startswith(
        f"{REPO}/pipelines/clara/covid19.yaml:24:12: warning: operator 'lung-segmentation' "
        "field 'container.image': cannot run image 'clara/ai-lung:latest' here (no docker or "
        "podman daemon answers); cannot be had here: lung segmentation (clara/ai-lung) needs "
        "NVIDIA's trained model"
    )


def test_fastio_passthrough_is_typed():
    graph = load_graph(REPO / "pipelines/clara/fastio-passthrough.yaml", gpus_available=0)
    seg = graph.node("fastio-to-npz").inputs["segmentation"]
    assert seg == Port("array", "float32", (1, -1, -1, -1))
    assert graph.node("compare").inputs == {
        "/npz": Port("stream", "npz"),
        "/input": Port("stream", "nifti"),
    }


# --------------------------------------------------------------------------- Python stages

STAGE_PIPELINE = f"""
    api-version: 0.5.0
    name: ct
    operators:
    - name: window
      stage: {STAGES}:WindowLevel
      arguments: {{low: "-500", high: 1500}}
      input:
      - name: image
    - name: threshold
      stage: {STAGES}:threshold
      arguments: {{level: 0.3}}
      input:
      - {{from: window, name: image}}
    - name: overlay
      stage: {STAGES}:Overlay
      replicas: 2
      timeout: 30
      input:
      - {{from: Window, name: image, type: array, element-type: f32}}
      - {{from: threshold, name: mask, port: label}}
      output:
      - name: overlay
    """


def test_a_python_stage_pipeline_validates_into_a_graph(tmp_path):
    graph = load_graph(write(tmp_path, STAGE_PIPELINE), gpus_available=0)
    assert graph.order == ("window", "threshold", "overlay")
    window = graph.node("window")
    assert window.stage_class.__name__ == "WindowLevel" and window.kind == "stage"
    assert window.arguments == {"low": -500.0, "high": 1500.0}  # converted by the signature
    assert graph.job_inputs == (("window", "image"),)
    # fan-out from window, fan-in at overlay; `from` is case-insensitive; `port` renames
    assert {e.target for e in graph.downstream("window")} == {"threshold", "overlay"}
    assert set(graph.upstream("overlay")) == {
        Edge("window", "image", "overlay", "image", location=None),
        Edge("threshold", "mask", "overlay", "label", location=None),
    }
    overlay = graph.node("overlay")
    assert overlay.spec.replicas == 2 and overlay.spec.timeout == 30.0
    assert overlay.outputs == {"overlay": Port("array", "float32", (-1, -1, -1))}
    # class outputs nobody consumes are fine: they are the job's results
    assert set(graph.results) == {("threshold", "volume_ml"), ("overlay", "overlay")}


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_pkg.mod:Thing", "cannot import module 'no_such_pkg.mod': there is no module "
         "'no_such_pkg' (looked next to the pipeline file, in the current folder and on "
         "PYTHONPATH)"),
        (f"{STAGES}:Missing", f"'{STAGES}' has no attribute 'Missing' (stages there: "
         "DicomSeries, NeedsModel, Overlay, Report, WindowLevel, threshold)"),
        (f"{STAGES}:not_a_stage", f"'{STAGES}:not_a_stage' is a plain function, not a Stage: "
         "decorate it with @dataflow.stage.stage(inputs=..., outputs=...)"),
        (f"{STAGES}:NOT_A_CLASS", f"'{STAGES}:NOT_A_CLASS' is an int, not a Stage subclass"),
        ("dataflow.stage:Stage", "'dataflow.stage:Stage' is the Stage base class itself, not "
         "a stage"),
    ],
)  # fmt: skip
def test_unknown_stage_import_paths(tmp_path, ref, message):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: seg
          stage: {ref}
          input: [{{name: image}}]
        """,
    )
    assert errors(path) == [f"{path}:4:10: error: operator 'seg' field 'stage': {message}"]
    with pytest.raises(StageImportError, match="not|no "):
        import_stage(ref)


def test_stage_modules_are_found_next_to_the_pipeline_file(tmp_path, monkeypatch):
    (tmp_path / "beside_the_yaml_stages.py").write_text(
        "from dataflow.stage import Port, Stage\n\n"
        "class Echo(Stage):\n"
        "    inputs = {'text': Port('string')}\n"
        "    outputs = {'text': Port('string')}\n"
    )
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: echo
          stage: beside_the_yaml_stages:Echo
          input: [{name: text}]
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(sys.modules, "beside_the_yaml_stages", raising=False)
    try:
        graph = load_graph(path)
        assert graph.node("echo").stage_class.__name__ == "Echo"
        assert str(tmp_path) not in sys.path  # only while importing
    finally:
        sys.modules.pop("beside_the_yaml_stages", None)


def test_a_stage_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_stage_module.py").write_text("raise RuntimeError('no GPU driver')\n")
    (tmp_path / "needs_dep_module.py").write_text("import not_installed_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StageImportError, match="failed: RuntimeError: no GPU driver"):
        import_stage("broken_stage_module:Thing")
    with pytest.raises(StageImportError, match="failed: it imports 'not_installed_dep', which"):
        import_stage("needs_dep_module:Thing")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("{batch: 2}", "missing required parameter(s) model"),
        ("{model: m, colour: red}", "unknown parameter 'colour' (known: model, batch)"),
        ("{model: m, batch: many}", "parameter 'batch' must be int; got 'many'"),
    ],
)
def test_bad_stage_arguments(tmp_path, arguments, message):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: seg
          stage: {STAGES}:NeedsModel
          arguments: {arguments}
          input: [{{name: image}}]
        """,
    )
    assert errors(path, gpus_available=1) == [
        f"{path}:5:14: error: operator 'seg' field 'arguments': stage {STAGES}:NeedsModel: "
        f"{message}"
    ]


def test_stage_ports_must_be_bound_by_name(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: src
          stage: {STAGES}:WindowLevel
          input: [{{name: image}}]
        - name: ov
          stage: {STAGES}:Overlay
          input:
          - {{from: src, name: image}}
          - {{from: src, name: image}}
          - {{from: src, name: picture}}
          - {{from: src}}
        """,
    )
    assert errors(path) == [
        f"{path}:10:5: error: operator 'ov' field 'input[1]': input port 'image' is bound twice "
        f"(first at {path}:9:5)",
        f"{path}:11:23: error: operator 'ov' field 'input[2].name': {STAGES}:Overlay has no "
        "input port 'picture' (its inputs: image, label) (to bind upstream output 'picture' to "
        "another port, add 'port: <input port>')",
        f"{path}:12:5: error: operator 'ov' field 'input[3].name': a Python stage's input names "
        "the port it binds ('name', or 'port' when the upstream output has another name); "
        f"{STAGES}:Overlay has inputs image, label",
        f"{path}:9:3: error: operator 'ov' field 'input': input port 'label' "
        f"(array<uint8>[-1, -1, -1]) of {STAGES}:Overlay is not bound: add an input with "
        "'name: label' (and 'from: <operator>', or no 'from' for the job's input)",
    ]


def test_yaml_types_of_a_stage_port_must_agree_with_the_class(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: wl
          stage: {STAGES}:WindowLevel
          input:
          - {{name: image, type: array, element-type: int16}}
          output:
          - {{name: image, shape: [-1, -1]}}
          - {{name: mask}}
        """,
    )
    assert errors(path) == [
        f"{path}:6:46: error: operator 'wl' field 'input[0].element-type': element-type "
        "'int16' does not agree with the stage's input port 'image', array<float32>[-1, -1, -1]",
        f"{path}:8:26: error: operator 'wl' field 'output[0].shape': shape [-1, -1] does not "
        "agree with the stage's output port 'image', array<float32>[-1, -1, -1]",
        f"{path}:9:12: error: operator 'wl' field 'output[1].name': {STAGES}:WindowLevel has no "
        "output port 'mask' (its outputs: image)",
    ]


def test_a_stage_path_is_noted_as_unused(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: reader
          stage: {STAGES}:DicomSeries
          input: [{{name: series, path: /input}}]
        """,
    )
    report = check_pipeline(path)
    assert report.ok and [d.field for d in report.notes] == ["input[0].path"]
    assert report.graph.node("reader").inputs == {"series": Port("stream", "dicom")}


# --------------------------------------------------------------------------- links and types


def test_from_must_name_an_operator_and_one_of_its_outputs(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: reader
          container: {command: [read]}
          input: [{path: /in}]
          output: [{path: /out, name: volume}, {path: /meta, name: meta}]
        - name: seg
          container: {command: [seg]}
          input:
          - {from: raeder, path: /a}
          - {from: reader, name: volumes, path: /b}
          - {from: reader, path: /c}
          - {from: sink, path: /d}
        - name: sink
          container: {command: [sink]}
          input: [{path: /x}]
        """,
    )
    assert errors(path) == [
        f"{path}:10:12: error: operator 'seg' field 'input[0].from': no operator named "
        "'raeder' (did you mean 'reader'?); operators: reader, seg, sink",
        f"{path}:11:26: error: operator 'seg' field 'input[1].name': operator 'reader' has no "
        "output 'volumes' (its outputs: volume, meta)",
        f"{path}:12:12: error: operator 'seg' field 'input[2].from': operator 'reader' has "
        "several outputs (volume, meta): say which with 'name'",
        f"{path}:13:12: error: operator 'seg' field 'input[3].from': operator 'sink' has no "
        "outputs",
    ]


def test_a_stage_input_fed_by_an_output_of_another_name_gets_a_hint(tmp_path):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: th
          stage: {STAGES}:threshold
          input: [{{name: image}}]
        - name: wl
          stage: {STAGES}:WindowLevel
          input: [{{from: th, name: image}}]
        """,
    )
    (message,) = errors(path)
    assert message == (
        f"{path}:8:28: error: operator 'wl' field 'input[0].name': operator 'th' has no output "
        "'image' (its outputs: mask, volume_ml)"
    )


def test_cycles_name_their_operators(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: a
          container: {command: [a]}
          input: [{from: c, path: /in}, {path: /job}]
          output: [{path: /out}]
        - name: b
          container: {command: [b]}
          input: [{from: a, path: /in}]
          output: [{path: /out}]
        - name: c
          container: {command: [c]}
          input: [{from: b, path: /in}]
          output: [{path: /out}]
        - name: d
          container: {command: [d]}
          input: [{from: d, path: /in}]
          output: [{path: /out}]
        """,
    )
    assert errors(path) == [
        f"{path}:5:18: error: operator 'a' field 'input[0].from': operators a -> b -> c -> a "
        "form a cycle",
    ]
    report = check_pipeline(path)
    assert report.graph is None
    # once that cycle is broken the self-loop shows
    fixed = write(tmp_path, path.read_text().replace("{from: c, path: /in}, ", ""), "f.yaml")
    assert errors(fixed) == [
        f"{fixed}:17:18: error: operator 'd' field 'input[0].from': operators d -> d form a cycle"
    ]


def test_connected_port_types_must_match(tmp_path):
    path = write(
        tmp_path,
        f"""
        api-version: 0.5.0
        name: p
        operators:
        - name: producer
          container: {{command: [p]}}
          output:
          - {{name: vol, type: array, element-type: int16, shape: [-1, 512, 512]}}
          - {{name: files, path: /out, type: stream, element-type: nifti}}
          - {{name: raw, path: /raw}}
        - name: consumer
          container: {{command: [c]}}
          input:
          - {{from: producer, name: vol, type: array, element-type: int16, shape: [-1, 256, 256]}}
          - {{from: producer, name: files, path: /in, type: stream, element-type: dicom}}
          - {{from: producer, name: raw, type: array, element-type: u8, shape: [3]}}
          - {{from: producer, name: files, path: /untyped}}
        - name: wl
          stage: {STAGES}:WindowLevel
          input: [{{from: producer, name: vol, port: image}}]
        """,
    )
    assert errors(path) == [
        f"{path}:13:39: error: operator 'consumer' field 'input[0]': operator 'producer' output "
        "'vol' (array<int16>[-1, 512, 512]) cannot feed input 'vol' "
        "(array<int16>[-1, 256, 256]): shape [-1, 512, 512] does not fit [-1, 256, 256]",
        f"{path}:14:52: error: operator 'consumer' field 'input[1]': operator 'producer' output "
        "'files' (stream<nifti>) cannot feed input '/in' (stream<dicom>): stream of 'nifti' "
        "does not match 'dicom'",
        f"{path}:15:39: error: operator 'consumer' field 'input[2]': operator 'producer' output "
        "'raw' (an untyped disk directory) cannot feed input 'raw' (array<uint8>[3]): an "
        "untyped output is a disk directory; it cannot feed array<uint8>[3]",
        f"{path}:19:18: error: operator 'wl' field 'input[0]': operator 'producer' output 'vol' "
        "(array<int16>[-1, 512, 512]) cannot feed input 'image' (array<float32>[-1, -1, -1]): "
        "element type int16 does not match float32",
    ]


def test_clara_type_equivalences_connect_with_a_note(tmp_path):
    path = write(
        tmp_path,
        f"""
        api-version: 0.5.0
        name: p
        operators:
        - name: text
          container: {{command: [t]}}
          output: [{{name: text, type: array, element-type: uint8, shape: [-1]}}]
        - name: report
          stage: {STAGES}:Report
          input: [{{from: text, name: text}}]
        """,
    )
    report = check_pipeline(path)
    assert report.ok
    assert [d.message for d in report.notes] == [
        "array<uint8>[-1] feeds string by Clara's type equivalence"
    ]


def test_compatible_rules():
    vol = Port("array", "float32", (-1, -1))
    assert compatible(None, None) == (None, None)
    assert compatible(None, Port("stream", "dicom")) == (None, None)
    assert compatible(Port("stream", "dicom"), None) == (None, None)
    assert "lives in shared memory" in compatible(None, vol)[0]
    assert compatible(Port("f32"), Port("array", "float32", (1,)))[1] is not None
    assert "does not match" in compatible(Port("f32"), Port("i32"))[0]


def test_container_inputs_with_the_same_path(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: a
          container: {image: x}
          input: [{path: /in}, {path: /in}]
        """,
    )
    assert errors(path) == [
        f"{path}:5:31: error: operator 'a' field 'input[1].path': two inputs use path '/in' "
        f"(the other at {path}:5:18)"
    ]


# --------------------------------------------------------------------------- the DAG


def edge(source, target):
    return Edge(source, None, target, "in", location=Location("f", 1, 1))


def test_topological_order_is_kahn_with_definition_order_ties():
    names = ["sink", "a", "b", "src"]
    edges = [edge("src", "a"), edge("src", "b"), edge("a", "sink"), edge("b", "sink")]
    assert topological_order(names, edges) == (["src", "a", "b", "sink"], None)
    assert topological_order(["x", "y"], []) == (["x", "y"], None)
    order, cycle = topological_order(["p", "q", "r"], [edge("q", "r"), edge("r", "q")])
    assert order == ["p"] and cycle == ["q", "r"]


def test_fan_in_from_one_upstream_counts_once(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: two
          container: {command: [x]}
          output: [{name: a, path: /a}, {name: b, path: /b}]
        - name: both
          container: {command: [y]}
          input: [{from: two, name: a, path: /a}, {from: TWO, name: B, path: /b}]
        """,
    )
    graph = load_graph(path)
    assert graph.order == ("two", "both")
    assert [(e.output, e.input) for e in graph.upstream("both")] == [("a", "/a"), ("b", "/b")]
    assert graph.results == ()  # both outputs of 'two' are consumed; 'both' has none


# --------------------------------------------------------------------------- this machine


def test_container_images_warn_without_docker_or_podman(tmp_path, no_container_runtime):
    path = write(tmp_path, "name: p\noperators:\n- name: a\n  container: {image: x, tag: '1'}\n")
    report = check_pipeline(path)
    assert report.ok
    assert [d.format() for d in report.warnings] == [
        f"{path}:4:22: warning: operator 'a' field 'container.image': cannot run image 'x:1' "
        "here (no docker or podman daemon answers); it has no command to run without one"
    ]


def test_an_image_with_a_command_falls_back_to_a_subprocess(tmp_path, monkeypatch, fake_docker):
    monkeypatch.setenv("DATAFLOW_CONTAINER_ENGINE", "none")
    path = write(
        tmp_path, "name: p\noperators:\n- name: a\n  container: {image: x, command: [ls]}\n"
    )
    (warning,) = check_pipeline(path).warnings
    assert warning.message == (
        "cannot run image 'x:latest' here (DATAFLOW_CONTAINER_ENGINE=none); its command runs as "
        "a local subprocess instead"
    )


def test_no_image_warning_with_docker(tmp_path, fake_docker):
    path = write(tmp_path, "name: p\noperators:\n- name: a\n  container: {image: x}\n")
    assert check_pipeline(path).warnings == []


def test_the_validator_is_given_the_machine_and_does_not_look_itself(tmp_path, monkeypatch):
    """What the machine offers comes in as an argument (dataflow.machine.Machine): given
    one, validation runs no probe (issue 13); the docker on PATH here would fail the test."""
    from dataflow.machine import Machine

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    probe = bin_dir / "docker"
    probe.write_text("#!/bin/sh\necho probed >> " + str(tmp_path / "probed") + "\nexit 0\n")
    probe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    path = write(tmp_path, "name: p\noperators:\n- name: a\n  container: {image: x}\n")
    elsewhere = Machine(gpus=0, engine=None, no_engine="the target machine has none")
    (warning,) = check_pipeline(path, machine=elsewhere).warnings
    assert "(the target machine has none)" in warning.message
    assert check_pipeline(path, machine=Machine(engine="podman")).warnings == []
    assert not (tmp_path / "probed").exists()


def test_a_command_only_container_needs_no_runtime(tmp_path, no_container_runtime):
    path = write(tmp_path, "name: p\noperators:\n- name: a\n  container: {command: [ls]}\n")
    assert check_pipeline(path).warnings == []


GPU_PIPELINE = f"""
    name: p
    operators:
    - name: seg
      container: {{command: [seg]}}
      requests: {{gpu: 1}}
      replicas: 2
    - name: model
      stage: {STAGES}:NeedsModel
      arguments: {{model: m}}
      input: [{{name: image}}]
    """


def test_more_gpus_than_available_is_a_warning(tmp_path):
    path = write(tmp_path, GPU_PIPELINE)
    report = check_pipeline(path, gpus_available=1)
    assert report.ok
    assert [d.format() for d in report.warnings] == [
        f"{path}:5:19: warning: operator 'seg' field 'requests.gpu': needs 2 GPU(s) (1 per "
        "worker x 2 replicas) but 1 is available; it cannot start on this machine",
    ]
    assert len(check_pipeline(path, gpus_available=2).warnings) == 0
    # the stage class asks for a GPU itself
    assert [d.operator for d in check_pipeline(path, gpus_available=0).warnings] == ["seg", "model"]


def test_gpus_default_to_the_environment_variable(tmp_path, monkeypatch):
    path = write(tmp_path, GPU_PIPELINE)
    monkeypatch.setenv("DATAFLOW_GPUS", "2x16GiB")  # the scheduler's syntax
    assert check_pipeline(path).warnings == []
    monkeypatch.setenv("DATAFLOW_GPUS", "none")
    assert "(declared by DATAFLOW_GPUS='none')" in check_pipeline(path).warnings[0].message
    monkeypatch.setenv("DATAFLOW_GPUS", "2x16")
    bad = check_pipeline(path).warnings[0].message
    assert "none assumed: DATAFLOW_GPUS='2x16': '16' is 16 bytes" in bad


def test_requests_fall_back_on_the_stage_class(tmp_path):
    graph = load_graph(write(tmp_path, GPU_PIPELINE), gpus_available=2)
    assert graph.node("model").requests.gpu == 1
    assert graph.node("seg").requests.gpu == 1


# --------------------------------------------------------------------------- the report


def test_report_lists_load_errors_and_load_graph_raises(tmp_path):
    path = write(tmp_path, "name: p\noperators: []\n")
    report = check_pipeline(path)
    assert not report.ok and report.graph is None
    assert report.format() == (
        f"{path}:2:12: error: field 'operators': must be a non-empty list of operators; got a list"
    )
    with pytest.raises(PipelineError, match=r"p.yaml:2:12: error: field 'operators'"):
        load_graph(path)


def test_report_format_puts_errors_first(tmp_path, no_container_runtime):
    path = write(
        tmp_path,
        """
        name: p
        orchestrator: Clara
        operators:
        - name: a
          container: {image: x}
          input: [{from: nobody, path: /in}]
        """,
    )
    report = check_pipeline(path)
    lines = report.format().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["error", "warning", "note"]
    assert report.format(notes=False).count("\n") == 1
    spec = load_pipeline(path)  # the file loads; the link is a validation error
    assert not validate(spec).ok
    with pytest.raises(PipelineError):
        validate(spec).raise_for_errors()


def test_messages_never_print_an_absolute_path_that_was_given_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "name: p\noperators:\n- name: a\n")
    (diagnostic,) = check_pipeline("p.yaml").errors
    assert diagnostic.format().startswith("p.yaml:3:3: error: operator 'a' field 'stage'")
    assert not os.path.isabs(diagnostic.location.file)
