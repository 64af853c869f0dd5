"""Malformed generation steps. The wire refuses any "gen" meta that does not follow its schema,
at the sender and at the receiver. A rank answers a well-typed but inconsistent step with an
error message: the caches of other sequences are untouched, the failed sequences hold nothing,
and the next valid step computes exactly what it computes on a fresh rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastserve.graph as G
from fastserve.engine.core import RankCore
from fastserve.engine.wire import (MAX_ID, MAX_SEQS, MAX_TEXT, VERSION, Message, check_meta,
                                   decode, encode)
from fastserve.errors import WireError
from fastserve.graph.decode import KVCache, Sampling, sample
from fastserve.graph.module import build_reference
from wireframes import header_frames

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# --- the wire ----------------------------------------------------------------------------------

VALID = {"seqs": [[0, 0, 3], [5, 7, 1]], "free": [2, 3], "logits": "lm_head",
         "sample": [[0.0, 0, 1.0, 0], [0.7, 40, 0.9, 12345]]}


def send(meta: dict) -> Message:
    """Encode at the sender, decode at the receiver (from plain bytes)."""
    frames = encode("data", request=1, micro=2, tensors={"ids": torch.tensor([[1, 2, 3, 4]])},
                    meta=meta)
    return decode([bytes(memoryview(f)) for f in frames])


def receive_raw(meta) -> Message:
    """Decode a header written by hand: what a peer that skips encode()'s checks sends."""
    return decode(header_frames({"v": VERSION, "kind": "data", "req": 1, "mb": 0,
                                 "tensors": [], "meta": meta}))


def refused_both_ways(gen) -> None:
    with pytest.raises(WireError) as sent:
        encode("data", meta={"gen": gen})
    assert sent.value.reason == "meta"
    with pytest.raises(WireError) as got:
        receive_raw({"gen": gen})
    assert got.value.reason in ("meta", "header")  # (oversized lists: msgpack's own limit)


@pytest.mark.parametrize("gen", [
    {"seqs": []},
    {"seqs": [], "free": [4, 5]},
    VALID,
    {"seqs": [[0, 0, 1]], "sample": [[1, 3, 1, 0]]},  # ints where numbers are wanted
    {"seqs": [[MAX_ID, MAX_ID, MAX_ID]], "free": [MAX_ID]},
    {"seqs": [[-3, -1, 0]]},  # well-typed: the rank, not the wire, refuses its values
    {"seqs": [[0, 0, 1]], "logits": "x" * MAX_TEXT},
    {"seqs": [[i, i, 1] for i in range(MAX_SEQS)], "free": list(range(MAX_SEQS))},
])
def test_a_valid_gen_meta_round_trips(gen):
    meta = {"gen": gen, "timings": [{"rank": 0, "stage": 0, "recv": 1.0, "start": 1.0,
                                     "end": 2.0}]}
    msg = send(meta)
    assert msg.meta == meta and msg.tensors["ids"].tolist() == [[1, 2, 3, 4]]
    assert receive_raw(meta).meta == meta


