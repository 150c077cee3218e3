"""The Celery application: JSON-only, late acks, one task at a time per process, redelivery on worker loss.

Settings (see ARCHITECTURE.md "Celery settings that matter"): `task_acks_late` + `task_reject_on_worker_lost`
so a shard whose worker dies is redelivered; `worker_prefetch_multiplier=1` so a busy process holds no extra
shards; `worker_proc_alive_timeout` (TAD_WORKER_PROC_ALIVE_TIMEOUT) long enough for a child's start-up;
`visibility_timeout` (TAD_VISIBILITY_TIMEOUT) above the longest shard so Redis does not redeliver a shard
that is still running; the redelivery cap lives in the DB (`shards.attempts`, TAD_MAX_REDELIVERIES). No result
backend: progress and results live in the results DB. Importing this module never imports torch: models are
loaded lazily in the worker's child processes, never before fork.
"""
from __future__ import annotations

from celery import Celery

from services.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (the broker, queue and timeouts)."""
    settings = settings or get_settings()
    app = Celery("tad", broker=settings.broker_url, include=["services.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout,
        task_default_queue=settings.queue,
        task_create_missing_queues=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 10,
            "health_check_interval": 25,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_pool_limit=2,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_track_started=False,
        timezone="UTC",
    )
    return app


app = make_celery()
