"""What the router shows of itself: `describe` (the deployment), `stats` (its counters), and a request's
progress to a stream (`stream_next`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from models.generation import stream_safe

if TYPE_CHECKING:
    from actors.request import Request
    from actors.router import RouterActor
    from models.tokenizer import Tokenizer


def describe(router: RouterActor) -> dict[str, Any]:
    pool = router.pool
    route = pool.plan()
    return {
        "deployment": router.deployment,
        "model": router.source,
        "config": router.cfg.to_dict(),
        "stages": [info for infos in pool.replica_info for info in infos],
        "route": [r.name for r in pool.table.on_route(route)],  # a new request's route now
        "route_cost_ms": route.cost_ms,
        "router_node": pool.node_id,
        "links": [vars(lk) for lk in pool.links_for(route)],  # how each hop of that route encodes
        "replicas": [[r.name for r in stage] for stage in pool.table.by_stage],
        "probes": router.prober.names(),
        "topology": None if pool.topology is None else pool.topology.spec.model_dump(),
        "router": router.rc.model_dump(),
        "decode_rings": router.rings is not None,  # tokens go round the stages (else a Ray call a hop)
    }


def routes_mermaid(router: RouterActor) -> str:
    """The replicas as a layered graph, the route a new request would take drawn thick."""
    from topology.planner import route_to_mermaid

    return route_to_mermaid(router.pool.plan(), router.pool.table.states(), router.pool.table.num_stages)


def stats(router: RouterActor) -> dict[str, Any]:
    rec, rings = router.recovery, router.rings
    ring_info = rings.describe() if rings else []
    return {
        "active": router._active(),
        "queued": len(router.waiting),
        "kv": {"block_size": router.kv.block_size, "blocks": router.kv.blocks, "blocks_reserved": router.kv.used,
               "preemptions": router.kv.preemptions},  # the bottleneck stage's pools together, in blocks
        "prefix": router.metrics.prefix_stats(),  # prompt tokens started, hit (computed by no stage), hit_rate
        "tokens_generated": router.tokens_generated,
        "retransmits": router.sender.retransmits + (rings.retransmits if rings else 0),
        "recoveries_s": [round(d, 3) for _, d, _ in rec.recoveries],
        "recoveries": [(end, round(d, 3), round(w, 3)) for end, d, w in rec.recoveries],
        "recoveries_total": rec.recovered,  # the lists above keep the last RECOVERIES_KEPT
        "steps": sum(lane.step for lane in router.lanes) + (rings.passes if rings else 0),
        "speculation": router.metrics.speculation(),  # passes, drafted, accepted, tokens_per_pass
        "rings": ring_info,  # decode rings: replicas, state, sequences, passes
        "rings_broken": [] if rings is None else [dict(b) for b in rings.broken],  # the last BREAKS_KEPT
        "rings_broken_total": 0 if rings is None else rings.breaks,
        # token reports the tails sent over their sockets, and connections refused (bad secret or frame)
        "ring_reports": {} if rings is None or rings.reports is None else
        {"by_socket": rings.reports.received, "refused": rings.reports.refused},
        "incarnation": router.incarnation,  # router restarts so far
        "replacements": rec.replacements,  # replicas placed anew after a node loss
        "resumed": router.resumed,  # requests re-admitted from the journal after a restart
        "copied_positions": rec.copied_positions,
        "rebuilt_positions": rec.rebuilt_positions,
        "lanes": [len(lane.seqs) for lane in router.lanes],
        "replicas": router.pool.table.describe(),
    }


async def stream_next(req: Request, cursor: int, wait_s: float, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """Tokens past `cursor` (waits up to `wait_s` for some); `done` with the completion at the end."""
    if len(req.seq.generated) <= cursor and not req.future.done():
        req.changed.clear()
        try:
            await asyncio.wait_for(req.changed.wait(), wait_s)
        except asyncio.TimeoutError:
            pass
    if req.future.done():
        completion = await asyncio.shield(req.future)  # raises the request's error, if any
        return {"token_ids": completion.token_ids[cursor:], "done": True, "completion": completion}
    text = stream_safe(tokenizer.decode(req.seq.generated), req.seq.params.stop) if tokenizer else ""
    lps = req.seq.logprobs[cursor:] if req.seq.params.logprobs is not None else None
    return {"token_ids": req.seq.generated[cursor:], "text": text, "logprobs": lps, "done": False, "completion": None}
