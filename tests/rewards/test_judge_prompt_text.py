"""The default judge prompt (`judge.prompt=capo`, conf/judge_prompt/capo.yaml), character
for character: what the judge is shown is part of the method (DESIGN §1.2), so any change
to it must be a deliberate change of this test."""

from capo_dist.judge_prompt import load_judge_prompt

build_critique_prompt = load_judge_prompt("capo").render

_HEAD = (
    "You are a meticulous math teacher. Below is a problem{ref_clause} and a student's "
    "solution split into numbered steps. Check each step ON ITS OWN CORRECTNESS: a step "
    "is wrong if it contains a calculation error, a logical error, a false statement or "
    "an unjustified claim. Do not mark a step wrong only because an earlier step was "
    "wrong; judge whether the step itself is correct given what precedes it.\n"
    "\n"
    "## Problem\n"
)
_TAIL = (
    "\n"
    "Briefly examine the steps one by one. Then end your reply with exactly one line of "
    "the form\n"
    "Wrong step list: [i, j, ...]\n"
    "listing the numbers of all wrong steps, or\n"
    "Wrong step list: []\n"
    "when every step is correct."
)


def test_prompt_with_reference_answer_exactly():
    got = build_critique_prompt(
        "  What is 2+2?\n", [" 2+2 = 5.\n", "So 5. "], reference_answer=" 4 "
    )
    assert got == (
        _HEAD.format(ref_clause=" with its reference final answer")
        + "What is 2+2?\n"
        + "\n## Reference answer\n4\n\n"
        + "## Solution\n"
        + "Step 0: 2+2 = 5.\n\nStep 1: So 5.\n"
        + _TAIL
    )


def test_prompt_without_reference_answer_exactly():
    got = build_critique_prompt("Q?", ["a", "b", "c"])
    assert got == (
        _HEAD.format(ref_clause="")
        + "Q?\n"
        + "\n## Solution\n"
        + "Step 0: a\n\nStep 1: b\n\nStep 2: c\n"
        + _TAIL
    )


def test_prompt_of_an_empty_solution_says_so():
    got = build_critique_prompt("Q?", [], reference_answer=None)
    assert got == _HEAD.format(ref_clause="") + "Q?\n\n## Solution\n(empty solution)\n" + _TAIL
