"""Prefix-affinity routing: a Ray Serve `RequestRouter` for pools whose catalog entry says
`routing.policy: prefix_affinity` (issue 13, item 1). Wired in `services.app.build_pool`.

With several replicas per pool, Serve's default router (power of two choices) spreads
requests that share a long system prompt over all replicas, and each replica prefills the
same prefix again. This router sends a request to the replica that served the longest known
prefix of its prompt, within the same tenant, unless that replica is busier than the
least-loaded one by more than the pool's `routing.max_imbalance` (a load bound: affinity
never makes a hot spot).

How it keys prefixes: the prompt (chat messages as role and text in order, or a completion
prompt's text or token ids) is serialised to bytes, cut into blocks of `block_bytes`, and each
block gets a chained hash (the hash of everything up to and including it). The chain is
rooted at the request's `cache_salt`, the tenant's prefix-cache salt that vLLM mixes into its
own block hashes (services/tenancy/cache_salt.py): two tenants sending the same prompt share
no entry, so tenant B is never routed by tenant A's prefixes and cannot learn where they live.
The index maps block hashes to the replicas that served them, least recently used first out,
at most `max_blocks` entries; replicas that leave are forgotten.

A prompt with no known prefix goes where rendezvous hashing of its first block points (the
highest hash of block and replica id), so every gateway replica, each with its own router
and index, sends a new prefix to the same replica without shared state; under the same load
bound. Queue lengths are the ones Serve's base class keeps (its cache, updated on every send
and every replica answer), probed only when missing, as the base class does.

Why not Ray's `ray.serve.llm.request_router.PrefixCacheAffinityRouter` (ray/llm/_internal/
serve/routing_policies/prefix_aware/): it keeps its prefix tree in a detached actor and calls
`ray.get` on it inside `choose_replicas`, `on_request_routed` and `update_replicas`, a
blocking round trip on the router's event loop for every request; it reads `.prompt` or
`.messages` attributes holding dicts or strings, which phiserve's `GenerationRequest` has not
(its `messages` are `ChatMessage` objects, its completions `prompts`, possibly token ids); and
its tree knows no tenant boundary, so one tenant's prompt would route (and time) another's.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from services.pools.engine import GenerationRequest, Prompt
from services.pools.metrics import PoolRoutingMetrics, Route

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 256
# A 16-byte key, a small tuple and an ordered-dict node per entry: ~6 MB per router (measured
# with tracemalloc) for 8 MiB of distinct prompt text, more than a replica's KV cache holds.
DEFAULT_MAX_BLOCKS = 32768
# Decisions waiting for `on_request_routed`; a request cancelled before it is routed leaves
# its decision behind, so the memo is bounded too.
MAX_PENDING_DECISIONS = 4096
# A block served by several replicas (after a fallback) keeps its most recent holders.
MAX_HOLDERS = 8

_DIGEST_BYTES = 16
_PERSON = b"phiserve-prefix"  # blake2b personalisation: these hashes mean nothing elsewhere

R = TypeVar("R", bound=Hashable)


@dataclass(frozen=True, slots=True)
class PromptKey:
    """A prompt's chained block hashes (full blocks only) and the seed of its placement."""

    blocks: tuple[bytes, ...]
    # The first block's hash, or the whole (shorter) prompt's: rendezvous hashing's input.
    seed: bytes


def prompt_key(request: GenerationRequest, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> PromptKey:
    """Hash `request`'s prompt into chained blocks rooted at its tenant's cache salt.

    O(prompt length): one incremental hash over the bytes, a copy per block boundary."""
    hasher = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=_PERSON)
    salt = request.cache_salt
    # Length-prefixed, so no salt is a prefix of another tenant's salt plus prompt bytes.
    hasher.update(b"\x00" if salt is None else b"\x01" + struct.pack("<I", len(salt)) + salt.encode())
    data = _prompt_bytes(request)
    blocks = []
    view = memoryview(data)
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        hasher.update(view[start : start + block_bytes])
        blocks.append(hasher.copy().digest())
    if blocks:
        return PromptKey(tuple(blocks), blocks[0])
    hasher.update(data)
    return PromptKey((), hasher.digest())


