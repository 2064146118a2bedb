"""Realistic mistakes: the plan leads with the cause, and its first suggestion is the fix."""

from pathlib import Path

import mistakes
import pytest

import orbax_surgery as osurg


@pytest.mark.parametrize('mistake', mistakes.MISTAKES, ids=lambda m: m.name)
def test_the_first_suggestion_is_the_fix(mistake):
    error = mistakes.first_error(mistake)
    assert isinstance(error, mistake.error), f'{type(error).__name__}: {error}'
    assert error.suggestions, f'no suggestion: {error}'
    assert error.suggestions[0] == mistake.fix, str(error)


def test_the_table_is_big_and_covers_every_kind_of_mistake():
    assert len(mistakes.MISTAKES) >= 30
    kinds = {m.category for m in mistakes.MISTAKES}
    wanted = {'typo', 'wrong prefix', 'wrong layer count', 'wrong heads', 'forgotten transpose'}
    assert wanted | {'wrong dtype'} <= kinds


def test_every_error_class_has_a_documented_example():
    documented = {m.error for m in mistakes.MISTAKES} | {e.error for e in mistakes.EXAMPLES}
    every = {osurg.SurgeryError, *mistakes._subclasses(osurg.SurgeryError)}
    assert every - documented <= {osurg.SurgeryError}  # The base class is documented alone.
    for example in mistakes.EXAMPLES:
        assert type(mistakes._raises(example.cause)) is example.error


def test_docs_errors_md_is_generated_from_the_table():
    docs = Path(__file__).parents[2] / 'docs' / 'errors.md'
    assert docs.read_text() == mistakes.errors_doc(), (
        'run: python tests/mistakes.py > docs/errors.md'
    )
