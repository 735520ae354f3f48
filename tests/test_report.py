"""The credit report: real `make_experience` samples rendered to HTML, read back by a browser.

The run directory is made the way the trainer makes it: hand-written responses
and critiques go through the real `capo_dist.experience.make_experience` with a
real (in-process trained) tokenizer, and `MetricsLogger` writes
`samples/step_XXXXXX.jsonl` and `metrics.jsonl`. The browser tests open the page
in headless Chromium (`/usr/bin/chromium`; they skip, saying so, when it is absent —
`apt-get install -y chromium` provides it) and read the DOM it built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from capo_dist.config import RunConfig
from capo_dist.experience import make_experience
from capo_dist.metrics import MetricsLogger
from capo_dist.models import train_tokenizer
from capo_dist.report import ResponseRecord, build_report, reward_colour
from capo_dist.types import Completion, JudgedRollout, Problem, Rollout
from tests.runs import REPO, readme_argv

CHROMIUM = Path("/usr/bin/chromium")
INJECTION = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"

QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and "
    "bakes muffins for her friends every day with four. She sells the remainder at the "
    "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
    "every day at the farmers' market?"
)
# (response, correct, critiques): one group of G = 4 for the question above.
GROUP = [
    (
        "Janet starts with 16 eggs each day.\n\nShe uses 3 + 4 = 7 eggs.\n\n"
        "She sells 16 - 7 = 9 eggs.\n\nShe makes 9 * 2 = 18 dollars.\n\nThe answer is \\boxed{18}.",
        True,
        ["Every step checks out.\nWrong step list: []"] * 4,
    ),
    (
        "She uses 3 + 4 = 8 eggs.\n\nShe sells 16 - 8 = 9 eggs.\n\n"
        "9 * 2 = 18, so she makes $18.\n\nThe answer is \\boxed{18}.",
        True,
        [
            "Step 0: 3 + 4 is 7, not 8.\nStep 1: 16 - 8 is 8, not 9.\nWrong step list: [0, 1]",
            "Step 0 adds wrongly.\nWrong step list: [0]",
            "**Wrong step list:** [0, 1]",
            "Step 0 is wrong.\nWrong step list: [0, 9]",
        ],
    ),
    (
        "She uses 3 + 4 = 7 eggs.\n\nShe sells 16 - 7 = 9 eggs.\n\n"
        "She makes 9 * 3 = 27 dollars.\n\nThe answer is \\boxed{27}.",
        False,
        [
            "Step 2 uses $3 per egg; the price is $2.\nWrong step list: [2]",
            "Wrong step list: [2, 3]",
            None,
            "I think it is fine overall.",
        ],
    ),
    (
        f"{INJECTION} She sells 16 - 3 - 4 = 9 eggs.\n\n9 * 2 = 19.\n\nThe answer is \\boxed{{19}}.",
        False,
        [
            "Step 1: 9 * 2 = 18. </pre><script>document.title='pwned'</script>\nWrong step list: [1]",
            "Wrong step list: [1]",
            "Wrong step list: [0, 1]",
            "Wrong step list: [1]",
        ],
    ),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE tokenizer trained on the responses (as the tiny policy's is)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([r for r, _, _ in GROUP] * 8 + [QUESTION] * 4, 600, out)
    return AutoTokenizer.from_pretrained(str(out))


def _judged(tok, rows, step: int) -> tuple[list[JudgedRollout], list[bool]]:
    problem = Problem(uid="gsm8k-0", question=QUESTION, gold="18")
    prompt = tok(QUESTION)["input_ids"]
    judged, correct = [], []
    for g, (text, ok, critiques) in enumerate(rows):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        completion = Completion(ids, tok.decode(ids, skip_special_tokens=True), [0.0] * len(ids))
        judged.append(JudgedRollout(Rollout(problem, g, prompt, completion, step), critiques))
        correct.append(ok)
    return judged, correct


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    """A run directory with two steps of real samples and six steps of real metrics."""
    run = tmp_path_factory.mktemp("report") / "run-majority"
    cfg = RunConfig()
    cfg.capo.vote = "majority"
    logger = MetricsLogger(run, cfg)
    try:
        for step in range(6):
            # Step 5 has the whole group; earlier ones a varying part (curves to plot).
            judged, correct = _judged(tok, GROUP[: 2 + step % 3] if step < 5 else GROUP, step)
            exp = make_experience(judged, tok, correct, cfg.capo, tok.pad_token_id)
            logger.log({"step": float(step), **exp.metrics})
            if step in (0, 5):
                logger.write_samples(step, exp.samples)
    finally:
        logger.close()
    # A truncated line, as a crash mid-write would leave it: skipped and counted.
    with open(run / "samples" / "step_000005.jsonl", "a") as f:
        f.write('{"uid": "x", "respo')
    return run


README_REPORT = "python -m capo_dist.report outputs/<name>/<time>"


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    """The page the README's command writes for `run_dir`."""
    argv = readme_argv(README_REPORT.replace("outputs/<name>/<time>", str(run_dir)))
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"[report] wrote {run_dir / 'report.html'}" in proc.stdout
    return run_dir / "report.html"