MALFORMED = {
    "not a map": [[0, 0, 3]],
    "nil": None,
    "a string": "seqs",
    "missing seqs": {"free": [1]},
    "empty map": {},
    "unknown key": {"seqs": [], "junk": 1},
    "key in another case": {"Seqs": []},
    "seqs not a list": {"seqs": {"0": [0, 0, 3]}},
    "seqs a flat triple": {"seqs": [0, 0, 3]},
    "seq entry of 2": {"seqs": [[0, 0]]},
    "seq entry of 4": {"seqs": [[0, 0, 3, 1]]},
    "seq entry empty": {"seqs": [[]]},
    "seq entry a map": {"seqs": [{"seq": 0, "start": 0, "n": 3}]},
    "seq id a float": {"seqs": [[0.0, 0, 3]]},
    "seq id a string": {"seqs": [["0", 0, 3]]},
    "seq id nil": {"seqs": [[None, 0, 3]]},
    "start a float": {"seqs": [[0, 1.5, 3]]},
    "n a float": {"seqs": [[0, 0, 3.0]]},
    "n a bool": {"seqs": [[0, 0, True]]},
    "seq id a bool": {"seqs": [[False, 0, 3]]},
    "seq id past int64": {"seqs": [[MAX_ID + 1, 0, 3]]},
    "start below int64": {"seqs": [[0, -(1 << 63), 1]]},
    "too many seqs": {"seqs": [[i, 0, 1] for i in range(MAX_SEQS + 1)]},
    "free not a list": {"seqs": [], "free": 3},
    "free of floats": {"seqs": [], "free": [1.0]},
    "free of bools": {"seqs": [], "free": [True]},
    "free of strings": {"seqs": [], "free": ["1"]},
    "free too long": {"seqs": [], "free": list(range(MAX_SEQS + 1))},
    "logits not a string": {"seqs": [], "logits": 1},
    "logits nil": {"seqs": [], "logits": None},
    "logits too long": {"seqs": [], "logits": "x" * (MAX_TEXT + 1)},
    "sample not a list": {"seqs": [[0, 0, 1]], "sample": {"t": 1.0}},
    "sample flat": {"seqs": [[0, 0, 1]], "sample": [1.0, 0, 1.0, 0]},
    "sample entry of 3": {"seqs": [[0, 0, 1]], "sample": [[1.0, 0, 1.0]]},
    "sample entry of 5": {"seqs": [[0, 0, 1]], "sample": [[1.0, 0, 1.0, 0, 0]]},
    "sample temperature nan": {"seqs": [[0, 0, 1]], "sample": [[float("nan"), 0, 1.0, 0]]},
    "sample temperature inf": {"seqs": [[0, 0, 1]], "sample": [[float("inf"), 0, 1.0, 0]]},
    "sample temperature a string": {"seqs": [[0, 0, 1]], "sample": [["1", 0, 1.0, 0]]},
    "sample temperature a bool": {"seqs": [[0, 0, 1]], "sample": [[True, 0, 1.0, 0]]},
    "sample top_k a float": {"seqs": [[0, 0, 1]], "sample": [[1.0, 4.0, 1.0, 0]]},
    "sample top_k a bool": {"seqs": [[0, 0, 1]], "sample": [[1.0, True, 1.0, 0]]},
    "sample top_p nil": {"seqs": [[0, 0, 1]], "sample": [[1.0, 0, None, 0]]},
    "sample seed a float": {"seqs": [[0, 0, 1]], "sample": [[1.0, 0, 1.0, 7.0]]},
    "sample seed past int64": {"seqs": [[0, 0, 1]], "sample": [[1.0, 0, 1.0, 1 << 63]]},
    "sample too long": {"seqs": [], "sample": [[0.0, 0, 1.0, 0]] * (MAX_SEQS + 1)},
}


@pytest.mark.parametrize("gen", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_gen_meta_is_refused_by_sender_and_receiver(gen):
    refused_both_ways(gen)


def test_gen_is_refused_on_other_kinds_and_next_to_unknown_keys():
    with pytest.raises(WireError, match="unexpected key 'gen'"):
        encode("error", meta={"error": {"message": "x"}, "gen": {"seqs": []}})
    with pytest.raises(WireError, match="unexpected key 'step'"):
        encode("data", meta={"gen": {"seqs": []}, "step": 1})


@pytest.mark.parametrize("key", ["seqs", "free", "sample"])
def test_a_step_of_max_seqs_sent_is_received(key):
    gen = {"seqs": [[i, 0, 1] for i in range(MAX_SEQS)], "free": list(range(MAX_SEQS)),
           "sample": [[0.0, 0, 1.0, i] for i in range(MAX_SEQS)]}
    gen = {"seqs": gen["seqs"] if key != "free" else [], key: gen[key]}
    assert send({"gen": gen}).meta == {"gen": gen}


# any value msgpack carries, of the kinds a hostile peer would try
scalars = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.integers(-3, 3),
                    st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=10)


def _is_int64(x) -> bool:
    return type(x) is int and -MAX_ID <= x <= MAX_ID


def _is_number(x) -> bool:
    return _is_int64(x) or (type(x) is float and x == x and abs(x) != float("inf"))


def _check_by_oracle(gen: dict, valid: bool) -> None:
    if valid:
        assert send({"gen": gen}).meta == {"gen": gen}
        assert receive_raw({"gen": gen}).meta == {"gen": gen}
    else:
        refused_both_ways(gen)


