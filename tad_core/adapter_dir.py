"""The on-disk layout of a PEFT adapter directory, in one place: PEFT's config and weight files (safetensors, or
pickled `.bin` that only a trusting caller may load) and `tad train`'s manifest. The loader, the submission
checks, the regression gate and the calibration cache all find an adapter's files through these names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
MANIFEST = "tad_manifest.json"  # written by `tad train`
MANIFEST_NAMES = (MANIFEST, "manifest.json")  # read in this order (older adapters wrote manifest.json)


def weights_file(adapter_dir: Path) -> Path | None:
    """The adapter's weights: the safetensors file when there is one, else the pickled file, else None."""
    for name in (SAFETENSORS, PICKLED):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's training manifest ({} when it has none or it is unreadable: a manifest is informative)."""
    for name in MANIFEST_NAMES:
        if (adapter_dir / name).is_file():
            try:
                data = json.loads((adapter_dir / name).read_text())
            except (OSError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}
