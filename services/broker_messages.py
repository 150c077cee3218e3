"""What the broker holds for one deployment's queue: the task name and arguments of every message that waits in
the queue or was delivered to a worker and not yet acknowledged (Redis transport).

Why: a stored `queued` shard or gate whose message is gone waits for ever. Several faults end there (the process
that planned a job dies before sending its shards, a retry cannot be published while the broker blips, a sweep's
send fails after its marker was set), and no single handler can cover them all. services.queueing.recover_orphans
compares the database with this snapshot instead and re-sends what has no message; a message it re-sends that was
not lost after all is harmless (a claimed shard is `busy` or finished for the second one, a started gate skipped).
"""
from __future__ import annotations

import base64
import json
import logging
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, unacknowledged messages (ETA'd retries included)
PRIORITY_SEP = "\x06\x16"  # kombu's separator of a queue's priority sub-lists


def _task_of(payload: dict[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
    """(task name, positional args) of a Celery protocol-2 message; None for anything else."""
    try:
        name = payload["headers"]["task"]
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(name), tuple(args)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        log.debug("not a Celery message (%s): %.200r", e, payload)
        return None


def pending_tasks(settings: Settings) -> set[tuple[str, tuple[Any, ...]]]:
    """Every (task, args) the broker still holds for `settings.queue`: waiting, or delivered and not acked."""
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        payloads: list[dict[str, Any]] = []
        for key in [settings.queue.encode(), *client.scan_iter(match=f"{settings.queue}{PRIORITY_SEP}*")]:
            payloads.extend(json.loads(raw) for raw in client.lrange(key, 0, -1))
        for raw in client.hvals(UNACKED_KEY):
            payload, _exchange, routing_key = json.loads(raw)
            if routing_key == settings.queue:  # other deployments may share the Redis database
                payloads.append(payload)
    finally:
        client.close()
    return {task for task in map(_task_of, payloads) if task is not None}
