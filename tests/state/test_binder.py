"""Binding plain values to state types: the plan compiled per type (codec._binder)
binds exactly what the checked path (codec._from_plain_checked) binds, refuses what it
refuses with its message, and codec.prepare() makes the plans ahead of time."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmm.state import SnapshotError, codec
from avmm.state.codec import Record, from_plain, to_plain

from .test_codec import SAMPLE, Sample
from .test_writer import _PLAIN, SECTIONS, Tree, _strategy, _trees


def _outcome(bind: Any, plain: Any, hint: Any) -> object:
    try:
        return ("bound", bind(plain, hint, "top"))
    except SnapshotError as e:
        return ("refused", str(e))


def _damaged(plain: Any, rng: random.Random, replacement: Any) -> Any:
    """``plain`` with one value somewhere in it replaced (or one field dropped, or one
    added, or a record renamed or re-versioned)."""
    if isinstance(plain, Record):
        fields = dict(plain.fields)
        choice = rng.randrange(6)
        if choice == 0 or not fields:
            fields[rng.choice(["x", "surplus", *fields]) + rng.choice(["", "2"])] = replacement
        elif choice == 1:
            del fields[rng.choice(list(fields))]
        elif choice == 2:
            return Record(plain.name + "X", plain.version, fields)
        elif choice == 3:
            return Record(plain.name, plain.version + rng.choice([-1, 1]), fields)
        else:
            name = rng.choice(list(fields))
            fields[name] = _damaged(fields[name], rng, replacement)
        return Record(plain.name, plain.version, fields)
    if isinstance(plain, list) and plain and rng.random() < 0.7:
        items = list(plain)
        index = rng.randrange(len(items))
        items[index] = _damaged(items[index], rng, replacement)
        return items
    if isinstance(plain, dict) and plain and rng.random() < 0.7:
        items = dict(plain)
        key = rng.choice(list(items))
        items[key] = _damaged(items[key], rng, replacement)
        return items
    return replacement


#: Replacements: values just outside the integer widths, look-alikes of other kinds, and
#: any plain value.
_REPLACEMENTS = st.one_of(
    st.sampled_from([-1, 256, 65536, 1 << 32, 1 << 64, -(1 << 63) - 1, True, False, None,
                     b"", "", [], {}]),
    _PLAIN)
_VALUES = st.one_of(_strategy(Sample), _trees(),
                    *(_strategy(cls) for cls in SECTIONS.values()))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_VALUES, st.integers(0, 1 << 32), _REPLACEMENTS)
def test_the_plan_binds_and_refuses_as_the_checked_path(value: Any, seed: int,
                                                        replacement: Any) -> None:
    hint = type(value)
    plain = to_plain(value)
    assert _outcome(from_plain, plain, hint) == \
        _outcome(codec._from_plain_checked, plain, hint)
    assert to_plain(from_plain(plain, hint, "top")) == plain
    damaged = _damaged(plain, random.Random(seed), replacement)
    assert _outcome(from_plain, damaged, hint) == \
        _outcome(codec._from_plain_checked, damaged, hint)


def test_the_plan_never_binds_what_the_checked_path_refuses() -> None:
    """Every refusal of test_codec's table, straight through the plan."""
    plain = to_plain(SAMPLE)
    for changes in ({"width": 256}, {"count": True}, {"blob": "x"}, {"maybe": 5},
                    {"table": {"a": 1 << 20}}, {"surplus": 1}, {"enabled": 1}):
        fields = {**plain.fields, **changes}
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the message is the checked path's
            codec._binder(Sample)(Record("Sample", 3, fields))


def test_prepare_makes_every_plan_before_the_state_is_read(monkeypatch) -> None:
    """After prepare(), binding and encoding a Tree (which contains a Sample, which
    contains Points) never looks at type hints again."""
    codec.field_hints.cache_clear()
    codec._BINDERS.clear()
    from avmm.state import _writer

    _writer._ENCODERS.clear()
    codec.prepare(Tree)

    def no_hints(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("get_type_hints called after prepare()")

    monkeypatch.setattr(codec, "get_type_hints", no_hints)
    tree = Tree("t", [Tree("c", [], SAMPLE, {}, {}, 1, b"")], None, {"w": 1}, {1: 2}, 3,
                b"r")
    assert codec.decode(codec.encode(tree), Tree) == tree


_EDGES = [-1, 256, 65536, 1 << 32, 1 << 64, -(1 << 63) - 1, True, False, None, b"", "", [],
          {}, Record("Point", 1, {"x": 1, "y": 1})]


def _every_replacement(plain: Any) -> Any:
    """``plain`` with each of its values, one at a time, replaced by each of _EDGES."""
    yield from _EDGES
    if isinstance(plain, Record):
        for name, value in plain.fields.items():
            for damaged in _every_replacement(value):
                yield Record(plain.name, plain.version, {**plain.fields, name: damaged})
    elif isinstance(plain, list):
        for index, value in enumerate(plain):
            for damaged in _every_replacement(value):
                yield [*plain[:index], damaged, *plain[index + 1:]]
    elif isinstance(plain, dict):
        for key, value in plain.items():
            for damaged in _every_replacement(value):
                yield {**plain, key: damaged}


def test_every_value_replaced_binds_or_refuses_as_the_checked_path() -> None:
    from .samples import platform_state

    tree = Tree("t", [Tree("c", [], SAMPLE, {"a": 255}, {-1: 0}, 65535, b"x")], None,
                {"w": 1}, {1: 2}, 3, b"r")
    bound = 0
    for value in (SAMPLE, tree, platform_state()):
        for damaged in _every_replacement(to_plain(value)):
            expected = _outcome(codec._from_plain_checked, damaged, type(value))
            assert _outcome(from_plain, damaged, type(value)) == expected
            bound += expected[0] == "bound"
    assert bound > 20  # accepted replacements were compared too
