"""The prefix-affinity router (issue 13, item 1), pure: the prompt's block hashes, the prefix
index and the choice. The Serve `RequestRouter` around them: test_prefix_router_serve.py."""

from __future__ import annotations

import pytest

from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.pools.prefix_router import (
    Choice,
    PrefixIndex,
    choose,
    prompt_key,
    rendezvous_score,
)

SYSTEM = "You are the support assistant of a shipping company. " * 40  # ~2 KB shared prefix
BLOCK = 256


def chat(salt: str | None, system: str, user: str) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=4),
        messages=(ChatMessage("system", system), ChatMessage("user", user)),
        cache_salt=salt,
    )


# --- hashing ---------------------------------------------------------------------------


def test_same_tenant_prompts_share_their_leading_blocks() -> None:
    a = prompt_key(chat("salt-a", SYSTEM, "where is my parcel?"), block_bytes=BLOCK)
    b = prompt_key(chat("salt-a", SYSTEM, "cancel my order"), block_bytes=BLOCK)
    shared = len(SYSTEM) // BLOCK
    assert len(a.blocks) >= shared
    assert a.blocks[:shared] == b.blocks[:shared]
    assert a.seed == b.seed  # same first block: the same placement for a new prefix


def test_the_same_prompt_under_two_salts_shares_no_block() -> None:
    a = prompt_key(chat("salt-a", SYSTEM, "hello"), block_bytes=BLOCK)
    b = prompt_key(chat("salt-b", SYSTEM, "hello"), block_bytes=BLOCK)
    unsalted = prompt_key(chat(None, SYSTEM, "hello"), block_bytes=BLOCK)
    assert not set(a.blocks) & set(b.blocks)
    assert not set(a.blocks) & set(unsalted.blocks)
    assert len({a.seed, b.seed, unsalted.seed}) == 3


def test_a_salt_cannot_be_forged_from_another_salt_and_prompt_bytes() -> None:
    # The salt is length-prefixed: salt "ab" + prompt "c..." is not salt "abc" + "...".
    a = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=("c" + "x" * 600,), cache_salt="ab")
    )
    b = prompt_key(GenerationRequest("r", "m", SamplingOptions(), prompts=("x" * 600,), cache_salt="abc"))
    assert not set(a.blocks) & set(b.blocks)


def test_completion_text_and_token_ids_are_keyed() -> None:
    text = prompt_key(GenerationRequest("r", "m", SamplingOptions(), prompts=("y" * 1000,), cache_salt="s"))
    more = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=("y" * 1000 + "z",), cache_salt="s")
    )
    ids = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=(tuple(range(300)),), cache_salt="s")
    )
    assert text.blocks == more.blocks[: len(text.blocks)] and len(text.blocks) == 3
    assert len(ids.blocks) == 300 * 4 // 256
    assert not set(ids.blocks) & set(text.blocks)


def test_a_short_prompt_has_no_block_but_a_seed_of_its_own() -> None:
    a = prompt_key(chat("s", "hi", "x"))
    b = prompt_key(chat("s", "hi", "y"))
    assert a.blocks == () and b.blocks == ()
    assert a.seed != b.seed


# --- the index ---------------------------------------------------------------------------


def test_the_longest_prefix_held_by_a_live_replica_wins() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    key = prompt_key(chat("s", SYSTEM, "q1"), block_bytes=BLOCK)
    index.record(key.blocks[:2], "r1")
    index.record(key.blocks, "r2")
    assert index.longest(key.blocks, {"r1", "r2"}) == (len(key.blocks), ("r2",))
    # r2 left: only r1's two blocks are known.
    assert index.longest(key.blocks, {"r1"}) == (2, ("r1",))
    assert index.longest(key.blocks, set()) == (0, ())


def test_replicas_that_leave_are_forgotten() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    a = prompt_key(chat("s", SYSTEM, "q1"), block_bytes=BLOCK)
    b = prompt_key(chat("t", SYSTEM, "q1"), block_bytes=BLOCK)
    index.record(a.blocks, "r1")
    index.record(a.blocks, "r2")
    index.record(b.blocks, "r2")
    index.forget({"r2"})
    assert index.holders() == {"r1"}
    assert len(index) == len(a.blocks)  # b's blocks had no other holder: gone
    assert index.longest(a.blocks, {"r1", "r2"}) == (len(a.blocks), ("r1",))


def test_memory_is_bounded_and_a_shared_beginning_outlives_deep_blocks() -> None:
    index: PrefixIndex[str] = PrefixIndex(max_blocks=64)
    hot = prompt_key(chat("s", SYSTEM, "hot"), block_bytes=BLOCK)
    for i in range(200):
        index.record(prompt_key(chat(f"t{i}", SYSTEM, str(i)), block_bytes=BLOCK).blocks, f"r{i % 3}")
        index.record(hot.blocks, "r0")  # one tenant's system prompt stays in use
        assert len(index) <= 64
    assert index.longest(hot.blocks, {"r0"})[0] == len(hot.blocks)


def test_an_unbounded_index_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)


# --- the choice --------------------------------------------------------------------------


def test_affinity_within_the_load_bound() -> None:
    choice = choose(["r1", "r2"], {"r1": 4, "r2": 0}, ("r1",), b"seed", max_imbalance=4)
    assert (choice.replica, choice.route) == ("r1", "affinity")


def test_the_load_bound_falls_back_to_the_least_loaded() -> None:
    choice = choose(["r1", "r2", "r3"], {"r1": 6, "r2": 3, "r3": 1}, ("r1",), b"seed", max_imbalance=4)
    assert (choice.replica, choice.route) == ("r3", "fallback")


def test_of_several_holders_the_prefix_keeps_its_home_while_within_the_bound() -> None:
    """After a fallback two replicas hold a prefix: the one rendezvous ranks first (its home)
    keeps taking it, even when the other holder is less loaded, so a tenant is not spread
    over both for good; the next holder takes it only while the home is over the bound."""
    holders = ("r1", "r2")
    home = max(holders, key=lambda r: rendezvous_score(b"seed", r))
    other = next(r for r in holders if r != home)
    loads = {home: 3, other: 1, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice(home, "affinity")
    loads = {home: 9, other: 1, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice(other, "affinity")
    loads = {home: 9, other: 9, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice("r3", "fallback")


def test_a_new_prefix_goes_where_rendezvous_points_whatever_the_order() -> None:
    replicas = [f"replica-{i}" for i in range(4)]
    placed = {}
    for n in range(64):
        seed = f"first block {n}".encode()
        winner = max(replicas, key=lambda r: rendezvous_score(seed, r))
        for order in (replicas, list(reversed(replicas))):
            choice = choose(order, {r: 0 for r in replicas}, (), seed, max_imbalance=4)
            assert (choice.replica, choice.route) == (winner, "spread")
        placed[winner] = placed.get(winner, 0) + 1
    assert len(placed) == 4  # the seeds spread over every replica


def test_a_new_prefix_respects_the_load_bound() -> None:
    seed = b"first block"
    winner = max(["r1", "r2"], key=lambda r: rendezvous_score(seed, r))
    other = "r2" if winner == "r1" else "r1"
    choice = choose(["r1", "r2"], {winner: 9, other: 2}, (), seed, max_imbalance=4)
    assert (choice.replica, choice.route) == (other, "spread")


def test_unknown_loads_count_as_the_least_known() -> None:
    choice = choose(["r1", "r2"], {"r2": 5}, ("r1",), b"seed", max_imbalance=0)
    assert (choice.replica, choice.route) == ("r1", "affinity")
