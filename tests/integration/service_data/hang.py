"""A test stage that does what its job folder tells it: a file ``hang`` makes it sleep until
the file is gone (a hung stage), ``fail`` makes it raise an error quoting a dataset's patient
elements (what a traceback may carry), ``crash`` kills its worker (as the OOM killer would);
otherwise it writes ``done.txt``. It logs an info event and prints a line (and, failing, a
patient element) for the job's own log. Each attempt leaves
``started-N`` in the job folder first, so a test can wait for the stage to be running."""

import os
import signal
import time
from pathlib import Path

from dataflow.stage import Port, Stage


class Hang(Stage):
    inputs = {"job": Port("stream", element_type="folder")}
    outputs = {"done": Port("stream", element_type="text")}

    def execute(self, ctx, job: Path) -> Path:
        job = Path(job)
        attempt = len(list(job.glob("started-*"))) + 1
        (job / f"started-{attempt}").touch()
        ctx.log.info("hang_attempt", attempt=attempt)
        print(f"attempt {attempt} on its folder", flush=True)
        while (job / "hang").exists():
            time.sleep(0.05)
        if (job / "crash").exists():
            os.kill(os.getpid(), signal.SIGKILL)
        if (job / "fail").exists():
            print("read PatientName:", "DOE^JANE", flush=True)  # a stage author's debug print
            raise ValueError(
                "cannot read (0010,0010) Patient's Name PN: 'DOE^JANE' in "
                f"{job.name}/1.dcm; PatientID=PAT-0042"
            )
        out = ctx.output_dir("done")
        (out / "done.txt").write_text(job.name)
        return out


class Broken(Hang):
    """A stage that cannot start: its ``prepare`` fails the same way every time."""

    def prepare(self, ctx) -> None:
        raise RuntimeError("model file /models/missing.onnx does not exist")
