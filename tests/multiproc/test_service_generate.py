"""A generating service on real ranks: completions over HTTP (plain, streamed, chat) equal
transformers' greedy tokens; a rank killed mid-generation costs the stream nothing (no gap, no
duplicate); bad bodies get a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import replace

import httpx
import pytest

from fastserve.errors import ServiceError
from fastserve.generate import Sampling
from fastserve.service import Service, ServiceConfig
from fastserve.service.config import Generation, Limits
from fastserve.service.http import make_app
from lms import hf_gpt2, hf_greedy, prompts, small_gpt2

pytestmark = pytest.mark.timeout(120)
STEPS = 12


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    spec, weights = small_gpt2(tmp_path_factory.mktemp("lm"))
    model = hf_gpt2(weights)
    return spec, model


def config(spec: str) -> ServiceConfig:
    return ServiceConfig(spec=spec, stages=2, limits=Limits(max_body_bytes=4096),
                         generation=Generation(enabled=True, max_tokens=40, max_seqs=2))


@pytest.fixture(scope="module")
def svc(lm):
    service = Service(config(lm[0])).start()
    yield service
    service.stop(drain=False)


def call(svc, *requests):
    async def main():
        transport = httpx.ASGITransport(app=make_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await asyncio.gather(*[client.post(path, json=body)
                                          for path, body in requests])
    return asyncio.run(main())


def test_concurrent_completions_equal_transformers_greedy(svc, lm):
    _, model = lm
    expected = [hf_greedy(model, p, STEPS) for p in prompts()]
    answers = call(svc, *[("/v1/completions", {"prompt": p, "max_tokens": STEPS,
                                               "temperature": 0}) for p in prompts()])
    assert [a.status_code for a in answers] == [200] * 4
    docs = [a.json() for a in answers]
    assert [d["choices"][0]["token_ids"] for d in docs] == expected
    assert all(d["object"] == "text_completion" and d["choices"][0]["finish_reason"] == "length"
               and d["usage"]["completion_tokens"] == STEPS for d in docs)
    metrics = svc.metrics.render().decode()
    assert "fastserve_generation_tokens_total" in metrics
    assert "fastserve_time_to_first_token_seconds_count" in metrics


def test_a_stream_is_the_same_text_as_the_whole_answer(svc):
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0.7, "seed": 5}
    whole, streamed = call(svc, ("/v1/completions", body),
                           ("/v1/completions", {**body, "stream": True}))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in streamed.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert sum((c["token_ids"] for c in chunks), []) == whole.json()["choices"][0]["token_ids"]
    assert "".join(c["text"] for c in chunks) == whole.json()["choices"][0]["text"]
    assert [c["finish_reason"] for c in chunks][-1] == "length"


def test_chat_and_stop_strings(svc):
    chat, = call(svc, ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}))
    assert chat.status_code == 200, chat.text
    doc = chat.json()
    assert doc["object"] == "chat.completion"
    text = doc["choices"][0]["message"]["content"]
    assert len(doc["choices"][0]["token_ids"]) == 6 and text
    stop = text[-1]  # the text ends just before the first place the stop string appears
    cut, = call(svc, ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "stop": [stop]}))
    choice = cut.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == \
        text[:text.index(stop)]


def test_a_chat_stream_gives_the_role_first_then_the_whole_answer(svc):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole, streamed = call(svc, ("/v1/chat/completions", body),
                           ("/v1/chat/completions", {**body, "stream": True}))
    events = [e.removeprefix("data: ") for e in streamed.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    assert {d["object"] for d in docs} == {"chat.completion.chunk"}
    deltas = [d["choices"][0]["delta"] for d in docs]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    answer = whole.json()["choices"][0]
    assert "".join(d["content"] for d in deltas) == answer["message"]["content"]
    assert sum((d["choices"][0]["token_ids"] for d in docs), []) == answer["token_ids"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_over_the_limit_gets_413_and_the_service_keeps_serving(svc, path):
    big = {"prompt": "x" * 5000, "messages": [{"role": "user", "content": "x" * 5000}]}
    answer, = call(svc, (path, big))
    assert answer.status_code == 413 and "limits.max_body_bytes" in answer.json()["error"]
    ok, = call(svc, ("/v1/completions", {"prompt": "hi", "max_tokens": 2}))
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2


@pytest.mark.parametrize("body,words", [
    ({"prompt": []}, "'prompt'"),
    ({"prompt": "x", "max_tokens": 41}, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens'"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature'"),
    ({"prompt": "x", "top_p": 0}, "'top_p'"),
    ({"prompt": "x", "n": 2}, "'n' can only be 1"),
    ({"prompt": "x", "stop": ["a"] * 5}, "'stop'"),
    ({"prompt": "x", "stream": "yes"}, "'stream'"),
    ({"prompt": "x", "tools": []}, "unknown field(s) tools"),
    ({"prompt": [600]}, "within [0, 500)"),
    ({"prompt": [1] * 30, "max_tokens": 40}, "64 positions"),
    ([1, 2], "JSON object"),
])
def test_bad_completion_bodies_are_refused(svc, body, words):
    answer, = call(svc, ("/v1/completions", body))
    assert answer.status_code == 400 and words in answer.json()["error"]


def test_infer_is_not_served_by_a_generating_service(svc):
    answer, = call(svc, ("/v1/infer", {"inputs": {"ids": [[1, 2]]}}))
    assert answer.status_code == 404 and "/v1/completions" in answer.json()["error"]


def test_a_rank_killed_mid_generation_costs_the_stream_nothing(lm):
    spec, model = lm
    prompt = prompts()[1]
    expected = hf_greedy(model, prompt, 40)
    with Service(config(spec)) as svc:  # its own: the ranks it restarts belong to this test
        generate_through_a_killed_rank(svc, prompt, expected)


def generate_through_a_killed_rank(svc, prompt, expected, age_s: float = 0.0):
    """``age_s``: hold the replica that long before the kill, so that the completion is
    older than that when it goes back to the queue."""
    restarts = svc.status()["restarts"]
    tokens, ended = [], threading.Event()
    outcome = {}

    def sink(kind, value):
        if kind == "token":
            tokens.append(value)
            if len(tokens) == 5:  # from the replica's own thread: the next step finds it dead
                time.sleep(age_s)
                rep = next(r for r in svc.replicas if r.dep is not None)
                os.kill(rep.dep.ranks[1].process.pid, signal.SIGKILL)
        else:
            outcome[kind] = value
            ended.set()

    svc.complete(prompt, sink, max_tokens=40, sampling=Sampling())
    assert ended.wait(60)
    assert outcome == {"done": "length"}
    assert tokens == expected  # continued from the tokens already sent: no gap, no duplicate
    assert svc.status()["restarts"] == restarts + 1


def test_a_generation_older_than_its_deadline_resumes_after_a_killed_rank(lm):
    """The queue's deadline bounds the wait for a first replica: a generation handed back
    mid-stream waits for the next one from then, not from its admission."""
    spec, model = lm
    prompt = prompts()[1]
    cfg = replace(config(spec), limits=Limits(max_body_bytes=4096, deadline_s=4.0))
    with Service(cfg) as svc:
        generate_through_a_killed_rank(svc, prompt, hf_greedy(model, prompt, 40), age_s=4.5)


def test_a_completion_whose_caller_went_away_is_counted_cancelled_not_ok(svc):
    before = dict(svc.outcomes)
    ended = threading.Event()
    c = svc.complete(prompts()[0], lambda kind, value: kind != "token" and ended.set(),
                     max_tokens=40, sampling=Sampling())
    c.cancel(gone=True)
    assert ended.wait(30)
    assert svc.outcomes["cancelled"] == before.get("cancelled", 0) + 1
    assert svc.outcomes["ok"] == before.get("ok", 0)


def test_the_end_of_sequence_token_is_in_the_ids_not_in_the_text(lm, tmp_path):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    spec, model = lm
    # a prompt whose greedy tokens include, third or later, one not said before: the EOS
    prompt, greedy, eos = next((p, g, t) for p in [*prompts(), [5, 6, 7]]
                               for g in [hf_greedy(model, p, 6)]
                               for t in g if g.index(t) >= 2)
    vocab = {f"<{i}>": i for i in range(500)} | {"<unk>": 500}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{eos}>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    cfg = config(spec)
    cfg = replace(cfg, generation=replace(cfg.generation, tokenizer=str(tmp_path)))
    with Service(cfg) as service:
        answer, = call(service, ("/v1/completions", {"prompt": prompt, "max_tokens": 6,
                                                     "temperature": 0}))
    choice = answer.json()["choices"][0]
    ids = greedy[:greedy.index(eos) + 1]
    assert choice["token_ids"] == ids and choice["finish_reason"] == "stop"
    assert choice["text"] == "".join(f"<{t}>" for t in ids[:-1])


def test_admission_refuses_what_the_model_cannot_run(svc):
    with pytest.raises(ServiceError) as info:
        svc.complete([], lambda k, v: None)
    assert info.value.status == 400
