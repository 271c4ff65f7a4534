"""Loading pipeline YAML: schema errors with FILE:LINE:COL, placeholders, imports, Clara extras."""

import textwrap
from pathlib import Path

import pytest

from dataflow.errors import DataflowError
from dataflow.pipeline import Location, PipelineError, load_pipeline


def write(directory: Path, text: str, name: str = "p.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_error(path: Path, args=None) -> str:
    with pytest.raises(PipelineError) as info:
        load_pipeline(path, args)
    return str(info.value)


CONTAINER_OP = """
    api-version: 0.4.0
    name: demo
    operators:
    - name: reader
      container:
        image: clara/dicom-reader
      input:
      - path: /input
      output:
      - path: /output
    """


def test_a_clara_040_pipeline_loads_with_locations(tmp_path):
    path = write(tmp_path, CONTAINER_OP)
    spec = load_pipeline(path)
    assert spec.name == "demo" and spec.api_version == "0.4.0" and spec.path == str(path)
    (op,) = spec.operators
    assert op.kind == "container" and op.container.image == "clara/dicom-reader"
    assert op.container.tag is None and op.container.reference == "clara/dicom-reader:latest"
    assert op.at("name") == Location(str(path), 4, 9)
    assert op.inputs[0].at("path") == Location(str(path), 8, 11)
    # 0.4.0 disk I/O is untyped: no type, no port; the input has no `from`: the job's input.
    assert op.inputs[0].type is None and op.inputs[0].declared_port() is None
    assert op.inputs[0].source is None
    assert spec.operator("READER") is op


def test_typed_io_normalises_clara_aliases_and_dynamic_zero(tmp_path):
    path = write(
        tmp_path,
        """
        api-version: 0.5.0
        name: typed
        operators:
        - name: a
          container: {image: x, tag: "1.0"}
          output:
          - {name: vol, type: array, element-type: f32, shape: [1, 0, -1]}
          - {name: count, type: I16}
        """,
    )
    op = load_pipeline(path).operators[0]
    vol, count = op.outputs
    assert (vol.type, vol.element_type, vol.shape) == ("array", "float32", (1, -1, -1))
    assert vol.declared_port().describe() == "array<float32>[1, -1, -1]"
    assert count.type == "int16"
    assert op.container.reference == "x:1.0"


def test_errors_name_file_line_column_operator_and_field(tmp_path):
    path = write(
        tmp_path,
        """
        api-version: 0.5.0
        name: bad
        operators:
        - name: a
          container:
            image: x
            command: python run.py
        """,
    )
    message = load_error(path)
    assert message.startswith(f"{path}:7:14: error: operator 'a' field 'container.command': ")
    assert "must be a list of strings" in message


def test_pipeline_error_is_a_dataflow_error_and_lists_every_error(tmp_path):
    path = write(
        tmp_path,
        """
        api-version: 0.5.0
        name: bad
        operators:
        - name: a
          container: {image: x}
          replicas: 0
          timeout: -3
        """,
    )
    with pytest.raises(DataflowError) as info:
        load_pipeline(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}:6:13: error: operator 'a' field 'replicas': must be a whole number of "
        "workers, 1 or more; got the number 0",
        f"{path}:7:12: error: operator 'a' field 'timeout': must be a number of seconds "
        "greater than 0; got the number -3",
    ]
    assert [d.field for d in info.value.errors] == ["replicas", "timeout"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("replicas", "true", "'replicas': must be a whole number of workers, 1 or more; got the "
         "boolean true"),
        ("replicas", "1.5", "'replicas': must be a whole number"),
        ("timeout", "soon", "'timeout': must be a number of seconds greater than 0; got the "
         "string 'soon'"),
        ("requests", "{gpu: two}", "'requests.gpu': must be a whole number of GPUs (0 or more); "
         "got the string 'two'"),
        ("requests", "{memory: 0}", "'requests.memory': must be a number of megabytes greater "
         "than 0"),
        ("requests", "4", "'requests': must be a mapping (cpu, gpu, memory)"),
        ("requests", "{resources: [a]}", "'requests.resources': must be a mapping of custom "
         "resource name: amount; got a list"),
        ("requests", "{resources: {GPU: 1}}", "'requests.resources.GPU': 'GPU' is Ray's own "
         "kind: ask for it with requests.gpu"),
        ("requests", "{resources: {a b: 1}}", "'requests.resources.a b': 'a b' is not a "
         "resource name"),
        ("requests", "{resources: {room: 0}}", "'requests.resources.room': must be an amount "
         "greater than 0"),
        ("requests", "{resources: {room: 2.5}}", "'requests.resources.room': must be a fraction "
         "of 1 or a whole number (Ray's rule); got 2.5"),
        ("variables", "[A, B]", "'variables': must be a mapping of environment variables"),
        ("input", "{path: /in}", "'input': must be a list of input entries; got a mapping"),
        ("description", "[x]", "'description': must be a string; got a list"),
    ],
)  # fmt: skip
def test_fields_of_the_wrong_type(tmp_path, field, value, message):
    path = write(
        tmp_path,
        f"""
        name: p
        operators:
        - name: op1
          container: {{image: x}}
          {field}: {value}
        """,
    )
    text = load_error(path)
    assert f"{path}:5:" in text and f"operator 'op1' field {message}" in text