def _samples(run_dir: Path, step: int) -> list[dict]:
    lines = (run_dir / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class _Page(HTMLParser):
    """What the tests read from a page: tags, attributes, token texts per response, critiques."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.responses: list[str] = []  # concatenated token texts, one per response
        self.critiques: list[str] = []
        self.title = ""
        self._stack: list[str] = []
        self._in = ""  # "t" (a token span), "crit", "title" or ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = (a.get("class") or "").split()
        if tag == "div" and "resp" in cls:
            self.responses.append("")
        if tag == "span" and "t" in cls and "eos" not in cls:
            self._in = "t"
        elif tag == "pre" and "crit" in cls:
            self._in = "crit"
            self.critiques.append("")
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "pre", "title"):
            self._in = ""

    def handle_data(self, data: str) -> None:
        if self._in == "t":
            self.responses[-1] += data
        elif self._in == "crit":
            self.critiques[-1] += data
        elif self._in == "title":
            self.title += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _check_page(page: _Page, run_dir: Path) -> None:
    """Every response's tokens, in order, spell the response; every critique is shown."""
    shown = _samples(run_dir, 0) + _samples(run_dir, 5)
    assert page.responses == [s["response"] for s in shown]
    assert page.critiques == [c for s in shown for c in s["critiques"] if c is not None]
    assert page.title == "CAPO credit report: run-majority"
    assert not any(tag == "script" for tag, _ in page.tags)
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)


def test_samples_are_what_make_experience_writes(run_dir: Path):
    records = [ResponseRecord.from_json(d) for d in _samples(run_dir, 5)]
    assert [r.correct for r in records] == [True, True, False, False]
    # Strict majority of the 4 valid critiques of response 1 ({0,1}, {0}, {0,1}, {0}; index
    # 9 dropped): step 0 (4/4) yes, step 1 (2/4) no.
    assert records[1].step_weights == [1.0, 0.0, 0.0, 0.0]
    assert set(records[1].token_rewards) == {1.0, 2.0}
    assert set(records[3].token_rewards) == {0.0, -1.0}


def test_report_page_structure_without_a_browser(report: Path, run_dir: Path):
    text = report.read_text()
    _check_page(_parse(text), run_dir)
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "data:image/png;base64," in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # no external assets
    assert "1 unreadable lines skipped" in text
    # The vote table of response 1 at step 5: S0 flagged by 4/4, S1 by 2/4 (not a majority).
    assert '<tr class="flag"><td>S0</td><td>4/4</td><td>1</td></tr>' in text
    assert "<tr><td>S1</td><td>2/4</td><td>0</td></tr>" in text
    assert "flags S0 (1 out-of-range index dropped)" in text
    assert "not a critique the <code>wrong_step_list</code> parser reads" in text
    assert "judge failed (abstains)" in text


def test_model_text_is_escaped(report: Path):
    text = report.read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    assert "&lt;/pre&gt;&lt;script&gt;" in text  # inside a critique, too
    assert "<img src=x" not in text


def test_reward_colour_scale():
    assert reward_colour(2) == "#1a9850" and reward_colour(-1) == "#d73027"
    assert reward_colour(5) == reward_colour(2) and reward_colour(-3) == reward_colour(-1)
    assert reward_colour(0.5) == "#c9e2ab"  # halfway between the 0 and +1 colours


