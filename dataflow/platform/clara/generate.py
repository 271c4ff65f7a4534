"""Regenerate the Python code of Clara's gRPC interface from ``protos/`` into ``gen/``.

    python -m venv /tmp/gen && /tmp/gen/bin/pip install "grpcio-tools<1.80" "protobuf<7"
    /tmp/gen/bin/python dataflow/platform/clara/generate.py

The generated modules are committed, so that installing dataflow needs no code generation.
They are generated with a grpcio-tools whose protoc writes protobuf 6 code (grpcio-tools 1.85
needs protobuf 7, which tritonclient's gRPC transport refuses), and their imports are made to
point inside this package: ``nvidia.clara.platform`` stays free for Clara's own client. The
descriptors keep Clara's file and message names (``nvidia/clara/platform/jobs.proto``,
``nvidia.clara.platform.JobsCreateRequest``), which is what the wire and Clara's clients see.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE / "protos"
GEN = HERE / "gen"
PACKAGE = "dataflow.platform.clara.gen"


def main() -> None:
    from grpc_tools import protoc

    shutil.rmtree(GEN, ignore_errors=True)
    GEN.mkdir()
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    code = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={GEN}",
                        f"--grpc_python_out={GEN}", *files])  # fmt: skip
    if code != 0:
        sys.exit(f"protoc failed ({code})")
    for folder in [GEN, *(p for p in GEN.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    for module in GEN.rglob("*.py"):
        text = module.read_text()
        ours = rf"from {PACKAGE}.nvidia.clara.platform\1 import"
        fixed = re.sub(r"^from nvidia\.clara\.platform(\S*) import", ours, text, flags=re.M)
        if fixed != text:
            module.write_text(fixed)
    print(f"generated {len(files)} files into {GEN}")


if __name__ == "__main__":
    main()
