"""``first_line``: every message that quotes a library's exception quotes it as one short plain line."""

from __future__ import annotations

from sepify.errors import first_line


def test_first_line_keeps_the_type_and_the_first_line_without_colour() -> None:
    error = RuntimeError("\x1b[1;31mshape mismatch\x1b[0m in node conv1\n  File 'model.py', line 3\n")
    assert first_line(error) == "RuntimeError: shape mismatch in node conv1"


def test_first_line_marks_where_it_cut_a_long_line() -> None:
    line = first_line(ValueError("x" * 400))
    assert line == "ValueError: " + "x" * 157 + "..."


def test_first_line_of_an_empty_message_is_the_type() -> None:
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("   \n  ")) == "OSError"