def test_step_selection(run_dir: Path, tmp_path: Path):
    run = shutil.copytree(run_dir, tmp_path / "copy")  # the shared page stays as it is
    with pytest.raises(FileNotFoundError, match="available"):
        build_report(run, steps=[3])
    text = build_report(run, steps=[5]).read_text()
    assert 'id="step-5"' in text and 'id="step-0"' not in text
    with pytest.raises(FileNotFoundError, match="neither"):
        build_report(tmp_path / "empty")


def test_grpo_run_and_empty_response(tok, tmp_path: Path):
    """Judge off (w_process = 0, no critiques) and a blank response render too."""
    cfg = RunConfig()
    cfg.capo.w_process = 0.0
    rows = [(GROUP[0][0], True, []), ("\n\n", False, [])]
    judged, correct = _judged(tok, rows, 0)
    logger = MetricsLogger(tmp_path, cfg)
    try:
        logger.write_samples(0, make_experience(judged, tok, correct, cfg.capo, 0).samples)
    finally:
        logger.close()
    text = build_report(tmp_path).read_text()
    assert text.count("no critiques (judge off: outcome reward only)") == 2
    assert "No training curves: metrics.jsonl is missing or has no figures." in text
    page = _parse(text)
    assert page.responses == [GROUP[0][0], "\n\n"]


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium to run the browser tests")
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=True)


def test_the_judge_prompts_parser_reads_the_critiques(tok, tmp_path: Path):
    """`critique_parser` (the judge prompt's) reads the critiques, in the experience and in
    the report: the group's critiques rewritten as JSON replies vote exactly as the CAPO
    ones do under the `json` parser, and are all invalid under CAPO's parser."""
    from capo_dist.rewards.critique import parse_critique

    def as_json(c: str | None) -> str | None:
        wrong = None if c is None else parse_critique(c, 9).wrong
        return c if wrong is None else f'Checked.\n```json\n{{"wrong_steps": {sorted(wrong)}}}\n```'

    cfg = RunConfig().capo
    judged, correct = _judged(tok, GROUP, 0)
    json_rows = [(r, ok, [as_json(c) for c in crits]) for r, ok, crits in GROUP]
    judged_json, _ = _judged(tok, json_rows, 0)
    capo = make_experience(judged, tok, correct, cfg, tok.pad_token_id)
    read = make_experience(judged_json, tok, correct, cfg, tok.pad_token_id, critique_parser="json")
    unread = make_experience(judged_json, tok, correct, cfg, tok.pad_token_id)
    assert [s["step_weights"] for s in read.samples] == [s["step_weights"] for s in capo.samples]
    assert any(any(s["step_weights"]) for s in read.samples)
    assert read.metrics["judge_invalid_rate"] == capo.metrics["judge_invalid_rate"] < 1
    assert unread.metrics["judge_invalid_rate"] == 1.0
    assert {s["critique_parser"] for s in read.samples} == {"json"}
    logger = MetricsLogger(tmp_path, RunConfig())
    try:
        logger.write_samples(0, read.samples)
    finally:
        logger.close()
    text = build_report(tmp_path).read_text()
    assert "critique 0: flags S0, S1" in text
    assert "not a critique the <code>json</code> parser reads" in text


def test_a_step_holding_one_problem_twice_is_refused_not_merged(tok):
    """Responses are grouped by problem uid: one group given twice would merge into one."""
    judged, correct = _judged(tok, GROUP, 0)
    with pytest.raises(ValueError, match="same problem uid twice"):
        make_experience(judged * 2, tok, correct * 2, RunConfig().capo, tok.pad_token_id)


def test_browser_dom_shows_tokens_and_critiques(report: Path, run_dir: Path, tmp_path: Path):
    dom = _chromium(["--dump-dom", report.as_uri()], tmp_path).stdout
    page = _parse(dom)
    _check_page(page, run_dir)  # the title is unchanged: no injected script ran
    assert 'class="outcome incorrect"' in dom


def test_browser_screenshot(report: Path, tmp_path: Path):
    shot = tmp_path / "report.png"
    _chromium(["--window-size=1400,1800", f"--screenshot={shot}", report.as_uri()], tmp_path)
    assert shot.stat().st_size > 20_000
    if os.environ.get("CAPO_REPORT_SCREENSHOT"):  # to look at it: CAPO_REPORT_SCREENSHOT=path
        shutil.copy(shot, os.environ["CAPO_REPORT_SCREENSHOT"])
