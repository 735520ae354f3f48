"""Judge prompts as configuration (capo_dist.judge_prompt, conf/judge_prompt/): the shipped
prompts load and render, and a bad prompt file fails in `validate` naming file and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_dist.config import ConfigError, JudgeConfig, RunConfig, validate
from capo_dist.judge_prompt import load_judge_prompt, prompt_names
from capo_dist.rewards.critique_parsers import get_parser

STEPS = ["2 + 2 = 5, so Ava has 5 apples.", "The answer is 5."]


def test_shipped_prompts_render_and_their_parsers_read_their_own_format():
    assert prompt_names() == ["capo", "first_error", "json"]
    replies = {
        "capo": "Step 0 is wrong.\nWrong step list: [0]",
        "first_error": "Paragraph 0 adds wrongly. \\boxed{0}",
        "json": 'Step 0 adds wrongly.\n{"wrong_steps": [0]}',
    }
    for name in prompt_names():
        prompt = load_judge_prompt(name)
        text = prompt.render("Ava has 2 apples and gets 2. How many?", STEPS, "4")
        assert "Ava has 2 apples" in text and STEPS[0] in text and STEPS[1] in text
        assert "{" not in text.replace('{"wrong_steps"', "").replace("\\boxed{}", "")
        assert get_parser(prompt.parser)(replies[name], len(STEPS)).wrong == {0}
    assert "<paragraph_1>\nThe answer is 5.\n</paragraph_1>" in load_judge_prompt(
        "first_error"
    ).render("q", STEPS)
    assert '{"wrong_steps": []}' in load_judge_prompt("json").render("q", STEPS)


def _write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    return str(path)


GOOD = 'parser: json\ntemplate: "Problem: {problem}\\nSteps:\\n{steps}\\nAnswer in JSON."\n'


def test_a_user_prompt_file_by_path(tmp_path: Path):
    path = _write(tmp_path, GOOD + 'step_format: "({index}) {text}"\nstep_separator: "\\n"\n')
    prompt = load_judge_prompt(path)
    assert prompt.render(" Q ", ["a ", "b"]) == "Problem: Q\nSteps:\n(0) a\n(1) b\nAnswer in JSON."
    assert prompt.parser == "json"
    cfg = RunConfig()
    cfg.judge = JudgeConfig(backend="openai", base_url="http://127.0.0.1:1/v1", model="m")
    cfg.judge.prompt = path
    validate(cfg)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("parser: json\ntemplate: 'Steps: {steps}'\n", r"template must contain \{problem\}"),
        ("parser: json\ntemplate: '{problem} {steps} {answer}'\n", r"placeholder \{answer\}"),
        (
            "parser: json\ntemplate: '{problem.__class__} {steps}'\n",
            r"placeholder \{problem.__class__\}",
        ),
        ("parser: json\ntemplate: '{problem!r} {steps}'\n", r"placeholder \{problem!r\}"),
        ("parser: json\ntemplate: '{problem:>9} {steps}'\n", r"placeholder \{problem:>9\}"),
        ("parser: json\ntemplate: '{problem} {steps} {\"a\": 1}'\n", "placeholder"),
        ("parser: json\ntemplate: '{problem} {steps} }'\n", "literal brace"),
        ("parser: nope\ntemplate: '{problem} {steps}'\n", "unknown critique parser 'nope'"),
        ("parser: no.such.module:f\ntemplate: '{problem} {steps}'\n", "cannot be imported"),
        ("template: '{problem} {steps}'\n", "parser is missing"),
        ("parser: json\n", "template is missing"),
        ("parser: json\ntemplate: [1]\n", "template must be a string"),
        (GOOD + "step_format: '{index}'\n", r"step_format must contain \{text\}"),
        (GOOD + "temperature: 0\n", "unknown key"),
        ("- a list\n", "must be a mapping"),
        ("parser: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_prompt_files_fail_in_validate(tmp_path: Path, body: str, message: str):
    cfg = RunConfig()
    cfg.judge.prompt = _write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "mine.yaml" in str(err.value)  # names the file


def test_unknown_prompt_names():
    for name, message in [
        ("nope", "is not a file; choose one of: capo, first_error, json"),
        ("../config", "give a prompt name"),
        ("/nonexistent/p.yaml", "is not a file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_judge_prompt(name)
