"""Where models live, and how a model's name or path becomes verified weights.

Two places hold models:

* **Shipped models**, package data of ``histo`` (``histo/models/``, read with
  :mod:`importlib.resources`): ``registry.json`` names them, with each file's sha256.
* **User models** (fine-tuned ones), in the user model folder (:func:`user_models_dir`): one
  folder per model, ``NAME/model.safetensors`` with ``NAME/model.json`` beside it (the
  architecture config and the weights' sha256, as ``histo train`` writes them).

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

Paths in ``file`` are relative to the registry's folder. Weights are checked against their
sha256 before they are read; a missing, corrupt or tampered file raises
:class:`histo.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from histo.errors import ModelError

#: the weights and description of a model folder (user models, ``histo train``'s output)
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
#: environment variable naming the user model folder
USER_MODELS_ENV = "HISTO_MODELS"


def shipped_models_dir() -> Path:
    """The folder of the shipped models: ``models/`` inside the installed ``histo`` package."""
    folder = importlib.resources.files("histo") / "models"
    # histo is installed as files (wheels unpack), so this is a real folder; a zipped install
    # would need the weights extracted, which nothing here does
    return Path(str(folder))


#: the registry shipped with histo (package data)
DEFAULT_REGISTRY = shipped_models_dir() / "registry.json"


def user_models_dir(environ: dict[str, str] | None = None) -> Path:
    """The user model folder: ``$HISTO_MODELS``, else the platform's user data folder.

    Linux and other Unix: ``$XDG_DATA_HOME/histo/models`` (default ``~/.local/share``);
    macOS: ``~/Library/Application Support/histo/models``; Windows:
    ``%LOCALAPPDATA%\\histo\\models``. The folder need not exist.
    """
    env = os.environ if environ is None else environ
    if env.get(USER_MODELS_ENV):
        return Path(env[USER_MODELS_ENV]).expanduser()
    home = Path(env.get("HOME") or Path.home())
    if sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "histo" / "models"


def user_model_names(environ: dict[str, str] | None = None) -> list[str]:
    """Names of the models in the user model folder (folders holding ``model.safetensors``)."""
    root = user_models_dir(environ)
    try:
        return sorted(p.name for p in root.iterdir() if (p / MODEL_FILE).is_file())
    except OSError:
        return []


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_registry(path: str | Path | None = None) -> dict:
    """Read a registry file (default: the shipped one, :data:`DEFAULT_REGISTRY`)."""
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
    expected = entry.get("sha256")
    if not expected:
        raise ModelError(f"model {name!r} has no sha256 in the registry; refusing to load {path}")
    _check_sha256(path, expected, name, "the registry checksum")
    return path


def _check_sha256(path: Path, expected: str, name: str, source: str) -> None:
    if not path.is_file():
        raise ModelError(f"weights of model {name!r} missing: {path}")
    actual = file_sha256(path)
    if actual != expected:
        raise ModelError(
            f"weights {path} do not match {source} (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...): corrupt or tampered file"
        )


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are and what they must hash to.

    Attributes
    ----------
    name
        Registry key, model folder name or weights file stem.
    weights
        The ``.safetensors`` file (None: the classical baseline, which has none).
    sha256
        The checksum the weights must match (registry or ``model.json``); None when nothing
        records one (a bare weights file given by path).
    entry
        Registry entry or ``model.json``: ``architecture``, ``config``,
        ``working_pixel_size_um``.
    recorded_in
        Where :attr:`sha256` was read ("registry" or "model.json").
    """

    name: str
    weights: Path | None
    sha256: str | None
    entry: dict = field(default_factory=dict)
    recorded_in: str = "registry"  #: where :attr:`sha256` comes from, for messages

    def verify(self) -> str:
        """Check the weights against :attr:`sha256` (when recorded); returns their sha256."""
        if self.weights is None:
            raise ModelError(f"model {self.name!r} has no weights file")
        if self.sha256:
            source = f"the {self.recorded_in} checksum"
            _check_sha256(self.weights, self.sha256, self.name, source)
            return self.sha256
        if not self.weights.is_file():
            raise ModelError(f"model weights {self.weights} not found")
        return file_sha256(self.weights)


