"""The replay chain and the replay cache's byte budget, on entries built by hand."""

from __future__ import annotations

import numpy as np

from lstm_serve.core.replay import ReplayCache, ReplayEntry, find

OUT = 2


def entry(
    seqs: list[int],
    steps: int | list[int] = 1,
    gen: int | list[int] = 1,
    prev: list[ReplayEntry | None] | None = None,
    prev_row: list[int] | None = None,
) -> ReplayEntry:
    """An entry of len(seqs) rows; y of each row is filled with its seq, so a hit names itself.
    steps: one count for all rows (y an ndarray) or one per row (y a list)."""
    n = len(seqs)
    if isinstance(steps, int):
        y: np.ndarray | list[np.ndarray] = np.stack(
            [np.full((steps, OUT), s, np.float32) for s in seqs]
        )
        counts = [steps] * n
    else:
        y = [np.full((t, OUT), s, np.float32) for s, t in zip(seqs, steps, strict=True)]
        counts = steps
    gens = [gen] * n if isinstance(gen, int) else gen
    p = np.full(n, None, object)
    if prev is not None:
        p[:] = prev
    return ReplayEntry(
        y, np.array(seqs, np.int64), np.array(gens, np.int64), np.zeros(n, bool),
        np.array(seqs, np.int64) + np.array(counts), p,
        np.array(prev_row or [0] * n, np.int64), np.arange(n, dtype=np.uint64),
    )  # fmt: skip


def hit(head: object, row: int, gen: int, seq: int) -> int | None:
    """The seq that the found row answers (its y is filled with it), or None."""
    f = find(head, row, gen, seq)
    if f is None:
        return None
    assert f.entry.y is not None
    return int(f.entry.y[f.row][0, 0])


def chain3() -> tuple[ReplayEntry, ReplayEntry, ReplayEntry]:
    """One session's requests at seq 0 (3 steps), 3 (2 steps), 5 (1 step)."""
    e1 = entry([0], steps=3)
    e2 = entry([3], steps=2, prev=[e1])
    e3 = entry([5], steps=1, prev=[e2])
    return e1, e2, e3


# -- the chain -----------------------------------------------------------------------------------


def test_find_walks_back_through_the_chain_to_the_request_starting_at_seq() -> None:
    _, _, head = chain3()
    assert hit(head, 0, 1, 5) == 5
    assert hit(head, 0, 1, 3) == 3
    assert hit(head, 0, 1, 0) == 0


def test_find_gives_nothing_for_a_seq_where_no_request_began() -> None:
    _, _, head = chain3()
    assert hit(head, 0, 1, 4) is None  # inside the request at 3
    assert hit(head, 0, 1, 1) is None  # inside the request at 0
    assert hit(head, 0, 1, 6) is None  # beyond the newest
    assert hit(None, 0, 1, 0) is None  # no answers at all


def test_find_follows_each_rows_own_previous_row() -> None:
    """A multi-session entry chains each row to the entry and row its session had before."""
    older = entry([0, 0], gen=[1, 2])  # sessions x (row 0) and y (row 1)
    # The next request had y in row 0 and x in row 1.
    newer = entry([1, 1], gen=[2, 1], prev=[older, older], prev_row=[1, 0])
    assert hit(newer, 1, 1, 0) == 0 and hit(newer, 0, 2, 0) == 0
    fx, fy = find(newer, 1, 1, 0), find(newer, 0, 2, 0)
    assert fx is not None and fx.entry is older and fx.row == 0
    assert fy is not None and fy.entry is older and fy.row == 1
    # the wrong row's generation does not match: a session never reads another's answers
    assert find(newer, 0, 1, 0) is None


def test_find_stops_at_a_generation_change() -> None:
    """Answers of an earlier generation (before a reset, or of a slot's previous session) are
    never found, even when their seq matches."""
    old = entry([0], steps=2, gen=1)
    new = entry([0], steps=1, gen=2, prev=[old])
    nxt = entry([1], steps=1, gen=2, prev=[new])
    f = find(nxt, 0, 2, 0)
    assert f is not None and f.entry is new
    stale = entry([2], steps=1, gen=1, prev=[old])
    assert hit(stale, 0, 1, 0) == 0
    assert hit(stale, 0, 2, 0) is None  # the head's own generation is not the session's
    older = entry([0], steps=1, gen=1)
    mid = entry([1], steps=1, gen=2, prev=[older])
    assert hit(mid, 0, 2, 0) is None