def test_custom_resources_are_read_per_operator(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: op1
          container: {image: x}
          requests: {cpu: 2, resources: {gpu-room: 1, "node:10.0.0.5": 0.01}}
        """,
    )
    [op] = load_pipeline(path).operators
    assert op.requests.cpu == 2.0
    assert op.requests.resources == {"gpu-room": 1.0, "node:10.0.0.5": 0.01}


def test_names_are_checked_and_case_insensitively_unique(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: Reader
          container: {image: x}
        - name: reader
          container: {image: x}
        - name: has space
          container: {image: x}
        - container: {image: x}
        """,
    )
    lines = load_error(path).splitlines()
    assert lines == [
        f"{path}:7:9: error: field 'operators[2].name': 'has space' is not a valid name: 1-255 "
        "Latin letters, digits, '-' or '_'",
        f"{path}:9:3: error: field 'operators[3].name': an operator needs a 'name'",
        f"{path}:5:9: error: operator 'reader' field 'name': the name is already used by "
        f"operator 'Reader' at {path}:3:9 (names are case-insensitive)",
    ]


def test_a_name_longer_than_255_characters_is_rejected(tmp_path):
    path = write(tmp_path, CONTAINER_OP.replace("name: reader", "name: " + "r" * 256))
    assert "is not a valid name" in load_error(path)