def locate_model(name_or_path: str | Path, registry: str | Path | None = None) -> ModelSource:
    """Find the model ``name_or_path`` names, without reading its weights.

    Looked up in this order: a path (a registry ``.json`` or a folder holding
    ``registry.json``: its default model; a model folder holding ``model.safetensors``; a
    ``.safetensors`` file), a name in ``registry`` (default: the shipped registry, aliases
    such as "default" allowed), a folder of that name in the user model folder.

    Raises
    ------
    histo.errors.ModelError
        Nothing of that name, or a path that is not a model.
    """
    key = str(name_or_path)
    path = Path(key).expanduser()
    if path.suffix == ".json" or (path.is_dir() and (path / "registry.json").exists()):
        return _from_registry("default", path if path.suffix == ".json" else path / "registry.json")
    if path.is_dir() or path.suffix in (".safetensors", ".pt", ".pth") or path.is_file():
        return _from_path(path)
    reg_path = Path(registry) if registry is not None else DEFAULT_REGISTRY
    reg = read_registry(reg_path)
    if registry is None and reg["aliases"].get(key, key) not in reg["models"]:
        user = user_models_dir() / key
        if (user / MODEL_FILE).is_file():
            return _from_model_dir(user)
        known = sorted(set(reg["models"]) | set(reg["aliases"]) | set(user_model_names()))
        raise ModelError(
            f"unknown model {key!r}; known models: {', '.join(known)} "
            f"(user models are folders in {user_models_dir()})"
        )
    return _from_registry(key, reg_path, reg)


def _from_registry(key: str, reg_path: Path, reg: dict | None = None) -> ModelSource:
    real, entry = resolve(key, reg if reg is not None else read_registry(reg_path))
    if entry.get("architecture") == "classical":
        return ModelSource(real, None, None, entry)
    if "file" not in entry:
        raise ModelError(f"model {real!r} has no weights file in the registry")
    if not entry.get("sha256"):
        raise ModelError(f"model {real!r} has no sha256 in the registry; refusing to load it")
    weights = (reg_path.resolve().parent / entry["file"]).resolve()
    return ModelSource(real, weights, entry["sha256"], entry)


def _from_path(path: Path) -> ModelSource:
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ModelError(f"model folder {path} holds no {MODEL_FILE}")
        return _from_model_dir(path)
    if not path.is_file():
        raise ModelError(f"model weights {path} not found")
    if path.suffix != ".safetensors":
        raise ModelError(f"model weights {path}: only .safetensors files are supported")
    if path.name == MODEL_FILE and (path.parent / MODEL_JSON).is_file():
        return _from_model_dir(path.parent)
    # a file listed in the shipped registry is checked against its checksum
    reg = read_registry(DEFAULT_REGISTRY)
    for name, entry in reg["models"].items():
        if (
            "file" in entry
            and (DEFAULT_REGISTRY.parent / entry["file"]).resolve() == path.resolve()
        ):
            return ModelSource(name, path.resolve(), entry.get("sha256"), entry)
    return ModelSource(path.stem, path.resolve(), None, {})


def _from_model_dir(folder: Path) -> ModelSource:
    """A model folder: ``model.safetensors``, checked against ``model.json``'s sha256."""
    weights = (folder / MODEL_FILE).resolve()
    meta: dict = {}
    if (folder / MODEL_JSON).is_file():
        try:
            meta = json.loads((folder / MODEL_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder / MODEL_JSON} is unreadable: {exc}") from None
        if not isinstance(meta, dict):
            raise ModelError(f"{folder / MODEL_JSON} is not a JSON object")
    return ModelSource(folder.resolve().name, weights, meta.get("sha256"), meta, MODEL_JSON)


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
        "sha256": file_sha256(weights),
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
    from histo.io.atomic import write_text_atomic

    write_text_atomic(reg_path, json.dumps(registry, indent=2) + "\n")
    return entry


@dataclass(frozen=True)
class ModelInfo:
    """One line of ``histo models``: a shipped or a user model, without reading its weights."""

    name: str
    where: str  #: "shipped" or "user"
    classes: int | None  #: class outputs of the network (None: the classical baseline)
    sha256: str | None
    base: str | None  #: the model a fine-tuned one started from
    path: Path | None


def list_models(registry: str | Path | None = None) -> list[ModelInfo]:
    """The shipped models (registry order) then the user models (by name)."""
    reg = read_registry(registry)
    root = (Path(registry) if registry is not None else DEFAULT_REGISTRY).resolve().parent
    found = []
    for name, entry in reg["models"].items():
        n_out = (entry.get("config") or {}).get("n_outputs")
        path = (root / entry["file"]).resolve() if "file" in entry else None
        classes = None if entry.get("architecture") == "classical" else int(n_out or 6) - 1
        found.append(ModelInfo(name, "shipped", classes, entry.get("sha256"), None, path))
    for name in user_model_names():
        source = _from_model_dir(user_models_dir() / name)
        base = source.entry.get("base") or {}
        n_out = (source.entry.get("config") or {}).get("n_outputs")
        classes = int(n_out) - 1 if n_out else None
        label = base.get("name") if isinstance(base, dict) else str(base)
        found.append(ModelInfo(name, "user", classes, source.sha256, label, source.weights))
    return found
