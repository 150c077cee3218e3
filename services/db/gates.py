"""Gates store: each adapter family's default gate suites and the gates queued for new adapter versions
(services.gates runs them). Functions of a Session returning plain types (services.db.entities); they never
commit. Status changes that several workers may race on are conditional UPDATEs: exactly one wins."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from services.db.entities import GATE_FINISHED, GateRunInfo, NotFound
from services.db.dialect import db_cutoff, db_now
from services.db.models import Adapter, AdapterFamily, GateRun, Suite


def family_gate_suites(session: Session, family: str) -> list[str]:
    """The suites every new version of adapter family `family` is gated on ([] when none are set)."""
    row = session.get(AdapterFamily, family)
    return list(row.gate_suites) if row is not None else []


def set_family_gate_suites(session: Session, family: str, suites: Sequence[str]) -> None:
    """Name the default gate suites of a family (replacing earlier ones; [] clears them)."""
    row = session.get(AdapterFamily, family)
    if row is None:
        session.add(AdapterFamily(name=family, gate_suites=list(suites)))
    else:
        row.gate_suites = list(suites)
    session.flush()


def create_gate_run(session: Session, *, candidate_id: int, suite_id: int, alpha: float, min_effect: float,
                    submitted_by: str = "", baseline_id: int | None = None) -> GateRunInfo:
    """A queued gate of adapter version `candidate_id` on suite `suite_id`, against version `baseline_id`."""
    row = GateRun(candidate_id=candidate_id, suite_id=suite_id, baseline_id=baseline_id, status="queued",
                  alpha=alpha, min_effect=min_effect, job_ids=[], submitted_by=submitted_by,
                  created_at=db_now(session))
    session.add(row)
    session.flush()
    return get_gate_run(session, row.id)


def _query():  # noqa: ANN202 - a select of (GateRun, candidate name, version, suite name, version, baseline version)
    cand, base = aliased(Adapter), aliased(Adapter)
    return (select(GateRun, cand.name, cand.version, Suite.name, Suite.version, base.version)
            .join(cand, cand.id == GateRun.candidate_id).join(Suite, Suite.id == GateRun.suite_id)
            .outerjoin(base, base.id == GateRun.baseline_id)), cand


def _info(g: GateRun, cn: str, cv: int, sn: str, sv: int, bv: int | None) -> GateRunInfo:
    return GateRunInfo(g.id, g.candidate_id, f"{cn}:{cv}", g.suite_id, f"{sn}:{sv}", g.status, g.alpha, g.min_effect,
                       [int(j) for j in (g.job_ids or [])], g.check_id, g.error, g.submitted_by, g.created_at,
                       g.finished_at, None if bv is None else f"{cn}:{bv}")


def get_gate_run(session: Session, gate_id: int) -> GateRunInfo:
    stmt, _ = _query()
    row = session.execute(stmt.where(GateRun.id == gate_id).execution_options(populate_existing=True)).first()
    if row is None:
        raise NotFound(f"gate {gate_id} does not exist")
    return _info(*row)


def gate_runs(session: Session, *, adapter_name: str | None = None, candidate_ids: Sequence[int] | None = None,
              open_only: bool = False, limit: int = 500) -> list[GateRunInfo]:
    """Gates, newest first: of one family, of some adapter versions, or only those without an outcome yet."""
    stmt, cand = _query()
    if adapter_name is not None:
        stmt = stmt.where(cand.name == adapter_name)
    if candidate_ids is not None:
        stmt = stmt.where(GateRun.candidate_id.in_(list(candidate_ids)))
    if open_only:
        stmt = stmt.where(GateRun.status.not_in(GATE_FINISHED))
    return [_info(*r) for r in session.execute(stmt.order_by(GateRun.id.desc()).limit(limit))]


def queued_gate_ids_older_than(session: Session, age_s: float) -> list[int]:
    """Ids of the gates still `queued` that were stored more than `age_s` seconds ago, by the database's clock
    (the candidates for a lost message)."""
    cutoff = db_cutoff(session, age_s)
    return list(session.scalars(select(GateRun.id).where(GateRun.status == "queued", GateRun.created_at < cutoff)
                                .order_by(GateRun.id)))


def move_gate_run(session: Session, gate_id: int, from_status: str, to_status: str, **values: object) -> bool:
    """Set a gate's status (and other columns) only if it is still `from_status`; True when this call did it."""
    if to_status in GATE_FINISHED:
        values.setdefault("finished_at", db_now(session))
    res = session.execute(update(GateRun).where(GateRun.id == gate_id, GateRun.status == from_status)
                          .values(status=to_status, **values))
    return res.rowcount == 1