def test_find_stops_at_an_entry_the_cache_dropped() -> None:
    e1, e2, head = chain3()
    cache = ReplayCache(1 << 20)
    for e in (e1, e2, head):
        assert cache.add(e)
    cache.budget = head.nbytes + e2.nbytes  # room for the two newest
    cache.add(entry([9]))  # pushes the two oldest out
    assert e1.y is None and e2.y is None and head.y is not None
    assert hit(head, 0, 1, 5) == 5
    assert hit(head, 0, 1, 3) is None and hit(head, 0, 1, 0) is None


def test_row_steps() -> None:
    assert entry([0, 4], steps=[3, 1]).row_steps(0) == 3
    assert entry([0, 4], steps=[3, 1]).row_steps(1) == 1
    assert entry([0, 4], steps=5).row_steps(1) == 5


# -- the byte budget -----------------------------------------------------------------------------


def test_entries_count_their_answers_bytes_and_more() -> None:
    """An entry's size grows exactly with its answers' bytes, and is larger than them (what it
    holds besides them is counted too); per-row arrays cost more than one block."""
    cache = ReplayCache(1 << 30)
    small, big = entry([0, 1], steps=1), entry([0, 1], steps=101)
    ragged = entry([0, 1], steps=[1, 1])
    for e in (small, big, ragged):
        assert cache.add(e)
    assert small.nbytes > 2 * OUT * 4
    assert big.nbytes - small.nbytes == 2 * 100 * OUT * 4
    assert ragged.nbytes > small.nbytes
    assert cache.bytes == small.nbytes + big.nbytes + ragged.nbytes and len(cache) == 3


def test_entries_are_evicted_oldest_first_and_the_budget_holds() -> None:
    probe = ReplayCache(1 << 20)
    probe.add(entry([0]))
    size = probe.bytes
    cache = ReplayCache(3 * size + size // 2)  # room for three
    es = [entry([i]) for i in range(6)]
    for i, e in enumerate(es):
        assert cache.add(e)
        assert cache.bytes <= cache.budget
        kept = es[max(0, i - 2) : i + 1]
        assert len(cache) == len(kept)
        assert [e.y is not None for e in es[: i + 1]] == [e in kept for e in es[: i + 1]]
    assert cache.bytes == 3 * size


def test_a_dropped_entry_lets_go_of_its_arrays() -> None:
    e1, e2, _ = chain3()
    cache = ReplayCache(1 << 20)
    cache.add(e1)
    cache.add(e2)
    cache.budget = e2.nbytes
    cache.add(entry([7], steps=1))
    assert e1.y is None and e2.y is None
    for e in (e1, e2):
        assert len(e.seq) == len(e.gen) == len(e.next_seq) == len(e.prev) == 0
        assert len(e.prev_row) == len(e.reset) == len(e.digest) == 0


def test_an_entry_larger_than_the_budget_is_not_kept_and_evicts_nothing() -> None:
    cache = ReplayCache(4096)
    kept = entry([0])
    assert cache.add(kept)
    before = cache.bytes
    huge = entry([1], steps=1000)  # 8 kB of answers alone
    assert cache.add(huge) is False
    assert len(cache) == 1 and cache.bytes == before and kept.y is not None
    assert huge.nbytes == 0 and huge.y is not None  # untouched, just not kept


def test_an_entry_of_exactly_the_budget_is_kept_alone() -> None:
    probe = ReplayCache(1 << 20)
    one = entry([0], steps=4)
    probe.add(one)
    cache = ReplayCache(one.nbytes)
    first = entry([5])
    assert cache.add(first)
    exact = entry([0], steps=4)
    assert cache.add(exact)
    assert len(cache) == 1 and cache.bytes == cache.budget and first.y is None