@FUZZ
@given(seqs=st.lists(st.one_of(st.lists(scalars, max_size=4), scalars), max_size=4))
def test_fuzzed_seq_entries_are_accepted_exactly_when_int64_triples(seqs):
    valid = all(type(s) is list and len(s) == 3 and all(map(_is_int64, s)) for s in seqs)
    _check_by_oracle({"seqs": seqs}, valid)


@FUZZ
@given(sample=st.lists(st.one_of(st.lists(scalars, min_size=3, max_size=5), scalars),
                       max_size=3))
def test_fuzzed_sample_entries_are_accepted_exactly_when_well_typed(sample):
    valid = all(type(s) is list and len(s) == 4 and _is_number(s[0]) and _is_int64(s[1])
                and _is_number(s[2]) and _is_int64(s[3]) for s in sample)
    _check_by_oracle({"seqs": [], "sample": sample}, valid)


@FUZZ
@given(gen=st.one_of(values, st.dictionaries(
    st.sampled_from(["seqs", "free", "logits", "sample", "junk"]), values, max_size=5)))
def test_fuzzed_gen_maps_are_refused_or_follow_the_schema(gen):
    try:
        msg = receive_raw({"gen": gen})
    except WireError as e:
        assert e.reason in ("meta", "header")
        with pytest.raises(WireError):
            encode("data", meta={"gen": gen})
        return
    # accepted: a map with seqs and only known keys, which the sender accepts too
    assert type(gen) is dict and "seqs" in gen
    assert set(gen) <= {"seqs", "free", "logits", "sample"}
    check_meta("data", msg.meta)
    assert send(msg.meta).meta == msg.meta


# --- the rank ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    doc = yaml.safe_load(open(ROOT / "graphs/gpt2.yaml"))
    doc["params"].update(vocab=500, positions=64, d_model=64, n_heads=4, n_layers=2)
    return G.compile_graph(G.spec_from_dict(doc))


def new_core(graph, max_bytes: int = 1 << 30) -> RankCore:
    return RankCore(0, 0, build_reference(graph), cache=KVCache(max_bytes))


def step(core: RankCore, seqs, ids, logits: str | None = "lm_head", **gen) -> Message:
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids], dtype=torch.int64)
    meta = {"seqs": seqs, **gen}
    if logits is not None:
        meta["logits"] = logits
    return core.handle(Message("data", 1, 0, {"ids": ids}, {"gen": meta}))


HELD, PROMPT = 1, [5, 6, 7, 8]  # a sequence the core holds while the bad step comes


def probe(core: RankCore) -> tuple[int, torch.Tensor, torch.Tensor]:
    """What the core computes next: HELD's next greedy token, then HELD's logits one position
    on and a new sequence's prefill logits (the whole vocabulary: a wrong cache shows there
    even where the argmax does not)."""
    tok = step(core, [[HELD, 4, 1]], [9])
    held = step(core, [[HELD, 5, 1]], [int(tok.tensors["tokens"][0])], logits=None)
    new = step(core, [[40, 0, 3]], [11, 12, 13], logits=None)
    assert (tok.kind, held.kind, new.kind) == ("data",) * 3
    core.cache.free([40])
    return int(tok.tensors["tokens"][0]), held.tensors["lm_head"], new.tensors["lm_head"]


def holding(graph) -> RankCore:
    core = new_core(graph)
    assert step(core, [[HELD, 0, 4]], PROMPT).kind == "data"
    return core


@pytest.fixture(scope="module")
def expected(graph):
    return probe(holding(graph))


def assert_probe(core, expected):
    tok, held, new = probe(core)
    assert tok == expected[0]
    assert torch.equal(held, expected[1]) and torch.equal(new, expected[2])


def assert_error_message(reply: Message) -> dict:
    assert reply.kind == "error", reply
    err = reply.meta["error"]
    assert err["rank"] == 0 and err["stage"] == 0 and err["message"]
    back = decode([bytes(memoryview(f)) for f in encode(reply.kind, request=reply.request,
                                                        micro=reply.micro, meta=reply.meta)])
    assert back.meta == reply.meta  # a peer accepts it
    return err


