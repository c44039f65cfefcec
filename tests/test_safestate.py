"""Run state as bytes that cannot run code: exact round trips, and clean errors for anything else."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prismfl import safestate
from prismfl.safestate import StateError


def test_round_trip_keeps_values_types_and_int_keys():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], betas=(0.5, 0.999))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    tree = {"optimizer": opt.state_dict(), "mask": torch.tensor([True, False]), "n": 3, "x": 0.1, "none": None,
            "deltas": {2: torch.arange(4, dtype=torch.uint8)}, "name": "é", "flags": [True, False]}  # fmt: skip
    back = safestate.from_bytes(safestate.to_bytes(tree))
    assert back["n"] == 3 and back["x"] == 0.1 and back["none"] is None and back["name"] == "é"
    assert back["flags"] == [True, False] and list(back["deltas"]) == [2]
    assert torch.equal(back["mask"], tree["mask"]) and back["mask"].dtype == torch.bool
    state = back["optimizer"]["state"]
    assert list(state) == [0] and torch.equal(state[0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    fresh.load_state_dict(back["optimizer"])  # an optimizer takes it back
    assert fresh.param_groups[0]["betas"] == [0.5, 0.999]


def test_the_same_tree_gives_the_same_bytes():
    tree = {"b": torch.ones(2), "a": [1, {"c": torch.zeros(1)}]}
    assert safestate.to_bytes(tree) == safestate.to_bytes(tree)


def test_what_cannot_be_stored_is_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        safestate.to_bytes({"x": object()})
    with pytest.raises(TypeError, match="dict keys"):
        safestate.to_bytes({"$tensor": 1})


def _with_tree(tree_json: str) -> bytes:
    """A well-formed safetensors file whose state tree is `tree_json`."""
    from safetensors.torch import save

    return save({"t0": torch.zeros(2)}, metadata={safestate.META_KEY: tree_json})


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "truncated"),
        (struct.pack("<Q", 2) + b"[]", "no metadata"),
        (struct.pack("<Q", 5) + b'{"a":', "unreadable header"),
        (struct.pack("<Q", 2 + 200_000) + b"[" * 100_001 + b"]" * 100_001, "unreadable header"),
    ],
)
def test_garbage_is_a_state_error(data, message):
    with pytest.raises(StateError, match=message):
        safestate.from_bytes(data)


@pytest.mark.parametrize(
    "tree, message",
    [
        ('{"x": {"$tensor": "t9"}}', "bad tensor reference"),
        ('[{"$tensor": "t0"}, {"$tensor": "t0"}]', "bad tensor reference"),
        ('{"$int_keys": [["a", 1]]}', "integer-keyed"),
        ('{"$pickle": 1}', "unknown marker"),
        ("[" * 70 + "]" * 70, "nested too deeply"),
        ("not json", "does not parse"),
    ],
)
def test_a_forged_tree_is_a_state_error(tree, message):
    with pytest.raises(StateError, match=message):
        safestate.from_bytes(_with_tree(tree))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_mutated_states_never_raise_anything_but_state_error(noise, at):
    data = bytearray(safestate.to_bytes({"a": torch.arange(6.0), "b": [1, "x"]}))
    data[at % len(data) : at % len(data) + len(noise)] = noise
    try:
        safestate.from_bytes(bytes(data))
    except StateError:
        pass


def test_tensors_of_the_tree_are_checked_by_safetensors():
    good = bytearray(_with_tree(json.dumps({"x": {"$tensor": "t0"}})))
    head = struct.unpack_from("<Q", good)[0]
    with pytest.raises(StateError, match="tensors do not load"):
        safestate.from_bytes(bytes(good[: 8 + head + 3]))  # the tensor bytes cut short
