"""issue 10: a stage's missing dependency is an error of validation naming what to install.

Before, with only ``pip install -e .``, ct-inference (onnxruntime) and ct-filter (nibabel) were
"valid (0 errors)" and their workers failed at start. Modules are hidden here the way Python
documents: ``sys.modules[name] = None`` makes it unimportable and ``find_spec`` say None, so the
real pipelines are checked as on a machine without the extra, and nothing is uninstalled.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from dataflow.pipeline import PipelineError, check_pipeline, load_graph
from dataflow.pipeline.requirements import installed, missing
from dataflow.stage import Stage

REPO = Path(__file__).parents[2]
DATA = Path(__file__).parent / "pipelines_data"


def pipeline(tmp_path: Path, stage: str, arguments: str = "") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "api-version: 0.5.0\nname: p\noperators:\n"
        f"- name: op\n  stage: {stage}\n{arguments}"
        "  input:\n  - name: image\n"
    )
    return path


@pytest.fixture(autouse=True)
def _stage_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(DATA.parent))


def hide(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def stage_errors(report) -> list[str]:
    return [d.format() for d in report.errors if d.field == "stage"]


def test_a_missing_module_is_an_error_naming_the_install(tmp_path):
    path = pipeline(tmp_path, "pipelines_data.needs:NeedsAbsent")
    report = check_pipeline(path)
    assert not report.ok and report.graph is None
    assert stage_errors(report) == [
        f"{path}:5:10: error: operator 'op' field 'stage': pipelines_data.needs:NeedsAbsent "
        "needs dataflow_test_surely_absent, not installed here: "
        "pip install 'dataflow-test-extras[absent]'"
    ]
    with pytest.raises(PipelineError, match="not installed here"):
        load_graph(path)  # what dataflow run, plan and serve call


def test_a_present_module_passes_and_a_bad_declaration_is_named(tmp_path):
    assert check_pipeline(pipeline(tmp_path, "pipelines_data.needs:NeedsPresent")).ok
    report = check_pipeline(pipeline(tmp_path, "pipelines_data.needs:BadRequires"))
    (message,) = stage_errors(report)
    assert "requires must map module names to what installs them" in message


def test_ct_filter_without_nibabel_names_the_research_extra(monkeypatch):
    hide(monkeypatch, "nibabel")
    report = check_pipeline(REPO / "pipelines" / "ct-filter.yaml")
    (error,) = report.errors
    assert error.operator == "nifti" and error.field == "stage"
    assert error.message == (
        "operators.research:WriteNifti needs nibabel, not installed here: "
        "pip install 'dataflow[research]'"
    )


def test_ct_inference_without_onnxruntime_names_the_onnx_extra(monkeypatch):
    hide(monkeypatch, "onnxruntime", "onnx")
    report = check_pipeline(REPO / "pipelines" / "ct-inference.yaml")
    (error,) = report.errors
    assert error.operator == "lung-inference"
    assert error.message.endswith(
        "needs onnxruntime and onnx, not installed here: pip install 'dataflow[onnx]'"
    )
    # a model file of one's own needs onnxruntime only
    report = check_pipeline(REPO / "pipelines" / "ct-inference.yaml", {"model": "m.onnx"})
    assert "needs onnxruntime, not installed" in report.errors[0].message


@pytest.mark.parametrize(
    ("protocol", "transport"), [("http", "geventhttpclient"), ("grpc", "grpc")]
)
def test_the_triton_backend_needs_tritonclient_and_its_transport(
    tmp_path, monkeypatch, protocol, transport
):
    arguments = (
        "  arguments: {backend: triton, model_name: m, url: 'localhost:1', "
        f"protocol: {protocol}}}\n"
    )
    path = pipeline(tmp_path, "operators.inference:Inference", arguments)
    assert not stage_errors(check_pipeline(path))
    hide(monkeypatch, transport)
    (message,) = stage_errors(check_pipeline(path))
    assert message.endswith(
        f"needs {transport}, not installed here: pip install 'dataflow[triton]'"
    )


def _stage_classes() -> list[type[Stage]]:
    import operators.dicom
    import operators.dicom.derived
    import operators.dicom.seg
    import operators.image
    import operators.image_stages
    import operators.inference
    import operators.passthrough
    import operators.register
    import operators.research  # noqa: F401

    found, todo = [], list(Stage.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("operators."):
            found.append(cls)
    return found


def test_every_extra_a_bundled_stage_names_is_declared_in_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set()
    for cls in _stage_classes():
        for parameters in ({}, {"backend": "triton"}, {"backend": "triton", "protocol": "grpc"}):
            for module, install in cls.requirements(parameters).items():
                assert install.startswith("dataflow[") and install.endswith("]"), (cls, install)
                named.add(install[len("dataflow[") : -1])
                assert installed(module), f"{module} ({install}) is missing from the test extra"
    assert named == {"onnx", "triton", "research"}
    assert named <= set(extras)


def test_missing_groups_modules_by_what_installs_them(monkeypatch):
    class Two(Stage):
        requires = {"numpy": "numpy", "a_surely_absent": "x[a]", "b_surely_absent": "x[a]"}

    assert missing(Two, {}) == {"x[a]": ["a_surely_absent", "b_surely_absent"]}


def test_a_stage_module_importing_an_absent_module_says_which(tmp_path):
    (tmp_path / "eager.py").write_text(
        "import dataflow_test_surely_absent\nfrom dataflow.stage import Stage\n"
        "class Eager(Stage):\n    pass\n"
    )
    (message,) = stage_errors(check_pipeline(pipeline(tmp_path, "eager:Eager")))
    assert "importing module 'eager' failed: it imports 'dataflow_test_surely_absent', " in (
        message
    )
    assert "which is not installed here" in message
