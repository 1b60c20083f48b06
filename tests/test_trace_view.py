from html.parser import HTMLParser

from nabla_lc import Result, Stats
from nabla_lc.engine.trace import PositionRecord
from nabla_lc.trace_view import render_trace, token_pieces


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> Collect:
    c = Collect()
    c.feed(page)
    return c


def test_trace_page_marks_every_probed_position(tiny_engine):
    config = tiny_engine.config.replace(entropy_threshold=0.0, grad_threshold=0.0, dto_steps=3, n=4)
    result = tiny_engine.generate([tiny_engine.request("What is 2 + 3?", seed=0)], config)[0]
    assert result.trace
    page = render_trace(result, tiny_engine.policy.decode, prompt="What is 2 + 3?")
    tags = parse(page).tags
    marked = {int(a["data-position"]): a["class"] for t, a in tags if t == "span" and "data-position" in a}
    visible = [r for r in result.trace if r.index < len(token_pieces(result.token_ids, tiny_engine.policy.decode))]
    assert set(marked) == {r.index for r in visible}
    for r in visible:
        expected = {True: "accepted", False: "rejected"}.get(r.accepted, "kept" if r.optimized else "pos")
        assert expected in marked[r.index].split()
    rows = [a for t, a in tags if t == "tr" and a.get("class")]
    assert len(rows) == len(result.trace)
    assert not any(t in ("script", "link", "img", "iframe") for t, _ in tags)


def test_model_text_is_escaped():
    evil = "<script>alert(1)</script>"
    ids = list(range(len(evil)))
    record = PositionRecord(3, 3, "<b>", 1.0, 9.0, optimized=True, proposed_token=4, proposed_text="<script>",
                            reward_current=0.1, reward_proposal=0.2, accepted=True, top_after=[("</table>", 0.5)])
    result = Result(evil, ids, "stop", Stats(), trace=[record])
    page = render_trace(result, lambda t: evil[: len(t)], prompt="<img src=x onerror=alert(1)>")
    assert "<script>" not in page and "<img" not in page and "</table>" not in page.split('<table id="positions">')[1].split("</tr>")[1]
    assert "&lt;script&gt;" in page
    assert not any(t in ("script", "img") for t, _ in parse(page).tags)


def test_token_pieces_rebuild_the_text(tokenizer):
    ids = tokenizer("12 + 30 = 42", add_special_tokens=False)["input_ids"]
    assert "".join(token_pieces(ids, tokenizer.decode)) == "12 + 30 = 42"
