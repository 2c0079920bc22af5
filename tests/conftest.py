"""Shared fixtures: random-weight reference checkpoints (built once per test session) and test images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import random_image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """reference_checkpoint(name) -> (folder, transformers model in eval mode), cached per session."""
    from tests.reference_checkpoints import build_reference_checkpoint

    built: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = (folder, build_reference_checkpoint(folder, name))
        return built[name]

    return get


@pytest.fixture
def images():
    return [random_image(i, (40 + 13 * i, 50 - 5 * i)) for i in range(4)]


