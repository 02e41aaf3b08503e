"""Load a Truss directory into a ModelHost, as Truss's own server does.

Used by ``kernel-magics serve`` and by anything that runs an exported model
outside the notebook. The config's environment_variables are set before the
model is imported; ``packages/`` and ``external_package_dirs`` go on the path;
model/model.py is imported as ``model.model`` (Truss's module name).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from .config import parse_config
from .errors import ModelDefinitionError
from .runtime import ModelHost
from .secrets import SecretStore
from .tracebacks import trim_traceback

__all__ = ["load_truss_dir"]


def load_truss_dir(root: Path, *, secrets_dir: Optional[Path] = None, secrets_hint: str = "") -> ModelHost:
    """Import the directory's model class and return a host with it defined (not loaded)."""
    root = Path(root).resolve()
    config_path = root / "config.yaml"
    if not config_path.is_file():
        raise ModelDefinitionError(f"{root} has no config.yaml, so it is not a Truss directory.")
    config = parse_config(config_path.read_text(), source=str(config_path))
    os.environ.update(config.environment_variables)
    extra = getattr(config, "bundled_packages_dir", None) or "packages"
    for path in [root / extra] + [(root / d).resolve() for d in config.external_package_dirs]:
        if path.is_dir() and str(path) not in sys.path:
            sys.path.append(str(path))
    module_dir = getattr(config, "model_module_dir", None) or "model"
    filename = getattr(config, "model_class_filename", None) or "model.py"
    model_py = root / module_dir / filename
    if not model_py.is_file():
        raise ModelDefinitionError(f"{root} has no {module_dir}/{filename}: there is no model to serve.")
    stem = model_py.stem
    module_name = f"{model_py.parent.name}.{stem}" if model_py.parent.name == stem else stem
    spec = importlib.util.spec_from_file_location(module_name, model_py)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = None
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        raise trim_traceback(exc)
    cls = getattr(module, config.model_class_name, None)
    if cls is None:
        raise ModelDefinitionError(f"{model_py} defines no class `{config.model_class_name}` (model_class_name in config.yaml).")
    host = ModelHost(config, secrets=SecretStore(config.secret_names, secrets_dir=secrets_dir, hint=secrets_hint),
                     base_dir=root)
    host.define(cls)
    return host
