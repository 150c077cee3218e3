"""The store facade: every read and write the services do, as functions of a Session.

The functions live in one module per area (services.db.registry, .jobs, .results, .workers, .gates) and return the
plain types of services.db.entities; they never commit: the caller's `session_scope()` decides. Writes that can be
repeated (a redelivered shard) are idempotent. This module re-exports them under one name because the CLI, the API,
the dashboard, the workers and the tests (some forty modules) all call `store.<function>`: one facade for every
caller, and the areas stay small.
"""
from __future__ import annotations

from services.db.entities import (  # noqa: F401
    TERMINAL_JOB,
    RESULT_COLUMNS,
    NotFound,
    BaseModelInfo,
    AdapterInfo,
    DatasetInfo,
    RunSpec,
    RunInfo,
    ShardInfo,
    JobInfo,
    ShardClaim,
    LeaderboardRow,
    DiffRow,
    GATE_FINISHED,
    GateRunInfo,
    RunDiff,
    SuiteInfo,
    RegressionCheckInfo,
    WorkerInfo,
)
from services.db.naming import (  # noqa: F401
    scoring_variant,
    with_variant,
)
from services.db.gates import (  # noqa: F401
    create_gate_run,
    family_gate_suites,
    gate_runs,
    queued_gate_ids_older_than,
    get_gate_run,
    move_gate_run,
    set_family_gate_suites,
)
from services.db.registry import (  # noqa: F401
    get_base_model,
    get_or_create_base_model,
    register_adapter,
    find_adapter,
    get_adapter,
    list_adapters,
    promote_adapter,
    promoted_adapter,
    register_dataset,
    get_dataset,
    list_datasets,
    load_samples,
    add_suite,
    find_suite,
    list_suites,
    record_regression_check,
    regression_checks,
)
from services.db.jobs import (  # noqa: F401
    create_job,
    get_job,
    list_jobs,
    open_job_ids,
    queued_shards_older_than,
    job_runs,
    job_shards,
    runs_by_hash,
    set_run_info,
    claim_shard,
    shard_progress,
    release_shard,
    finish_shard,
    request_cancel,
    cancel_requested,
    mark_job_failed,
)
from services.db.results import (  # noqa: F401
    upsert_sample_results,
    refresh_aggregates,
    run_aggregates,
    sample_rows,
    stored_sample_indices,
    count_sample_rows,
    leaderboard,
    run_diff,
)
from services.db.workers import (  # noqa: F401
    heartbeat,
    stale_running_shards,
    requeue_stale_shard,
    unrequeue_stale_shard,
    list_workers,
)
