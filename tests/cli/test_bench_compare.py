"""``fastserve bench compare`` and ``bench request`` through the CLI boundary, on the small
MLP: every run they name is measured (torch.distributed.pipelining included), the FastServe runs
were checked against one process, and each ratio is the quotient of the figures it names."""

from __future__ import annotations

import json
import statistics

import pytest

from fastserve.cli.app import run_cli
from fastserve.engine.spin import SPIN_US
from fastserve.resources.inventory import machine_cores
from lms import ROOT

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # a benchmark command, as the README's: about 15 s
def test_bench_compare_measures_every_run_and_states_its_ratios(capsys):
    code = run_cli(["bench", "compare", str(ROOT / "graphs/mlp.yaml"), "--batch", "8",
                    "--micro-batches", "4", "--stream", "2", "--rounds", "2", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert "checking the deployments against one process" in out.err
    runs = {"one_process_1_thread", "one_process_2_threads", "fastserve_pipeline_2_stages",
            "fastserve_pipeline_2_stages_stream", "fastserve_2_replicas",
            "fastserve_2_replicas_stream", "torch_pipelining_2_stages",
            "2_plain_processes_side_by_side"}
    assert set(doc["seconds_per_batch"]) == runs
    assert doc["micro_batch_samples"] == 2 and sum(doc["cut"]) == 14 and len(doc["cut"]) == 2
    for name, seconds in doc["seconds_per_round"].items():
        assert len(seconds) == 2 and all(s > 0 for s in seconds), name
        assert doc["samples_per_s"][name] == pytest.approx(8 / statistics.median(seconds))
    # the MLP's results (80 bytes) are too small to be worth the ring: the socket takes them
    assert doc["results_through_ring"] == {"pipeline": 0.0, "replicas": 0.0}
    rate = doc["samples_per_s"]
    one = rate["one_process_1_thread"]
    assert doc["ratios"]["fastserve_2_replicas_stream / (2 x one 1-thread process)"] == \
        pytest.approx(rate["fastserve_2_replicas_stream"] / (2 * one))
    side = rate["2_plain_processes_side_by_side"]
    assert doc["ratios"]["2 plain processes side by side / (2 x one 1-thread process)"] == \
        pytest.approx(side / (2 * one))
    assert doc["ratios"]["fastserve_2_replicas_stream / 2 plain processes side by side"] == \
        pytest.approx(rate["fastserve_2_replicas_stream"] / side)
    assert doc["ratios"]["fastserve_pipeline_2_stages_stream / torch pipelining"] == \
        pytest.approx(rate["fastserve_pipeline_2_stages_stream"]
                      / rate["torch_pipelining_2_stages"])



@pytest.mark.slow  # a benchmark command, as the README's: about 11 s
def test_bench_request_states_the_overhead_in_raw_round_trips(capsys):
    code = run_cli(["bench", "request", str(ROOT / "graphs/mlp.yaml"), "--blocks", "2",
                    "--requests", "5", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    us = doc["microseconds"]
    assert set(us) == {"eager", "raw_rtt", "one_rank", "two_stages", "plain_one_process",
                       "plain_two_processes"}
    assert all(v > 0 for v in us.values())
    assert us["one_rank"] > us["raw_rtt"]  # a rank's round trip includes a raw one
    assert doc["one_rank_over_eager_in_raw_rtts"] == pytest.approx(
        (us["one_rank"] - us["eager"]) / us["raw_rtt"])
    assert doc["two_stages_over_plain"] == pytest.approx(
        us["two_stages"] / us["plain_two_processes"])
    # polling needs a core per rank thread
    cores = machine_cores()  # (what the deployment counts, a container quota included)
    assert doc["spin_us"] == {"one_rank": SPIN_US, "two_stages": SPIN_US if cores >= 2 else 0}


@pytest.mark.parametrize("command", ["compare", "pipeline"])
def test_a_spec_that_runs_code_needs_trust_before_anything_starts(capsys, command):
    code = run_cli(["bench", command, str(ROOT / "graphs/gpt2-hf-tiny.yaml")])
    err = capsys.readouterr().err
    assert code != 0 and "--trust-code" in err and "Traceback" not in err


@pytest.mark.slow  # a benchmark command, as the README's: about 12 s
def test_bench_transport_measures_fastserve_and_a_plain_codec_against_raw(capsys):
    code = run_cli(["bench", "transport", "--transport", "ipc", "--blocks", "1", "--spin-us",
                    "500", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert [r["size"] for r in rows] == ["4KiB", "64KiB", "1MiB", "16MiB"]
    for r in rows:
        assert r["plain_ratio"] == pytest.approx(r["plain_rtt_us"] / r["raw_rtt_us"])
        assert r["overhead_ratio"] == pytest.approx(r["fastserve_rtt_us"] / r["raw_rtt_us"])
        # the polling peers: the same hop as a deployment waits for it
        assert r["spin_us"] == 500
        assert r["polling_over_raw"] == pytest.approx(r["fastserve_polling_rtt_us"]
                                                      / r["raw_rtt_us"])
        assert r["polling_over_raw_polling"] == pytest.approx(
            r["fastserve_polling_rtt_us"] / r["raw_polling_rtt_us"])
    # without a window, no polling peers; the table says what it measured
    assert run_cli(["bench", "transport", "--transport", "ipc", "--blocks", "1", "--spin-us",
                    "0", "--json"]) == 0
    assert all("fastserve_polling_rtt_us" not in r and r["spin_us"] == 0
               for r in json.loads(capsys.readouterr().out))
    assert run_cli(["bench", "transport", "--spin-us", "-1"]) != 0
    assert "--spin-us" in capsys.readouterr().err


@pytest.mark.slow  # a benchmark command: three agents and two 3-stage deployments, about 40 s
def test_bench_hosts_measures_hops_with_and_without_polling(capsys):
    code = run_cli(["bench", "hosts", "--batch", "2", "--seq", "8", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert doc["exact"] is True and [h["size"] for h in doc["hops"]] == ["4KiB", "16MiB"]
    cores = machine_cores()  # (what the deployment counts, a container quota included)
    for h in doc["hops"]:
        assert h["vs_raw"] == pytest.approx(h["fastserve_rtt_us"] / h["raw_rtt_us"])
        assert h["spin_us"] == (SPIN_US if cores >= 2 else 0)
        if h["spin_us"]:
            assert h["polling_vs_raw"] == pytest.approx(h["fastserve_polling_rtt_us"]
                                                        / h["raw_rtt_us"])
            assert h["polling_vs_raw_polling"] == pytest.approx(
                h["fastserve_polling_rtt_us"] / h["raw_polling_rtt_us"])
