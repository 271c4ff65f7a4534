"""The executor's edge references keep their names and values across the workers' pipes."""

import pickle

import pytest

from dataflow.execution.refs import ObjRef, PathRef, ValRef, from_wire, to_wire

REFS = [ObjRef("a1b2", "arrow"), ObjRef("c3"), PathRef("/out/job/seg"), ValRef(3.5), ValRef("lung")]


@pytest.mark.parametrize("ref", REFS)
def test_a_reference_survives_the_wire_form_and_pickling(ref):
    wire = pickle.loads(pickle.dumps(to_wire(ref)))
    assert type(wire) is tuple  # plain on the pipe
    back = from_wire(wire)
    assert back == ref and type(back) is type(ref)