def test_a_valid_step_samples_the_argmax_and_its_answer_goes_on_the_wire(graph):
    core = new_core(graph)
    out = step(core, [[0, 0, 3], [1, 0, 2]], [1, 2, 3, 40, 41])
    ref = step(new_core(graph), [[0, 0, 3], [1, 0, 2]], [1, 2, 3, 40, 41], logits=None)
    assert out.kind == "data" and out.tensors["tokens"].dtype == torch.int64
    assert out.tensors["tokens"].tolist() == ref.tensors["lm_head"][0, [2, 4]].argmax(-1).tolist()
    assert (core.cache.length(0), core.cache.length(1), len(core.cache)) == (3, 2, 2)
    back = decode([bytes(memoryview(f)) for f in encode(
        out.kind, request=out.request, micro=out.micro, tensors=out.tensors, meta=out.meta)])
    # the sampled answer does not carry the step back (the coordinator has it)
    assert set(back.meta) == {"timings"} and back.meta["timings"][0]["rank"] == 0
    # a stage that does not sample passes the step on, for the stages after it
    mid = step(new_core(graph), [[0, 0, 3]], [1, 2, 3], logits="not_this_shards")
    assert mid.kind == "data" and mid.meta["gen"]["seqs"] == [[0, 0, 3]]
    assert "lm_head" in mid.tensors


def test_seeded_sampling_at_the_rank_draws_at_the_position_of_the_new_token(graph):
    # near-uniform draws (temperature 100), so the seed and the position decide the token
    s = Sampling(100.0, 0, 1.0, 11)
    ref = step(new_core(graph), [[0, 0, 3]], [1, 2, 3], logits=None).tensors["lm_head"]
    want = [int(sample(ref[0, 2:3], [s], [pos])) for pos in range(3, 9)]
    assert len(set(want)) > 2  # (the check tells positions apart)
    alone = step(new_core(graph), [[0, 0, 3]], [1, 2, 3], sample=[s.to_wire()])
    assert int(alone.tensors["tokens"][0]) == want[0]
    # batched after another sequence and with other sampling: the same draw
    core = new_core(graph)
    both = step(core, [[5, 0, 2], [0, 0, 3]], [7, 8, 1, 2, 3],
                sample=[[0.0, 0, 1.0, 0], s.to_wire()])
    assert int(both.tensors["tokens"][1]) == want[0]


