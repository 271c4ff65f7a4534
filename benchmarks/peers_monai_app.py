"""The peer of pipelines/ct-segmentation.yaml in MONAI Deploy App SDK 4.0.0, for
benchmarks/peers.py. Runs in MONAI Deploy's own virtual environment (benchmarks/.peers/monai-venv,
which benchmarks/peers.py builds), never in the project's.

Stock operators of the SDK (DICOM loader, series selector, series to volume, SEG writer) around
one operator of ours, ``Thresholds``: the same NumPy / SciPy steps and parameters as the
pipeline's stages (Gaussian sigma 1 mm with edge 'nearest' and truncate 3; tissue >= -500 HU;
the largest 26-connected component; holes filled with the 6-connected background; lung <= -400
HU inside the body; bone >= 350 HU in 26-connected components of at least 50 voxels, inside the
body), giving the label volume 1 body without lung and bone, 2 lung, 3 bone.

    python peers_monai_app.py OUTPUT STUDY [STUDY ...]

runs the app once per study, one after the other in this process (a study's SEG goes to
OUTPUT/<study folder name>/), and prints one JSON line per study: its name and the seconds from
the start of this process, and then one line with the imports' seconds.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application, Image, Operator, OperatorSpec  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_seg_writer_operator import (  # noqa: E402
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import (  # noqa: E402
    DICOMSeriesSelectorOperator,
)
from monai.deploy.operators.dicom_series_to_volume_operator import (  # noqa: E402
    DICOMSeriesToVolumeOperator,
)
from pydicom.sr.codedict import codes  # noqa: E402
from scipy import ndimage  # noqa: E402

IMPORTED = time.perf_counter()

SIGMA_MM, BODY_HU, LUNG_HU, BONE_HU, BONE_MIN_VOXELS = 1.0, -500.0, -400.0, 350.0, 50
CT_RULES = '{"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]}'
FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def segment_labels(volume: np.ndarray, spacing: tuple) -> np.ndarray:
    """uint8 labels of a [D, H, W] HU volume with ``spacing`` in mm (as the pipeline's stages)."""
    smooth = ndimage.gaussian_filter(
        volume.astype(np.float32),
        [SIGMA_MM / s for s in spacing],
        mode="nearest",
        truncate=3.0,
    )
    tissue = smooth >= BODY_HU
    labels, n = ndimage.label(tissue, FULL)
    body = np.zeros(volume.shape, bool)
    if n:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body = labels == int(np.argmax(sizes))
    body = ndimage.binary_fill_holes(body, FACES)
    bones, n = ndimage.label(smooth >= BONE_HU, FULL)
    sizes = np.bincount(bones.ravel(), minlength=n + 1)
    keep = sizes >= BONE_MIN_VOXELS
    keep[0] = False
    out = body.astype(np.uint8)
    out[body & (smooth <= LUNG_HU)] = 2
    out[(out == 1) & keep[bones]] = 3
    return out


class Thresholds(Operator):
    """Image (HU, [D, H, W]) -> Image of labels 1 body, 2 lung, 3 bone."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("seg_image")

    def compute(self, op_input, op_output, context) -> None:
        image = op_input.receive("image")
        meta = image.metadata()
        spacing = (
            float(meta["depth_pixel_spacing"]),
            float(meta["row_pixel_spacing"]),
            float(meta["col_pixel_spacing"]),
        )
        labels = segment_labels(image.asnumpy(), spacing)
        op_output.emit(Image(labels, meta), "seg_image")


def _segments() -> list:
    algorithm = {"algorithm_name": "thresholds", "algorithm_version": "1"}
    return [
        SegmentDescription(
            segment_label="Body without lung and bone",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.SoftTissue,
            **algorithm,
        ),
        SegmentDescription(
            segment_label="Lung",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Lung,
            **algorithm,
        ),
        SegmentDescription(
            segment_label="Bone",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Bone,
            **algorithm,
        ),
    ]


class CTSegmentationApp(Application):
    """DICOM study folder -> CT series -> volume -> thresholds -> DICOM SEG."""

    def __init__(self, study, output, *args, **kwargs) -> None:
        self.study, self.output = study, output
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=self.study, name="loader"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=CT_RULES, name="selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="to_volume")
        thresholds = Thresholds(self, name="thresholds")
        writer = DICOMSegmentationWriterOperator(
            self, segment_descriptions=_segments(), output_folder=self.output, name="seg_writer"
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(
            selector, to_volume, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(to_volume, thresholds, {("image", "image")})
        self.add_flow(
            selector, writer, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(thresholds, writer, {("seg_image", "seg_image")})


def main(argv: list[str]) -> None:
    from pathlib import Path

    output, studies = Path(argv[0]), [Path(s) for s in argv[1:]]
    for study in studies:
        app = CTSegmentationApp(study, output / study.name)
        app.run()
        done = time.perf_counter() - STARTED
        print(json.dumps({"study": study.name, "done_s": round(done, 4)}), flush=True)
    print(json.dumps({"imports_s": round(IMPORTED - STARTED, 4)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
