"""Array index <-> patient coordinates, from the geometry metadata of docs/tensors.md.

The position of element ``[i, j, k]`` of a ``[D, H, W]`` volume is
``origin + direction @ (spacing * [i, j, k])`` in DICOM patient coordinates (LPS, mm). The
writers (RTSTRUCT contours, NIfTI and MetaImage headers) and the tests use these helpers, so the
convention lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydicom.valuerep import format_number_as_ds

from dataflow.errors import DataflowError

__all__ = ["GeometryError", "decimal_strings", "index_affine", "patient_points", "voxel_points"]


class GeometryError(DataflowError, ValueError):
    """A tensor's metadata lacks a usable geometry (spacing, origin, direction)."""


def index_affine(metadata: Mapping[str, Any], ndim: int = 3) -> np.ndarray:
    """4x4 matrix: homogeneous array index ``(i, j, k, 1)`` -> LPS mm."""
    try:
        spacing = np.asarray(metadata["spacing"], dtype=np.float64)
        origin = np.asarray(metadata["origin"], dtype=np.float64)
        direction = np.asarray(metadata["direction"], dtype=np.float64).reshape(3, 3)
    except KeyError as missing:
        raise GeometryError(f"the tensor's metadata has no {missing.args[0]!r}") from None
    except ValueError as bad:
        raise GeometryError(f"the tensor's direction is not 9 numbers: {bad}") from None
    if ndim != 3 or spacing.shape != (3,) or origin.shape != (3,):
        raise GeometryError(
            f"need a 3D geometry (3 spacings, an [x, y, z] origin); got spacing "
            f"{spacing.tolist()} and origin {origin.tolist()} for {ndim} axes"
        )
    out = np.eye(4)
    out[:3, :3] = direction * spacing  # column i scaled by spacing[i]
    out[:3, 3] = origin
    return out


def patient_points(metadata: Mapping[str, Any], index: np.ndarray) -> np.ndarray:
    """LPS positions (mm) of (fractional) array indices ``index`` of shape ``(..., 3)``."""
    a = index_affine(metadata)
    return np.asarray(index, dtype=np.float64) @ a[:3, :3].T + a[:3, 3]


def voxel_points(metadata: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """LPS positions of every voxel centre of a volume of ``shape``: ``(*shape, 3)``."""
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    return patient_points(metadata, index)


def decimal_strings(values: np.ndarray) -> list[str]:
    """Coordinates as DICOM decimal strings (VR DS, at most 16 characters, no "-0")."""
    return [format_number_as_ds(float(v) + 0.0) for v in np.ravel(values)]
