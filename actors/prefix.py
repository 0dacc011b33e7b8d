"""The router's side of the paged KV cache: block admission, prefix hits and prefix-aware routes.

- `KvBudget` (pure): each replica's pool in blocks. A request reserves its prompt plus a stretch of
  output on every replica of its route and grows while it decodes; one that cannot grow is preempted (its blocks stay cached, so
  taking it up again recomputes little) instead of any stage allocating past its pool.
- `PrefixIndex` (pure): which full-block hashes each replica is believed to hold (what the router
  sent there; bounded like the replica's pool, least recently used out), so the planner can price
  the prompt tokens a route would have to compute.
- `PrefixCache`: the router's prefix caching. Before a new sequence's first step every replica of
  its route pins its cached prefix (`pin_route`); the step starts where all of them hold it. A
  prompt that shares most of its blocks with one still being computed (the `n` choices of one
  request, a burst with one long system prompt) waits for that prefill, then starts on its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from models.blocks import chain_hashes

if TYPE_CHECKING:
    from actors.metrics import RouterMetrics
    from actors.request import Request

log = logging.getLogger(__name__)

GROW_TOKENS = 256  # output positions reserved at a time
LAG_TOKENS = 64  # a ring may run this far ahead of the tokens the router has seen
PIN_TIMEOUT_S = 10.0
PREFILL_TOKEN_MS = 0.05  # a prompt token's compute on a replica not measured yet
EXPECTED_STEPS = 128  # a request's decode steps when it may run longer (most stop sooner)


def expected_steps(req: Request) -> int:
    """The decode steps a request is expected to take from here: what the planner spreads its prefill over."""
    return max(1, min(EXPECTED_STEPS, req.seq.params.max_new_tokens - len(req.seq.generated)))


class KvBudget:
    """Blocks reserved per request on each replica of its route, against that replica's own pool: with
    several replicas a stage holds as many sequences as their pools together (the smallest pool once
    stood for every replica)."""

    def __init__(self, pools: Callable[[], dict[tuple[int, int], int]], block_size: int) -> None:
        self.pools = pools  # () -> (stage, replica) -> its pool's tokens, as the replicas are now
        self.block_size = block_size
        smallest = min(pools().values())
        # a small pool reserves in smaller stretches (a sixteenth of it), never below a block
        self.grow_tokens = max(block_size, min(GROW_TOKENS, smallest // 16))
        self.lag_tokens = max(block_size, min(LAG_TOKENS, smallest // 16))
        self.reserved: dict[str, tuple[tuple[int, ...], int]] = {}  # request id -> (its route's replicas, blocks)
        self.held: Counter[tuple[int, int]] = Counter()  # (stage, replica) -> blocks reserved there
        self.preemptions = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _stages(self) -> list[dict[int, int]]:
        """Per stage, replica -> its pool in blocks."""
        out: list[dict[int, int]] = []
        for (stage, replica), tokens in sorted(self.pools().items()):
            while len(out) <= stage:
                out.append({})
            out[stage][replica] = max(1, tokens // self.block_size)
        return out

    @property
    def blocks(self) -> int:
        """The bottleneck stage's pools together, in blocks (what `used` is measured against)."""
        return min(sum(pools.values()) for pools in self._stages())

    @property
    def used(self) -> int:
        """Blocks reserved on each stage (a request holds its blocks once a stage)."""
        return sum(blocks for _, blocks in self.reserved.values())

    def one_pool(self) -> int:
        """Blocks one sequence can have at most: the largest pool of each stage, the smallest of those."""
        return min(max(pools.values()) for pools in self._stages())

    def fits_ever(self, tokens: int) -> bool:
        """Whether one sequence of `tokens` positions fits the pools at all."""
        return self.blocks_for(tokens) <= self.one_pool()

    def want(self, length: int, limit: int) -> int:
        """Blocks for `length` positions, a stretch of output and the ring's lag, never past the
        `limit` positions the request can reach (so a request alone always fits)."""
        return min(self.blocks_for(min(limit, length + self.grow_tokens) + self.lag_tokens), self.blocks_for(limit))

    def reserve(self, rid: str, length: int, limit: int, replicas: tuple[int, ...]) -> bool:
        """Reserves on the route's `replicas` for a request about to start (`length` positions now, `limit` at
        most), or moved there; False: no room on one of them."""
        need, stages = self.want(length, limit), self._stages()
        old_route, old = self.reserved.get(rid, ((), 0))
        for stage, replica in enumerate(replicas):
            mine = old if stage < len(old_route) and old_route[stage] == replica else 0
            if self.held[(stage, replica)] - mine + need > stages[stage].get(replica, 0):
                return False
        self.release(rid)
        self.reserved[rid] = (tuple(replicas), need)
        for stage, replica in enumerate(replicas):
            self.held[(stage, replica)] += need
        return True

    def full(self, length: int, limit: int) -> frozenset[tuple[int, int]]:
        """The (stage, replica)s without room now for a request of `length` positions (`limit` at most):
        its route goes around them while another replica of their stage has room."""
        need = self.want(length, limit)
        return frozenset((stage, replica) for stage, pools in enumerate(self._stages())
                         for replica, blocks in pools.items() if self.held[(stage, replica)] + need > blocks)

    def grow(self, rid: str, length: int, limit: int, route: Any) -> bool:
        """Keeps `length` + lag covered on the request's `route` (a failover's: there now) as it decodes;
        False: no room (preempt it). A request without a reservation or a route has nothing to grow."""
        have = self.reserved.get(rid)
        if have is None or route is None or \
                have[0] == route.replicas and self.blocks_for(length + self.lag_tokens) <= have[1]:
            return True
        return self.reserve(rid, length, limit, route.replicas)

    def fits_now(self, wants: Sequence[tuple[int, int]]) -> bool:
        """Whether requests of (positions now, positions at most) could all start now (on some routes)."""
        return self.used + sum(self.want(n, limit) for n, limit in wants) <= self.blocks

    def release(self, rid: str) -> None:
        route, blocks = self.reserved.pop(rid, ((), 0))
        for stage, replica in enumerate(route):
            self.held[(stage, replica)] -= blocks
            if self.held[(stage, replica)] <= 0:
                del self.held[(stage, replica)]


