"""The mutants of `tests/mutants.py` still name lines that are there, once each, and tests that
exist: a change that moves a mutated line must move its mutant too, or `python -m
tests.mutants` stops at it (the mutants themselves run outside the suite, about a minute)."""

from __future__ import annotations

import pytest

from tests.mutants import MUTANTS, REPO


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name.split(":")[0])
def test_every_mutant_names_a_line_that_is_there_once_and_tests_that_exist(mutant):
    assert (REPO / mutant.path).read_text().count(mutant.line) == 1, mutant.line
    assert mutant.mutated != mutant.line
    assert all((REPO / test.split("::")[0]).is_file() for test in mutant.tests)
