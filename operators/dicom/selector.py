"""Rule-based DICOM series selection (MONAI Deploy's / Clara's series selector).

- :func:`load_rules` (from :mod:`operators.dicom.selector_rules`): JSON/YAML text, a file or
  a mapping -> a validated :class:`Ruleset`.
- :func:`evaluate`: a study (folder, files, or ``(path, header)`` pairs) and rules -> a
  :class:`SelectionReport`: which series each selection matched and why the others did not.
- :func:`select_series`: the same, just ``{selection name: [SeriesInfo]}``.
- :class:`SelectSeries`: the stage. It copies (hard-links) the chosen series into its
  ``series`` output, which ``SeriesToVolume`` reads unchanged, and writes the report to
  ``selection/selection.json``. Rules are checked when the pipeline loads.

Headers only: no pixel data is read. Messages name series by UID, number, modality,
description and instance count; patient attributes never appear in them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dataflow.stage import ParameterError, Port, Stage, StageError, pipeline_folder
from operators.dicom.frames import element_int
from operators.dicom.selector_rules import RuleError, Ruleset, load_rules
from operators.dicom.series import _split, read_headers

__all__ = [
    "RuleError",
    "SelectSeries",
    "SelectionError",
    "SelectionReport",
    "SeriesInfo",
    "evaluate",
    "load_rules",
    "select_series",
]

Headers = list[tuple[Path, Dataset]]


class SelectionError(StageError, ValueError):
    """No series matched (the message lists each series with the first condition it failed)."""


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One series of the study: what messages and the report say about it, and its files."""

    uid: str
    number: int | None
    modality: str
    description: str
    instances: int
    files: tuple[Path, ...]

    def describe(self) -> str:
        number = f"#{self.number} " if self.number is not None else ""
        return (
            f"{self.uid} ({number}{self.modality} {self.description!r}, "
            f"{self.instances} instance(s))"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.uid, "series_number": self.number,
            "modality": self.modality, "description": self.description,
            "instances": self.instances,
        }  # fmt: skip


@dataclasses.dataclass
class SelectionReport:
    """``matched``: selection -> series (best first); ``rejected``: selection -> {UID: why}."""

    rules: Ruleset
    series: list[SeriesInfo]
    matched: dict[str, list[SeriesInfo]]
    rejected: dict[str, dict[str, str]]
    all_matched: bool = False
    sort_by_instance_count: bool = False

    def first_match(self) -> str | None:
        """The first selection (in the rules' order) that matched a series."""
        return next((name for name in self.rules.names if self.matched[name]), None)

    def explain(self, names: Sequence[str] | None = None) -> str:
        """Why the selections ``names`` (default: all) matched nothing, series by series."""
        parts = []
        for name in names or self.rules.names:
            why = "; ".join(
                f"{s.describe()}: {self.rejected[name].get(s.uid, 'matched')}" for s in self.series
            )
            parts.append(f"selection {name!r}: {why or 'no series'}")
        return " | ".join(parts)

    def to_json(self, chosen: str | None = None) -> dict[str, Any]:
        return {
            "rules": self.rules.source,
            "all_matched": self.all_matched,
            "sort_by_instance_count": self.sort_by_instance_count,
            "chosen_selection": chosen,
            "chosen_series": self.matched[chosen][0].uid if chosen else None,
            "series": [s.to_json() for s in self.series],
            "selections": [
                {
                    "name": name,
                    "matched": [s.uid for s in self.matched[name]],
                    "rejected": self.rejected[name],
                }
                for name in self.rules.names
            ],
        }


def _study(study: str | Path | Iterable[str | Path] | Headers) -> list[tuple[SeriesInfo, Dataset]]:
    items = list(study) if not isinstance(study, (str, os.PathLike)) else None
    if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
        headers: Headers = [(Path(p), ds) for p, ds in items]
    else:
        headers = read_headers(study if items is None else items)
    found = []
    for uid, group in _split(headers).items():
        group = sorted(group, key=lambda item: str(item[0]))
        first = group[0][1]
        info = SeriesInfo(
            uid=uid,
            number=element_int(first, "SeriesNumber", group[0][0].name),
            modality=str(first.get("Modality", "")),
            description=str(first.get("SeriesDescription", "")),
            instances=len(group),
            files=tuple(p for p, _ in group),
        )
        found.append((info, first))
    big = sys.maxsize
    return sorted(found, key=lambda f: (f[0].number if f[0].number is not None else big, f[0].uid))


def evaluate(
    study: str | Path | Iterable[str | Path] | Headers,
    rules: Ruleset | Mapping | Sequence | str | os.PathLike,
    *,
    all_matched: bool = False,
    sort_by_instance_count: bool = False,
) -> SelectionReport:
    """Match every series of ``study`` against every selection of ``rules``.

    Series are considered in SeriesNumber order (then UID), each by its first instance's header
    (in file-name order). Without ``all_matched`` a selection keeps only its first match, as in
    MONAI; with it, all, sorted by descending instance count when ``sort_by_instance_count``
    (MONAI's ``sort_by_sop_instance_count``; stable, so ties keep SeriesNumber order)."""
    ruleset = load_rules(rules)
    series = _study(study)
    matched: dict[str, list[SeriesInfo]] = {}
    rejected: dict[str, dict[str, str]] = {}
    for selection in ruleset.selections:
        hits, misses = [], {}
        for info, header in series:
            reason = selection.check(header)
            if reason is None:
                hits.append(info)
            else:
                misses[info.uid] = reason
        if not all_matched:
            for info in hits[1:]:
                misses[info.uid] = "matched, but not the first match (all_matched is off)"
            hits = hits[:1]
        elif sort_by_instance_count:
            hits.sort(key=lambda s: s.instances, reverse=True)
        matched[selection.name], rejected[selection.name] = hits, misses
    return SelectionReport(
        ruleset, [s for s, _ in series], matched, rejected, all_matched, sort_by_instance_count
    )


