"""The stage author's API: :class:`Stage`, :class:`Port`, the :func:`stage` decorator and
:class:`StageContext`.

A stage follows Clara's driver life-cycle: ``prepare`` once per worker (load a model, allocate),
``execute`` once per job flowing through, ``cleanup`` once per worker. Ports use Clara's types::

    class WindowLevel(Stage):
        inputs = {"image": Port("array", element_type="float32", shape=(-1, -1, -1))}
        outputs = {"image": Port("array", element_type="float32", shape=(-1, -1, -1))}

        def __init__(self, low: float = -1000.0, high: float = 1000.0):  # parameters
            self.low, self.high = low, high

        def execute(self, ctx, image):
            return np.clip((image - self.low) / (self.high - self.low), 0, 1)

Parameters are the constructor's keyword arguments; the pipeline's values are checked against its
signature (names, required ones, types) when the pipeline loads, before anything runs.

``execute(ctx, **inputs)`` receives one value per input port: a read-only NumPy array for
``array`` ports (a zero-copy view of the store), ``str`` for ``string``, a Python number for
primitives, a :class:`pathlib.Path` (a directory) for ``stream``. It returns the outputs: a
mapping ``{port: value}``, or the bare value when the stage has exactly one output port, or
``None`` when it has none. An array output may be a NumPy array, a :class:`Tensor` (array plus
metadata), or an array from ``ctx.allocate(port, shape)`` that was computed in place in shared
memory (no copy). Array outputs inherit the metadata of the stage's first array input unless a
``Tensor`` says otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dataflow.errors import DataflowError
from dataflow.tensors import ELEMENT_TYPES, dtype_of

__all__ = [
    "PORT_TYPES",
    "PRIMITIVES",
    "ParameterError",
    "Port",
    "PortError",
    "Stage",
    "StageContext",
    "StageError",
    "Tensor",
    "checking_pipeline",
    "collect_outputs",
    "function_stage",
    "inherited_metadata",
    "output_values",
    "pipeline_folder",
]

#: Clara primitive types (and their aliases) usable as a port ``type``.
PRIMITIVES = {
    **{name: name for name in ELEMENT_TYPES if name != "bool"},
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "f16": "float16", "f32": "float32", "f64": "float64",
}  # fmt: skip
PORT_TYPES = ("array", "string", "stream", *PRIMITIVES)


class StageError(DataflowError):
    """A stage's own code failed (the user's exception is chained as ``__cause__``)."""


class PortError(DataflowError, ValueError):
    """A port is declared wrongly, or a value does not fit its port."""


class ParameterError(DataflowError, ValueError):
    """A stage parameter is unknown, missing or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Port:
    """A typed input or output, in Clara's terms.

    ``type``: ``array`` (needs ``element_type`` and ``shape``; -1 marks a dynamic dimension),
    ``string``, ``stream`` (files on disk; ``element_type`` is a free label such as ``dicom``),
    or a primitive (``float32``, ``i16``...).
    """

    type: str
    element_type: str | None = None
    shape: tuple[int, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        kind = self.type.lower() if isinstance(self.type, str) else self.type
        if kind not in PORT_TYPES:
            raise PortError(f"port type must be one of {', '.join(PORT_TYPES)}; got {self.type!r}")
        object.__setattr__(self, "type", PRIMITIVES.get(kind, kind))
        if self.type == "array":
            if self.element_type is None or self.shape is None:
                raise PortError("an array port needs element_type and shape")
            object.__setattr__(self, "element_type", _element_name(self.element_type))
            shape = tuple(int(d) for d in self.shape)
            if any(d == 0 or d < -1 for d in shape):
                raise PortError(f"array shape dimensions must be positive or -1; got {shape}")
            object.__setattr__(self, "shape", shape)
        elif self.type == "stream":
            if not self.element_type:
                raise PortError("a stream port needs an element_type label (e.g. 'dicom')")
            if self.shape is not None:
                raise PortError("a stream port has no shape")
        elif self.element_type is not None or self.shape is not None:
            raise PortError(f"a {self.type} port takes no element_type or shape")

    def describe(self) -> str:
        """``array<float32>[-1, 512, 512]``, ``string``, ``stream<dicom>``, ``float32``."""
        if self.type == "array":
            return f"array<{self.element_type}>[{', '.join(map(str, self.shape))}]"
        if self.type == "stream":
            return f"stream<{self.element_type}>"
        return self.type

    def accepts(self, upstream: Port) -> str | None:
        """Why ``upstream`` (an output) cannot feed this input, or None if it can."""
        if self.type != upstream.type:
            return f"type {upstream.describe()} does not match {self.describe()}"
        if self.type == "array":
            if self.element_type != upstream.element_type:
                return f"element type {upstream.element_type} does not match {self.element_type}"
            if len(self.shape) != len(upstream.shape):
                return f"shape {list(upstream.shape)} has a different rank than {list(self.shape)}"
            for mine, theirs in zip(self.shape, upstream.shape):
                if mine != -1 and theirs != -1 and mine != theirs:
                    return f"shape {list(upstream.shape)} does not fit {list(self.shape)}"
        if self.type == "stream" and self.element_type != upstream.element_type:
            return f"stream of {upstream.element_type!r} does not match {self.element_type!r}"
        return None

    def check_value(self, value: Any, where: str) -> None:
        """Raise PortError naming ``where`` (e.g. "stage 'x' output 'y'") if value does not fit."""
        if self.type == "array":
            array = value.array if isinstance(value, Tensor) else value
            if not isinstance(array, np.ndarray):
                raise PortError(f"{where} must be a NumPy array; got {type(value).__name__}")
            expected = dtype_of(self.element_type)
            if array.dtype != expected or not _shape_fits(array.shape, self.shape):
                raise PortError(
                    f"{where} must be {self.element_type} {list(self.shape)}; "
                    f"got {array.dtype} {list(array.shape)} instead"
                )
        elif self.type == "string":
            if not isinstance(value, str):
                raise PortError(f"{where} must be a str; got {type(value).__name__}")
        elif self.type == "stream":
            if not isinstance(value, (str, Path)):
                raise PortError(f"{where} must be a path; got {type(value).__name__}")
        else:
            kind = np.dtype(self.type).kind
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            if kind in "iu" and isinstance(value, (float, np.floating)):
                ok = False
            if not ok:
                raise PortError(f"{where} must be a {self.type}; got {value!r}")


def _element_name(element_type: Any) -> str:
    if isinstance(element_type, str) and element_type.lower() in PRIMITIVES:
        return PRIMITIVES[element_type.lower()]
    if isinstance(element_type, str) and element_type.lower() == "bool":
        return "bool"
    dt = dtype_of(element_type)
    return next(name for name, d in ELEMENT_TYPES.items() if d == dt)


def _shape_fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d == -1 or d == s for s, d in zip(shape, declared))


