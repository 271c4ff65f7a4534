import numpy as np
import pytest

from dataflow.stage import (
    ParameterError,
    Port,
    PortError,
    Stage,
    StageContext,
    Tensor,
    collect_outputs,
    function_stage,
)

VOL = Port("array", element_type="float32", shape=(-1, -1, -1))


class WindowLevel(Stage):
    inputs = {"image": VOL}
    outputs = {"image": VOL}

    def __init__(self, low: float = -1000.0, high: float = 1000.0):
        self.low, self.high = low, high

    def execute(self, ctx, image):
        return np.clip((image - self.low) / (self.high - self.low), 0, 1).astype(np.float32)


@function_stage(inputs={"image": VOL}, outputs={"mask": Port("array", "uint8", (-1, -1, -1))})
def threshold(image, ctx, *, level: float = 0.5):
    """Voxels above level."""
    return (image > level).astype(np.uint8)


def test_ports_normalise_clara_aliases_and_describe_themselves():
    assert Port("array", "f32", [2, -1]).describe() == "array<float32>[2, -1]"
    assert Port("i16").type == "int16"
    assert Port("stream", element_type="dicom").describe() == "stream<dicom>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "tensor"}, "port type must be one of"),
        ({"type": "array", "element_type": "float32"}, "needs element_type and shape"),
        ({"type": "array", "element_type": "float32", "shape": (0, 3)}, "positive or -1"),
        ({"type": "stream"}, "needs an element_type label"),
        ({"type": "string", "shape": (3,)}, "takes no element_type or shape"),
        ({"type": "array", "element_type": "complex64", "shape": (3,)}, "unsupported element"),
    ],
)
def test_bad_ports_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Port(**kwargs)


def test_connected_ports_must_match():
    assert VOL.accepts(Port("array", "float32", (3, 4, 5))) is None
    assert "element type int16" in VOL.accepts(Port("array", "int16", (-1, -1, -1)))
    assert "different rank" in VOL.accepts(Port("array", "float32", (-1, -1)))
    assert "does not fit" in Port("array", "u8", (4,)).accepts(Port("array", "u8", (5,)))
    assert "does not match" in Port("string").accepts(Port("float32"))


def test_parameters_are_checked_and_converted_from_yaml_strings():
    assert WindowLevel.check_parameters({"low": "-500", "high": 1500}) == {
        "low": -500.0,
        "high": 1500.0,
    }
    with pytest.raises(ParameterError, match="unknown parameter 'width'.*known: low, high"):
        WindowLevel.check_parameters({"width": 3})
    with pytest.raises(ParameterError, match="parameter 'low' must be float; got 'cold'"):
        WindowLevel.check_parameters({"low": "cold"})
    assert threshold.check_parameters({"level": "0.25"}) == {"level": 0.25}


def test_a_stage_class_without_init_takes_no_parameters():
    """object.__init__ reads as (*args, **kwargs) but refuses them all when called: the
    validator says so at once instead of the workers failing to start (issue 13)."""

    class Sink(Stage):
        inputs = {"x": Port("stream", element_type="npy")}
        outputs = {}

        def execute(self, ctx, x):
            return {}

    assert Sink.check_parameters({}) == {}
    with pytest.raises(ParameterError, match="unknown parameter 'level' \\(known: none\\)"):
        Sink.check_parameters({"level": 3})


def test_output_values_are_checked_with_the_stage_port_and_shapes_in_the_message():
    wl = WindowLevel()
    with pytest.raises(PortError) as info:
        collect_outputs(wl, np.zeros((512, 512), np.int16), "window")
    assert str(info.value) == (
        "stage 'window' output 'image' must be float32 [-1, -1, -1]; got int16 [512, 512] instead"
    )
    out = collect_outputs(wl, Tensor(np.zeros((1, 2, 3), np.float32), {"spacing": [1, 1, 1]}), "w")
    assert isinstance(out["image"], Tensor)


def test_function_stage_runs_with_ctx_and_parameters():
    assert threshold.__doc__ == "Voxels above level."
    instance = threshold(level=0.5)
    ctx = StageContext(stage="threshold")
    mask = instance.execute(ctx, image=np.array([[[0.2, 0.7]]], np.float32))
    assert mask.tolist() == [[[0, 1]]]


def test_function_stage_arguments_must_be_ports_or_keyword_only():
    with pytest.raises(PortError, match="argument 'level' is not an input port"):

        @function_stage(inputs={"image": VOL})
        def bad(image, level=0.5):
            return image


def test_context_time_left_counts_down():
    ctx = StageContext(stage="s")
    ctx.begin_job("j1", "job-1", timeout=60)
    assert 59 < ctx.time_left <= 60
    ctx.begin_job("j2", "job-2")
    assert ctx.time_left is None


def test_dataflow_stage_is_the_module_and_the_decorator_has_its_own_name():
    """``import dataflow.stage as m`` gives the module (the decorator shadowed it, issue
    13); code still calling the old name is told the new one."""
    import types

    import dataflow
    import dataflow.stage as module

    assert isinstance(module, types.ModuleType) and module.Stage is Stage
    assert dataflow.function_stage is function_stage
    with pytest.raises(TypeError, match="the decorator is dataflow.function_stage"):
        dataflow.stage(inputs={})


def test_metadata_from_names_the_input_whose_metadata_a_plain_output_inherits():
    from dataflow.stage import output_values

    class Overlay(Stage):
        inputs = {"image": VOL, "mask": VOL}
        outputs = {"image": VOL}
        metadata_from = "mask"

    meta = {"image": {"spacing": [1, 1, 1]}, "mask": {"spacing": [2, 2, 2]}}
    out = output_values(Overlay(), {"image": np.zeros((1, 1, 1), np.float32)}, meta)
    assert out["image"].metadata == {"spacing": [2, 2, 2]}
    Overlay.metadata_from = "labels"  # no such input: said, with the inputs there are
    with pytest.raises(PortError, match="metadata_from names no input 'labels'.*image, mask"):
        output_values(Overlay(), {"image": np.zeros((1, 1, 1), np.float32)}, meta)
