"""Series-selection rules in MONAI Deploy's format: loading, validation and matching.

A rule set is ``{"selections": [{"name": ..., "conditions": {KEYWORD: VALUE, ...}}, ...]}``
(JSON or YAML; a bare list of selections is accepted too). How a condition matches depends on
its value and on the attribute's value in the series (its first instance), as in MONAI's
``DICOMSeriesSelectorOperator``; docs/operators.md ("Series selector") has the table.
:func:`load_rules` checks everything that can be checked without a study (keywords, regular
expressions, relations, ranges, orientations) and raises :class:`RuleError` naming the rule
file, the line (where it can be found), the selection and the condition.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dataflow.errors import DataflowError

__all__ = [
    "ORIENTATIONS",
    "RELATIONS",
    "Condition",
    "RuleError",
    "Ruleset",
    "Selection",
    "attribute",
    "load_rules",
    "orientation_of",
    "private",
]

#: Relational operators of ``[value, op]`` (MONAI) or ``[op, value]`` (our extension).
RELATIONS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "!=": lambda a, b: a != b, "==": lambda a, b: a == b,
}  # fmt: skip
#: Orientation names, indexed by the axis the slice normal is closest to (x, y, z in LPS).
ORIENTATIONS = ("Sagittal", "Coronal", "Axial")
_FORMS = ("not", "in", "not_in")  # our mapping forms: {"not": COND}, {"in": [..]}, {"not_in": [..]}
_SELECTION_KEYS = {"name", "conditions", "description"}
_TOP_KEYS = {"selections", "description"}
_NOT_PRIVATE = {"PatientPosition", "PatientOrientation"}


class RuleError(DataflowError, ValueError):
    """A rule set is malformed (the message names the file, line, selection and condition)."""


def private(keyword: str) -> bool:
    """Whether values of ``keyword`` identify the patient and must stay out of messages."""
    return keyword.startswith(("Patient", "OtherPatient", "IssuerOfPatient")) and (
        keyword not in _NOT_PRIVATE
    )


def _show(keyword: str, value: Any) -> str:
    if private(keyword):
        return "(value withheld)"
    return str(value) if isinstance(value, (int, float)) else repr(value)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One ``KEYWORD: VALUE`` of a selection; :meth:`check` says why an attribute fails it."""

    keyword: str
    value: Any
    kind: str  # ignored | orientation | not | in | not_in | relation | range | list | scalar
    where: str = ""
    operand: Any = None  # relation: (op, number); not: the inner Condition; in/not_in: values

    def check(self, value: Any) -> str | None:
        """None when ``value`` (from :func:`attribute`) satisfies the condition, else why not."""
        key, shown = self.keyword, _show(self.keyword, value)
        if self.kind == "ignored":
            return None
        if self.kind == "not":
            return None if self.operand.check(value) else f"{key} {shown} matches {self._rule()}"
        if value is None:
            return f"{key} is absent or empty"
        if self.kind == "orientation":
            found = orientation_of(value)
            if found is None:
                return f"{key} {shown} is not two direction cosines"
            return None if found == self.operand else f"{key} is {found}, not {self.operand}"
        if self.kind in ("in", "not_in"):
            hit = any(_same(v, r) for v in _values(value) for r in self.operand)
            return None if hit == (self.kind == "in") else f"{key} {shown} fails {self._rule()}"
        if isinstance(value, list) and self.kind != "relation":
            return self._check_list(value, shown)
        if self.kind == "relation":
            op, bound = self.operand
            numbers = [_number(v) for v in _values(value)]
            if any(n is None for n in numbers):
                return f"{key} {shown} is not a number"
            ok = all(RELATIONS[op](n, bound) for n in numbers)
            return None if ok else f"{key} {shown} is not {op} {bound:g}"
        if self.kind == "range":
            number, (low, high) = _number(value), self.value
            if number is None:
                return f"{key} {shown} is not a number"
            return None if low <= number <= high else f"{key} {shown} is not in [{low}, {high}]"
        if self.kind == "list":  # a list against one value: "all these present" in [value]
            return self._check_list([value], shown)
        return self._check_scalar(value, shown)

    def _check_scalar(self, value: Any, shown: str) -> str | None:
        rule, key = self.value, self.keyword
        if isinstance(value, (int, float)):
            if isinstance(rule, str):  # MONAI: a regular expression over the number's text
                ok = re.fullmatch(rule, str(value)) is not None
            else:
                ok = value == rule
        elif isinstance(rule, str):  # MONAI: case-insensitive equality, else regex search
            ok = value.casefold() == rule.casefold() or bool(re.search(rule, value, re.I))
        else:
            ok = _same(value, rule)
        return None if ok else f"{key} {shown} does not match {self._rule()}"

    def _check_list(self, values: list, shown: str) -> str | None:
        rules = self.value if isinstance(self.value, list) else [self.value]
        for rule in rules:
            text = str(rule)
            excluded = text.startswith("!")
            term = text[1:] if excluded else rule
            present = any(_same(v, term) for v in values)
            if present == excluded:
                verb = "has" if excluded else "lacks"
                return f"{self.keyword} {shown} {verb} {_show(self.keyword, str(term))}"
        return None

    def _rule(self) -> str:
        return _show(self.keyword, self.value)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A named selection: every condition must hold (conditions in the file's order)."""

    name: str
    conditions: tuple[Condition, ...]

    def check(self, header: Dataset) -> str | None:
        """None when the series whose first instance is ``header`` matches, else the first
        condition it fails, explained."""
        for condition in self.conditions:
            reason = condition.check(attribute(header, condition.keyword))
            if reason is not None:
                return reason
        return None


@dataclasses.dataclass(frozen=True)
class Ruleset:
    """Validated rules; ``source`` is the file they came from (or ``<inline>``)."""

    selections: tuple[Selection, ...]
    source: str = "<inline>"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.selections]


