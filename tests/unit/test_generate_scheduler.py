"""The generation schedulers as pure functions of the queue (FCFS, skip-join MLFQ), the KV
cache's ordering and byte budget, and sampling: exact values, no process, no model."""

from __future__ import annotations

import pytest
import torch

from fastserve.generate.scheduler import FCFS, MLFQ, Costs, Pick, SeqState, scheduler
from fastserve.graph.decode import GenerationError, KVCache, KVCacheFull, Sampling, sample

# binary fractions, so that every quantum and prefill cost below is exact:
# quantum_s(level) = 0.25 * 4 * 2**level = 1, 2, 4, 8, 16, 32 seconds; a prompt token 0.5 s
COSTS = Costs(step_s=0.25, token_s=0.5)


def seq(id, arrival=0.0, prompt=4, max_tokens=4, **kw) -> SeqState:
    kw.setdefault("last_run", arrival)
    return SeqState(id, arrival, prompt, max_tokens, **kw)


# --- FCFS --------------------------------------------------------------------------------------


def test_fcfs_runs_in_arrival_order_ties_by_id():
    seqs = [seq(0, 3.0), seq(1, 1.0), seq(2, 2.0), seq(3, 1.0)]
    assert FCFS().pick(seqs, 8, 1000, 10.0, COSTS) == Pick([1, 3, 2, 0], [])


def test_fcfs_caps_a_step_at_max_seqs():
    seqs = [seq(i, float(5 - i)) for i in range(5)]
    assert FCFS().pick(seqs, 2, 1000, 10.0, COSTS).run == [4, 3]
    assert FCFS().pick(seqs, 1, 1000, 10.0, COSTS).run == [4]


def test_fcfs_reserves_prompt_plus_whole_output():
    f = FCFS()
    assert f.reserve(seq(0, prompt=5, max_tokens=10, generated=3, cached=7)) == 15
    seqs = [seq(i, float(i), prompt=5, max_tokens=10) for i in range(3)]
    assert f.pick(seqs, 8, 30, 10.0, COSTS).run == [0, 1]  # exactly 30: fits
    assert f.pick(seqs, 8, 29, 10.0, COSTS).run == [0]
    assert f.pick(seqs, 8, 14, 10.0, COSTS).run == []


def test_fcfs_head_of_line_blocks_a_smaller_later_job():
    head = seq(0, 0.0, prompt=15, max_tokens=5)  # needs 20
    small = seq(1, 1.0, prompt=1, max_tokens=1)  # needs 2: would fit
    assert FCFS().pick([small, head], 8, 10, 10.0, COSTS) == Pick([], [])
    # what running sequences reserve counts too
    running = seq(2, -1.0, prompt=4, max_tokens=4, cached=5, generated=1)  # reserves 8
    assert FCFS().pick([running, small, head], 8, 27, 10.0, COSTS).run == [2]
    assert FCFS().pick([running, small, head], 8, 28, 10.0, COSTS).run == [2, 0]
    assert FCFS().pick([running, small, head], 8, 30, 10.0, COSTS).run == [2, 0, 1]


def test_fcfs_skips_in_flight_sequences_but_counts_their_reservation():
    flying = seq(0, 0.0, prompt=5, max_tokens=5, in_flight=True)  # reserves 10
    new = seq(1, 1.0, prompt=5, max_tokens=5)
    assert FCFS().pick([flying, new], 8, 19, 10.0, COSTS) == Pick([], [])
    assert FCFS().pick([flying, new], 8, 20, 10.0, COSTS) == Pick([1], [])
    # a cached sequence already holds its reservation: it runs without another
    cached = seq(2, 0.5, prompt=5, max_tokens=5, cached=5, generated=1)
    assert FCFS().pick([flying, cached], 8, 20, 10.0, COSTS).run == [2]


def test_fcfs_never_changes_levels():
    f = FCFS()
    s = seq(0, prompt=10_000, level=0, attained=1.5)
    assert f.join(s, COSTS) == 0
    assert f.account(s, 100.0, COSTS) == (0, 101.5)


# --- MLFQ --------------------------------------------------------------------------------------


