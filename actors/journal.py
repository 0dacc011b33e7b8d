"""The router's request journal: accepted requests kept where a restarted router finds them.

Records live in the GCS's key-value store (the store Ray Serve's controller checkpoints into),
one key per request under `meshpipe/<deployment>/requests/`, so they outlive the router actor
(and, with GCS fault tolerance, the head node). A record is the request's prompt, sampling
parameters, deadline and the tokens generated so far (checkpointed every second); a restarted
router re-admits each one and prefills prompt + generated tokens. Sampling is seeded per position,
so the continuation is the one the old router would have produced.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "meshpipe"


@dataclass
class RequestRecord:
    rid: str
    prompt: list[int]  # token ids
    params: Any  # SamplingParams (with its seed)
    deadline_unix: float | None  # time.time() after which the request times out
    generated: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    completion: Any = None  # the Completion once finished (kept until the router forgets it)


class RequestJournal:
    """put / drop / load of RequestRecords for one deployment (pickled: written and read by meshpipe only)."""

    def __init__(self, deployment: str) -> None:
        self.prefix = f"meshpipe/{deployment}/requests/"

    def put(self, record: RequestRecord) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.prefix + record.rid, pickle.dumps(record), overwrite=True,
                                     namespace=NAMESPACE)

    def drop(self, rid: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.prefix + rid, namespace=NAMESPACE)

    def load(self) -> list[RequestRecord]:
        from ray.experimental import internal_kv

        out = []
        for key in internal_kv._internal_kv_list(self.prefix, namespace=NAMESPACE):
            raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is None:
                continue
            try:
                out.append(pickle.loads(raw))
            except Exception as e:  # noqa: BLE001 - a record of another meshpipe version: skip it, say so
                log.warning("journal record %r is unreadable (%s): skipped", key, e)
        return out

    def clear(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.prefix, del_by_prefix=True, namespace=NAMESPACE)
