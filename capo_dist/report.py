"""The credit report of a run: where CAPO put reward, token by token, and why.

`python -m capo_dist.report RUN_DIR` reads the per-response records the trainer
writes to `RUN_DIR/samples/step_XXXXXX.jsonl` (`capo_dist.experience` makes them:
response text, step spans, each token's char span, token rewards and
advantages, the judge's raw critiques, the voted step weights) and renders
`RUN_DIR/report.html`:

* each response's tokens coloured by CAPO token reward on a diverging scale
  (+2 correct/clean, +1 correct/voted wrong, 0 incorrect/clean, -1
  incorrect/voted wrong; values in between, e.g. from the `average` vote, are
  interpolated), a marker where each step starts, and the token's index, step,
  reward and advantage on hover;
* the outcome (the extracted final answer against the gold answer);
* beside it the judge: how many valid critiques flagged each step, the voted
  weight, and every critique's text with the list parsed from it.

The page is one self-contained file (inline CSS, the curves as a data: URI, no
script): every text that came from a model or a dataset is HTML-escaped, as it
is untrusted. `RUN_DIR/metrics.jsonl` is plotted to `RUN_DIR/curves.png`
(reward_mean, accuracy with clean_correct, process_penalty_rate, and eval
pass@1 when the run logged it) and embedded at the top of the page.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capo_dist.rewards.answers import extract_answer
from capo_dist.rewards.critique_parsers import get_parser
from capo_dist.rewards.steps import token_steps

# Diverging colour scale anchored at the four CAPO rewards of DESIGN §1.4.
_SCALE: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-1.0, (215, 48, 39)),  # incorrect, voted-wrong step
    (0.0, (236, 236, 236)),  # incorrect, clean step
    (1.0, (166, 217, 106)),  # correct, voted-wrong step
    (2.0, (26, 152, 80)),  # correct, clean step
)
_LEGEND = (
    (2.0, "+2", "correct, clean step"),
    (1.0, "+1", "correct, voted-wrong step"),
    (0.0, "0", "incorrect, clean step"),
    (-1.0, "\u22121", "incorrect, voted-wrong step"),
)
_STEP_FILE_RE = re.compile(r"step_(\d+)\.jsonl$")
_CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward_mean", ("reward_mean",)),
    ("accuracy", ("accuracy", "clean_correct")),
    ("process_penalty_rate", ("process_penalty_rate",)),
)


@dataclass(frozen=True)
class ResponseRecord:
    """One response as the trainer wrote it (see `capo_dist.experience.Experience.samples`)."""

    uid: str
    group_index: int
    question: str
    gold: str
    response: str
    correct: bool
    steps: list[tuple[int, int]]
    token_offsets: list[tuple[int, int]]
    token_rewards: list[float]
    advantages: list[float]
    critiques: list[str | None]
    step_weights: list[float]
    vote: str
    critique_parser: str = "wrong_step_list"  # absent in samples written before judge.prompt

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ResponseRecord:
        """Build from one JSON line; ValueError/KeyError/TypeError if it is inconsistent."""
        rec = cls(
            uid=str(d["uid"]),
            group_index=int(d["group_index"]),
            question=str(d["question"]),
            gold=str(d["gold"]),
            response=str(d["response"]),
            correct=bool(d["correct"]),
            steps=[(int(s), int(e)) for s, e in d["steps"]],
            token_offsets=[(int(s), int(e)) for s, e in d["token_offsets"]],
            token_rewards=[float(x) for x in d["token_rewards"]],
            advantages=[float(x) for x in d["advantages"]],
            critiques=[None if c is None else str(c) for c in d["critiques"]],
            step_weights=[float(x) for x in d["step_weights"]],
            vote=str(d["vote"]),
            critique_parser=str(d.get("critique_parser", "wrong_step_list")),
        )
        n, end = len(rec.token_offsets), len(rec.response)
        if len(rec.token_rewards) != n or len(rec.advantages) != n:
            raise ValueError("token_offsets, token_rewards and advantages differ in length")
        if any(not 0 <= s <= e <= end for s, e in rec.token_offsets + rec.steps):
            raise ValueError("a span lies outside the response")
        if rec.steps and len(rec.step_weights) != len(rec.steps):
            raise ValueError("step_weights and steps differ in length")
        return rec


@dataclass
class StepSamples:
    """The records of one training step, and how many lines of its file were unusable."""

    step: int
    records: list[ResponseRecord]
    skipped: int


def read_step(path: Path, step: int) -> StepSamples:
    """Records of one `step_XXXXXX.jsonl` file; bad lines are skipped and counted."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(ResponseRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                skipped += 1
    return StepSamples(step=step, records=records, skipped=skipped)


