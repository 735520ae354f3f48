"""Judge prompts as configuration: `judge.prompt` names a YAML file in conf/judge_prompt/.

A prompt is what the judge model reads (a template) and how its reply is read
(a parser from `capo_dist.rewards.critique_parsers`). `judge.prompt=NAME` loads
conf/judge_prompt/NAME.yaml; a value ending in `.yaml`/`.yml` is a path to one
anywhere. Fields:

| field            | what                                                                  |
| ---------------- | --------------------------------------------------------------------- |
| `template`       | the prompt, Python `str.format` syntax (write a literal brace as `{{` / `}}`); must use `{problem}` and `{steps}` |
| `parser`         | a registered parser name, or `package.module:function`                |
| `step_format`    | one step in `{steps}`: placeholders `{index}` (0-based) and `{text}` (stripped); default `Step {index}: {text}` |
| `step_separator` | between steps; default a blank line                                   |
| `empty_solution` | `{steps}` of a response with no step; default `(empty solution)`      |
| `description`    | free text                                                             |

Template placeholders: `{problem}` (stripped), `{steps}`, `{num_steps}`,
`{last_step}` (num_steps - 1), `{reference}` (the stripped reference answer;
empty when `judge.include_reference=false`), and CAPO's two conditional pieces
`{ref_clause}` (" with its reference final answer" or "") and `{ref_block}`
("\\n## Reference answer\\n<reference>\\n" or ""). Any other placeholder, an
attribute or index (`{problem.x}`), a conversion or a format spec is refused:
`load_judge_prompt` raises ConfigError naming the file, the field and the fix,
which `capo_dist.config.validate` turns into a failure before any actor starts.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from capo_dist.config import ConfigError
from capo_dist.rewards.critique_parsers import get_parser

PROMPT_DIR = Path(__file__).resolve().parent.parent / "conf" / "judge_prompt"
TEMPLATE_FIELDS = (
    "problem",
    "steps",
    "num_steps",
    "last_step",
    "reference",
    "ref_clause",
    "ref_block",
)
REQUIRED_FIELDS = ("problem", "steps")
STEP_FIELDS = ("index", "text")
_KEYS = ("template", "parser", "step_format", "step_separator", "empty_solution", "description")
# A prompt file larger than this is not a prompt.
MAX_PROMPT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt: its template and the name of the parser of its replies."""

    name: str
    template: str
    parser: str
    step_format: str = "Step {index}: {text}"
    step_separator: str = "\n\n"
    empty_solution: str = "(empty solution)"
    description: str = ""

    def render(
        self, problem: str, steps: Sequence[str], reference_answer: str | None = None
    ) -> str:
        """The text the judge reads for one response (reference None: not shown)."""
        shown = self.step_separator.join(
            self.step_format.format(index=i, text=s.strip()) for i, s in enumerate(steps)
        )
        reference = "" if reference_answer is None else reference_answer.strip()
        has_ref = reference_answer is not None
        return self.template.format(
            problem=problem.strip(),
            steps=shown or self.empty_solution,
            num_steps=len(steps),
            last_step=len(steps) - 1,
            reference=reference,
            ref_clause=" with its reference final answer" if has_ref else "",
            ref_block=f"\n## Reference answer\n{reference}\n" if has_ref else "",
        )


def prompt_names() -> list[str]:
    """The prompts shipped in conf/judge_prompt/."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def _check_format(where: str, text: str, allowed: tuple[str, ...], required: tuple[str, ...]):
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as err:  # a lone brace
        raise ConfigError(f"{where}: {err}; write a literal brace as {{{{ or }}}}") from None
    used = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ConfigError(
                f"{where}: placeholder {shown} is not allowed; use only "
                f"{', '.join('{' + a + '}' for a in allowed)} (a literal brace is {{{{ or }}}})"
            )
        used.add(name)
    missing = [r for r in required if r not in used]
    if missing:
        raise ConfigError(
            f"{where} must contain {', '.join('{' + m + '}' for m in missing)} "
            "(the judge would not see the response)"
        )


def load_judge_prompt(name: str) -> JudgePrompt:
    """The prompt `name` (conf/judge_prompt/NAME.yaml) or at the path `name` (*.yaml);
    ConfigError naming the file and the fix when it is missing or malformed."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
    else:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(
                f"judge.prompt={name!r}: give a prompt name ({', '.join(prompt_names())}) "
                "or the path of a .yaml file"
            )
        path = PROMPT_DIR / f"{name}.yaml"
    where = f"judge.prompt={name!r} ({path})"
    if not path.is_file():
        raise ConfigError(
            f"{where} is not a file; choose one of: {', '.join(prompt_names())}, "
            "or give the path of a .yaml file (fields in capo_dist/judge_prompt.py)"
        )
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_PROMPT_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys template and parser")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_KEYS)}"
        )
    for key in _KEYS:
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    for key in ("template", "parser"):
        if not data.get(key):
            raise ConfigError(f"{where}: {key} is missing")
    prompt = JudgePrompt(name=name, **data)
    _check_format(f"{where} template", prompt.template, TEMPLATE_FIELDS, REQUIRED_FIELDS)
    _check_format(f"{where} step_format", prompt.step_format, STEP_FIELDS, ("text",))
    try:
        get_parser(prompt.parser)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return prompt