def select_series(
    study: str | Path | Iterable[str | Path] | Headers,
    rules: Ruleset | Mapping | Sequence | str | os.PathLike,
    *,
    all_matched: bool = False,
    sort_by_instance_count: bool = False,
) -> dict[str, list[SeriesInfo]]:
    """``{selection name: [matched series]}`` (see :func:`evaluate`)."""
    report = evaluate(
        study, rules, all_matched=all_matched, sort_by_instance_count=sort_by_instance_count
    )
    return report.matched


def _place(files: Sequence[Path], root: Path | None, out: Path) -> tuple[int, int]:
    """Hard-link (else copy) ``files`` under ``out``, keeping paths relative to ``root``."""
    linked = copied = 0
    for src in files:
        rel = src.relative_to(root) if root and src.is_relative_to(root) else Path(src.name)
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        try:
            os.link(src, dest)
            linked += 1
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dest)
            copied += 1
    return linked, copied


def _is_path(rules: Any) -> bool:
    """A one-line string not opening a JSON document names a rule file."""
    return (
        isinstance(rules, str)
        and bool(rules.strip())
        and "\n" not in rules
        and rules.lstrip()[:1] not in ("{", "[")
    )


class SelectSeries(Stage):
    """The job's DICOM folder -> the series chosen by rules (``series``, for SeriesToVolume)
    and a JSON report (``selection/selection.json``).

    ``rules``: the rules inline (a mapping or list), as JSON/YAML text, or a ``.json``/``.yaml``
    file; a relative path is resolved against the pipeline file's folder, else the current
    directory. ``selection``: which named selection feeds ``series`` (default: the first, in
    the rules' order, that matched). ``all_matched`` and ``sort_by_instance_count`` (alias
    ``sort_by_sop_instance_count``): as in MONAI; ``series`` gets the first series of the
    selection's list."""

    inputs = {"study": Port("stream", element_type="dicom", description="DICOM files")}
    outputs = {
        "series": Port("stream", element_type="dicom", description="the chosen series"),
        "selection": Port("stream", element_type="json", description="selection.json"),
    }

    def __init__(
        self,
        rules: dict | list | str,
        selection: str | None = None,
        all_matched: bool = False,
        sort_by_instance_count: bool = False,
        sort_by_sop_instance_count: bool | None = None,
    ):
        self.rules = load_rules(Path(rules) if _is_path(rules) else rules)
        if selection is not None and selection not in self.rules.names:
            raise ParameterError(
                f"SelectSeries: selection {selection!r} is not in the rules "
                f"{self.rules.source} (they name {', '.join(map(repr, self.rules.names))})"
            )
        self.selection = selection
        self.all_matched = all_matched
        self.sort = sort_by_instance_count or bool(sort_by_sop_instance_count)

    @classmethod
    def check_parameters(cls, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """The base checks, then the rules themselves: a malformed rule fails the load."""
        out = super().check_parameters(values, where)
        where = where or f"stage {cls.__name__}"
        rules = out.get("rules")
        if _is_path(rules) and not Path(rules).is_absolute():
            base = pipeline_folder()
            candidates = [*([base / rules] if base is not None else []), Path.cwd() / rules]
            found = next((p for p in candidates if p.is_file()), candidates[0])
            out["rules"] = str(found.resolve())
        try:
            cls(**out)
        except (RuleError, ParameterError) as exc:
            raise ParameterError(f"{where}: parameter 'rules': {exc}") from None
        return out

    def execute(self, ctx, study: Path) -> dict[str, Path]:
        report = evaluate(
            study, self.rules, all_matched=self.all_matched, sort_by_instance_count=self.sort
        )
        chosen = self.selection if self.selection is not None else report.first_match()
        if chosen is not None and not report.matched[chosen]:
            chosen = None
        selection_dir = ctx.output_dir("selection")
        (selection_dir / "selection.json").write_text(
            json.dumps(report.to_json(chosen), indent=2) + "\n"
        )
        if chosen is None:
            names = [self.selection] if self.selection is not None else None
            what = f"selection {self.selection!r}" if names else "any selection"
            raise SelectionError(
                f"no series of the study ({len(report.series)}) matches {what} of the rules "
                f"{self.rules.source}: {report.explain(names)}"
            )
        series = report.matched[chosen][0]
        linked, copied = _place(series.files, Path(study), ctx.output_dir("series"))
        ctx.log.info(
            "series_selected",
            selection=chosen,
            series_instance_uid=series.uid,
            instances=series.instances,
            candidates=len(report.matched[chosen]),
            linked=linked,
            copied=copied,
        )
        return {"series": ctx.output_dir("series"), "selection": selection_dir}