# each: the step's seqs, its ids (a list for (1, T), or a tensor), extra gen keys, and what the
# error says; the sequence ids in the step are not held by the core before it
DISTINCT = "distinct sequences, each with a position >= 0 and at least one token"
BAD_STEPS = {
    "duplicate seq ids": ([[3, 0, 2], [3, 2, 1]], [1, 2, 3], {}, DISTINCT),
    "duplicate seq ids, same position": ([[3, 0, 1], [3, 0, 1]], [1, 2], {}, DISTINCT),
    "negative start": ([[3, -1, 2]], [1, 2], {}, DISTINCT),
    "n = 0": ([[3, 0, 0]], [], {}, DISTINCT),
    "n = 0 next to a valid one": ([[3, 0, 2], [4, 0, 0]], [1, 2], {}, DISTINCT),
    "negative n": ([[3, 0, -1]], [1], {}, DISTINCT),
    "negative seq id": ([[-1, 0, 2]], [1, 2], {}, DISTINCT),
    "fewer ids than tokens": ([[3, 0, 3]], [1, 2], {}, "shape (1, 3, ...), got (1, 2)"),
    "more ids than tokens": ([[3, 0, 2]], [1, 2, 3], {}, "shape (1, 2, ...), got (1, 3)"),
    "ids for one of two seqs": ([[3, 0, 2], [4, 0, 2]], [1, 2], {}, "of 4 tokens needs"),
    "ids of rank 1": ([[3, 0, 3]], torch.tensor([1, 2, 3]), {}, "got (3,)"),
    "ids of rank 3": ([[3, 0, 3]], torch.tensor([[[1], [2], [3]]]), {}, "Error"),
    "ids of batch 2": ([[3, 0, 3]], torch.tensor([[1, 2, 3], [4, 5, 6]]), {}, "got (2, 3)"),
    "ids as floats": ([[3, 0, 3]], torch.tensor([[1.0, 2.0, 3.0]]), {}, "Error"),
    "token id past the vocabulary": ([[3, 0, 3]], [1, 500, 2], {}, "IndexError"),
    "negative token id": ([[3, 0, 3]], [1, -1, 2], {}, "IndexError"),
    "a new sequence not at position 0": ([[3, 2, 1]], [1], {},
                                         "sequence 3 steps at position 2 but node 'h.0' holds 0"),
    "a prompt past 64 positions": ([[3, 0, 65]], [1] * 65, {}, "position 64 is past the 64"),
    "a prompt past 64 next to a valid one": ([[4, 0, 2], [3, 0, 65]], [1] * 67, {},
                                             "position 64 is past the 64"),
    "a start at int64 max": ([[3, MAX_ID, 1]], [1], {}, "Error"),
    "sample list shorter": ([[3, 0, 2]], [1, 2], {"sample": []}, "samples 0 sequences, it has 1"),
    "sample list longer": ([[3, 0, 2]], [1, 2], {"sample": [[0.0, 0, 1.0, 0]] * 2},
                           "samples 2 sequences, it has 1"),
    "sample of 2 for 3 seqs": ([[3, 0, 1], [4, 0, 1], [5, 0, 1]], [1, 2, 3],
                               {"sample": [[0.0, 0, 1.0, 0]] * 2}, "samples 2 sequences"),
    "temperature -1": ([[3, 0, 2]], [1, 2], {"sample": [[-1.0, 0, 1.0, 0]]}, "temperature"),
    "temperature 1000": ([[3, 0, 2]], [1, 2], {"sample": [[1000.0, 0, 1.0, 0]]}, "temperature"),
    "top_p 0": ([[3, 0, 2]], [1, 2], {"sample": [[1.0, 0, 0.0, 0]]}, "top_p"),
    "top_p 2": ([[3, 0, 2]], [1, 2], {"sample": [[1.0, 0, 2.0, 0]]}, "top_p"),
    "top_k -1": ([[3, 0, 2]], [1, 2], {"sample": [[1.0, -1, 1.0, 0]]}, "top_k"),
    "seed -1": ([[3, 0, 2]], [1, 2], {"sample": [[1.0, 0, 1.0, -1]]}, "seed"),
    "a bad sampling among good ones": ([[3, 0, 1], [4, 0, 1]], [1, 2],
                                       {"sample": [[0.5, 0, 1.0, 0], [1.0, 0, 0.0, 0]]}, "top_p"),
    "a sample entry of 3": ([[3, 0, 2]], [1, 2], {"sample": [[1.0, 0, 1.0]]}, "sampling"),
}


@pytest.mark.parametrize("seqs, ids, gen, says", list(BAD_STEPS.values()), ids=list(BAD_STEPS))
def test_an_inconsistent_step_is_an_error_and_the_rank_goes_on(graph, expected, seqs, ids,
                                                                gen, says):
    core = holding(graph)
    before = core.cache.bytes
    assert before > 0
    assert says in assert_error_message(step(core, seqs, ids, **gen))["message"]
    assert core.stats.errors == 1 and core.stats.processed == 1
    # the held sequence is untouched; the failed ones hold nothing
    assert core.cache.bytes == before and len(core.cache) == 1
    assert core.cache.length(HELD) == len(PROMPT)
    assert all(core.cache.length(s[0]) == 0 for s in seqs)
    assert_probe(core, expected)


def test_an_unsampled_step_is_checked_the_same(graph, expected):
    core = holding(graph)
    before = core.cache.bytes
    assert_error_message(step(core, [[3, 0, 3]], [1, 2], logits=None))
    assert_error_message(step(core, [[3, 0, 1], [3, 1, 1]], [1, 2], logits=None))
    assert_error_message(step(core, [[3, 1, 1]], [1], logits="not-an-output"))
    assert core.cache.bytes == before and core.stats.errors == 3
    assert_probe(core, expected)


