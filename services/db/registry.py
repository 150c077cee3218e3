"""Registry store: base models, adapters (versions, promotion), datasets and their samples, regression suites
and gate verdicts. Functions of a Session returning plain types (services.db.entities); they never commit."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from services.db.entities import (AdapterInfo, BaseModelInfo, DatasetInfo, NotFound, RegressionCheckInfo,
                                  SuiteInfo)
from services.db.models import Adapter, BaseModel, Dataset, DatasetSample, RegressionCheck, Suite


def _base_info(m: BaseModel) -> BaseModelInfo:
    return BaseModelInfo(m.id, m.name, m.path, m.sha256, m.licence)


def _adapter_info(a: Adapter, base_name: str) -> AdapterInfo:
    return AdapterInfo(a.id, a.name, a.version, a.path, a.method, a.sha256, a.base_model_id, base_name,
                       dict(a.manifest or {}), bool(a.promoted), a.created_at)


def _dataset_info(d: Dataset) -> DatasetInfo:
    return DatasetInfo(d.id, d.name, d.version, d.split, d.content_hash, d.task_type, d.n_rows, d.source)


def get_base_model(session: Session, base_model_id: int) -> BaseModelInfo:
    row = session.get(BaseModel, base_model_id)
    if row is None:
        raise NotFound(f"base model {base_model_id} does not exist")
    return _base_info(row)


def get_or_create_base_model(session: Session, name: str, path: str, sha256: str | None = None,
                             licence: str | None = None) -> BaseModelInfo:
    """The base model row for `name`, created on first use; a sha256 or licence learnt later is filled in."""
    row = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if row is None:
        row = BaseModel(name=name, path=path, sha256=sha256, licence=licence)
        session.add(row)
        session.flush()
    else:
        if sha256 and not row.sha256:
            row.sha256 = sha256
        if licence and not row.licence:
            row.licence = licence
    return _base_info(row)


def register_adapter(
    session: Session,
    *,
    name: str,
    path: str,
    method: str,
    sha256: str,
    base_model_id: int,
    manifest: dict[str, Any] | None = None,
    version: int | None = None,
) -> tuple[AdapterInfo, bool]:
    """Register a version of adapter `name`; identical weights (same name and sha256) return the existing one.

    Returns (adapter, created). The version is auto-incremented unless given; a given version that exists with
    other weights raises ValueError.
    """
    base_name = session.scalar(select(BaseModel.name).where(BaseModel.id == base_model_id))
    if base_name is None:
        raise NotFound(f"base model id {base_model_id} does not exist")
    same = session.scalar(select(Adapter).where(Adapter.name == name, Adapter.sha256 == sha256)
                          .order_by(Adapter.version.desc()))
    if same is not None and (version is None or version == same.version):
        return _adapter_info(same, base_name), False
    if version is None:
        version = (session.scalar(select(func.max(Adapter.version)).where(Adapter.name == name)) or 0) + 1
    elif session.scalar(select(Adapter.id).where(Adapter.name == name, Adapter.version == version)) is not None:
        raise ValueError(f"adapter {name}:{version} already exists with other weights")
    row = Adapter(name=name, version=version, path=path, method=method, sha256=sha256, base_model_id=base_model_id,
                  manifest=manifest or {}, promoted=False)
    session.add(row)
    session.flush()
    return _adapter_info(row, base_name), True


def find_adapter(session: Session, name: str, version: int | None = None) -> AdapterInfo | None:
    """Adapter `name` at `version`, or its latest version when `version` is None."""
    stmt = select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id).where(Adapter.name == name)
    stmt = stmt.where(Adapter.version == version) if version is not None else stmt.order_by(Adapter.version.desc())
    row = session.execute(stmt.limit(1)).first()
    return _adapter_info(row[0], row[1]) if row else None


def get_adapter(session: Session, adapter_id: int) -> AdapterInfo:
    row = session.execute(select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
                          .where(Adapter.id == adapter_id)).first()
    if row is None:
        raise NotFound(f"adapter id {adapter_id} does not exist")
    return _adapter_info(row[0], row[1])


def list_adapters(session: Session, name: str | None = None) -> list[AdapterInfo]:
    stmt = select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
    if name is not None:
        stmt = stmt.where(Adapter.name == name)
    return [_adapter_info(a, b) for a, b in session.execute(stmt.order_by(Adapter.name, Adapter.version))]


def promote_adapter(session: Session, name: str, version: int) -> AdapterInfo:
    """Mark `name:version` as the accepted baseline (and no other version of `name`)."""
    target = find_adapter(session, name, version)
    if target is None:
        raise NotFound(f"adapter {name}:{version} does not exist")
    session.execute(update(Adapter).where(Adapter.name == name).values(promoted=(Adapter.version == version)))
    session.flush()
    return get_adapter(session, target.id)


def promoted_adapter(session: Session, name: str) -> AdapterInfo | None:
    row = session.execute(select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
                          .where(Adapter.name == name, Adapter.promoted.is_(True))).first()
    return _adapter_info(row[0], row[1]) if row else None


def register_dataset(
    session: Session,
    *,
    name: str,
    split: str,
    content_hash: str,
    task_type: str,
    source: str,
    samples: Sequence[dict[str, Any]],
) -> tuple[DatasetInfo, bool]:
    """Store a dataset and its samples once per content hash; returns (dataset, created)."""
    existing = session.scalar(select(Dataset).where(Dataset.content_hash == content_hash))
    if existing is not None:
        return _dataset_info(existing), False
    version = (session.scalar(select(func.max(Dataset.version)).where(Dataset.name == name)) or 0) + 1
    row = Dataset(name=name, version=version, split=split, content_hash=content_hash, task_type=task_type,
                  n_rows=len(samples), source=source)
    session.add(row)
    session.flush()
    if samples:
        session.execute(
            DatasetSample.__table__.insert(),
            [{"dataset_id": row.id, "idx": i, "sample_id": str(s["id"]), "sample": s} for i, s in enumerate(samples)],
        )
    return _dataset_info(row), True


def get_dataset(session: Session, dataset_id: int) -> DatasetInfo:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset id {dataset_id} does not exist")
    return _dataset_info(row)


def list_datasets(session: Session) -> list[DatasetInfo]:
    return [_dataset_info(d) for d in session.scalars(select(Dataset).order_by(Dataset.name, Dataset.version))]


def load_samples(session: Session, dataset_id: int, start: int, stop: int) -> list[dict[str, Any]]:
    """The stored sample dicts with index in [start, stop), in index order."""
    stmt = (select(DatasetSample.sample).where(DatasetSample.dataset_id == dataset_id, DatasetSample.idx >= start,
                                               DatasetSample.idx < stop).order_by(DatasetSample.idx))
    return [dict(s) for s in session.scalars(stmt)]


def _suite_info(x: Suite) -> SuiteInfo:
    return SuiteInfo(x.id, x.name, x.version, dict(x.spec), x.sha256, x.source, x.created_at)


def add_suite(session: Session, *, name: str, version: int, spec: dict[str, Any], sha256: str,
              source: str = "") -> tuple[SuiteInfo, bool]:
    """Store suite `name:version`; returns (suite, created). The same definition again is a no-op; another
    definition under an existing version raises ValueError (a version is never redefined)."""
    row = session.scalar(select(Suite).where(Suite.name == name, Suite.version == version))
    if row is not None:
        if row.sha256 != sha256:
            raise ValueError(f"suite {name}:{version} already exists with another definition; give the changed "
                             "suite a new version")
        return _suite_info(row), False
    row = Suite(name=name, version=version, spec=spec, sha256=sha256, source=source)
    session.add(row)
    session.flush()
    return _suite_info(row), True


def find_suite(session: Session, name: str, version: int | None = None) -> SuiteInfo | None:
    """Suite `name` at `version`, or its newest version when `version` is None."""
    stmt = select(Suite).where(Suite.name == name)
    stmt = stmt.where(Suite.version == version) if version is not None else stmt.order_by(Suite.version.desc())
    row = session.scalars(stmt.limit(1)).first()
    return _suite_info(row) if row else None


def list_suites(session: Session) -> list[SuiteInfo]:
    return [_suite_info(x) for x in session.scalars(select(Suite).order_by(Suite.name, Suite.version))]


def record_regression_check(session: Session, *, suite_id: int, candidate_id: int, baseline_id: int, alpha: float,
                            min_effect: float, verdict: str, rows: Sequence[dict[str, Any]]) -> int:
    """Store one gate verdict with its rows; returns its id."""
    row = RegressionCheck(suite_id=suite_id, candidate_id=candidate_id, baseline_id=baseline_id, alpha=alpha,
                          min_effect=min_effect, verdict=verdict, rows=list(rows))
    session.add(row)
    session.flush()
    return row.id


def regression_checks(session: Session, adapter_name: str | None = None, limit: int = 100) -> list[RegressionCheckInfo]:
    """Gate verdicts (newest first), those whose candidate is a version of `adapter_name` when given."""
    cand, base = aliased(Adapter), aliased(Adapter)
    stmt = (select(RegressionCheck, Suite.name, Suite.version, cand.name, cand.version, base.name, base.version)
            .join(Suite, Suite.id == RegressionCheck.suite_id)
            .join(cand, cand.id == RegressionCheck.candidate_id).join(base, base.id == RegressionCheck.baseline_id))
    if adapter_name is not None:
        stmt = stmt.where(cand.name == adapter_name)
    out = []
    for c, sn, sv, cn, cv, bn, bv in session.execute(stmt.order_by(RegressionCheck.id.desc()).limit(limit)):
        out.append(RegressionCheckInfo(c.id, c.suite_id, f"{sn}:{sv}", c.candidate_id, f"{cn}:{cv}", c.baseline_id,
                                       f"{bn}:{bv}", c.alpha, c.min_effect, c.verdict, list(c.rows or []),
                                       c.created_at))
    return out