def attribute(header: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` as plain Python: None (absent or empty), an int, a float, a str,
    or a list of those for a multi-valued attribute."""
    value = header.get(keyword)
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
        return None
    if isinstance(value, (list, MultiValue)):
        return [_plain(v) for v in value]
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value  # pydicom's IS and DS keep their text: str(DS("3")) == "3", as MONAI sees
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\0 ")
    return str(value)


def orientation_of(value: Any) -> str | None:
    """``Axial``, ``Coronal`` or ``Sagittal`` from ImageOrientationPatient's six cosines: the
    patient axis the slice normal (row x column) is closest to, as MONAI computes it."""
    numbers = [_number(v) for v in _values(value)]
    if len(numbers) != 6 or any(n is None for n in numbers):
        return None
    normal = np.cross(np.array(numbers[:3], float), np.array(numbers[3:], float))
    if not np.linalg.norm(normal) > 0:
        return None
    return ORIENTATIONS[int(np.argmax(np.abs(normal)))]


def _values(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _same(value: Any, rule: Any) -> bool:
    """Case-insensitive text equality, or numeric equality when both read as numbers."""
    a, b = _number(value), _number(rule)
    if a is not None and b is not None:
        return a == b
    return str(value).strip().casefold() == str(rule).strip().casefold()


# --------------------------------------------------------------------------- loading


def load_rules(source: Ruleset | Mapping | Sequence | str | os.PathLike) -> Ruleset:
    """Rules from a mapping or list, JSON or YAML text, or a ``.json``/``.yaml`` file."""
    if isinstance(source, Ruleset):
        return source
    text, origin = None, "<inline>"
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and not source.lstrip().startswith(("{", "["))
        and ("\n" not in source)
    ):
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleError(f"cannot read the rule file {origin}: {exc.strerror or exc}") from None
    elif isinstance(source, str):
        text = source
    if text is not None:
        data, lines = _parse(text, origin)
    else:
        data, lines = source, {}
    return _Checker(origin, lines).ruleset(data)


def _parse(text: str, origin: str) -> tuple[Any, dict[tuple, int]]:
    try:
        if origin.lower().endswith(".json") or text.lstrip().startswith(("{", "[")):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise RuleError(f"{origin}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RuleError(f"{origin}{line}: not valid YAML: {exc}") from None
    try:
        lines = _lines(yaml.compose(text), ())
    except yaml.YAMLError:  # JSON that PyYAML reads differently: no line numbers
        lines = {}
    return data, lines


def _lines(node: Any, path: tuple) -> dict[tuple, int]:
    """``{path: line}`` for every node (a mapping entry's line is its key's)."""
    found = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            found.update(_lines(child, (*path, key.value)))
            found[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            found.update(_lines(child, (*path, i)))
    return found


class _Checker:
    def __init__(self, origin: str, lines: dict[tuple, int]) -> None:
        self.origin, self.lines = origin, lines

    def fail(self, path: tuple, message: str) -> RuleError:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1)
                     if path[:n] in self.lines), None)  # fmt: skip
        return RuleError(f"{self.origin}{f':{line}' if line else ''}: {message}")

    def ruleset(self, data: Any) -> Ruleset:
        prefix: tuple = ("selections",)
        if isinstance(data, Mapping):
            unknown = sorted(set(map(str, data)) - _TOP_KEYS)
            if unknown:
                raise self.fail((unknown[0],), f"unknown key {unknown[0]!r} (known: selections)")
            data = data.get("selections")
        elif isinstance(data, list):
            prefix = ()
        if not isinstance(data, list) or not data:
            raise self.fail(prefix, "the rules need 'selections': a non-empty list")
        selections, seen = [], {}
        for i, entry in enumerate(data):
            selection = self.selection(entry, (*prefix, i), i)
            if selection.name in seen:
                raise self.fail((*prefix, i), f"selection name {selection.name!r} is used twice")
            seen[selection.name] = i
            selections.append(selection)
        return Ruleset(tuple(selections), self.origin)

    def selection(self, entry: Any, path: tuple, index: int) -> Selection:
        if not isinstance(entry, Mapping):
            raise self.fail(path, f"selection {index + 1} must be a mapping (name, conditions)")
        name = str(entry.get("name") or "").strip() or f"selection {index + 1}"
        unknown = sorted(set(map(str, entry)) - _SELECTION_KEYS)
        if unknown:
            raise self.fail(
                (*path, unknown[0]),
                f"selection {name!r}: unknown key "
                f"{unknown[0]!r} (known: {', '.join(sorted(_SELECTION_KEYS))})",
            )
        conditions = entry.get("conditions")
        if not isinstance(conditions, Mapping) or not conditions:
            raise self.fail(
                (*path, "conditions"),
                f"selection {name!r} needs 'conditions': a "
                "non-empty mapping of DICOM keywords to values",
            )
        parsed = tuple(self.condition(name, str(k), v, (*path, "conditions", k))
                       for k, v in conditions.items())  # fmt: skip
        return Selection(name, parsed)

    def condition(self, name: str, key: str, value: Any, path: tuple) -> Condition:
        where = f"selection {name!r} condition {key!r}"

        def bad(problem: str) -> RuleError:
            return self.fail(path, f"{where}: {problem} (got {_show(key, value)})")

        if key not in keyword_dict:
            close = difflib.get_close_matches(key, keyword_dict, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.fail(path, f"{where}: {key!r} is not a DICOM keyword{hint}")
        if dictionary_VR(keyword_dict[key]) == "SQ":
            raise bad("a sequence attribute cannot be matched")
        return self.value(key, value, where, bad)

    def value(self, key: str, value: Any, where: str, bad) -> Condition:
        if value is None or value == "" or value == [] or value == {}:
            return Condition(key, value, "ignored", where)  # MONAI skips empty conditions
        if isinstance(value, bool):
            raise bad("true/false is not a condition")
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in _FORMS:
                raise bad(f"a mapping condition is one of {{{', '.join(_FORMS)}: ...}}")
            form, inner = next(iter(value.items()))
            if form == "not":
                return Condition(key, value, "not", where, self.value(key, inner, where, bad))
            if not isinstance(inner, list) or not inner:
                raise bad(f"{form!r} takes a non-empty list of values")
            return Condition(key, value, form, where, tuple(inner))
        if isinstance(value, str):
            if key == "ImageOrientationPatient" and not value.lstrip().startswith("!"):
                label = value.strip().capitalize()
                if label not in ORIENTATIONS:
                    raise bad(f"an orientation is one of {', '.join(ORIENTATIONS)}")
                return Condition(key, value, "orientation", where, label)
            try:
                re.compile(value)
            except re.error as exc:
                raise bad(f"not a valid regular expression: {exc}") from None
            return Condition(key, value, "scalar", where)
        if isinstance(value, (int, float)):
            return Condition(key, value, "scalar", where)
        if not isinstance(value, list):
            raise bad(f"a {type(value).__name__} is not a condition")
        return self.list_value(key, value, where, bad)

    def list_value(self, key: str, value: list, where: str, bad) -> Condition:
        if any(isinstance(v, (list, Mapping, bool)) for v in value):
            raise bad("a list condition holds strings or numbers")
        ops = [v for v in value if isinstance(v, str) and v.strip() in RELATIONS]
        if len(value) == 2 and ops:
            op = ops[0].strip()
            other = value[1] if value[0] is ops[0] else value[0]
            bound = _number(other)
            if bound is None or (isinstance(other, str) and other.strip() in RELATIONS):
                raise bad(f"a relation is [number, {op!r}] or [{op!r}, number]")
            return Condition(key, value, "relation", where, (op, bound))
        near = [v for v in value if isinstance(v, str) and re.fullmatch(r"[<>=!]+", v.strip())]
        if near:
            raise bad(f"unknown relation {near[0]!r}; use one of {', '.join(RELATIONS)}")
        if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            if value[0] > value[1]:
                raise bad("a range [min, max] needs min <= max")
            return Condition(key, value, "range", where)
        return Condition(key, value, "list", where)
