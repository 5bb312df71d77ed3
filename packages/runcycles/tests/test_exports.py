"""The public surface: a sorted ``__all__`` whose every name imports."""

from __future__ import annotations

import importlib

import pytest

import runcycles

MODULES = [
    "runcycles",
    "runcycles.config",
    "runcycles.exceptions",
    "runcycles.response",
    "runcycles.retry",
    "runcycles.client",
    "runcycles.testing",
    "runcycles.pricing",
    "runcycles.usage",
    "runcycles.adapters",
    "runcycles.testing.fake_server",
    "runcycles.testing.adapter_contract",
    "runcycles.governance",
    "runcycles.action_kinds",
    "runcycles.events",
    "runcycles.webhooks",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_sorted_unique_and_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = list(module.__all__)

    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, name


def test_package_reexports_every_public_model_and_error() -> None:
    from runcycles import exceptions, models

    public = set(runcycles.__all__)
    missing_models = {
        name for name in models.__all__ if name[0].isupper() and not name.isupper()
    } - public
    missing_errors = (
        {name for name in exceptions.__all__ if name[0].isupper()} - {"ERROR_CLASSES"} - public
    )
    assert not missing_models
    assert not missing_errors


def test_version() -> None:
    assert isinstance(runcycles.__version__, str)
    assert runcycles.__version__[0].isdigit()
