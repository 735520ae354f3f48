"""Fuzzing the code that reads untrusted model text: the verifier, the critique parser, the
step splitter and the symbolic step checker. No exception escapes; every call returns in
bounded time; nothing is executed."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_dist.rewards.critique import parse_critique
from capo_dist.rewards.steps import split_steps
from capo_dist.rewards.verifier import Verifier, extract_answer
from capo_dist.step_checker import step_is_correct

# Text that looks like what models write, with the characters parsers trip on.
MATHY = st.text(
    alphabet=st.sampled_from(list("0123456789+-*/^=()[]{},.:; \n\\$%#xyzabc")) | st.characters(),
    max_size=400,
)
CRITIQUE = st.builds(
    lambda pre, items, post: f"{pre}\nWrong step list: [{items}]{post}",
    st.text(max_size=100),
    st.text(alphabet="0123456789-, []abc", max_size=60),
    st.text(max_size=40),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(timeout_s=2.0)
    yield v
    v.close()


@FUZZ
@given(text=st.one_of(MATHY, CRITIQUE), num_steps=st.integers(-3, 50))
def test_critique_parser_never_raises(text, num_steps):
    start = time.perf_counter()
    parsed = parse_critique(text, max(num_steps, 0))
    assert parsed.wrong is None or all(0 <= i < max(num_steps, 0) for i in parsed.wrong)
    assert time.perf_counter() - start < 0.5


@FUZZ
@given(text=MATHY)
def test_step_splitter_spans_are_exact(text):
    spans = split_steps(text)
    assert all(0 <= s < e <= len(text) and text[s:e].strip() for s, e in spans)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))


@FUZZ
@given(text=MATHY)
def test_step_checker_never_raises(text):
    start = time.perf_counter()
    assert isinstance(step_is_correct(text), bool)
    assert time.perf_counter() - start < 0.5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(MATHY, MATHY.map(lambda t: f"so \\boxed{{{t}}}")), gold=MATHY)
def test_verifier_never_raises_and_is_bounded(verifier, response, gold):
    start = time.perf_counter()
    extract_answer(response)
    (ok,) = verifier.check_many([response], [gold])
    assert isinstance(ok, bool)
    # the hard limit bounds each side; 5 s of slack for a loaded machine (measured: ~0.05 s)
    assert time.perf_counter() - start < 2 * verifier.timeout_s + 5.0
