"""monitor.probes.dnsnames.name_of: question names out of the kernel's 64-byte copies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from monitor.probes.dnsnames import MAX_NAME, NAME, name_of


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def copy(question: bytes) -> bytes:
    """What the kernel keeps: the first NAME bytes, zero-filled past the packet's end."""
    return question[:NAME].ljust(NAME, b"\0")


def test_a_name_lower_cased_with_its_type_and_class_after_it() -> None:
    assert name_of(copy(wire("WWW.Example.COM") + b"\0\x1c\0\x01")) == "www.example.com"
    assert name_of(copy(b"\0\0\x01\0\x01")) == "."  # the root


def test_names_that_go_wrong_end_where_they_do_marked_cut() -> None:
    assert name_of(copy(b"\x02nx\xc0\x0c")) == "nx~"  # a pointer: never in a question
    assert name_of(copy(b"\x02nx\x50" + b"z" * 10)) == "nx~"  # a length over 63
    assert name_of(copy(b"\x02nx\x3f" + b"y" * 20)) == "nx." + "y" * 20 + "~"  # packet ended
    long = copy(wire("nx." + "w" * 63))  # the copy ends inside the second label
    assert name_of(long) == "nx." + "w" * 59 + "~" and len(name_of(long)) == MAX_NAME
    assert name_of(copy(b"\x03a\xffb\0")) == "a\ufffdb"  # not UTF-8: shown, not refused


@given(st.binary(max_size=NAME))
def test_any_bytes_give_a_bounded_name_and_never_raise(raw: bytes) -> None:
    name = name_of(copy(raw))
    assert 1 <= len(name) <= MAX_NAME


@given(st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20),
                min_size=1, max_size=3))
def test_names_that_fit_come_back_whole(labels: list[str]) -> None:
    name = ".".join(labels)
    question = wire(name) + b"\0\x01\0\x01"
    if len(question) <= NAME:
        assert name_of(copy(question)) == name
