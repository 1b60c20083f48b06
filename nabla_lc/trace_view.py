"""A self-contained HTML page showing which tokens ∇-Reasoner revised (no scripts, fonts or network).

All model text is escaped: model output is untrusted.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Sequence

from .engine.trace import PositionRecord
from .engine.types import Result

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;padding:0 2rem;max-width:70rem;color:#1d1d1f;background:#fff}
h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:2rem}
.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace;line-height:2.1;border:1px solid #ddd;padding:1rem;border-radius:6px;background:#fafafa}
.tok{border-radius:3px;padding:2px 1px}
span.pos{outline:1px dashed #8a8a8a;outline-offset:-1px}
.kept{background:#ffeb99;box-shadow:inset 0 -2px #d4a800}
.accepted{background:#b3ecbf;box-shadow:inset 0 -2px #1e8e3e}
.rejected{background:#ffd0d0;box-shadow:inset 0 -2px #d93025}
.tok.accepted{font-weight:700}
.tok sup{font-family:system-ui,sans-serif;font-size:.6rem;font-weight:400;color:#555;margin-left:1px}
table{border-collapse:collapse;font-size:.85rem;margin-top:.5rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}
tr.kept td,tr.accepted td,tr.rejected td{box-shadow:none}
tr.kept td{background:#fff6cc}tr.accepted td{background:#d9f5df}tr.rejected td{background:#ffe5e5}
#positions td:nth-child(n+5){text-align:right;font-variant-numeric:tabular-nums}
#positions td:nth-child(7){text-align:left;font-weight:600}
#positions td:nth-child(4){max-width:22rem}
code{font-family:ui-monospace,Menlo,Consolas,'DejaVu Sans Mono',monospace;background:#0000000d;padding:0 2px;border-radius:2px}
.legend span{display:inline-block;margin-right:1rem;padding:0 .4rem;border-radius:3px}
#stats{display:block}
#stats tbody{display:grid;grid-template-columns:repeat(auto-fill,minmax(16rem,1fr));column-gap:1.5rem}
#stats tr{display:flex;border-bottom:1px solid #e5e5e5}
#stats th,#stats td{border:none;background:none}
#stats th{flex:1;font-weight:500;color:#444}
#stats td{text-align:right;font-variant-numeric:tabular-nums}
"""


_LABELS = {"accepted": "accepted", "rejected": "rejected", "kept": "kept", "pos": "probed only"}
"""What each status (also the CSS class) reads as on the page."""


def _status(record: PositionRecord) -> str:
    """The CSS class of a position: accepted, rejected, kept (optimized, same token) or pos (probed only)."""
    if record.accepted is True:
        return "accepted"
    if record.accepted is False:
        return "rejected"
    return "kept" if record.optimized else "pos"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _tok(text: str | None) -> str:
    return f"<code>{html.escape(repr(text)[1:-1])}</code>" if text is not None else "–"


def token_pieces(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Each token's share of the decoded text (incremental, so multi-token characters stay whole)."""
    pieces, previous = [], ""
    for i in range(len(token_ids)):
        text = decode(list(token_ids[: i + 1]))
        pieces.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return pieces


def render_trace(result: Result, decode: Callable[[list[int]], str], title: str = "∇-Reasoner trace", prompt: str | None = None) -> str:
    """The trace page of one result; ``decode`` turns token ids into text (the policy tokenizer's)."""
    records = {r.index: r for r in result.trace}
    pieces = token_pieces(result.token_ids, decode)
    spans, shown = [], 0
    for i, piece in enumerate(pieces):
        room = len(result.text) - shown
        if room <= 0:
            break
        piece = piece[:room]  # the text is cut at a stop string
        shown += len(piece)
        record = records.get(i)
        if record is None:
            spans.append(html.escape(piece))
            continue
        spans.append(
            f'<span class="tok {_status(record)}" id="p{i}" data-position="{i}" title="position {i}: {_LABELS[_status(record)]}">'
            f"{html.escape(piece)}<sup>{i}</sup></span>"
        )
    rows = []
    for r in result.trace:
        top = ", ".join(f"{_tok(t)} {p:.2f}" for t, p in r.top_after) or "–"
        rows.append(
            f'<tr class="{_status(r)}"><td><a href="#p{r.index}">{r.index}</a></td><td>{_tok(r.original_text)}</td><td>{_tok(r.proposed_text)}</td>'
            f"<td>{top}</td><td>{_fmt(r.reward_current)}</td><td>{_fmt(r.reward_proposal)}</td><td>{_LABELS[_status(r)]}</td>"
            f"<td>{r.steps}</td><td>{r.cache_hits}</td><td>{_fmt(r.entropy, 3)}</td><td>{_fmt(r.grad_norm, 3)}</td></tr>"
        )
    stats = result.stats.to_dict()
    stat_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in stats.items())
    prompt_block = f"<h2>Prompt</h2><div class='text'>{html.escape(prompt)}</div>" if prompt else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{prompt_block}
<h2>Response</h2>
<p class="legend"><span class="pos">probed, kept without DTO</span><span class="kept">optimized, same token</span>
<span class="accepted">proposal accepted</span><span class="rejected">proposal rejected</span></p>
<div class="text" id="response">{''.join(spans)}</div>
<p>answer: <code>{html.escape(_fmt(result.answer))}</code> · reward: {html.escape(_fmt(result.reward))} · finish: {html.escape(result.finish_reason)}</p>
<h2>Positions</h2>
<table id="positions"><tr><th>position</th><th>original</th><th>proposed</th><th>top after DTO (softmax(z̃/τ))</th>
<th>reward current</th><th>reward proposal</th><th>outcome</th><th>steps</th><th>cache hits</th><th>entropy</th><th>grad norm</th></tr>
{''.join(rows)}</table>
<h2>Statistics</h2>
<table id="stats">{stat_rows}</table>
</body></html>
"""


def write_trace(result: Result, decode: Callable[[list[int]], str], path: str | Path, **kw: Any) -> Path:
    """Write :func:`render_trace` to ``path``."""
    path = Path(path)
    path.write_text(render_trace(result, decode, **kw), encoding="utf-8")
    return path
