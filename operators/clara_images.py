"""Clara's well-known operator images, done by bundled stages, so that Clara's own pipelines
run unchanged without containers (see docs/pipelines.md, "Clara's operator images").

``IMAGES`` is the table the engine reads through the ``dataflow.images`` entry point
(pyproject.toml; ``dataflow.pipeline.images``): image name -> the stage that does its job here,
or why it cannot. Each stage takes the arguments of a container operator (``command``,
``inputs`` and ``outputs`` with their declared paths, ``variables``...) and speaks the image's
disk protocol: the same folders in, the same files out, so its neighbours, containers or not,
do not notice. They run in warm workers like any stage: no container start per job.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.stage import Port, Stage, StageContext, StageError

__all__ = [
    "IMAGES",
    "ClaraImage",
    "DicomReader",
    "DicomWriter",
    "FastIOPassthrough",
    "NullOperator",
    "RegisterResultsImage",
    "read_mhd",
]

_MODEL = (
    "needs NVIDIA's trained model, served by Triton, which is not distributed with dataflow; "
    "no bundled stage can stand in for it (run the image with Docker or Podman and a GPU, or "
    "replace the operator with operators.inference:Inference and a model of your own)"
)

#: Image name (no registry host, no tag) -> the bundled stage that does its job, or why not.
IMAGES: dict[str, dict[str, Any]] = {
    "clara/dicom-reader": {
        "stage": "operators.clara_images:DicomReader",
        "does": "DICOM instances -> one MetaImage (.mhd/.raw) per image series, named by "
        "its SeriesInstanceUID",
        "gpu": False,
    },
    "clara/dicom-writer": {
        "stage": "operators.clara_images:DicomWriter",
        "does": "a MetaImage volume named by its source series + the original DICOM -> a new "
        "derived series of the same study",
        "gpu": False,
    },
    "clara/register-results": {
        "stage": "operators.clara_images:RegisterResultsImage",
        "does": "register.py --agent --data: the input's files become an export task",
        "gpu": False,
    },
    "null-pipeline/operator-py": {
        "stage": "operators.clara_images:NullOperator",
        "does": "the sizing tool's null operator: its input passed on unchanged",
        "gpu": False,
    },
    "clara/app_fastio_passthrough": {
        "stage": "operators.clara_images:FastIOPassthrough",
        "does": "main.py nifti_to_fastio | fastio_to_npz | compare, over shared memory",
        "gpu": False,
    },
    "clara/ai-lung": {"unavailable": f"lung segmentation (clara/ai-lung) {_MODEL}"},
    "clara/ai-covid-19": {
        "unavailable": f"COVID-19 classification from the CT and its lung mask (clara/ai-covid-19) "
        f"{_MODEL}"
    },
    "lung-lesion-seg-app": {
        "unavailable": "lung and lesion (GGO) segmentation, a user's application image built "
        "around its own model served by Triton; neither image nor model is published, and no "
        "bundled stage can stand in for it"
    },
}


def _port(kind: Sequence[Any] | None, element_type: str | None) -> Port:
    if kind is None:
        return Port("stream", element_type=element_type or "disk")
    type_, element, shape = kind
    if type_ == "stream":
        return Port("stream", element_type=element or "disk")
    return Port(type_, element_type=element, shape=tuple(shape) if shape else None)


class ClaraImage(Stage):
    """A bundled stand-in for a Clara operator image: takes a container operator's arguments
    and declares the same ports (a folder for each disk input and output, shared-memory
    arrays where the pipeline declares ``type: array``)."""

    def __init__(
        self,
        command: list | None = None,
        inputs: dict | None = None,
        outputs: dict | None = None,
        input_types: dict | None = None,
        output_types: dict | None = None,
        variables: dict | None = None,
        image: str | None = None,
        tag: str = "latest",
        ports: dict | None = None,
    ):
        self.command = [str(c) for c in command or ()]
        self.input_paths = dict(inputs or {})  # port -> the path the image reads it at
        self.output_paths = dict(outputs or {})
        self.variables = {str(k): str(v) for k, v in (variables or {}).items()}
        self.image = f"{image}:{tag}"
        kinds = ports or {}
        self.inputs = {
            p: _port((kinds.get("inputs") or {}).get(p), (input_types or {}).get(p))
            for p in self.input_paths
        }
        self.outputs = {
            p: _port((kinds.get("outputs") or {}).get(p), (output_types or {}).get(p))
            for p in self.output_paths
        }

    def _by_path(self, *paths: str) -> str | None:
        """The input port the image reads at one of ``paths`` (e.g. '/dicom')."""
        wanted = {p.rstrip("/") for p in paths}
        for port, path in self.input_paths.items():
            if path and path.rstrip("/") in wanted:
                return port
        return None

    def _one_output(self, ctx: StageContext) -> tuple[str, Path]:
        if len(self.outputs) != 1:
            raise StageError(
                f"image {self.image}: expected one output folder; the operator declares "
                f"{sorted(self.outputs) or 'none'}"
            )
        port = next(iter(self.outputs))
        return port, ctx.output_dir(port)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- MetaImage


_MET_DTYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2",
    "MET_INT": "i4", "MET_UINT": "u4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}  # fmt: skip


def read_mhd(path: Path) -> np.ndarray:
    """The voxels of an uncompressed MetaImage as a ``[D, H, W]`` array (the geometry is the
    source series', checked by the caller)."""
    fields = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    where = f"MetaImage {path.name}"
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        dtype = np.dtype(_MET_DTYPES[fields["ElementType"]])
        data_file = fields["ElementDataFile"]
    except (KeyError, ValueError) as exc:
        raise StageError(f"{where}: missing or bad header field {exc}") from None
    if fields.get("CompressedData", "False").lower() == "true" or len(dims) != 3:
        raise StageError(f"{where}: only uncompressed 3D MetaImage is read here")
    order = ">" if fields.get("BinaryDataByteOrderMSB", "False").lower() == "true" else "<"
    raw = path.parent / data_file
    if not raw.is_file():
        raise StageError(f"{where}: its data file {data_file!r} is not next to it")
    data = np.fromfile(raw, dtype=dtype.newbyteorder(order))
    if data.size != int(np.prod(dims)):
        raise StageError(f"{where}: {data_file} holds {data.size} voxels, DimSize says {dims}")
    return data.reshape(dims[::-1])


# --------------------------------------------------------------------------- the images


class DicomReader(ClaraImage):
    """``clara/dicom-reader``: each image series of the input folder as ``<SeriesUID>.mhd``
    (float32 HU, with its geometry) in the output folder."""

    def execute(self, ctx, **inputs: Path) -> dict[str, Path]:
        from operators.dicom.series import SeriesError, load_series, split_series
        from operators.research import mhd_header

        port, out = self._one_output(ctx)
        (folder,) = inputs.values()
        written = []
        for uid, files in split_series(Path(folder)).items():
            try:
                volume, metadata = load_series(files, getattr(ctx, "memory_limit", None))
            except SeriesError as exc:  # not images (SR, SEG...), or not one volume
                ctx.log.info("series_skipped", series=uid, reason=str(exc)[:300])
                continue
            (out / f"{uid}.raw").write_bytes(np.ascontiguousarray(volume).tobytes())
            (out / f"{uid}.mhd").write_text(mhd_header(volume, metadata, f"{uid}.raw"))
            written.append(uid)
        if not written:
            raise StageError(f"image {self.image}: no DICOM image series in the input folder")
        ctx.log.info("series_converted", image=self.image, series=len(written))
        return {port: out}


class DicomWriter(ClaraImage):
    """``clara/dicom-writer``: the volume(s) of the input folder (``<SeriesUID>.mhd``, as the
    reader names them) become new derived series of the original series found in the folder
    read at ``/dicom``."""

    def execute(self, ctx, **inputs: Path) -> dict[str, Path]:
        from operators.dicom.derived import make_derived_series
        from operators.dicom.seg import source_datasets
        from operators.dicom.series import load_series, split_series

        port, out = self._one_output(ctx)
        originals = self._by_path("/dicom", "/dcm")
        if originals is None or len(inputs) != 2:
            raise StageError(
                f"image {self.image}: needs two inputs, the volume and the original DICOM "
                f"read at /dicom; the operator declares {self.input_paths}"
            )
        dicom = Path(inputs[originals])
        (volumes,) = [Path(v) for p, v in inputs.items() if p != originals]
        series = split_series(dicom)
        mhds = sorted(volumes.glob("*.mhd"))
        if not mhds:
            raise StageError(f"image {self.image}: no .mhd volume in its input folder")
        for mhd in mhds:
            uid = mhd.stem
            if uid not in series:
                raise StageError(
                    f"image {self.image}: {mhd.name} names series {uid}, which is not among "
                    f"the original DICOM ({len(series)} series)"
                )
            _, metadata = load_series(series[uid])
            volume = read_mhd(mhd).astype(np.float32)
            datasets = make_derived_series(
                volume, source_datasets(dicom, metadata), series_description="Clara dicom-writer"
            )
            for ds in datasets:
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return {port: out}


def _option(command: Sequence[str], name: str) -> str | None:
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


class RegisterResultsImage(ClaraImage):
    """``clara/register-results``: ``register.py --agent AGENT --data '["DEST"]'`` registers
    the input folder's files as an export task, written to the operator's ``task`` folder."""

    def __init__(self, **arguments: Any):
        super().__init__(**arguments)
        agent = _option(self.command, "--agent")
        data = _option(self.command, "--data")
        if agent is None:
            raise StageError(
                f"image {self.image}: its command names no --agent: {shlex.join(self.command)}"
            )
        try:
            destinations = json.loads(data) if data else []
        except json.JSONDecodeError as exc:
            raise StageError(f"image {self.image}: --data is not JSON ({exc}): {data}") from None
        if not isinstance(destinations, list):
            destinations = [destinations]
        from operators.register import RegisterResults

        self.register = RegisterResults(destinations=[str(d) for d in destinations], agent=agent)

    def execute(self, ctx, **inputs: Path) -> dict[str, Path] | None:
        from operators.register import register_files

        (folder,) = inputs.values()
        out = ctx.output_dir("task")  # type: ignore[attr-defined]
        task = register_files(
            Path(folder), out, agent=self.register.agent,
            destinations=self.register.destinations, job_id=ctx.job_id or "",
            job_name=ctx.job_name,
        )  # fmt: skip
        ctx.log.info("results_registered", agent=self.register.agent,
                     destinations=self.register.destinations, files=len(task["uris"]))  # fmt: skip
        return {port: out for port in self.outputs} or None


class NullOperator(ClaraImage):
    """``null-pipeline/operator-py``: the operator sizing tool's null operator, which does no
    work: every file of its inputs is passed on to its output (hard links where possible)."""

    def execute(self, ctx, **inputs: Path) -> dict[str, Path]:
        from dataflow.durable import link_or_copy

        port, out = self._one_output(ctx)
        for folder in inputs.values():
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    link_or_copy(path, out / path.relative_to(folder))
        return {port: out}


class FastIOPassthrough(ClaraImage):
    """``clara/app_fastio_passthrough``: ``main.py nifti_to_fastio`` reads the NIfTI of its
    input into ``segmentation`` float32 ``[1, X, Y, Z]`` and ``segmentation_shape`` int32
    ``[4]`` (shared memory); ``fastio_to_npz`` checks the one against the other and writes
    ``segmentation.npz``; ``compare`` checks that npz against the original NIfTI, writes
    ``report.json``, and fails the job when they differ."""

    requires = {"nibabel": "dataflow[research]"}
    STEPS = ("nifti_to_fastio", "fastio_to_npz", "compare")

    def __init__(self, **arguments: Any):
        super().__init__(**arguments)
        steps = [w for w in self.command if w in self.STEPS]
        if len(steps) != 1:
            raise StageError(
                f"image {self.image}: the command must name one of {', '.join(self.STEPS)}; "
                f"got {shlex.join(self.command) or 'none'}"
            )
        self.step = steps[0]

    def execute(self, ctx, **inputs: Any) -> dict[str, Any]:
        return getattr(self, self.step)(ctx, inputs)

    def _nifti(self, folder: Path) -> tuple[str, np.ndarray]:
        import nibabel as nib

        files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if len(files) != 1:
            raise StageError(
                f"image {self.image} ({self.step}): expected one .nii or .nii.gz file in the "
                f"input folder; found {len(files)}: {[p.name for p in files][:5]}"
            )
        return files[0].name, np.asarray(nib.load(files[0]).get_fdata(dtype=np.float32))

    def nifti_to_fastio(self, ctx, inputs: Mapping[str, Any]) -> dict[str, Any]:
        (folder,) = inputs.values()
        _, volume = self._nifti(Path(folder))
        segmentation = volume[np.newaxis]
        return {
            "segmentation": segmentation,
            "segmentation_shape": np.asarray(segmentation.shape, dtype=np.int32),
        }

    def fastio_to_npz(self, ctx, inputs: Mapping[str, Any]) -> dict[str, Any]:
        segmentation, shape = inputs["segmentation"], inputs["segmentation_shape"]
        if tuple(segmentation.shape) != tuple(int(v) for v in shape):
            raise StageError(
                f"image {self.image} (fastio_to_npz): segmentation is {list(segmentation.shape)}"
                f" but segmentation_shape says {[int(v) for v in shape]}"
            )
        port, out = self._one_output(ctx)
        np.savez_compressed(out / "segmentation.npz", segmentation=segmentation)
        return {port: out}

    def compare(self, ctx, inputs: Mapping[str, Any]) -> dict[str, Any]:
        npz_port = self._by_path("/npz")
        if npz_port is None:
            raise StageError(f"image {self.image} (compare): no input read at /npz")
        nifti_port = next(p for p in inputs if p != npz_port)
        name, original = self._nifti(Path(inputs[nifti_port]))
        with np.load(Path(inputs[npz_port]) / "segmentation.npz") as npz:
            result = npz["segmentation"]
        equal = result.shape == (1, *original.shape) and np.array_equal(result[0], original)
        report = {"nifti": name, "shape": list(result.shape), "equal": bool(equal)}
        port, out = self._one_output(ctx)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not equal:
            raise StageError(f"image {self.image} (compare): the npz differs from {name}")
        return {port: out}
