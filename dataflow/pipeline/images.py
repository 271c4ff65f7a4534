"""Clara's well-known operator images, run as bundled stages instead of containers.

Clara's own pipelines name operator images (``clara/dicom-reader``, ``clara/register-results``,
the null pipeline's ``null-pipeline/operator-py``...). Where a package of stages does the same
job, it says so through the ``dataflow.images`` entry point: a mapping of image names to what
runs them here::

    [project.entry-points."dataflow.images"]
    clara = "operators.clara_images:IMAGES"

    IMAGES = {
        "clara/dicom-reader": {"stage": "operators.clara_images:DicomReader",
                               "does": "DICOM instances -> one MetaImage per series"},
        "clara/ai-lung": {"unavailable": "lung segmentation by NVIDIA's trained model ..."},
    }

An operator whose image is listed with a ``stage`` runs that stage in a warm worker, with the
arguments a container operator's command would get (``command``, ``inputs``, ``outputs`` and
their types, ``variables``, ``image``, ``tag``) plus ``ports`` (each port's Clara type), so
the pipeline runs unchanged, without a container engine. ``gpu: false`` says the stage needs
no GPU: the operator's ``requests.gpu`` (the image's need) is then not asked of this machine.
An image listed as ``unavailable`` cannot run here; the reason is given wherever the pipeline
is refused. ``DATAFLOW_BUNDLED_IMAGES=0`` turns the table off (every image then needs Docker
or Podman). Image names match without registry host and tag: ``nvcr.io/nvidia/clara/
dicom-reader:0.7.3-2011.5`` is ``clara/dicom-reader``.

The engine reads the table through entry points, never by importing ``operators``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
from collections.abc import Mapping
from typing import Any

from dataflow.pipeline.spec import ContainerSpec

__all__ = ["ENTRY_POINTS", "SWITCH_ENV", "Image", "bundled", "image_key", "lookup", "port_types"]

ENTRY_POINTS = "dataflow.images"
SWITCH_ENV = "DATAFLOW_BUNDLED_IMAGES"


@dataclasses.dataclass(frozen=True)
class Image:
    """What this machine knows of one image: the bundled ``stage`` that does its job (with
    what it ``does``), or why it is ``unavailable``."""

    name: str
    stage: str | None = None
    does: str = ""
    unavailable: str | None = None
    gpu: bool = True
    source: str = ""  # the entry point that listed it

    def describe(self) -> str:
        if self.stage is not None:
            what = f" ({self.does})" if self.does else ""
            return f"runs here as the bundled stage {self.stage}{what}"
        return f"cannot be had here: {self.unavailable}"


def image_key(image: str) -> str:
    """``nvcr.io/nvidia/clara/dicom-reader:0.7.3`` -> ``clara/dicom-reader``: no registry
    host (a first part with '.' or ':', or ``localhost``), no ``nvidia/`` namespace, no tag
    or digest; lower case."""
    name = image.strip().lower().split("@", 1)[0]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if ":" in parts[-1]:
        parts[-1] = parts[-1].split(":", 1)[0]
    if len(parts) > 1 and parts[0] == "nvidia":
        parts = parts[1:]
    return "/".join(parts)


def _entry(name: str, value: Any, source: str) -> Image:
    if not isinstance(value, Mapping) or not (("stage" in value) ^ ("unavailable" in value)):
        raise ValueError(
            f"entry point {source!r} ({ENTRY_POINTS}): image {name!r} needs either 'stage' "
            f"('module:Stage') or 'unavailable' (why); got {value!r}"
        )
    return Image(
        name=image_key(name),
        stage=value.get("stage"),
        does=str(value.get("does", "")),
        unavailable=value.get("unavailable"),
        gpu=bool(value.get("gpu", True)),
        source=source,
    )


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Image]:
    table: dict[str, Image] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        listed = ep.load()
        for name, value in dict(listed).items():
            image = _entry(str(name), value, f"{ep.name} = {ep.value}")
            table.setdefault(image.name, image)  # the first package to list an image wins
    return table


def lookup(container: ContainerSpec | None) -> Image | None:
    """What the image table says of ``container``'s image, or None (not listed, no image, or
    the table turned off with ``DATAFLOW_BUNDLED_IMAGES=0``)."""
    if container is None or not container.image:
        return None
    if os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "no", "false", "off"):
        return None
    return _table().get(image_key(container.image))


def bundled(container: ContainerSpec | None) -> Image | None:
    """The table's entry when a bundled stage runs ``container``'s image, else None."""
    image = lookup(container)
    return image if image is not None and image.stage is not None else None


def port_types(node: Any, in_names: Mapping[str, str], out_names: Mapping[Any, str]) -> dict:
    """Each executor port of a container node as ``[type, element_type, shape]`` (None: an
    untyped disk directory), for a bundled stage to declare the same ports."""

    def kind(port):
        if port is None:
            return None
        return [port.type, port.element_type, list(port.shape) if port.shape else None]

    return {
        "inputs": {in_names[k]: kind(p) for k, p in node.inputs.items()},
        "outputs": {out_names[k]: kind(p) for k, p in node.outputs.items()},
    }