def test_stage_and_container_are_exclusive_and_one_is_needed(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: both
          stage: pkg.mod:Thing
          container: {image: x}
        - name: neither
          input: [{path: /in}]
        - name: badref
          stage: pkg/mod.py
        """,
    )
    text = load_error(path)
    assert f"{path}:5:3: error: operator 'both' field 'container': an operator has either " in text
    assert f"{path}:6:3: error: operator 'neither' field 'stage': an operator needs 'stage'" in text
    assert (
        f"{path}:9:10: error: operator 'badref' field 'stage': must be a Python import path "
        "'package.module:ClassName'; got the string 'pkg/mod.py'"
    ) in text


def test_arguments_belong_to_python_stages(tmp_path):
    path = write(tmp_path, CONTAINER_OP + "  arguments: {level: 3}\n")
    assert "operator 'reader' field 'arguments': 'arguments' are a Python stage's" in (
        load_error(path)
    )


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("{path: /in, type: stream}", "input[0].element-type", "a stream needs an "
         "'element-type' label"),
        ("{type: stream, element-type: dicom}", "input[0].path", "a stream (files on disk) "
         "needs a 'path'"),
        ("{path: /in, type: stream, element-type: d, shape: [3]}", "input[0].shape", "a stream "
         "(files on disk) has no shape"),
        ("{type: array, element-type: float32}", "input[0].shape", "an array needs a 'shape'"),
        ("{type: array, shape: [3]}", "input[0].element-type", "an array needs an "
         "'element-type'"),
        ("{path: /in, type: array, element-type: u8, shape: [3]}", "input[0].path", "an array "
         "lives in shared memory and takes no 'path'"),
        ("{type: string, shape: [3]}", "input[0].shape", "a string takes no 'shape'"),
        ("{type: f32, element-type: float32}", "input[0].element-type", "a float32 takes no "
         "'element-type'"),
        ("{path: /in, element-type: dicom}", "input[0].element-type", "'element-type' needs a "
         "'type'"),
        ("{name: x}", "input[0].path", "an untyped input (Clara 0.4.0) is a disk directory and "
         "needs a 'path'"),
        ("{type: tensor}", "input[0].type", "must be one of array, string, stream or a "
         "primitive"),
        ("{type: array, element-type: f32, shape: [2, -3]}", "input[0].shape", "must be a list of "
         "dimensions, each a positive integer or -1 (or 0) for a dynamic one; got [2, -3]"),
        ("{type: array, element-type: complex64, shape: [3]}", "input[0].type", "unsupported "
         "element type 'complex64'"),
        ("{from: 'bad name', path: /in}", "input[0].from", "'bad name' is not a valid name"),
    ],
)  # fmt: skip
def test_clara_type_rules_for_container_io(tmp_path, entry, field, message):
    path = write(
        tmp_path,
        f"""
        api-version: 0.5.0
        name: p
        operators:
        - name: op
          container: {{image: x}}
          input:
          - {entry}
        """,
    )
    text = load_error(path)
    assert f"{path}:7:" in text and f"operator 'op' field {field!r}: {message}" in text


def test_several_outputs_must_each_be_named_and_unique(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        operators:
        - name: op
          container: {image: x}
          output:
          - {path: /a}
          - {path: /b, name: seg}
          - {path: /c, name: SEG}
        """,
    )
    first, second = load_error(path).splitlines()
    assert first.startswith(f"{path}:6:5: error: operator 'op' field 'output[0].name': an ")
    assert second.startswith(f"{path}:8:22: error: operator 'op' field 'output[2].name': output ")
    assert "'SEG' is declared twice" in second


def test_yaml_syntax_errors_and_duplicate_keys_have_locations(tmp_path):
    broken = write(tmp_path, "name: p\noperators:\n- name: [a\n", "broken.yaml")
    assert load_error(broken).startswith(f"{broken}:4:1: error: not valid YAML")
    twice = write(tmp_path, CONTAINER_OP + "  input: []\n", "twice.yaml")
    assert f"{twice}:11:3: error: duplicate key 'input' (first given at {twice}:7:3)" in (
        load_error(twice)
    )
    empty = write(tmp_path, "", "empty.yaml")
    assert load_error(empty) == f"{empty}:1:1: error: the file is empty"


def test_unknown_top_level_keys_warn_and_clara_extras_are_notes(tmp_path):
    path = write(
        tmp_path,
        """
        api-version: 0.6.0
        name: p
        orchestrator: Clara
        pull-secrets: [ngc-clara]
        colour: blue
        operators:
        - name: op
          container:
            image: x
            tag: "20.07"
            variables: {LABELS: '["a"]'}
          models:
          - name: segmentation_ct_spleen_v1
          services:
          - name: trtis
            container: {image: nvcr.io/nvidia/tensorrtserver}
          input:
          - {path: /in}
        """,
    )
    spec = load_pipeline(path)
    found = {(d.severity, d.operator, d.field): d for d in spec.diagnostics}
    assert set(found) == {
        ("note", None, "orchestrator"),
        ("note", None, "pull-secrets"),
        ("warning", None, "colour"),
        ("note", "op", "container.tag"),
        ("note", "op", "container.variables"),
        ("note", "op", "models"),
        ("note", "op", "services"),
    }
    colour = found["warning", None, "colour"].format()
    assert colour.startswith(f"{path}:5:1: warning: field 'colour': unknown key 'colour' is ")
    op = spec.operators[0]
    assert op.models == ("segmentation_ct_spleen_v1",)
    assert op.services[0]["name"] == "trtis"
    assert op.variables == {"LABELS": '["a"]'}


