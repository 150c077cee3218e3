"""The API's job body is derived from the store's JobInfo: a field added to the store reaches the API."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

from services.api.schemas import JobOut, job_out
from services.db.entities import JobInfo


def _job() -> JobInfo:
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    return JobInfo(id=7, status="running", submitted_by="alice", created_at=now, spec={"dataset": "arc_easy"},
                   dataset_id=1, adapter_id=None, base_model_id=1, cancel_requested=False, n_samples=10, n_shards=2,
                   shards_done=1, shards_failed=0, samples_done=4, error=None, started_at=now, finished_at=None,
                   owner_id=3)


def test_job_body_has_every_store_field_but_the_owner_id_plus_owner_progress_finished() -> None:
    store_fields = {f.name for f in dataclasses.fields(JobInfo)}
    assert set(JobOut.model_fields) == (store_fields - {"owner_id"}) | {"owner", "progress", "finished"}


def test_job_body_validates_what_job_out_builds() -> None:
    body = JobOut.model_validate(job_out(_job(), "alice"))
    assert (body.id, body.owner, body.progress, body.finished) == (7, "alice", 0.4, False)
    assert "owner_id" not in body.model_dump()
