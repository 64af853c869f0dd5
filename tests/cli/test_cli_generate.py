"""``fastserve generate`` and ``fastserve bench generate`` through the CLI boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastserve.cli.app import run_cli
from lms import ROOT, hf_gpt2, hf_greedy, prompts, small_gpt2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    spec, weights = small_gpt2(tmp_path_factory.mktemp("lm"))
    model = hf_gpt2(weights)
    return spec, [hf_greedy(model, p, 6) for p in prompts()[:2]]


def ids(prompt):
    return ",".join(map(str, prompt))


def test_generate_on_two_stages_checks_and_equals_transformers(lm, capsys):
    spec, expected = lm
    code = run_cli(["generate", spec, "--ids", ids(prompts()[0]), "--ids", ids(prompts()[1]),
                    "--max-tokens", "6", "--stages", "2", "--check", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert [r["tokens"] for r in doc["results"]] == expected
    assert doc["check"] == "tokens equal the in-process run"
    assert [r["end"] for r in doc["results"]] == ["length", "length"]
    assert "rank 1 ready" in out.err


def test_stream_prints_the_text_and_stop_strings_end_it(lm, capsys):
    spec, _ = lm
    # bytes in, bytes out: a vocabulary of 500 takes UTF-8 text
    assert run_cli(["generate", spec, "--prompt", "hello", "--max-tokens", "5", "--local",
                    "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first = doc["results"][0]
    assert first["prompt_tokens"] == 5 and len(first["tokens"]) == 5
    stop = first["text"][-1]  # a stop string seen in the text ends it just before
    assert run_cli(["generate", spec, "--prompt", "hello", "--max-tokens", "5", "--local",
                    "--stop", stop, "--json"]) == 0
    stopped = json.loads(capsys.readouterr().out)["results"][0]
    assert stopped["end"] == "stop" and stopped["text"] == first["text"][:first["text"].index(stop)]
    assert run_cli(["generate", spec, "--prompt", "hello", "--max-tokens", "3", "--local",
                    "--stream"]) == 0
    out = capsys.readouterr()
    assert "3 token(s)" in out.err and out.out.endswith("\n")


@pytest.mark.parametrize("args,code,words", [
    (["--ids", "1,x"], 2, "comma-separated integers"),
    (["--ids", "1", "--ids", "2", "--stream"], 2, "one prompt"),
    ([], 2, "give a prompt"),
    (["--ids", "600"], 1, "within [0, 500)"),
    (["--ids", "1", "--max-tokens", "100"], 1, "64 positions"),
    (["--ids", "1", "--tokenizer", "/nonexistent"], 2, "does not exist"),
    (["--ids", "1", "--top-p", "0"], 2, "top-p"),
])
def test_bad_requests_are_refused_clearly(lm, capsys, args, code, words):
    spec, _ = lm
    assert run_cli(["generate", spec, "--local", *args]) == code
    assert words in capsys.readouterr().err


def test_a_captured_gpt2_generates_on_ranks_as_transformers_does(capsys):
    """The shipped captured GPT-2 (source:) is rewritten with the op library's layers; its
    tokens through two ranks equal generate() of the eager model with the graph's weights,
    and the rewrite's weights are removed when the command ends."""
    import tempfile

    import fastserve.graph as G
    from fastserve.graph import zoo

    spec = str(ROOT / "graphs/gpt2-hf-tiny.yaml")
    source = G.load_spec(spec, trust_code=True).source
    model = G.seed_weights(zoo.hf_gpt2(**source.kwargs), 0)
    before = set(Path(tempfile.gettempdir()).glob("fastserve-lm-*"))
    code = run_cli(["generate", spec, "--trust-code", "--ids", ids(prompts()[0]),
                    "--max-tokens", "6", "--stages", "2", "--check", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "rewritten with the op library's layers" in out.err
    assert json.loads(out.out)["results"][0]["tokens"] == hf_greedy(model, prompts()[0], 6)
    assert set(Path(tempfile.gettempdir()).glob("fastserve-lm-*")) == before


def test_a_graph_that_is_not_a_language_model_is_named(capsys):
    assert run_cli(["generate", str(ROOT / "graphs/mlp.yaml"), "--ids", "1"]) == 2
    assert "not a language model" in capsys.readouterr().err


def test_bench_generate_prints_every_figure(lm, capsys):
    spec, _ = lm
    code = run_cli(["bench", "generate", spec, "--rounds", "1", "--requests", "6",
                    "--tokens", "4", "--seqs", "4", "--seconds", "20", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert doc["decode"]["ratio"] > 0 and doc["step"]["runtime_ms_per_stage"] is not None
    d = doc["decode"]  # the pipeline's ceiling: 2 stages x one process decoding 2 sequences
    assert d["pipeline_ceiling"] == pytest.approx(
        2 * d["one_process_micro_batch_tokens_per_s"] / d["one_process_tokens_per_s"])
    # two plain processes decoding 2 sequences each, side by side
    assert d["plain_ceiling"] == pytest.approx(
        d["plain_side_by_side_tokens_per_s"] / d["one_process_tokens_per_s"])
    assert d["ratio_of_plain"] == pytest.approx(
        d["pipeline_tokens_per_s"] / d["plain_side_by_side_tokens_per_s"])
    assert d["plain_side_by_side_tokens_per_s"] > 0
    assert doc["decode"]["decode_plan_tokens_per_s"] > 0  # the plan generate makes for decode
    assert doc["decode"]["decode_plan"].startswith("1 stage(s)")
    w = doc["workload"]  # the capacity is measured at the workload's 4 sequences per step
    assert w["load"] == 1.0 and w["capacity_tokens_per_s"] > 0
    assert w["capacity_tokens_per_s"] != doc["decode"]["pipeline_tokens_per_s"]
    for name in ("fcfs", "mlfq"):
        r = doc["schedulers"][name]
        assert r["finished"] + r["unfinished"] == 6 and r["finished"] > 0
        assert r["jct_mean_s"] > 0 and r["ttft_p50_ms"] > 0


def test_a_decode_profile_cuts_the_stages_and_the_tokens_stay_exact(lm, tmp_path, capsys):
    spec, expected = lm
    out = tmp_path / "decode.json"
    assert run_cli(["profile", spec, "--decode", "2", "--out", str(out)]) == 0
    assert "decode steps of 2 sequences" in capsys.readouterr().out
    assert json.loads(out.read_text())["phase"] == "decode"
    code = run_cli(["generate", spec, "--ids", ids(prompts()[0]), "--ids", ids(prompts()[1]),
                    "--max-tokens", "6", "--stages", "2", "--profile", str(out), "--json"])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert [r["tokens"] for r in json.loads(got.out)["results"]] == expected
    assert "stages cut by measured decode steps: wte.." in got.err
    # a decode profile planning whole batches is used, with a note
    assert run_cli(["plan", spec, "--stages", "2", "--profile", str(out)]) == 0
    assert "timed generation steps, and this plans whole batches" in capsys.readouterr().err


def test_the_cut_follows_the_profile_it_is_given(lm, tmp_path, capsys):
    spec, expected = lm
    out = tmp_path / "decode.json"
    assert run_cli(["profile", spec, "--decode", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    # a profile where the first block costs as much as all the rest: it is a stage alone
    rest = sum(doc["node_seconds"].values())
    doc["node_seconds"]["h.0"] = 10 * rest
    doc["node_times"]["h.0"] = [[1, 10 * rest]]
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    code = run_cli(["generate", spec, "--ids", ids(prompts()[0]), "--max-tokens", "6",
                    "--stages", "2", "--profile", str(out), "--json"])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert "stages cut by measured decode steps: wte..h.0 | h.1..lm_head" in got.err
    assert json.loads(got.out)["results"][0]["tokens"] == expected[0]


def test_a_profile_of_other_nodes_or_a_batch_shape_for_decode_is_refused(lm, tmp_path, capsys):
    spec, _ = lm
    assert run_cli(["profile", spec, "--decode", "2", "--dim", "seq=8", "--out",
                    str(tmp_path / "x.json")]) == 2
    assert "drop --dim with --decode" in capsys.readouterr().err
    other, _ = small_gpt2(tmp_path, layers=2)
    out = tmp_path / "other.json"
    assert run_cli(["profile", other, "--decode", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert run_cli(["generate", spec, "--ids", "1,2", "--max-tokens", "2", "--stages", "2",
                    "--profile", str(out)]) == 2
    assert "times other nodes than the graph" in capsys.readouterr().err