@pytest.mark.parametrize("start", [0, 2, 5])
def test_a_step_at_a_position_the_cache_does_not_hold_drops_that_sequence(graph, expected,
                                                                          start):
    # a replayed prefill (0), a replayed decode step (2), a step past a gap (5) of HELD, which
    # holds 4 positions: refused, and its cache is dropped so that it starts again at 0
    core = holding(graph)
    assert step(core, [[7, 0, 2]], [3, 4]).kind == "data"
    both = core.cache.bytes
    err = assert_error_message(step(core, [[HELD, start, 1]], [9]))
    assert err["node"] == "h.0" and f"steps at position {start}" in err["message"]
    assert core.cache.length(HELD) == 0 and core.cache.length(7) == 2
    assert core.cache.bytes == both // 2  # both had 16-position buffers: HELD's are gone
    assert step(core, [[HELD, 0, 4]], PROMPT).kind == "data"  # started again
    assert_probe(core, expected)


def test_a_failing_step_drops_every_sequence_of_it(graph, expected):
    # HELD's segment is fine and runs first; the new sequence's is refused at the same node
    core = holding(graph)
    err = assert_error_message(step(core, [[HELD, 4, 1], [3, 2, 1]], [9, 1]))
    assert "sequence 3 steps at position 2" in err["message"]
    assert (core.cache.bytes, len(core.cache)) == (0, 0)
    assert step(core, [[HELD, 0, 4]], PROMPT).kind == "data"
    assert_probe(core, expected)


INCONSISTENT_FOR_HELD = {
    "temperature -1": ([[HELD, 4, 1]], [9], {"sample": [[-1.0, 0, 1.0, 0]]}),
    "sample list longer": ([[HELD, 4, 1]], [9], {"sample": [[0.0, 0, 1.0, 0]] * 2}),
    "fewer ids than tokens": ([[HELD, 4, 2]], [9], {}),
    "duplicate seq ids": ([[HELD, 4, 1], [HELD, 5, 1]], [9, 10], {}),
}


@pytest.mark.parametrize("seqs, ids, gen", list(INCONSISTENT_FOR_HELD.values()),
                         ids=list(INCONSISTENT_FOR_HELD))
def test_a_refused_step_drops_its_held_sequences_too(graph, seqs, ids, gen):
    core = holding(graph)
    assert_error_message(step(core, seqs, ids, **gen))
    assert core.cache.length(HELD) == 0
    assert step(core, [[HELD, 0, 4]], PROMPT).kind == "data"


def test_a_kv_budget_too_small_is_an_error_and_holds_nothing(graph):
    core = new_core(graph, max_bytes=1000)
    err = assert_error_message(step(core, [[0, 0, 3]], [1, 2, 3]))
    assert err["node"] == "h.0" and "KVCacheFull" in err["message"]
    assert (core.cache.bytes, len(core.cache)) == (0, 0)
    err = assert_error_message(step(core, [[0, 0, 3]], [1, 2, 3]))  # the same again: not stuck
    assert "KVCacheFull" in err["message"] and core.cache.bytes == 0


def test_a_budget_for_one_sequence_refuses_the_second_and_keeps_the_first(graph, expected):
    # 2 attention nodes x 16 positions x (k + v) x 64 dims x 4 bytes: one short sequence
    core = new_core(graph, max_bytes=2 * 16 * 2 * 64 * 4)
    assert step(core, [[HELD, 0, 4]], PROMPT).kind == "data"
    assert core.cache.bytes == core.cache.max_bytes
    err = assert_error_message(step(core, [[3, 0, 2]], [1, 2]))
    assert "KVCacheFull" in err["message"]
    assert core.cache.bytes == core.cache.max_bytes and len(core.cache) == 1
    tok = step(core, [[HELD, 4, 1]], [9])
    assert int(tok.tensors["tokens"][0]) == expected[0]
    held = step(core, [[HELD, 5, 1]], [expected[0]], logits=None)
    assert torch.equal(held.tensors["lm_head"], expected[1])
    # past 16 positions the sequence outgrows the budget: an error, and it is dropped
    pos = 6
    while True:
        reply = step(core, [[HELD, pos, 1]], [1])
        if reply.kind == "error":
            break
        pos += 1
    assert pos == 16 and "KVCacheFull" in reply.meta["error"]["message"]
    assert (core.cache.bytes, len(core.cache)) == (0, 0)