def _prompt_bytes(request: GenerationRequest) -> bytes:
    """The prompt as the bytes whose prefixes stand for the engine's cached prefixes.

    Separators, not length prefixes, between messages: a length in front of a text would
    make two prompts that share a long beginning differ at once. A text holding the separator
    can only make two prompts of the SAME tenant look alike (the salt roots the chain), which
    costs a cache miss, never isolation. Images count by number only: hashing megabytes per
    request is not worth the rare case of one text with different images."""
    if request.messages is not None:
        parts = []
        for message in request.messages:
            parts.append(message.role.encode())
            parts.append(b"\x00")
            parts.append(message.text.encode())
            parts.append(b"\x00%d\x1e" % message.image_count)
        return b"m" + b"".join(parts)
    if request.prompts:
        # Several prompts go to one replica together: the first one places them.
        return _completion_bytes(request.prompts[0])
    return b""


def _completion_bytes(prompt: Prompt) -> bytes:
    if isinstance(prompt, str):
        return b"p" + prompt.encode()
    return b"t" + struct.pack(f"<{len(prompt)}I", *prompt)


def rendezvous_score(seed: bytes, replica_key: str) -> int:
    """Highest random weight: the replica with the highest score for a seed takes it. Stable
    across processes (no `hash()`, which Python salts per process)."""
    digest = hashlib.blake2b(seed + replica_key.encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big")


class PrefixIndex(Generic[R]):
    """Block hash -> the replicas that served it; least recently used first out."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self._max_blocks = max_blocks
        self._blocks: OrderedDict[bytes, tuple[R, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def longest(self, blocks: Sequence[bytes], live: Mapping[R, Any] | set[R]) -> tuple[int, tuple[R, ...]]:
        """How many leading blocks some live replica holds, and which replicas hold them all.

        Chained hashes: holding block i means having served blocks 0..i, so the walk stops
        at the first block no live replica holds."""
        depth = 0
        holders: tuple[R, ...] = ()
        for i, block in enumerate(blocks):
            held = self._blocks.get(block)
            if held is None:
                break
            alive = tuple(r for r in held if r in live)
            if not alive:
                break
            depth, holders = i + 1, alive
        return depth, holders

    def record(self, blocks: Sequence[bytes], replica: R) -> None:
        """`replica` served these blocks. Refreshed deepest first, so the first blocks (a shared
        system prompt) are the most recent and the last to go."""
        for block in reversed(blocks):
            held = self._blocks.get(block)
            if held is None:
                self._blocks[block] = (replica,)
            else:
                if held[0] != replica:
                    self._blocks[block] = (replica, *(r for r in held if r != replica))[:MAX_HOLDERS]
                self._blocks.move_to_end(block)
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)

    def forget(self, gone: Iterable[R]) -> None:
        """Drop replicas that left; blocks no one holds any more go too."""
        gone = set(gone)
        if not gone:
            return
        for block, held in list(self._blocks.items()):
            kept = tuple(r for r in held if r not in gone)
            if not kept:
                del self._blocks[block]
            elif len(kept) != len(held):
                self._blocks[block] = kept

    def holders(self) -> set[R]:
        """Every replica some block points to (for tests and diagnostics)."""
        return {r for held in self._blocks.values() for r in held}


@dataclass(frozen=True, slots=True)
class Choice(Generic[R]):
    replica: R
    route: Route


def choose(
    candidates: Sequence[R],
    loads: Mapping[R, int],
    holders: Sequence[R],
    seed: bytes,
    *,
    max_imbalance: int,
    key: Callable[[R], str] = str,
) -> Choice[R]:
    """The routing decision, pure.

    `holders`: live replicas holding the longest known prefix (empty: none known).
    `loads`: ongoing requests per candidate, where known; an unknown load counts as the
    least known one (the base class probes the replica before sending, and goes on to the
    next rank when it is full). Holders and new prefixes are ranked by rendezvous score, so
    routers agree and a prefix keeps one home."""
    score = {r: rendezvous_score(seed, key(r)) for r in candidates}
    least_load = min((loads[r] for r in candidates if r in loads), default=0)

    def load(r: R) -> int:
        return loads.get(r, least_load)

    least_loaded = min(candidates, key=lambda r: (load(r), -score[r]))
    # Holders in rendezvous order, not by load: after a fallback both replicas hold a
    # tenant's prefix, and picking the less loaded holder would spread the tenant over both
    # for good, doubling the cache it takes (benchmarks/prefix_routing.py measured the hit
    # rate falling to ~1.0-1.4x of the default router's). The prefix's home keeps it; the
    # next holder takes it only while the home is over the bound.
    for holder in sorted(holders, key=lambda r: score.get(r, 0), reverse=True):
        if load(holder) - least_load <= max_imbalance:
            return Choice(holder, "affinity")
    if holders:
        return Choice(least_loaded, "fallback")
    preferred = max(candidates, key=lambda r: score[r])
    if load(preferred) - least_load > max_imbalance:
        return Choice(least_loaded, "spread")
    return Choice(preferred, "spread")


def _replica_key(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


class PrefixAffinityRouter(MultiplexMixin, RequestRouter):
    """Serve calls `initialize_state(**request_router_kwargs)` once, then `choose_replicas`
    per routing attempt and `on_request_routed` once the chosen replica accepted.

    No FIFO mixin: the base class hands a chosen replica to exactly the request it was chosen
    for (FIFO would give request A's affine replica to whichever request waits longest).

    Serve's `MultiplexMixin` for tenants' LoRA adapters (issue 14): a request with a
    multiplexed model id (services/pools/adapter_cache.py) goes first to the replicas that
    hold its adapter, then to those holding the fewest adapters, then to the rest, as with
    Serve's default router; prefix affinity chooses within the first of those groups that has
    a replica. Loading an adapter costs more than missing a prefix."""

    def initialize_state(  # type: ignore[override]  # Serve passes request_router_kwargs by name
        self,
        max_imbalance: int = 4,
        pool: str | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        metrics: PoolRoutingMetrics | None = None,
    ) -> None:
        if block_bytes < 1:
            raise ValueError("block_bytes must be at least 1")
        self._max_imbalance = max_imbalance
        self._pool = pool or self._deployment_id.name.removeprefix("pool-")
        self._block_bytes = block_bytes
        self._index: PrefixIndex[ReplicaID] = PrefixIndex(max_blocks)
        self._decisions: OrderedDict[str, tuple[tuple[bytes, ...], tuple[ReplicaID, ...]]] = OrderedDict()
        self._metrics = metrics if metrics is not None else PoolRoutingMetrics()

    @property
    def index(self) -> PrefixIndex[ReplicaID]:
        return self._index

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks: the chosen replica alone, then every other candidate (the base class takes
        the least loaded of a rank that has room, and moves to the next rank otherwise)."""
        request = _generation_request(pending_request)
        if request is None or not candidate_replicas:
            # ready(), diagnostics(): no prompt to place; the least loaded takes it.
            return [candidate_replicas] if candidate_replicas else []
        assert pending_request is not None
        groups = [candidate_replicas]
        model_id = pending_request.metadata.multiplexed_model_id
        if model_id:
            groups = [g for g in self.rank_replicas_via_multiplex(candidate_replicas, model_id) if g]
        first = groups[0]
        key = prompt_key(request, block_bytes=self._block_bytes)
        by_id = {r.replica_id: r for r in first}
        _, holders = self._index.longest(key.blocks, by_id)
        loads = await self._queue_lengths(first)
        choice = choose(
            list(by_id), loads, holders, key.seed, max_imbalance=self._max_imbalance, key=_replica_key
        )
        self._remember(pending_request, key.blocks, holders)
        chosen = by_id[choice.replica]
        rest = [r for r in first if r is not chosen]
        return [[chosen], *([rest] if rest else []), *groups[1:]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        decision = self._decisions.pop(request_id, None)
        if decision is None:
            request = _generation_request(pending_request)
            if request is None:
                return
            decision = (prompt_key(request, block_bytes=self._block_bytes).blocks, ())
        blocks, holders = decision
        self._index.record(blocks, replica_id)
        route: Route = "affinity" if replica_id in holders else ("fallback" if holders else "spread")
        self._metrics.routed(self._pool, route)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replica_id_set)
        super().update_replicas(replicas)
        self._index.forget(before - self._replica_id_set)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget((replica_id,))

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Ongoing requests per replica from the base class's cache; probed (as the base
        class would before sending) only for replicas it has no fresh entry for."""
        loads: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            queue_len = (
                self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            )
            if queue_len is None:
                missing.append(r)
            else:
                loads[r.replica_id] = queue_len
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                if queue_len is not None:
                    loads[r.replica_id] = queue_len
        return loads

    def _remember(
        self, pending_request: PendingRequest, blocks: tuple[bytes, ...], holders: tuple[ReplicaID, ...]
    ) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._decisions[request_id] = (blocks, holders)
        self._decisions.move_to_end(request_id)
        while len(self._decisions) > MAX_PENDING_DECISIONS:
            self._decisions.popitem(last=False)


def _generation_request(pending_request: PendingRequest | None) -> GenerationRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request if isinstance(request, GenerationRequest) else None