class PrefixIndex:
    """Per replica, the block hashes it is believed to cache (an LRU as big as its pool)."""

    def __init__(self, block_size: int, capacity: int) -> None:
        self.block_size, self.capacity = block_size, capacity
        self.held: dict[tuple[int, int], OrderedDict[bytes, None]] = {}

    def hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """The hash chain of a prompt's full blocks, leaving at least its last token to compute."""
        return chain_hashes(tokens[:len(tokens) - 1], self.block_size)

    def hit_tokens(self, replica: tuple[int, int], hashes: Sequence[bytes]) -> int:
        held = self.held.get(replica)
        n = 0
        if held:
            for h in hashes:
                if h not in held:
                    break
                n += 1
        return n * self.block_size

    def forget(self, replica: tuple[int, int]) -> None:
        """A replica removed (drained): what it cached went with it, and a later one may take its id."""
        self.held.pop(replica, None)

    def record(self, replicas: Sequence[tuple[int, int]], hashes: Sequence[bytes]) -> None:
        for rep in replicas:
            held = self.held.setdefault(rep, OrderedDict())
            for h in hashes:
                held[h] = None
                held.move_to_end(h)
            while len(held) > self.capacity:
                held.popitem(last=False)


async def pin_route(handles: Sequence[Any], rid: str, hashes: list[bytes]) -> int:
    """Pins a new sequence's cached prefix on every replica of its route; returns the positions all hold
    (0 if any replica fails or is slow to answer: the sequence then computes its whole prompt)."""
    async def one(h: Any) -> int:
        return (await h.pin_prefix.remote([(rid, hashes)]))[0]
    try:
        held = await asyncio.wait_for(asyncio.gather(*[one(h) for h in handles]), PIN_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - no prefix then; the first step rewinds any pins
        log.warning("prefix lookup for %s failed (%s); it computes its whole prompt", rid, type(e).__name__)
        return 0
    return min(held)


class PrefixCache:
    """The router's prefix caching: the index, pins in flight and the prompts being computed."""

    def __init__(self, block_size: int, capacity: int, metrics: RouterMetrics) -> None:
        self.index = PrefixIndex(block_size, capacity)
        self.metrics = metrics
        self.pinning: set[str] = set()  # requests whose route is pinning their cached prefix
        self.computing: dict[str, list[bytes]] = {}  # request -> the prompt blocks it is computing
        self._computing = Counter[bytes]()

    def hashes(self, req: Request) -> list[bytes]:
        return self.index.hashes(req.seq.prompt + req.seq.generated)

    def should_wait(self, hashes: Sequence[bytes]) -> bool:
        """Whether a prompt shares at least half its blocks with prompts being computed right now."""
        shared = 0
        for h in hashes:
            if not self._computing[h]:
                break
            shared += 1
        return shared > 0 and 2 * shared >= len(hashes)

    def begin(self, req: Request, hashes: list[bytes]) -> None:
        """The request got its route: until its prompt is computed, prompts like it wait (`should_wait`)."""
        self.pinning.add(req.rid)
        self.computing[req.rid] = hashes
        self._computing.update(hashes)

    async def pin_then(self, req: Request, hashes: list[bytes], handles: Sequence[Any],
                       place: Callable[[Request], None], schedule: Callable[[], None]) -> None:
        """Pins the prompt's cached prefix on the route (`pin_route`), then `place`s the request to start
        there (an `ended` request meanwhile is not placed) and lets the queue move (`schedule`)."""
        hit = await pin_route(handles, req.rid, hashes)
        if req.rid not in self.pinning:  # ended meanwhile: the free it sent may have run before the pins
            await asyncio.gather(*[h.free.remote([req.rid]) for h in handles], return_exceptions=True)
            return
        self.pinning.discard(req.rid)
        req.seq.cached = hit
        self.metrics.prompted(hit_tokens=hit)
        self.index.record(list(enumerate(req.route.replicas)), hashes)
        if hit >= len(hashes) * self.index.block_size:
            self.first_token(req.rid)  # nothing of its blocks to compute: no one waits for it
        place(req)
        schedule()

    def first_token(self, rid: str) -> None:
        """The request's prompt is computed: its blocks are cached on its route."""
        hashes = self.computing.pop(rid, None)
        if hashes:
            self._computing -= Counter(hashes)  # drops the keys that reach 0 (subtract would keep them)

    def ended(self, req: Request) -> None:
        """The request left its route (finished, cancelled, preempted): its full blocks stay cached there."""
        self.pinning.discard(req.rid)
        self.first_token(req.rid)
        if req.route is not None:
            self.index.record(list(enumerate(req.route.replicas)), self.hashes(req))