def test_mlfq_quanta_double_per_level():
    m = MLFQ()
    assert [m.quantum_s(i, COSTS) for i in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert MLFQ(quantum=2.0).quantum_s(3, Costs(0.5, 1.0)) == 8.0


@pytest.mark.parametrize("prompt, level", [
    (1, 0), (2, 0),  # 1.0 s of prefill: level 0's quantum covers it exactly
    (3, 1), (4, 1),  # 1.5, 2.0
    (5, 2), (8, 2),  # 2.5, 4.0
    (9, 3), (16, 3), (17, 4), (64, 5),
    (10_000, 5),  # beyond every quantum: the last level
])
def test_mlfq_skip_joins_the_first_level_whose_quantum_covers_the_prefill(prompt, level):
    assert MLFQ().join(seq(0, prompt=prompt), COSTS) == level


def test_mlfq_join_follows_the_measured_costs():
    s = seq(0, prompt=100)
    assert MLFQ().join(s, Costs(step_s=0.25, token_s=0.01)) == 0  # 1.0 s
    assert MLFQ().join(s, Costs(step_s=0.25, token_s=0.05)) == 3  # 5.0 s
    assert MLFQ(levels=3).join(s, Costs(step_s=0.25, token_s=0.05)) == 2


def test_mlfq_demotes_when_the_quantum_is_used():
    m = MLFQ()
    s = seq(0, level=1, attained=1.0)  # level 1's quantum: 2.0 s
    assert m.account(s, 0.5, COSTS) == (1, 1.5)
    assert m.account(s, 1.0, COSTS) == (2, 0.0)  # exactly used
    assert m.account(s, 7.0, COSTS) == (2, 0.0)  # one level at a time
    last = seq(1, level=5, attained=31.0)
    assert m.account(last, 5.0, COSTS) == (5, 36.0)  # the last level keeps its jobs
    assert MLFQ(levels=2).account(seq(2, level=1, attained=0.0), 9.0, COSTS) == (1, 9.0)


def test_mlfq_a_higher_level_preempts_a_lower_one():
    long = seq(0, 0.0, prompt=4, level=2, cached=10, generated=6)
    new = seq(1, 3.0, prompt=4, level=0)
    mid = seq(2, 1.0, prompt=4, level=1, cached=5, generated=1)
    m = MLFQ()
    assert m.pick([long, new, mid], 8, 1000, 3.0, COSTS) == Pick([1, 2, 0], [])
    assert m.pick([long, new, mid], 1, 1000, 3.0, COSTS) == Pick([1], [])
    # within a level: arrival order, then id
    twin = seq(3, 3.0, prompt=4, level=0)
    assert m.pick([twin, long, new], 2, 1000, 3.0, COSTS).run == [1, 3]


def test_mlfq_starvation_guard_runs_a_long_waiting_job_as_level_zero():
    m = MLFQ(starve_s=5.0)
    starved = seq(0, 0.0, level=4, cached=5, generated=1, last_run=5.0)
    fresh = seq(1, 9.0, level=1, last_run=9.0)
    assert m.priority(starved, 10.0) == (0, 0.0, 0)  # waited exactly starve_s
    assert m.pick([fresh, starved], 1, 1000, 10.0, COSTS).run == [0]
    assert m.priority(starved, 9.5) == (4, 0.0, 0)
    assert m.pick([fresh, starved], 1, 1000, 9.5, COSTS).run == [1]


def test_mlfq_reserves_what_the_cache_holds():
    m = MLFQ()
    assert m.reserve(seq(0, prompt=5, generated=3, cached=7)) == 7
    assert m.reserve(seq(0, prompt=5, generated=3)) == 8  # a prefill of prompt + tokens so far


def test_mlfq_evicts_the_lowest_priority_cache_and_does_not_also_run_it():
    low = seq(0, 0.0, prompt=5, level=3, cached=10, generated=6)
    mid = seq(1, 1.0, prompt=5, level=1, cached=6, generated=2)
    new = seq(2, 2.0, prompt=8, level=0)  # needs 8; 16 are held of 20
    # after the eviction `low` would fit its one new position: it must still not run
    assert MLFQ().pick([low, mid, new], 8, 20, 2.0, COSTS) == Pick([2, 1], [0])
    # room enough: nobody is evicted
    assert MLFQ().pick([low, mid, new], 8, 27, 2.0, COSTS) == Pick([2, 1, 0], [])


def test_mlfq_evicts_lowest_first_and_only_as_many_as_needed():
    v4 = seq(0, 0.0, prompt=4, level=4, cached=5, generated=1)
    v3 = seq(1, 0.0, prompt=4, level=3, cached=5, generated=1)
    v2 = seq(2, 0.0, prompt=4, level=2, cached=5, generated=1)
    new = seq(3, 1.0, prompt=12, level=0)  # 15 held of 20; needs 12: two must go
    assert MLFQ().pick([v2, v3, v4, new], 8, 20, 1.0, COSTS) == Pick([3, 2], [0, 1])


def test_mlfq_never_evicts_a_job_of_higher_priority_than_the_one_admitted():
    high = seq(0, 0.0, prompt=10, level=0, cached=15, generated=6)  # cannot add its 16th
    low = seq(1, 1.0, prompt=3, level=2)
    assert MLFQ().pick([high, low], 8, 15, 1.0, COSTS) == Pick([], [])
    # the same level: the earlier arrival has the priority
    early = seq(0, 0.0, prompt=10, level=2, cached=15, generated=6)
    assert MLFQ().pick([early, low], 8, 15, 1.0, COSTS) == Pick([], [])
    # while a job of its level that arrived after it may be evicted for it
    late = seq(0, 2.0, prompt=10, level=2, cached=15, generated=6)
    assert MLFQ().pick([late, low], 8, 15, 2.0, COSTS) == Pick([1], [0])


def test_mlfq_skips_in_flight_sequences_but_counts_their_cache():
    flying = seq(0, 0.0, prompt=10, level=0, in_flight=True)  # a prefill of 10 in flight
    new = seq(1, 1.0, prompt=5, level=0)
    assert MLFQ().pick([flying, new], 8, 14, 1.0, COSTS) == Pick([], [])
    assert MLFQ().pick([flying, new], 8, 15, 1.0, COSTS) == Pick([1], [])


def test_mlfq_a_job_that_does_not_fit_lets_a_smaller_one_behind_it_run():
    big = seq(0, 0.0, prompt=30, level=0)
    small = seq(1, 1.0, prompt=3, level=0)
    assert MLFQ().pick([big, small], 8, 10, 1.0, COSTS) == Pick([1], [])


def test_mlfq_counts_the_position_an_in_flight_decode_step_adds():
    # `flying` holds 5 positions and its in-flight step adds a 6th; 6 + 5 > 10
    flying = seq(0, 0.0, prompt=5, level=0, generated=1, cached=5, in_flight=True)
    new = seq(1, 1.0, prompt=5, level=0)
    assert MLFQ().pick([flying, new], 8, 10, 1.0, COSTS).run == []


def test_mlfq_does_not_evict_when_the_eviction_cannot_make_room():
    flying = seq(0, 0.0, prompt=8, level=0, in_flight=True)  # 8 of 10, not evictable
    victim = seq(1, 0.5, prompt=1, level=3, cached=1, generated=1)
    new = seq(2, 1.0, prompt=5, level=0)  # needs 5: cannot fit before `flying` is done
    assert MLFQ().pick([flying, victim, new], 8, 10, 1.0, COSTS).evict == []


def test_schedulers_by_name():
    assert type(scheduler("fcfs")) is FCFS and type(scheduler("mlfq")) is MLFQ
    with pytest.raises(ValueError, match="unknown scheduler 'lifo'"):
        scheduler("lifo")


# --- KVCache -----------------------------------------------------------------------------------


def kv(n: int, fill: float = 1.0, heads: int = 2, hd: int = 4) -> torch.Tensor:
    return torch.full((heads, n, hd), fill)


def test_kv_cache_appends_in_order_and_counts_its_bytes():
    c = KVCache()
    k, v = c.extend(7, "a", 0, kv(3, 1.0), kv(3, -1.0))
    # a first buffer of 16 positions: k and v, 2 heads x 4 dims x 4 bytes each
    assert c.bytes == 2 * 16 * 2 * 4 * 4 == 1024
    assert k.shape == (2, 3, 4) and torch.equal(v, kv(3, -1.0))
    k, v = c.extend(7, "a", 3, kv(13, 2.0), kv(13, -2.0))
    assert c.bytes == 1024 and c.length(7) == 16  # filled, not grown
    k, v = c.extend(7, "a", 16, kv(1, 3.0), kv(1, -3.0))
    assert c.bytes == 2048  # doubled to 32 positions
    assert torch.equal(k, torch.cat([kv(3, 1.0), kv(13, 2.0), kv(1, 3.0)], 1))
    assert torch.equal(v, torch.cat([kv(3, -1.0), kv(13, -2.0), kv(1, -3.0)], 1))
    c.extend(7, "b", 0, kv(40), kv(40))  # a second node: its own buffers, sized to fit
    assert c.bytes == 2048 + 2 * 40 * 2 * 4 * 4
    c.extend(8, "a", 0, kv(1), kv(1))
    assert (len(c), c.length(7), c.length(8), c.tokens()) == (2, 40, 1, 41)
    c.free([7, 99])
    assert (len(c), c.bytes, c.length(7)) == (1, 1024, 0)
    c.free([8])
    assert (len(c), c.bytes, c.tokens()) == (0, 0, 0)


@pytest.mark.parametrize("start", [1, 2, 5])
def test_kv_cache_refuses_a_step_after_a_gap(start):
    c = KVCache()
    c.extend(0, "a", 0, kv(2), kv(2))
    with pytest.raises(GenerationError, match=f"position {2 + start} but node 'a' holds 2"):
        c.extend(0, "a", 2 + start, kv(1), kv(1))
    assert (c.length(0), c.bytes) == (2, 1024)


@pytest.mark.parametrize("start", [0, 1])
def test_kv_cache_refuses_a_replayed_step(start):
    c = KVCache()
    c.extend(0, "a", 0, kv(2), kv(2))
    with pytest.raises(GenerationError, match="holds 2 positions"):
        c.extend(0, "a", start, kv(1, 9.0), kv(1, 9.0))
    k, _ = c.extend(0, "a", 2, kv(1), kv(1))
    assert torch.equal(k, kv(3))  # the refused step wrote nothing


def test_kv_cache_refuses_a_new_sequence_that_does_not_start_at_zero():
    c = KVCache()
    with pytest.raises(GenerationError, match="position 3 but node 'x' holds 0"):
        c.extend(4, "x", 3, kv(1), kv(1))
    assert c.bytes == 0 and c.length(4) == 0


def test_a_refused_first_step_leaves_no_sequence_behind():
    c = KVCache()
    with pytest.raises(GenerationError):
        c.extend(4, "x", 3, kv(1), kv(1))
    assert len(c) == 0


def test_kv_cache_keeps_its_byte_budget():
    c = KVCache(max_bytes=1024)
    c.extend(0, "a", 0, kv(16), kv(16))
    assert c.bytes == 1024
    with pytest.raises(KVCacheFull, match="past its 1024 bytes"):
        c.extend(0, "a", 16, kv(1), kv(1))  # would double to 2048
    with pytest.raises(KVCacheFull):
        c.extend(1, "a", 0, kv(1), kv(1))  # a second sequence: no room either
    assert (c.bytes, len(c), c.length(0), c.length(1)) == (1024, 1, 16, 0)
    c.free([0])
    assert (c.bytes, len(c)) == (0, 0)
    c.extend(1, "a", 0, kv(1), kv(1))  # the freed bytes are usable again
    assert c.bytes == 1024
    tiny = KVCache(max_bytes=1023)
    with pytest.raises(KVCacheFull):
        tiny.extend(0, "a", 0, kv(1), kv(1))
    assert (tiny.bytes, len(tiny)) == (0, 0)


# --- sampling ----------------------------------------------------------------------------------


def logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_the_argmax():
    x = logits()
    got = sample(x, [Sampling()] * 3, [0, 1, 2])
    assert got.dtype == torch.int64 and got.shape == (3,)
    assert got.tolist() == x.argmax(-1).tolist()
    assert sample(torch.tensor([[0.0, 5.0, 1.0, 4.9]]), [Sampling()], [0]).tolist() == [1]


@pytest.mark.parametrize("temperature", [0.01, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    x = logits(rows=4)
    s = [Sampling(temperature, top_k=1, seed=i) for i in range(4)]
    for pos in range(5):
        assert sample(x, s, [pos] * 4).tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("top_p", [1e-9, 0.01])
def test_a_tiny_top_p_is_greedy(top_p):
    x = logits(rows=4)
    s = [Sampling(2.0, top_p=top_p, seed=i) for i in range(4)]
    for pos in range(5):
        assert sample(x, s, [pos] * 4).tolist() == x.argmax(-1).tolist()


def test_top_k_and_top_p_keep_draws_within_the_head():
    x = torch.tensor([[3.0, 2.9, 0.0, -1.0, -2.0, 1.0]])
    ks = {int(sample(x, [Sampling(100.0, top_k=2, seed=s)], [0])) for s in range(60)}
    assert ks == {0, 1}  # near-uniform at temperature 100, but only within the top 2
    # probabilities 0.5, 0.3, 0.2 at temperature 1: top_p 0.6 keeps the first two
    y = torch.tensor([[0.5, 0.3, 0.2]]).log()
    ps = {int(sample(y, [Sampling(1.0, top_p=0.6, seed=s)], [0])) for s in range(60)}
    assert ps == {0, 1}
    ps = {int(sample(y, [Sampling(1.0, top_p=0.81, seed=s)], [0])) for s in range(60)}
    assert ps == {0, 1, 2}
    # two tokens of exactly 0.5: top_p 0.5 is reached by the first alone
    z = torch.tensor([[0.0, 0.0, -1e9]])
    assert len({int(sample(z, [Sampling(1.0, top_p=0.5, seed=s)], [0])) for s in range(40)}) == 1
    assert {int(sample(z, [Sampling(1.0, top_p=0.51, seed=s)], [0])) for s in range(40)} == {0, 1}


def test_a_certain_token_is_drawn_whatever_the_seed():
    x = torch.full((1, 20), -50.0)
    x[0, 13] = 50.0
    assert {int(sample(x, [Sampling(1.0, seed=s)], [s])) for s in range(20)} == {13}


def test_a_seed_and_position_fix_the_draw_whatever_the_batch():
    flat = torch.zeros(1, 500)  # uniform: every draw is the seed's doing
    s = Sampling(1.0, seed=1234)

    def draw(seed_sampling, pos):
        return int(sample(flat, [seed_sampling], [pos]))

    draws = [draw(s, p) for p in range(12)]
    assert draws == [draw(s, p) for p in range(12)]  # reproducible
    assert len(set(draws)) > 6  # the position varies the draw
    assert draws != [draw(Sampling(1.0, seed=1235), p) for p in range(12)]  # so does the seed
    # in a batch, each row draws as it would alone
    batch = torch.zeros(3, 500)
    other = [Sampling(1.0, seed=9), s, Sampling(0.5, top_k=10, seed=2)]
    assert int(sample(batch, other, [4, 7, 1])[1]) == draws[7]


@pytest.mark.parametrize("kw", [
    {"temperature": -1.0}, {"temperature": 100.5}, {"temperature": float("nan")},
    {"top_k": -1}, {"top_k": (1 << 31) + 1},
    {"top_p": 0.0}, {"top_p": -0.5}, {"top_p": 1.01}, {"top_p": float("nan")},
    {"seed": -1}, {"seed": 1 << 63},
])
def test_sampling_refuses_bad_values(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Sampling(**kw)


def test_sampling_accepts_its_bounds_and_goes_on_the_wire():
    for s in (Sampling(0.0, 0, 1.0, 0), Sampling(100.0, 1 << 31, 1e-12, (1 << 63) - 1)):
        assert Sampling(*s.to_wire()) == s
    assert Sampling(0.7, 40, 0.9, 5).to_wire() == [0.7, 40, 0.9, 5]


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_temperature_near_zero_samples_the_largest_logit_not_nan(temperature):
    # float32 logits divided by these overflow to infinity (or by a float32 zero): the
    # probabilities must still be defined, all on the largest logit
    logits = torch.tensor([[1.0, 3.5, -2.0, 3.25], [0.0, -1.0, 7.0, 6.5]])
    got = sample(logits, [Sampling(temperature, seed=s) for s in (1, 2)], [0, 3])
    assert got.tolist() == [1, 2]
