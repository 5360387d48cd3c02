"""Model registry and loading: ``models/registry.json`` names the shipped weights.

Registry format (one JSON file)::

    {
      "aliases": {"default": "unet"},
      "models": {
        "unet": {"file": "histo-unet/model.safetensors", "sha256": "...",
                 "architecture": "HistoUNet", "config": {"widths": [...], "n_outputs": 6},
                 "working_pixel_size_um": 1.0, "description": "..."},
        "classical": {"architecture": "classical", "working_pixel_size_um": 1.0, ...}
      }
    }

Paths in ``file`` are relative to the registry's folder. Loading verifies the sha256 of the file
before reading it; a missing, corrupt or tampered file raises :class:`histo.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from histo.errors import ModelError

#: the registry shipped with histo (``models/registry.json`` at the repository root)
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "models" / "registry.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_registry(path: str | Path | None = None) -> dict:
    """Read a registry file (default: the shipped ``models/registry.json``)."""
    p = Path(path) if path is not None else DEFAULT_REGISTRY
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelError(f"model registry {p} not found") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"model registry {p} is unreadable: {exc}") from None
    if not isinstance(data, dict) or "models" not in data:
        raise ModelError(f"model registry {p} has no 'models' table")
    data.setdefault("aliases", {})
    return data


def resolve(name: str, registry: dict) -> tuple[str, dict]:
    """Entry of ``name`` (after aliases) in a registry."""
    key = registry["aliases"].get(name, name)
    if key not in registry["models"]:
        known = sorted(set(registry["models"]) | set(registry["aliases"]))
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known)}")
    return key, registry["models"][key]


def verified_path(entry: dict, root: Path, name: str) -> Path:
    """The weights file of a registry entry, after checking it exists and matches its sha256."""
    if "file" not in entry:
        raise ModelError(f"model {name!r} has no weights file in the registry")
    path = (root / entry["file"]).resolve()
    if not path.is_file():
        raise ModelError(f"weights of model {name!r} missing: {path}")
    expected = entry.get("sha256")
    if not expected:
        raise ModelError(f"model {name!r} has no sha256 in the registry; refusing to load {path}")
    actual = _sha256(path)
    if actual != expected:
        raise ModelError(
            f"weights {path} do not match the registry checksum (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...): corrupt or tampered file"
        )
    return path


def register_weights(
    name: str,
    weights: str | Path,
    registry_path: str | Path | None = None,
    description: str | None = None,
) -> dict:
    """Record trained weights in a registry (file path relative to it, sha256, config).

    The network config and working resolution are read from the safetensors metadata.
    Returns the new entry. The registry is rewritten atomically.
    """
    from safetensors import safe_open

    reg_path = Path(registry_path) if registry_path is not None else DEFAULT_REGISTRY
    weights = Path(weights).resolve()
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelError(f"cannot read weights {weights}: {exc}") from None
    registry = read_registry(reg_path) if reg_path.exists() else {"aliases": {}, "models": {}}
    entry = {
        "file": str(weights.relative_to(reg_path.resolve().parent)),
        "sha256": _sha256(weights),
        "architecture": meta.get("architecture", "HistoUNet"),
        "config": meta.get("config", {}),
        "working_pixel_size_um": float(meta.get("working_pixel_size_um", 1.0)),
        "size_bytes": weights.stat().st_size,
        "description": description
        or registry["models"]
        .get(name, {})
        .get("description", "compact U-Net trained on synthetic sections"),
    }
    registry["models"][name] = entry
    tmp = reg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(registry, indent=2) + "\n")
    tmp.replace(reg_path)
    return entry