@dataclasses.dataclass
class Tensor:
    """An array together with its metadata (geometry, UIDs; see docs/tensors.md).

    A stage returns one to give an output's metadata; a function stage gets one for each input
    parameter annotated ``Tensor`` (see :func:`stage`)."""

    array: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """The voxel size in mm along each axis (``metadata["spacing"]``), or None if unknown."""
        value = self.metadata.get("spacing")
        return None if value is None else tuple(float(v) for v in value)


class StageContext:
    """What stage code gets to know and use while it runs.

    ``job_id``, ``job_name``, ``stage`` (its name in the pipeline), ``replica`` (index),
    ``device`` (the GPU index assigned, or None), ``scratch_dir`` (a directory for this worker),
    ``payload_dir`` (this job's directory for stream ports), ``log`` (bound to job and stage),
    ``time_left`` (seconds before the stage timeout, or None), ``metadata`` (input port ->
    metadata of array inputs), :meth:`output_dir` (the job's folder for a stream output),
    :meth:`allocate`, ``memory_limit`` (bytes a job may allocate in this worker beyond
    its prepared footprint — from ``requests.memory`` or the service's default — or None when
    unlimited: bound decodes by it before allocating), ``provenance`` (for a stage whose
    class sets ``wants_provenance``: the job's provenance so far — pipeline, inputs, the
    upstream stages' records, this stage's own — as :mod:`dataflow.execution.provenance`
    describes it; None otherwise), :meth:`note_output` (an instance this job wrote, for the
    job's provenance and ``dataflow trace``).
    """

    def __init__(
        self,
        *,
        stage: str,
        replica: int = 0,
        device: int | None = None,
        scratch_dir: Path | None = None,
        log: Any = None,
        allocator: Callable[[str, tuple[int, ...], Any], np.ndarray] | None = None,
        memory_limit: int | None = None,
        output_dirs: Callable[[str], Path] | None = None,
    ) -> None:
        import structlog

        self.stage = stage
        self.memory_limit: int | None = memory_limit
        self.replica = replica
        self.device = device
        self.scratch_dir = scratch_dir
        self._base_log = log or structlog.get_logger("dataflow.stage").bind(stage=stage)
        self._allocator = allocator
        self._output_dirs = output_dirs
        self.job_id: str | None = None
        self.job_name: str | None = None
        self.payload_dir: Path | None = None
        self.metadata: dict[str, dict[str, Any]] = {}
        self.provenance: dict[str, Any] | None = None
        self.outputs_noted: list[dict[str, Any]] = []
        self.log = self._base_log
        self._deadline: float | None = None

    def begin_job(
        self,
        job_id: str,
        job_name: str,
        *,
        payload_dir: Path | None = None,
        metadata: Mapping[str, dict[str, Any]] | None = None,
        timeout: float | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        """Called by the runtime before each ``execute``."""
        self.job_id, self.job_name, self.payload_dir = job_id, job_name, payload_dir
        self.metadata = dict(metadata or {})
        self.provenance = provenance
        if self.outputs_noted:
            self.outputs_noted = []
        self.log = self._base_log.bind(job_id=job_id)
        self._deadline = None if timeout is None else time.monotonic() + timeout

    @property
    def time_left(self) -> float | None:
        """Seconds left before this stage's timeout for the current job (None: no timeout)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def note_output(self, sop_instance_uid: str, **about: Any) -> None:
        """Say that this job wrote the DICOM instance ``sop_instance_uid`` (``about``: its
        ``sop_class_uid``, ``series_instance_uid``, ``study_instance_uid``, ``file``...; UIDs
        and names of files only, never patient data): the job's provenance lists it, and
        ``dataflow trace`` finds the job from it."""
        self.outputs_noted.append({"sop_instance_uid": str(sop_instance_uid), "stage": self.stage,
                                   **{k: str(v) for k, v in about.items()}})  # fmt: skip

    def output_dir(self, port: str) -> Path:
        """This job's folder for stream output ``port`` (made): write files into it and
        return it, or return nothing and it is the port's value."""
        if self._output_dirs is None:
            raise StageError(f"stage {self.stage!r}: no job folder for output {port!r} here "
                             "(ctx.output_dir is given by the runtime)")  # fmt: skip
        return self._output_dirs(port)

    def allocate(self, port: str, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
        """A writable array for output ``port`` in shared memory: compute into it, return it."""
        if self._allocator is None:
            dt = dtype_of(dtype) if dtype is not None else None
            return np.empty(shape, dtype=dt)
        return self._allocator(port, tuple(shape), dtype)


class Stage:
    """Base class of stages. Override ``execute``; ``prepare`` and ``cleanup`` are optional.

    Class attributes: ``inputs`` and ``outputs`` (name -> :class:`Port`), and optionally
    ``requests`` (``{"cpu": 1, "gpu": 0, "memory": 512}``, as in Clara, memory in MB) and
    ``requires``: the modules it imports beyond dataflow's own dependencies, each with what
    installs it (``{"nibabel": "dataflow[research]"}``). Validation finds them without
    importing them; one missing is an error naming the install. A stage whose needs depend on
    its parameters overrides :meth:`requirements`. ``metadata_from``: the array input whose
    metadata (geometry, UIDs) an array output returned as a plain array inherits; by default
    the first array input in the order of ``inputs`` (return a :class:`Tensor` to set an
    output's metadata yourself). The same rule runs in the workers and in
    :mod:`dataflow.testing` (:func:`output_values`). ``wants_provenance``: the stage is given
    the job's provenance so far as ``ctx.provenance`` (docs/provenance.md).
    """

    inputs: ClassVar[Mapping[str, Port]] = {}
    outputs: ClassVar[Mapping[str, Port]] = {}
    requests: ClassVar[Mapping[str, int]] = {}
    requires: ClassVar[Mapping[str, str]] = {}
    metadata_from: ClassVar[str | None] = None
    #: the stage reads ``ctx.provenance`` (a DICOM writer): the runtime hands it the record
    wants_provenance: ClassVar[bool] = False

    @classmethod
    def requirements(cls, parameters: Mapping[str, Any]) -> Mapping[str, str]:
        """Module -> what installs it, for these (checked) parameters; ``requires`` by default."""
        return cls.requires

    def prepare(self, ctx: StageContext) -> None:
        """Once per worker, before the first job: load a model, allocate buffers."""

    def execute(self, ctx: StageContext, **inputs: Any) -> Any:
        """Once per job: compute the outputs from the inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute(ctx, **inputs)")

    def cleanup(self, ctx: StageContext) -> None:
        """Once per worker, after the last job."""

    @classmethod
    def check_parameters(cls, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Validate and convert parameter values against the constructor's signature."""
        return check_parameters(cls.__init__, values, where or f"stage {cls.__name__}")


_PIPELINE_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "dataflow_pipeline_folder", default=None
)


def pipeline_folder() -> Path | None:
    """The folder of the pipeline file whose operator is being checked, inside
    :meth:`Stage.check_parameters` while a pipeline loads; None elsewhere (``run_stage``).

    A stage with file parameters (a rule file, a model) resolves relative paths against it
    there, and returns absolute ones, so that workers need not know the pipeline file."""
    return _PIPELINE_FOLDER.get()


@contextlib.contextmanager
def checking_pipeline(folder: str | Path | None):
    """Make :func:`pipeline_folder` return ``folder`` within the block (the loader uses it)."""
    token = _PIPELINE_FOLDER.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _PIPELINE_FOLDER.reset(token)


def collect_outputs(
    stage: Stage, result: Any, stage_name: str, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A stage's ``execute`` result as ``{port: value}``, checked against its output ports
    (the runtime's, in the workers and in :mod:`dataflow.testing`: not the author's API).

    ``defaults``: values for ports the stage may leave out (a stream port's directory)."""
    ports = stage.outputs  # a class attribute, or per instance (command stages)
    defaults = defaults or {}
    if result is None:
        values: dict[str, Any] = {}
    elif (
        isinstance(result, Mapping)
        and set(result) <= set(ports)
        and (len(ports) != 1 or next(iter(ports)) in result)
    ):
        values = dict(result)
    elif len(ports) == 1 or len(set(ports) - set(defaults)) == 1:
        values = {next(p for p in ports if p not in defaults or len(ports) == 1): result}
    else:
        raise PortError(
            f"stage {stage_name!r} must return a mapping of its outputs "
            f"{sorted(ports)}; got {type(result).__name__}"
        )
    for port, value in defaults.items():
        values.setdefault(port, value)
    missing = set(ports) - set(values)
    if missing:
        raise PortError(f"stage {stage_name!r} did not produce output(s) {sorted(missing)}")
    for name, value in values.items():
        ports[name].check_value(value, f"stage {stage_name!r} output {name!r}")
    return values


def inherited_metadata(stage: Stage, metadata: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The metadata a plain-array output of ``stage`` gets, from its array inputs' metadata
    (``port -> metadata``): its ``metadata_from`` input's, else its first array input's in the
    order of its ``inputs``; ``{}`` when it has none."""
    if stage.metadata_from is not None:
        if stage.metadata_from not in stage.inputs:
            known = ", ".join(stage.inputs)
            raise PortError(f"stage {type(stage).__name__}: metadata_from names no input "
                            f"{stage.metadata_from!r} (inputs: {known})")  # fmt: skip
        return dict(metadata.get(stage.metadata_from) or {})
    for port in stage.inputs:
        if port in metadata:
            return dict(metadata[port])
    return {}


def output_values(
    stage: Stage, outputs: Mapping[str, Any], metadata: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``outputs`` (as :func:`collect_outputs` gives them) with every array output a
    :class:`Tensor` carrying the metadata downstream stages will see: its own if the stage
    returned a Tensor, else :func:`inherited_metadata`. What a worker publishes to the store
    and what :func:`dataflow.testing.run_stage` shows an author."""
    inherited: dict[str, Any] | None = None
    out: dict[str, Any] = {}
    for port, value in outputs.items():
        if stage.outputs[port].type == "array" and not isinstance(value, Tensor):
            if inherited is None:
                inherited = inherited_metadata(stage, metadata)
            value = Tensor(value, inherited)
        out[port] = value
    return out


def check_parameters(init: Callable, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``values`` against ``init``'s keyword parameters; convert YAML strings to types."""
    if init is object.__init__:  # a stage class without __init__ takes no parameters
        init = _no_parameters
    signature = inspect.signature(init)
    params = {
        name: p
        for name, p in signature.parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    hints = _type_hints(init)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in params:
            if takes_any:
                out[name] = value
                continue
            known = ", ".join(params) or "none"
            raise ParameterError(f"{where}: unknown parameter {name!r} (known: {known})")
        out[name] = _convert(value, hints.get(name), f"{where}: parameter {name!r}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in values]
    if missing:
        raise ParameterError(f"{where}: missing required parameter(s) {', '.join(missing)}")
    return out


def _no_parameters(self) -> None:
    """The constructor a stage class has when it defines none: ``object``'s takes
    ``*args, **kwargs`` on paper but refuses every one when called."""


def _type_hints(init: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(init)
    except Exception:  # unresolvable annotations: skip type checks rather than fail loading
        return {}


def _convert(value: Any, hint: Any, where: str) -> Any:
    if hint is None or hint is Any:
        return value
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or (typing.get_origin(hint) is typing.Union)
        else (hint,)
    )
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert_one(value, option)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ParameterError(f"{where} must be {names}; got {value!r}")


def _convert_one(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError("not a bool")
    if origin is int:
        if isinstance(value, bool):
            raise TypeError("not an int")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an int")
        return int(value)
    if origin is float:
        if isinstance(value, bool):
            raise TypeError("not a float")
        return float(value)
    if origin is str:
        if isinstance(value, (dict, list)):
            raise TypeError("not a str")
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return value
    if isinstance(origin, type) and not isinstance(value, origin):
        raise TypeError(f"not a {origin.__name__}")
    return value


def function_stage(
    *,
    inputs: Mapping[str, Port] | None = None,
    outputs: Mapping[str, Port] | None = None,
    requests: Mapping[str, int] | None = None,
) -> Callable[[Callable], type[Stage]]:
    """Turn a function into a stage. Its keyword-only arguments are the stage's parameters::

        @function_stage(inputs={"image": Port("array", "float32", (-1, -1, -1))},
                        outputs={"mask": Port("array", "uint8", (-1, -1, -1))})
        def threshold(image, *, level: float = 0.5):
            return (image > level).astype(np.uint8)

    Positional arguments receive the inputs by port name; ``ctx`` is passed if the function has
    a parameter of that name. An array input annotated :class:`Tensor` receives
    ``Tensor(array, metadata)``, so the function can read its geometry (``.spacing`` in mm)::

        @function_stage(inputs={"mask": Port("array", "uint8", (-1, -1, -1))},
                        outputs={"ml": Port("float64")})
        def volume_ml(mask: Tensor):
            return float(mask.array.sum()) * math.prod(mask.spacing) / 1000.0
    """

    def wrap(fn: Callable) -> type[Stage]:
        signature = inspect.signature(fn)
        kw_only = [p for p in signature.parameters.values() if p.kind == p.KEYWORD_ONLY]
        wants_ctx = "ctx" in signature.parameters
        port_names = set(inputs or {})
        for p in signature.parameters.values():
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            if positional and p.name != "ctx" and p.name not in port_names:
                raise PortError(
                    f"stage function {fn.__name__!r}: argument {p.name!r} is not an input "
                    f"port (inputs: {sorted(port_names) or 'none'}); make parameters "
                    "keyword-only (after *)"
                )

        with_metadata = _tensor_parameters(fn, signature, dict(inputs or {}))

        def __init__(self, **params: Any) -> None:
            self.params = params

        __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *kw_only]
        )
        __init__.__annotations__ = {
            p.name: p.annotation for p in kw_only if p.annotation is not p.empty
        }

        def execute(self, ctx: StageContext, **values: Any) -> Any:
            if wants_ctx:
                values["ctx"] = ctx
            for port in with_metadata:
                values[port] = Tensor(values[port], dict(ctx.metadata.get(port, {})))
            return fn(**values, **self.params)

        namespace = {
            "__init__": __init__,
            "execute": execute,
            "inputs": dict(inputs or {}),
            "outputs": dict(outputs or {}),
            "requests": dict(requests or {}),
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
            "__qualname__": fn.__qualname__,
            "__wrapped__": fn,
        }
        return type(fn.__name__, (Stage,), namespace)

    return wrap


def _tensor_parameters(
    fn: Callable, signature: inspect.Signature, ports: Mapping[str, Port]
) -> set[str]:
    """The array input ports whose parameter is annotated ``Tensor`` (the class, or its name in
    a string annotation under ``from __future__ import annotations``)."""
    names = {"Tensor", "dataflow.Tensor", "dataflow.stage.Tensor"}
    out = set()
    for p in signature.parameters.values():
        if p.name not in ports or not (p.annotation is Tensor or p.annotation in names):
            continue
        if ports[p.name].type != "array":
            raise PortError(
                f"stage function {fn.__name__!r}: argument {p.name!r} is annotated Tensor but "
                f"input port {p.name!r} is {ports[p.name].type!r}, not an array"
            )
        out.add(p.name)
    return out


class _StageModule(types.ModuleType):
    """``dataflow.stage`` is this module; called as the decorator it was once, it says
    what the decorator is called now."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("dataflow.stage is the module: the decorator is dataflow.function_stage "
                        "(from dataflow import function_stage; @function_stage(inputs=..., "
                        "outputs=...))")  # fmt: skip


sys.modules[__name__].__class__ = _StageModule
