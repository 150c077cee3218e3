"""Regression gates: `tad adapters register|list|promote`, `tad suites add|list`, `tad regress`.

`tad regress` exits 0 when nothing regressed, 1 when something did, 2 on usage or input errors (and when an
evaluation it needed did not finish, so there is no verdict), so a CI pipeline can gate on it.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from services.refs import MAX_ID

from services.cli.common import (ApiTokenOpt, ServerOpt, TokenOpt, UserOpt, api_client, cell, check_schema,
                                 cli_settings, fail, fail_listing, json_default, progress_bar, user_errors)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for machines")]


@contextmanager
def _gate_errors() -> Iterator[None]:
    """The errors of this module a user can fix: one message, exit code 2, no traceback."""
    from tad_core.models import ModelLoadError

    from services.refs import RefError
    from services.regress import EvaluationFailed, GateError
    from services.suites import SuiteError

    with user_errors():
        try:
            yield
        except SuiteError as e:
            fail_listing("invalid suite", e.errors)
        except (GateError, RefError, ModelLoadError) as e:
            fail(str(e))
        except EvaluationFailed as e:
            fail(f"no verdict: {e}")


def _manifest_summary(manifest: dict[str, Any]) -> str:
    if not manifest:
        return ""
    parts = []
    if "train_size" in manifest:
        parts.append(f"{manifest['train_size']} {manifest.get('dataset', '?')}:{manifest.get('split', '?')} samples")
    if "steps" in manifest:
        parts.append(f"{manifest['steps']} steps")
    if "final_loss" in manifest:
        parts.append(f"final loss {manifest['final_loss']:.3f}")
    return ", ".join(parts)


def register(app: typer.Typer) -> None:
    """Add the adapters / suites groups and the regress command to the `tad` app."""
    adapters_app = typer.Typer(help="Adapter registry: versions, weights hash, promoted baseline.",
                               no_args_is_help=True)
    app.add_typer(adapters_app, name="adapters")
    suites_app = typer.Typer(help="Regression suites: named, versioned sets of datasets x strategies.",
                             no_args_is_help=True)
    app.add_typer(suites_app, name="suites")

    @adapters_app.command("register")
    def adapters_register(
        name: Annotated[str, typer.Argument(help="adapter family name (letters, digits, _ . -)")],
        directory: Annotated[Path, typer.Argument(metavar="DIR", help="PEFT adapter directory")],
        version: Annotated[Optional[int], typer.Option("--version", min=1, max=MAX_ID, help="version number (default: "
                                                       "next free one)")] = None,
        base: Annotated[Optional[str], typer.Option("--base", help="base model it belongs to (default: the one "
                                                    "in tad_manifest.json, else smollm2-135m-instruct)")] = None,
        gate: Annotated[Optional[list[str]], typer.Option("--gate", metavar="SUITE", help="queue the regression "
                                                          "gate on this suite on the workers (repeatable; default: "
                                                          "the family's gate suites, tad adapters gates)")] = None,
        wait: Annotated[bool, typer.Option("--wait", help="wait for the gates' verdicts; exit 0 passed, 1 "
                                           "regressed, 2 no verdict")] = False,
        timeout: Annotated[Optional[float], typer.Option("--timeout", min=1.0, help="with --wait: give up after "
                                                         "this many seconds (exit 2)")] = None,
        alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="gate significance level")] = 0.05,
        min_effect: Annotated[float, typer.Option("--min-effect", min=0.0, max=1.0,
                                                  help="gate: smallest accuracy change that counts")] = 0.01,
        user: UserOpt = "",
        server: ServerOpt = None,
        api_token: ApiTokenOpt = None,
    ) -> None:
        """Register an adapter directory as a new version of NAME (identical weights: nothing to do), and queue
        its regression gates on the workers. With --server, DIR is a directory on the server (inside its model
        roots) and everything goes through the API (no database credentials)."""
        from services.gates import gate_exit_code, wait_for_gates

        if server:
            from services.cli import remote

            client = api_client(server, api_token)
            body = {"name": name, "path": str(directory), "version": version, "base": base, "gate": gate or [],
                    "alpha": alpha, "min_effect": min_effect}
            reply = remote.register_adapter(client, body)
            info, created, twins = reply["adapter"], reply["created"], reply["twins"]
            warnings, skipped, queued = reply["warnings"], reply["gates_skipped"], reply["gates"]
            settings = None

            def fetch(gate_id: int) -> Any:
                return remote.gate(client, gate_id)
        else:
            from services.registration import register_adapter_dir

            settings = cli_settings()
            with _gate_errors():
                check_schema(settings, migrate_embedded=True)
                reg = register_adapter_dir(name, str(directory), version=version, base=base, gate=gate or None,
                                           alpha=alpha, min_effect=min_effect, submitted_by=user or "",
                                           settings=settings)
            info, created, twins = reg.adapter, reg.created, reg.twins
            warnings, skipped, queued = reg.warnings, reg.gates_skipped, reg.gates
            fetch = None
        for warning in warnings:
            typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
        if not created:
            typer.echo(f"{info.label} already has these weights (sha256 {info.sha256[:12]}): nothing registered")
        else:
            summary = _manifest_summary(info.manifest)
            typer.echo(f"registered {info.label}: {info.method}, sha256 {info.sha256[:12]}, base {info.base_model}"
                       + (f", trained on {summary}" if summary else "") + f"\n  {info.path}")
        if twins:
            typer.echo(f"  note: the same weights are registered as {', '.join(twins)}")
        if skipped:
            typer.secho(f"note: {skipped}", err=True, fg=typer.colors.YELLOW)
        for g in queued:
            typer.echo(f"gate {g.id}: {g.candidate} on suite {g.suite}: {g.status}")
        if not (wait and queued):
            return
        gates = wait_for_gates([g.id for g in queued], settings, timeout=timeout, fetch=fetch)
        for g in gates:
            typer.echo(f"gate {g.id}: {g.candidate} on suite {g.suite}: {g.status}"
                       + (f" (check {g.check_id})" if g.check_id else "") + (f": {g.error}" if g.error else ""))
        raise typer.Exit(gate_exit_code(gates))

    @adapters_app.command("gates")
    def adapters_gates(
        name: Annotated[str, typer.Argument(help="adapter family name")],
        suites: Annotated[Optional[list[str]], typer.Argument(metavar="[SUITE]...", help="suites every new "
                                                              "version is gated on")] = None,
        clear: Annotated[bool, typer.Option("--clear", help="gate new versions on no suite")] = False,
    ) -> None:
        """Show or set the default gate suites of an adapter family (what `register` queues without --gate)."""
        from services.db import store
        from services.db.session import session_scope
        from services.registration import set_default_gates

        settings = cli_settings()
        with _gate_errors():
            check_schema(settings, migrate_embedded=True)
            if suites or clear:
                current = set_default_gates(name, [] if clear else suites or [], settings)
            else:
                with session_scope(settings) as s:
                    current = store.family_gate_suites(s, name)
        typer.echo(f"{name}: new versions are gated on " + (", ".join(current) if current else "no suite"))

    @adapters_app.command("list")
    def adapters_list(name: Annotated[Optional[str], typer.Argument(help="only this family")] = None,
                      as_json: JsonOpt = False) -> None:
        """List registered adapter versions (★ = promoted baseline) with their gates' verdicts."""
        from rich.console import Console
        from rich.table import Table

        from services.db import store
        from services.db.session import session_scope
        from services.gates import newest_per_suite

        settings = cli_settings()
        with _gate_errors():
            check_schema(settings, migrate_embedded=True)
        with session_scope(settings) as s:
            rows = store.list_adapters(s, name)
            gates = store.gate_runs(s, candidate_ids=[a.id for a in rows]) if rows else []
        by_adapter = newest_per_suite(gates)
        if as_json:
            typer.echo(json.dumps([{**asdict(a), "gates": [{"id": g.id, "suite": g.suite, "status": g.status,
                                                            "verdict": g.verdict, "check_id": g.check_id,
                                                            "error": g.error} for g in by_adapter.get(a.id, [])]}
                                   for a in rows], default=json_default))
            return
        table = Table()
        for col in ("adapter", "promoted", "gates", "method", "base", "sha256", "trained on", "registered", "path"):
            table.add_column(col, overflow="fold")
        for a in rows:
            verdicts = "\n".join(f"{g.suite} {g.status}" for g in by_adapter.get(a.id, [])) or "-"
            table.add_row(cell(a.label), "★" if a.promoted else "", cell(verdicts), cell(a.method),
                          cell(a.base_model), a.sha256[:12], cell(_manifest_summary(a.manifest) or "-"),
                          a.created_at.strftime("%Y-%m-%d %H:%M"), cell(a.path))
        Console(width=200).print(table)

    @adapters_app.command("promote")
    def adapters_promote(ref: Annotated[str, typer.Argument(metavar="NAME:VERSION")]) -> None:
        """Mark NAME:VERSION as the accepted baseline of its family (what `tad regress` compares with)."""
        from services.db import store
        from services.db.session import session_scope
        from services.refs import parse_ref
        from services.regress import GateError

        settings = cli_settings()
        with _gate_errors():
            check_schema(settings, migrate_embedded=True)
            name, version = parse_ref(ref, "adapter")
            if version is None:
                raise GateError(f"adapter {ref!r}: give the version to promote, NAME:VERSION")
            with session_scope(settings) as s:
                info = store.promote_adapter(s, name, version)
        typer.echo(f"promoted {info.label} (sha256 {info.sha256[:12]}): the baseline of `tad regress {name}:N`")

    @suites_app.command("add")
    def suites_add(file: Annotated[Path, typer.Argument(metavar="FILE", help="suite YAML file")]) -> None:
        """Validate a suite file and store it (the same definition again: nothing to do)."""
        from services.db import store
        from services.db.session import session_scope
        from services.regress import GateError
        from services.suites import load_suite_file

        settings = cli_settings()
        with _gate_errors():
            spec = load_suite_file(file)
            check_schema(settings, migrate_embedded=True)
            with session_scope(settings) as s:
                try:
                    info, created = store.add_suite(s, name=spec.name, version=spec.version, spec=spec.to_json(),
                                                    sha256=spec.sha256, source=str(Path(file).resolve()))
                except ValueError as e:
                    raise GateError(str(e)) from None
        what = f"{len(spec.datasets)} dataset(s) x {len(spec.strategies)} strategy spec(s)"
        typer.echo(f"added suite {info.label}: {what}" if created else
                   f"suite {info.label} is already stored with this definition: nothing added")

    @suites_app.command("list")
    def suites_list(as_json: JsonOpt = False) -> None:
        """List stored suites."""
        from rich.console import Console
        from rich.table import Table

        from services.db import store
        from services.db.session import session_scope
        from services.suites import SuiteSpec

        settings = cli_settings()
        with _gate_errors():
            check_schema(settings, migrate_embedded=True)
        with session_scope(settings) as s:
            rows = store.list_suites(s)
        if as_json:
            typer.echo(json.dumps([asdict(x) for x in rows], default=json_default))
            return
        table = Table()
        for col in ("suite", "datasets", "strategies", "config", "added"):
            table.add_column(col, overflow="fold")
        for x in rows:
            spec = SuiteSpec.from_json(x.spec)
            table.add_row(cell(x.label), cell("\n".join(d.label for d in spec.datasets)),
                          cell(", ".join(spec.strategies)),
                          cell(", ".join(f"{k}={v}" for k, v in spec.config.items()) or "-"),
                          x.created_at.strftime("%Y-%m-%d %H:%M"))
        Console(width=180).print(table)

    @app.command()
    def regress(
        candidate: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="candidate adapter version")],
        suite: Annotated[str, typer.Option("--suite", help="suite NAME or NAME:VERSION")],
        against: Annotated[Optional[str], typer.Option("--against", metavar="NAME:VERSION",
                                                       help="baseline (default: the promoted version)")] = None,
        alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="significance level")] = 0.05,
        min_effect: Annotated[float, typer.Option("--min-effect", min=0.0, max=1.0,
                                                  help="smallest accuracy change that counts")] = 0.01,
        as_json: JsonOpt = False,
        force: Annotated[bool, typer.Option("--force", help="recompute even when identical runs exist")] = False,
        workers: Annotated[bool, typer.Option("--workers", help="run the jobs on the Celery workers (default: "
                                              "in this process)")] = False,
        timeout: Annotated[Optional[float], typer.Option("--timeout", min=1.0, help="with --workers: give up "
                                                         "after this many seconds")] = None,
        token: TokenOpt = None,
        user: UserOpt = "",
    ) -> None:
        """Gate a candidate adapter version against its baseline on a suite (exit 0: passed, 1: regressed, 2: error)."""
        from services.regress import finish_gate, plan_gate, run_embedded, run_on_workers

        settings = cli_settings()
        with _gate_errors():
            check_schema(settings, migrate_embedded=not workers)
            plan = plan_gate(candidate, suite, against, alpha=alpha, min_effect=min_effect, force=force,
                             submitted_by=user or "", token=token, settings=settings)
            reused = sum(1 for side in plan.sides if side.reused)
            typer.echo(f"{plan.candidate.label} vs {plan.baseline.label} on suite {plan.suite.label}: "
                       f"{len(plan.jobs)} job(s) to run ({plan.total_samples} samples), "
                       f"{reused} of {len(plan.sides)} dataset run(s) reused", err=True)
            if plan.jobs:
                with progress_bar(plan.total_samples, "regress") as bar:
                    if workers:
                        def _set(done: int) -> None:
                            bar.n = done
                            bar.refresh()

                        run_on_workers(plan, settings, progress=_set, timeout=timeout)
                    else:
                        run_embedded(plan, settings, progress=bar.update)
            result = finish_gate(plan, settings)
        if as_json:
            typer.echo(json.dumps(result.to_json(), default=json_default))
        else:
            _print_gate(result)
        raise typer.Exit(result.exit_code)


