"""docker-compose.yml cannot run here (no Docker engine): check its structure and that its commands exist."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.main import get_command

from services.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _cli_has(argv: list[str]) -> bool:
    """Whether `tad <argv...>` names an existing (sub)command and its options exist."""
    assert argv[0] == "tad"
    cmd = get_command(app)
    args = argv[1:]
    while hasattr(cmd, "commands") and args and args[0] in cmd.commands:
        cmd, args = cmd.commands[args[0]], args[1:]
    if hasattr(cmd, "commands"):
        return False
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    return all(a in opts for a in args if a.startswith("--"))


def test_services_and_dependencies() -> None:
    c = _compose()
    services = c["services"]
    assert {"postgres", "redis", "migrate", "worker", "dashboard", "api"} <= services.keys()
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    assert any("pgdata" in v for v in services["postgres"]["volumes"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for svc in ("worker", "dashboard", "api"):
        assert services[svc]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--appendonly" in services["redis"]["command"]


def test_secrets_come_from_required_env_vars() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "TAD_SUBMIT_TOKEN", "TAD_MODELS_DIR"):
        assert re.search(r"\$\{" + var + r":\?", text), var
    env = _compose()["services"]["worker"]["environment"]
    assert env["TAD_DATABASE_URL"].startswith("postgresql+psycopg://") and "${POSTGRES_PASSWORD:?" in env["TAD_DATABASE_URL"]
    # no literal secret: every password / token value is an environment reference
    for key, value in re.findall(r"^\s*(\w*(?:PASSWORD|TOKEN)\w*):\s*(.+)$", text, flags=re.M):
        assert value.strip().startswith("${"), key


def test_commands_exist_in_the_cli() -> None:
    services = _compose()["services"]
    for name in ("migrate", "worker", "dashboard", "api"):
        command = services[name]["command"]
        assert _cli_has(command), (name, command)
    assert not _cli_has(["tad", "no-such-command"])


def test_dockerfile_installs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" in text and "pip install --no-deps -e ." in text


def test_api_service_listens_on_every_interface_with_the_db_and_broker() -> None:
    api = _compose()["services"]["api"]
    command = api["command"]
    assert command[:2] == ["tad", "serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert any(p.endswith(":8000") for p in api["ports"])
    env = api["environment"]
    assert env["TAD_DATABASE_URL"].startswith("postgresql+psycopg://") and env["TAD_BROKER_URL"].startswith("redis://")
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/health" in " ".join(api["healthcheck"]["test"])