def test_old_and_unknown_api_versions(tmp_path):
    old = load_pipeline(write(tmp_path, CONTAINER_OP.replace("0.4.0", "0.3.0"), "old.yaml"))
    assert [d.severity for d in old.diagnostics] == ["note"]
    assert "deprecated since Clara 0.5.0" in old.diagnostics[0].message
    new = load_pipeline(write(tmp_path, CONTAINER_OP.replace("0.4.0", "2.0"), "new.yaml"))
    assert "unknown api-version '2.0'" in new.diagnostics[0].message


def test_pipeline_variables_merge_into_every_operator(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        variables: {CLARA_TRACE: 2, MODE: fast, FLAG: true}
        operators:
        - name: a
          container: {image: x}
          variables: {MODE: slow}
        - name: b
          container: {image: x}
        """,
    )
    a, b = load_pipeline(path).operators
    assert a.variables == {"CLARA_TRACE": "2", "MODE": "slow", "FLAG": "true"}
    assert b.variables == {"CLARA_TRACE": "2", "MODE": "fast", "FLAG": "true"}


# --------------------------------------------------------------------------- placeholders

PARAMETRISED = """
    name: p
    parameters:
      organ: liver
      workers: "2"
      model:
    operators:
    - name: seg-${{ organ }}
      container:
        image: clara/ai-${{organ}}
        command: ["run", "--model=${{ model }}", "--organ", "${{ organ }}"]
      replicas: ${{ workers }}
      requests: {gpu: "${{ workers }}"}
    """


def test_placeholders_take_arguments_then_defaults(tmp_path):
    path = write(tmp_path, PARAMETRISED)
    spec = load_pipeline(path, {"model": "v2", "ORGAN": "spleen"})
    (op,) = spec.operators
    assert op.name == "seg-spleen" and op.container.image == "clara/ai-spleen"
    assert op.container.command == ("run", "--model=v2", "--organ", "spleen")
    assert op.replicas == 2 and isinstance(op.replicas, int)  # a plain scalar is re-read
    assert op.requests.gpu == 2  # a quoted one is a string, read as a number where one is due
    assert spec.parameters == {"organ": "spleen", "workers": "2", "model": "v2"}


def test_a_placeholder_without_a_value_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, PARAMETRISED)
    assert load_error(path) == (
        f"{path}:10:22: error: operator 'seg-liver' field 'container.command[1]': placeholder "
        "${{ model }} has no value: parameter 'model' of the pipeline has no default and no "
        "argument gave one"
    )


def test_an_undefined_placeholder_is_an_error(tmp_path):
    path = write(tmp_path, CONTAINER_OP.replace("clara/dicom-reader", "${{ image }}"))
    assert load_error(path) == (
        f"{path}:6:12: error: operator 'reader' field 'container.image': placeholder "
        "${{ image }} has no value: 'image' is not a parameter (no parameters are declared)"
    )


def test_malformed_and_unclosed_placeholders(tmp_path):
    path = write(tmp_path, CONTAINER_OP.replace("/output", "'${{ a b }}/${{ c'"))
    text = load_error(path)
    assert "malformed placeholder '${{ a b }}'" in text
    assert "unclosed placeholder" in text


def test_arguments_that_are_not_parameters_are_rejected(tmp_path):
    path = write(tmp_path, PARAMETRISED)
    assert load_error(path, {"model": "v2", "colour": "red"}) == (
        f"{path}:2:1: error: field 'parameters': argument 'colour' is not a parameter of this "
        "pipeline (parameters: organ, workers, model)"
    )
    plain = write(tmp_path, CONTAINER_OP, "plain.yaml")
    assert "(parameters: it declares none)" in load_error(plain, {"x": "1"})


def test_operator_parameters_scope_their_own_placeholders(tmp_path):
    path = write(
        tmp_path,
        """
        name: p
        parameters: {organ: liver, level: "0.5"}
        operators:
        - name: a
          parameters: {level: "0.9", model: "${{ organ }}-v1"}
          container: {image: x, command: ["${{ model }}", "${{ level }}", "${{ organ }}"]}
        - name: b
          container: {image: x, command: ["${{ level }}"]}
        - name: c
          container: {image: x, command: ["${{ model }}"]}
        """,
    )
    text = load_error(path, {"organ": "lung"})
    assert text == (
        f"{path}:10:35: error: operator 'c' field 'container.command[0]': placeholder "
        "${{ model }} has no value: 'model' is not a parameter (parameters: level, organ)"
    )
    spec = load_pipeline(
        write(tmp_path, path.read_text().replace('${{ model }}"]}\n', 'x"]}\n'), "ok.yaml"),
        {"organ": "lung"},
    )
    a, b, _ = spec.operators
    assert a.container.command == ("lung-v1", "0.9", "lung")  # its own default shadows
    assert a.parameters == {"level": "0.9", "model": "lung-v1"}
    assert b.container.command == ("0.5",)


# --------------------------------------------------------------------------- imports

SEG_OPERATOR = """
    api-version: 0.5.0
    name: seg-${{ organ }}
    parameters:
      organ: liver
    container:
      image: clara/ai-${{ organ }}
    input:
    - from: reader
      path: /input
    """


def test_import_an_operator_with_arguments(tmp_path):
    write(tmp_path, SEG_OPERATOR, "operators/seg.yaml")
    path = write(
        tmp_path,
        CONTAINER_OP
        + """
    - import:
        path: operators/seg.yaml
        args: {organ: spleen}
    - import: operators/seg.yaml
    """,
    )
    _, spleen, liver = load_pipeline(path).operators
    assert (spleen.name, spleen.container.image) == ("seg-spleen", "clara/ai-spleen")
    assert liver.name == "seg-liver"
    assert spleen.location.file == str(tmp_path / "operators" / "seg.yaml")
    assert spleen.inputs[0].source == "reader"


def test_import_a_pipeline_document_and_a_list(tmp_path):
    write(
        tmp_path,
        """
        name: part
        parameters: {tag: "1"}
        variables: {PART: "yes"}
        operators:
        - name: p1
          container: {image: "x:${{ tag }}"}
        - import: {path: more.yaml}
        """,
        "lib/part.yaml",
    )
    write(tmp_path, "- name: p2\n  container: {image: y}\n", "lib/more.yaml")
    path = write(
        tmp_path,
        """
        name: main
        parameters: {version: "7"}
        variables: {TOP: "1"}
        operators:
        - import:
            path: lib/part.yaml
            args: {tag: "${{ version }}"}
        """,
    )
    p1, p2 = load_pipeline(path).operators
    assert p1.container.image == "x:7"
    # more.yaml is imported by part.yaml, so it is in part's scope
    assert p1.variables == p2.variables == {"TOP": "1", "PART": "yes"}
    assert p2.location.file == str(tmp_path / "lib" / "more.yaml")


def test_errors_in_an_imported_file_name_that_file_and_line(tmp_path):
    write(tmp_path, SEG_OPERATOR + "replicas: none\n", "operators/seg.yaml")
    path = write(tmp_path, CONTAINER_OP + "- import: {path: operators/seg.yaml}\n")
    assert load_error(path) == (
        f"{tmp_path / 'operators' / 'seg.yaml'}:10:11: error: operator 'seg-liver' field "
        "'replicas': must be a whole number of workers, 1 or more; got the string 'none'"
    )


def test_import_problems(tmp_path):
    write(tmp_path, SEG_OPERATOR, "seg.yaml")
    path = write(
        tmp_path,
        CONTAINER_OP
        + """
    - import: {path: missing.yaml}
    - import: {path: seg.yaml, args: {colour: red}}
    - import: {args: {}}
    """,
    )
    lines = load_error(path).splitlines()
    assert lines[0] == (
        f"{path}:12:18: error: field 'operators[1].import.path': cannot import 'missing.yaml': "
        f"no file {tmp_path / 'missing.yaml'}"
    )
    assert lines[1] == (
        f"{path}:13:34: error: field 'operators[2].import.args': argument 'colour' is not a "
        f"parameter of the imported file {tmp_path / 'seg.yaml'} (parameters: organ)"
    )
    assert lines[2].startswith(f"{path}:14:11: error: field 'operators[3].import.path': ")


def test_import_cycles_are_detected(tmp_path):
    a = write(tmp_path, "name: a\noperators:\n- import: {path: b.yaml}\n", "a.yaml")
    b = tmp_path / "b.yaml"
    write(tmp_path, "name: b\noperators:\n- import: {path: a.yaml}\n", "b.yaml")
    assert load_error(a) == (
        f"{b}:3:18: error: field 'operators[0].import.path': import cycle: {a} -> {b} -> {a}"
    )


def test_the_example_in_docs_pipelines_md_loads(tmp_path):
    docs = Path(__file__).resolve().parents[2] / "docs" / "pipelines.md"
    example = docs.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    write(tmp_path, "name: report-${{ title }}\nparameters: {title: x}\nstage: m:R\n",
          "operators/report.yaml")  # fmt: skip
    spec = load_pipeline(write(tmp_path, example), {"level": "0.7"})
    window, threshold, report = spec.operators
    assert threshold.arguments == {"level": "0.7"} and threshold.replicas == 2  # quoted: a str
    assert report.name == "report-CT" and window.variables == {"OMP_NUM_THREADS": "1"}


def test_a_pipeline_timeout_bounds_each_job(tmp_path):
    text = CONTAINER_OP.replace("name: demo", "name: demo\n    timeout: 1800")
    assert load_pipeline(write(tmp_path, text)).timeout == 1800.0
    assert load_pipeline(write(tmp_path, CONTAINER_OP)).timeout is None
    bad = write(tmp_path, CONTAINER_OP.replace("name: demo", "name: demo\n    timeout: never"))
    assert (
        f"{bad}:3:10: error: field 'timeout': must be a number of seconds greater than 0; "
        "got the string 'never'"
    ) in load_error(bad)


def test_a_misspelled_port_field_is_an_error_with_did_you_mean(tmp_path):
    """issue 10: ``elemnt-type`` was a warning and the port silently lost its element type."""
    path = write(
        tmp_path,
        """
        api-version: 0.4.0
        name: p
        operators:
        - name: reader
          container: {image: clara/dicom-reader}
          input:
          - {path: /input}
          output:
          - path: /output
            type: stream
            elemnt-type: dicom
        """,
    )
    message = load_error(path)
    assert (
        f"{path}:11:5: error: operator 'reader' field 'output[0].elemnt-type': unknown key "
        "'elemnt-type' (did you mean 'element-type'?" in message
    )


@pytest.mark.parametrize(
    ("entry", "field", "hint"),
    [
        ("input:\n  - {path: /in, colour: red}", "input[0].colour", "known: element-type"),
        ("input:\n  - {path: /in, form: x}", "input[0].form", "did you mean 'from'?"),
        ("requests: {cpu: 1, memroy: 10}", "requests.memroy", "did you mean 'memory'?"),
        ("container: {image: x, comand: [a]}", "container.comand", "did you mean 'command'?"),
    ],
)
def test_unknown_keys_of_closed_mappings_are_errors(tmp_path, entry, field, hint):
    text = "api-version: 0.4.0\nname: p\noperators:\n- name: op\n"
    if not entry.startswith("container"):
        text += "  container: {image: x}\n"
    text += f"  {entry}\n"
    if not entry.startswith("input"):
        text += "  input:\n  - {path: /in}\n"
    path = tmp_path / "p.yaml"
    path.write_text(text)
    message = load_error(path)
    assert f"error: operator 'op' field '{field}': unknown key" in message
    assert hint in message


def test_a_near_miss_of_an_operator_field_is_an_error_another_key_a_warning(tmp_path):
    near = write(tmp_path, CONTAINER_OP + "  descripton: reads\n", "near.yaml")
    assert "field 'descripton': unknown key 'descripton' (did you mean 'description'?" in (
        load_error(near)
    )
    other = write(tmp_path, CONTAINER_OP + "  x-owner: radiology\n", "other.yaml")
    (found,) = load_pipeline(other).diagnostics
    assert found.severity == "warning" and "unknown key 'x-owner' is ignored" in found.message
