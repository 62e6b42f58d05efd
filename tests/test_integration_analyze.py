"""`cqil analyze` on the real default model and text (SmolLM2-135M-Instruct, Shakespeare)."""

import json

import pytest
from conftest import run_cqil

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "report.json"
    result = run_cqil("--quiet", "analyze", "default", "--samples", "2", "--seq-len", "64",
                      "--window", "2", "--repeats", "2", "--json", out)
    assert result.code == 0, result.err
    return json.loads(out.read_text())


def test_default_model_has_thirty_layers(report):
    assert report["num_layers"] == 30
    assert report["model_name"] == "SmolLM2-135M-Instruct"


def test_middle_layers_are_quasi_independent_and_the_first_pair_is_not(report):
    sim = report["similarity"]
    middle = [sim[i][i + 1] for i in range(8, 22)]
    assert min(middle) > 0.9, middle
    assert sim[0][1] < 0.5 < min(middle)


def test_latencies_are_positive(report):
    latency = report["latency_ms"]
    assert all(t > 0 for t in latency["prefill"] + latency["decode"])
    assert latency["prefill_total"] > sum(latency["prefill"]) * 0.5


def test_sensitivity_covers_every_adjacent_pair(report):
    pairs = {tuple(g["layers"]) for g in report["groups"] if g["size"] == 2}
    assert pairs == {(i, i + 1) for i in range(29)}
    assert all(g["cost"] == g["local_error"] >= 0 for g in report["groups"])
