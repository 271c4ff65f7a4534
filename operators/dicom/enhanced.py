"""The phantom as one Enhanced CT Image Storage file (multi-frame, functional groups).

Every frame's ImagePositionPatient is in its own PlanePositionSequence (per-frame functional
groups). PlaneOrientationSequence, PixelMeasuresSequence and PixelValueTransformationSequence
are shared by all frames, or repeated in every frame with ``per_frame=True`` — readers must
accept both. With ``shuffle=True`` the frames are stored in a random order (their
InStackPositionNumber still tells the spatial one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from operators.dicom.phantom import (
    _order,
    common_dataset,
    ds_values,
    hu_at,
    save,
    scan_geometry,
    stored_values,
)

__all__ = ["write_enhanced_ct"]


def _item(**elements) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def write_enhanced_ct(
    path: str | Path,
    *,
    slices: int = 24,
    size: int = 64,
    oblique: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    per_frame: bool = False,
    series_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
) -> Path:
    """Write the phantom (same geometry as :func:`write_ct_series`) as one multi-frame file.

    Returns the path. The SOP Instance UID and series UID are derived from ``seed`` and the
    options, the study and frame of reference UIDs are those of the phantom study for ``seed``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    geometry = scan_geometry(slices, size, oblique=oblique)
    entropy = ["dataflow phantom", str(seed), "enhanced", str(series_number), str(geometry)]
    series_uid = str(generate_uid(entropy_srcs=entropy))
    ds = common_dataset(
        seed=seed,
        series_uid=series_uid,
        series_number=series_number,
        description="Phantom CT (enhanced)",
    )
    del ds.AcquisitionDate, ds.AcquisitionTime  # not in the Enhanced CT IOD
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = str(generate_uid(entropy_srcs=[series_uid, "instance"]))
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "dataflow"
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.NumberOfFrames = slices
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.PixelRepresentation = 0
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.AcquisitionDateTime = "20240101120000"

    dimension_uid = str(generate_uid(entropy_srcs=[series_uid, "dimensions"]))
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )

    def geometry_groups() -> dict[str, Sequence]:
        return {
            "PixelMeasuresSequence": Sequence(
                [
                    _item(
                        PixelSpacing=ds_values(geometry.pixel_spacing),
                        SliceThickness=format_number_as_ds(geometry.slice_spacing),
                    )
                ]
            ),
            "PlaneOrientationSequence": Sequence(
                [
                    _item(
                        ImageOrientationPatient=ds_values(
                            geometry.row_cosine + geometry.column_cosine
                        )
                    )
                ]
            ),
            "PixelValueTransformationSequence": Sequence(
                [
                    _item(
                        RescaleIntercept=format_number_as_ds(rescale_intercept),
                        RescaleSlope=format_number_as_ds(rescale_slope),
                        RescaleType="HU",
                    )
                ]
            ),
        }

    shared = _item(
        CTImageFrameTypeSequence=Sequence(
            [
                _item(
                    FrameType=["DERIVED", "PRIMARY", "VOLUME", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ]
        ),
        FrameAnatomySequence=Sequence(
            [
                _item(
                    AnatomicRegionSequence=Sequence([_code("43799004", "SCT", "Chest")]),
                    FrameLaterality="U",
                )
            ]
        ),
        FrameVOILUTSequence=Sequence([_item(WindowCenter="40", WindowWidth="400")]),
        IrradiationEventIdentificationSequence=Sequence(
            [_item(IrradiationEventUID=str(generate_uid(entropy_srcs=[series_uid, "event"])))]
        ),
    )
    if not per_frame:
        for keyword, value in geometry_groups().items():
            setattr(shared, keyword, value)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    order = _order(slices, np.random.default_rng(seed)) if shuffle else np.arange(slices)
    frames, pixels = [], []
    for k in order:
        item = _item(
            FrameContentSequence=Sequence(
                [
                    _item(
                        StackID="1",
                        InStackPositionNumber=int(k) + 1,
                        DimensionIndexValues=[1, int(k) + 1],
                        FrameAcquisitionDateTime="20240101120000",
                        FrameReferenceDateTime="20240101120000",
                        FrameAcquisitionDuration=0.0,
                    )
                ]
            ),
            PlanePositionSequence=Sequence(
                [_item(ImagePositionPatient=ds_values(geometry.position(k)))]
            ),
        )
        if per_frame:
            for keyword, value in geometry_groups().items():
                setattr(item, keyword, value)
        frames.append(item)
        pixels.append(stored_values(hu_at(geometry.points(k)), rescale_slope, rescale_intercept, 0))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).astype("<u2").tobytes()
    save(ds, path, transfer_syntax)
    return path