def _print_gate(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"regressed": "red", "improved": "green", "unchanged": "", "no data": "yellow", "too few": "yellow",
               "errors": "yellow"}
    table = Table(title=f"tad regress {cell(result.candidate)} vs {cell(result.baseline)} on suite {cell(result.suite)} "
                        f"(alpha {result.alpha:g}, min effect {result.min_effect:g})")
    for col in ("dataset", "strategy", "n", "baseline acc", "candidate acc", f"diff [{1 - result.alpha:.0%} CI]",
                "fixed/broken", "McNemar p", "p Holm", "verdict", "runs (baseline/candidate)"):
        table.add_column(col, justify="left" if col in ("dataset", "strategy", "verdict") else "right")
    for r in result.rows:
        diff = "-" if r.diff is None else f"{r.diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
        runs = (f"{r.baseline_run_id}{' (reused)' if r.baseline_reused else ''} / "
                f"{r.candidate_run_id}{' (reused)' if r.candidate_reused else ''}")
        verdict = f"[{colours[r.verdict]}]{r.verdict}[/]" if colours.get(r.verdict) else r.verdict
        table.add_row(cell(f"{r.dataset}:{r.split}" + (f"[:{r.limit}]" if r.limit else "")), cell(r.strategy), str(r.n),
                      "-" if r.baseline_acc is None else f"{r.baseline_acc:.4f}",
                      "-" if r.candidate_acc is None else f"{r.candidate_acc:.4f}", diff,
                      f"{r.fixed}/{r.broken}", "-" if r.p_value is None else f"{r.p_value:.4g}",
                      "-" if r.p_holm is None else f"{r.p_holm:.4g}", verdict, runs)
    console = Console(width=200)
    console.print(table)
    n_reg = sum(r.verdict == "regressed" for r in result.rows)
    n_imp = sum(r.verdict == "improved" for r in result.rows)
    if n_reg:
        console.print(f"[red]REGRESSED[/]: {n_reg} of {len(result.rows)} (dataset, strategy) rows; exit 1 "
                      f"(check {result.check_id})")
    elif result.undecided:
        console.print(f"[yellow]NO VERDICT[/]: {cell(result.why_undecided)}; exit 2 (nothing stored)")
    else:
        console.print(f"[green]PASSED[/]: nothing regressed ({n_imp} improved, "
                      f"{len(result.rows) - n_imp} unchanged); exit 0 (check {result.check_id})")
