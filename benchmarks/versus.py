"""One benchmark, side by side: a commit (HEAD by default) against a baseline commit, in one run.

```bash
.venv/bin/python benchmarks/versus.py engine --base db91644 --rounds 2 --json OUT.json -- --quick
.venv/bin/python benchmarks/versus.py store --base db91644 -- --quick --systems ours
```

Both commits are checked out (``git worktree``, detached, in a temporary folder: edits in
the working tree are not measured) and each round runs the baseline's own copy of
``benchmarks/NAME.py`` and then ours, with the arguments after ``--``, each with its own tree
first on ``PYTHONPATH`` (so worker processes
and the store server import the same tree as the script). Rounds alternate which goes first,
so a machine that grows busier during the run weighs on both alike.

It prints, for each (case, system), the median of each side's values over the rounds and
their ratio, and says which is better by the unit (times: lower; rates: higher); with
``--json PATH`` it writes those rows, every round's records and the run's provenance. It
asserts nothing: reading the ratios against their spread is the reader's job (the rows keep
every round's value).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import ROOT, git, machine, machine_busy, run_footer, run_header, write_results  # noqa: E402

LOWER_IS_BETTER = {"ms", "us", "s"}


def run_once(tree: Path, name: str, args: list[str], out: Path) -> list[dict]:
    """Runs ``tree``'s ``benchmarks/NAME.py`` with ``args``; returns its records."""
    cmd = [sys.executable, str(tree / "benchmarks" / f"{name}.py"), *args, "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"[versus] {tree.name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=sys.stderr)
    return json.loads(out.read_text())


def compare(base_runs: list[list[dict]], ours_runs: list[list[dict]]) -> list[dict]:
    """One row per (case, system) present on both sides."""

    def by_key(runs: list[list[dict]]) -> dict[tuple, list[dict]]:
        found: dict[tuple, list[dict]] = {}
        for records in runs:
            for r in records:
                if isinstance(r.get("value"), (int, float)):
                    found.setdefault((r["case"], r.get("system", "")), []).append(r)
        return found

    base, ours = by_key(base_runs), by_key(ours_runs)
    rows = []
    for key in [k for k in ours if k in base]:
        b = [r["value"] for r in base[key]]
        o = [r["value"] for r in ours[key]]
        unit = ours[key][0].get("unit", "")
        mb, mo = statistics.median(b), statistics.median(o)
        ratio = mo / mb if mb else None
        if ratio is None or unit == "ratio" or unit == "x":
            better = None
        else:
            better = ratio <= 1 if unit in LOWER_IS_BETTER else ratio >= 1
        rows.append({"case": key[0], "system": key[1], "unit": unit, "base": b, "ours": o,
                     "base_median": mb, "ours_median": mo,
                     "ratio": None if ratio is None else round(ratio, 3),
                     "ours_better_or_equal": better})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours_args, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if (
        "--" in argv) else (argv, [])  # fmt: skip
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="a benchmark in benchmarks/: engine, store, dicom, ...")
    parser.add_argument("--base", required=True, help="the baseline commit")
    parser.add_argument("--ours", default="HEAD", help="the commit measured (default HEAD)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (base, ours)")
    parser.add_argument("--json", help="write the rows, records and provenance here")
    args = parser.parse_args(ours_args)
    if not (HERE / f"{args.name}.py").is_file():
        parser.error(f"no benchmark benchmarks/{args.name}.py")
    started, header = time.perf_counter(), run_header()
    busy_at_start = machine_busy()
    base_commit = git("rev-parse", args.base)
    ours_commit = git("rev-parse", args.ours)
    base_runs: list[list[dict]] = []
    ours_runs: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="versus-") as tmp:
        trees = {"base": Path(tmp) / f"base-{base_commit[:8]}",
                 "ours": Path(tmp) / f"ours-{ours_commit[:8]}"}  # fmt: skip
        for side, commit in (("base", base_commit), ("ours", ours_commit)):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(trees[side]), commit], check=True)  # fmt: skip
        try:
            for i in range(args.rounds):
                order = list(trees.items())
                for side, where in order if i % 2 == 0 else order[::-1]:
                    records = run_once(where, args.name, bench_args, Path(tmp) / f"{side}{i}.json")
                    (base_runs if side == "base" else ours_runs).append(records)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)  # fmt: skip
    rows = compare(base_runs, ours_runs)
    print(f"\n{args.name}: ours ({ours_commit[:8]}) against "
          f"{base_commit[:8]}, median of {args.rounds} rounds each")  # fmt: skip
    print(f"{'case':42} {'system':12} {'base':>10} {'ours':>10} {'ratio':>6}  unit")
    for r in rows:
        mark = {True: "", False: "  <- worse", None: ""}[r["ours_better_or_equal"]]
        print(f"{r['case'][:42]:42} {r['system'][:12]:12} {r['base_median']:>10.4g} "
              f"{r['ours_median']:>10.4g} {r['ratio'] or 0:>6.3f}  {r['unit']}{mark}")  # fmt: skip
    if args.json:
        meta = {**header, "machine": machine(), "benchmark": args.name, "base": base_commit,
                "ours": ours_commit,
                "rounds": args.rounds, "arguments": bench_args,
                "runs": {"base": base_runs, "ours": ours_runs},
                **run_footer(started, busy_at_start)}  # fmt: skip
        for path in write_results(args.json, rows, meta):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