def _pick_steps(available: list[int], steps: Sequence[int] | None, max_steps: int) -> list[int]:
    """The requested steps, else up to `max_steps` evenly spaced (first and last included)."""
    if steps is not None:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise FileNotFoundError(f"no samples for steps {missing}; available: {available}")
        return sorted(set(steps))
    if len(available) <= max_steps:
        return available
    idx = {round(i * (len(available) - 1) / (max_steps - 1)) for i in range(max_steps)}
    return [available[i] for i in sorted(idx)]


# ---------------------------------------------------------------- curves


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Plot the training curves of `metrics.jsonl` to `out_png` (None: nothing to plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    panels = [(t, [k for k in keys if any(k in r for r in rows)]) for t, keys in _CURVE_PANELS]
    eval_keys = sorted(
        {k for r in rows for k in r if k.startswith("eval/") and k.endswith("/pass@1")}
    )
    if eval_keys:
        panels.append(("eval pass@1", eval_keys))
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            pts = [
                (r.get("step", n), r[key])
                for n, r in enumerate(rows)
                if isinstance(r.get(key), (int, float))
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.savefig(out_png)
    return out_png


# ---------------------------------------------------------------- HTML


def reward_colour(r: float) -> str:
    """The background colour of a token of reward `r` (clamped to [-1, 2])."""
    r = min(max(r, _SCALE[0][0]), _SCALE[-1][0])
    for (x0, c0), (x1, c1) in zip(_SCALE, _SCALE[1:], strict=False):
        if r <= x1:
            t = (r - x0) / (x1 - x0)
            rgb = [round(a + t * (b - a)) for a, b in zip(c0, c1, strict=True)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#{:02x}{:02x}{:02x}".format(*_SCALE[-1][1])


def _ink(r: float) -> str:
    """Text colour readable on `reward_colour(r)`."""
    return "#fff" if r <= -0.6 or r >= 1.6 else "#111"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _tokens_html(rec: ResponseRecord) -> str:
    """The response as coloured token spans, with a marker where each step begins."""
    tok_step = token_steps(rec.token_offsets, rec.steps)
    weights = rec.step_weights
    out: list[str] = []
    pos, current = 0, None
    last = len(rec.token_offsets) - 1
    for i, ((s, e), r, a, k) in enumerate(
        zip(rec.token_offsets, rec.token_rewards, rec.advantages, tok_step, strict=True)
    ):
        if rec.steps and k != current:
            w = weights[k] if k < len(weights) else 0.0
            cls = "sb flag" if w > 0 else "sb"
            out.append(f'<span class="{cls}" title="step {k}, voted weight {w:g}">S{k}</span>')
            current = k
        if s > pos:  # characters no token covers (not expected): shown plain
            out.append(_e(rec.response[pos:s]))
        text = rec.response[s:e]
        if not text:
            if i != last:
                continue  # a zero-width token inside the text: its character is on a neighbour
            text, extra = "\u220e", " eos"  # the end token (EOS) has no text
        else:
            extra = ""
        title = f"token {i} · step {k} · reward {r:+.2f} · advantage {a:+.3f}"
        out.append(
            f'<span class="t{extra}" style="background:{reward_colour(r)};color:{_ink(r)}" '
            f'title="{_e(title)}">{_e(text)}</span>'
        )
        pos = max(pos, e)
    if pos < len(rec.response):
        out.append(_e(rec.response[pos:]))
    return "".join(out)


def _judge_html(rec: ResponseRecord) -> str:
    """Outcome, the vote per step, and every critique with the list parsed from it."""
    answer = extract_answer(rec.response)
    verdict = "correct" if rec.correct else "incorrect"
    mark = "\u2713" if rec.correct else "\u2717"
    parts = [
        f'<div class="outcome {verdict}">{mark} {verdict}</div>',
        f'<div class="ans">answer: <code>{_e(answer) if answer is not None else "(none)"}</code>'
        f" · gold: <code>{_e(rec.gold)}</code></div>",
    ]
    num_steps = len(rec.steps)
    parse = get_parser(rec.critique_parser)
    parsed = [parse(c, num_steps) for c in rec.critiques]
    valid = [p for p in parsed if p.wrong is not None]
    if not rec.critiques:
        parts.append('<div class="vote">no critiques (judge off: outcome reward only)</div>')
    else:
        parts.append(
            f'<div class="vote">vote: <b>{_e(rec.vote)}</b> over {len(valid)} valid of '
            f"{len(rec.critiques)} critiques"
            + (" — none valid: outcome reward only" if not valid else "")
            + "</div>"
        )
        rows = []
        for k in range(num_steps):
            n = sum(k in p.wrong for p in valid if p.wrong is not None)
            w = rec.step_weights[k] if k < len(rec.step_weights) else 0.0
            cls = ' class="flag"' if w > 0 else ""
            rows.append(f"<tr{cls}><td>S{k}</td><td>{n}/{len(valid)}</td><td>{w:g}</td></tr>")
        parts.append(
            '<table class="votes"><tr><th>step</th><th>flagged by</th><th>voted weight</th></tr>'
            + "".join(rows)
            + "</table>"
        )
    for n, (text, p) in enumerate(zip(rec.critiques, parsed, strict=True)):
        if text is None:
            head = "judge failed (abstains)"
        elif p.wrong is None:
            head = (
                f"not a critique the <code>{_e(rec.critique_parser)}</code> parser reads "
                "(invalid, abstains)"
            )
        else:
            head = "flags " + (", ".join(f"S{k}" for k in sorted(p.wrong)) or "nothing")
            if p.dropped:
                head += f" ({p.dropped} out-of-range index dropped)"
        body = f'<pre class="crit">{_e(text)}</pre>' if text is not None else ""
        parts.append(f'<div class="c"><div class="ch">critique {n}: {head}</div>{body}</div>')
    return "".join(parts)


def _response_html(rec: ResponseRecord) -> str:
    n = max(len(rec.token_rewards), 1)
    mean_r = sum(rec.token_rewards) / n
    flagged = {k for k, w in enumerate(rec.step_weights) if w > 0}
    in_flagged = sum(k in flagged for k in token_steps(rec.token_offsets, rec.steps))
    head = (
        f"response {rec.group_index} · {len(rec.token_rewards)} tokens · {len(rec.steps)} steps "
        f"({len(flagged)} voted wrong, {in_flagged} tokens in them) · mean reward {mean_r:+.2f}"
    )
    return (
        f'<div class="card"><div class="rh">{_e(head)}</div><div class="cols">'
        f'<div class="resp">{_tokens_html(rec)}</div>'
        f'<div class="judge">{_judge_html(rec)}</div></div></div>'
    )


def _step_html(ss: StepSamples) -> str:
    recs = ss.records
    acc = sum(r.correct for r in recs) / max(len(recs), 1)
    toks = sum(len(r.token_rewards) for r in recs)
    mean_r = sum(sum(r.token_rewards) for r in recs) / max(toks, 1)
    head = f"{len(recs)} responses · accuracy {100 * acc:.0f}% · mean token reward {mean_r:+.2f}"
    if ss.skipped:
        head += f" · {ss.skipped} unreadable lines skipped"
    groups: dict[str, list[ResponseRecord]] = {}
    for r in recs:
        groups.setdefault(r.uid, []).append(r)
    body = []
    for uid, group in groups.items():
        first = group[0]
        body.append(
            f'<div class="group"><div class="q"><span class="uid">{_e(uid)}</span> '
            f"{_e(first.question)}<div class='gold'>gold answer: <code>{_e(first.gold)}</code>"
            "</div></div>"
            + "".join(_response_html(r) for r in sorted(group, key=lambda r: r.group_index))
            + "</div>"
        )
    return (
        f'<section id="step-{ss.step}"><h2>Step {ss.step}</h2><p class="sum">{_e(head)}</p>'
        + "".join(body)
        + "</section>"
    )


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1500px;padding:16px 24px;color:#111;background:#fafafa}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:18px;border-bottom:2px solid #ccc;padding-bottom:2px}
.legend{display:flex;gap:14px;flex-wrap:wrap;align-items:center;margin:8px 0}
.sw{display:inline-block;min-width:2.2em;text-align:center;padding:1px 4px;border-radius:3px;
font-weight:600}
.bar{width:260px;height:14px;border-radius:3px;background:linear-gradient(90deg,@SCALE@)}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:14px 0;padding:10px}
.q{white-space:pre-wrap;background:#f1f4f8;padding:6px 8px;border-radius:4px}
.uid{font:12px monospace;color:#555;background:#dde3ea;padding:0 4px;border-radius:3px}
.gold{margin-top:4px;color:#333}
.card{border-top:1px dashed #ccc;margin-top:10px;padding-top:6px}
.rh{font-size:12px;color:#555;margin-bottom:4px}
.cols{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:14px}
.resp{font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word}
.t{border-radius:2px;padding:1px 0;box-shadow:inset -1px 0 0 rgba(255,255,255,.6)}.t.eos{padding:0 3px;margin-left:2px}
.sb{font:bold 10px system-ui,sans-serif;background:#555;color:#fff;border-radius:3px;
padding:0 3px;margin:0 3px 0 1px;vertical-align:1px;user-select:none}
.sb.flag{background:#b2182b}
.outcome{font-weight:700}.outcome.correct{color:#1a7f37}.outcome.incorrect{color:#b2182b}
.vote{margin:6px 0 4px}table.votes{border-collapse:collapse;font-size:12px;margin-bottom:6px}
.votes td,.votes th{border:1px solid #ddd;padding:1px 8px;text-align:center}
.votes tr.flag td{background:#fbe3e4;font-weight:600}
.c{margin-top:6px}.ch{font-size:12px;font-weight:600;color:#333}
pre.crit{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;border:1px solid #e2e2e2;
border-radius:4px;padding:4px 6px;margin:2px 0;max-height:11em;overflow:auto;font-size:12px}
img.curves{max-width:100%;border:1px solid #ddd;background:#fff}
code{background:#eee;padding:0 3px;border-radius:3px}
""".replace("@SCALE@", ",".join(f"rgb{c}" for _, c in _SCALE))


def render_html(
    run_name: str, steps: list[StepSamples], available: list[int], curves_png: Path | None
) -> str:
    """The whole report page (self-contained; every data text escaped)."""
    legend = "".join(
        f'<span><span class="sw" style="background:{reward_colour(v)};color:{_ink(v)}">'
        f"{label}</span> {_e(desc)}</span>"
        for v, label, desc in _LEGEND
    )
    curves = "<p>No training curves: metrics.jsonl is missing or has no figures.</p>"
    if curves_png is not None:
        data = base64.b64encode(curves_png.read_bytes()).decode("ascii")
        curves = f'<img class="curves" alt="training curves" src="data:image/png;base64,{data}">'
    shown = ", ".join(str(s.step) for s in steps)
    nav = " · ".join(f'<a href="#step-{s.step}">step {s.step}</a>' for s in steps)
    body = "".join(_step_html(s) for s in steps) or "<p>No samples were written for this run.</p>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>CAPO credit report: {_e(run_name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>CAPO credit report: {_e(run_name)}</h1>"
        f"<p>Steps with samples: {len(available)}; shown: {_e(shown) or 'none'}. {nav}</p>"
        '<div class="legend"><b>token reward</b>'
        f'<span class="bar" title="-1 … +2"></span>{legend}</div>'
        "<p>Hover a token for its index, step, reward and advantage. "
        '<span class="sb">S2</span> marks where step 2 starts, '
        '<span class="sb flag">S2</span> a voted-wrong one.</p>'
        f"{curves}{body}</body></html>"
    )


def build_report(
    run_dir: str | Path, steps: Sequence[int] | None = None, max_steps: int = 4
) -> Path:
    """Write `report.html` (and `curves.png` when there are metrics) into `run_dir`."""
    run = Path(run_dir)
    files = {
        int(m.group(1)): p
        for p in sorted((run / "samples").glob("step_*.jsonl"))
        if (m := _STEP_FILE_RE.search(p.name))
    }
    metrics = run / "metrics.jsonl"
    if not files and not metrics.exists():
        raise FileNotFoundError(f"{run} has neither samples/step_*.jsonl nor metrics.jsonl")
    available = sorted(files)
    chosen = _pick_steps(available, steps, max(max_steps, 1))
    curves = plot_curves(metrics, run / "curves.png") if metrics.exists() else None
    page = render_html(run.name, [read_step(files[s], s) for s in chosen], available, curves)
    out = run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """The CLI: `python -m capo_dist.report RUN_DIR [--steps 0,10] [--max-steps 4]`."""
    parser = argparse.ArgumentParser(
        prog="python -m capo_dist.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (has metrics.jsonl, samples/)")
    parser.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=None,
        help="comma-separated steps to show (default: up to --max-steps, evenly spaced)",
    )
    parser.add_argument("--max-steps", type=int, default=4)
    args = parser.parse_args(argv)
    out = build_report(args.run_dir, args.steps, args.max_steps)
    print(f"[report] wrote {out}")
    return out


if __name__ == "__main__":
    main()