def test_a_free_only_message_frees_and_passes_on(graph):
    core = holding(graph)
    assert step(core, [[7, 0, 2]], [3, 4]).kind == "data"
    both = core.cache.bytes
    out = step(core, [], [], free=[HELD, 99])  # an unknown id is no error
    assert out.kind == "data" and "gen" not in out.meta  # (the last stage: nothing after it)
    assert list(out.tensors) == ["tokens"] and out.tensors["tokens"].shape == (0,)
    assert out.tensors["tokens"].dtype == torch.int64 and len(out.meta["timings"]) == 1
    assert core.cache.bytes == both // 2 and core.cache.length(HELD) == 0
    assert core.cache.length(7) == 2
    # a stage that does not sample passes nothing on
    out = step(core, [], [], logits=None, free=[7])
    assert (out.kind, out.tensors) == ("data", {})
    assert out.meta["gen"]["free"] == [7]  # the stages after it drop theirs
    assert (core.cache.bytes, len(core.cache)) == (0, 0)
    assert core.stats.errors == 0


def test_free_applies_before_the_step_of_the_same_message(graph, expected):
    core = holding(graph)
    assert_error_message(step(core, [[HELD, 0, 4]], PROMPT))  # held: a replay
    core = holding(graph)
    assert step(core, [[HELD, 0, 4]], PROMPT, free=[HELD]).kind == "data"
    assert core.cache.length(HELD) == 4
    assert_probe(core, expected)


# a rank gets any well-typed step (anything the wire accepts): it answers, never raises, its
# answer goes on the wire, and once every sequence is freed it holds no byte
small_ints = st.integers(-2, 6)
sampling = st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 200.0]), min_size=1, max_size=1) \
    .flatmap(lambda t: st.tuples(st.just(t[0]), st.sampled_from([-1, 0, 1, 5]),
                                 st.sampled_from([0.0, 0.5, 1.0, 1.5]),
                                 st.sampled_from([-1, 0, 7]))).map(list)
steps = st.tuples(
    st.lists(st.tuples(st.integers(-1, 3), small_ints, st.integers(-1, 4)).map(list),
             max_size=3),
    st.booleans(),  # ids as many as the tokens, or any number
    st.lists(st.integers(-1, 501), max_size=8),
    st.one_of(st.none(), st.lists(sampling, max_size=3)),
    st.lists(st.integers(-1, 3), max_size=2),
    st.sampled_from(["lm_head", None]))


@settings(FUZZ, max_examples=80)
@given(plan=st.lists(steps, min_size=1, max_size=4))
def test_fuzzed_well_typed_steps_never_take_the_rank_down(graph, plan):
    core = new_core(graph)
    for seqs, match, ids, sample, free, logits in plan:
        tokens = sum(max(s[2], 0) for s in seqs)
        if match:
            ids = [(x % 500) for x in (ids * 8)[:tokens]] if ids else [1] * tokens
        gen = {"free": free, **({"sample": sample} if sample is not None else {})}
        held = {s[0]: core.cache.length(s[0]) for s in seqs}
        meta = {"gen": {"seqs": seqs, **gen, **({"logits": logits} if logits else {})}}
        check_meta("data", meta)  # well-typed: the wire would deliver it
        reply = step(core, seqs, ids, logits, **gen)
        assert reply.kind in ("data", "error")
        decode([bytes(memoryview(f)) for f in encode(
            reply.kind, request=reply.request, micro=reply.micro, tensors=reply.tensors,
            meta=reply.meta)])
        if reply.kind == "data":
            assert all(core.cache.length(s[0]) == s[1] + s[2] for s in seqs)
            if logits and seqs:
                assert reply.tensors["tokens"].shape == (len(seqs),)
                assert all(0 <= t < 500 for t in reply.tensors["tokens"].tolist())
        else:  # failed sequences hold nothing new: dropped, or as they were
            assert all(core.cache.length(s) in (0, n) for s, n in held.items() if s not in free)
    assert core.cache.bytes >= 0
    core.cache.free(range(-1, 4))
    assert (core.cache.bytes, len(core.cache)) == (0, 0)
