"""The sync and async twins of guarded execution expose the same API, and every name imports."""

from __future__ import annotations

import importlib
import inspect

import pytest

import runcycles
from runcycles import (
    AsyncReservationGuard,
    AsyncStreamReservation,
    ReservationGuard,
    StreamReservation,
)

RENAMED = {"__enter__": "__aenter__", "__exit__": "__aexit__"}
TWINS = [(ReservationGuard, AsyncReservationGuard), (StreamReservation, AsyncStreamReservation)]


def public_names(cls: type) -> set[str]:
    names = set()
    for klass in cls.__mro__[:-1]:
        names |= {name for name in vars(klass) if not name.startswith("_")}
    return names


def normalised(member: object) -> list[tuple[str, object, object, str]]:
    signature = inspect.signature(member)  # type: ignore[arg-type]
    rows: list[tuple[str, object, object, str]] = [
        (
            p.name,
            p.kind,
            p.default,
            str(p.annotation)
            .replace("AsyncCyclesClient", "CyclesClient")
            .replace("AsyncBase", "Base"),
        )
        for p in signature.parameters.values()
    ]
    rows.append(("return", None, None, str(signature.return_annotation)))
    return rows


@pytest.mark.parametrize(("sync_cls", "async_cls"), TWINS)
def test_same_public_names(sync_cls: type, async_cls: type) -> None:
    assert public_names(sync_cls) == public_names(async_cls)


@pytest.mark.parametrize(("sync_cls", "async_cls"), TWINS)
def test_same_signatures_and_async_where_io(sync_cls: type, async_cls: type) -> None:
    for name in [*public_names(sync_cls), "__init__", *RENAMED]:
        sync_member = getattr(sync_cls, name)
        async_member = getattr(async_cls, RENAMED.get(name, name))
        if isinstance(sync_member, property) or not callable(sync_member):
            assert type(async_member) is type(sync_member), name  # property or slot
            continue
        assert normalised(sync_member) == normalised(async_member), name
        does_io = name in ("commit", "release", "start", "fail", "settle", *RENAMED)
        assert inspect.iscoroutinefunction(async_member) is does_io, name
        assert not inspect.iscoroutinefunction(sync_member), name


@pytest.mark.parametrize(
    "module_name",
    ["runcycles.context", "runcycles.lifecycle", "runcycles.decorator", "runcycles.streaming"],
)
def test_all_is_sorted_unique_and_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, name


def test_package_reexports_the_guarded_execution_api() -> None:
    expected = {
        "AsyncReservationGuard",
        "AsyncStreamReservation",
        "CyclesContext",
        "DryRunResult",
        "ReservationAlreadyFinalizedError",
        "ReservationGuard",
        "StreamReservation",
        "StreamUsage",
        "UnfinalizedReservationWarning",
        "cycles",
        "dry_run",
        "get_cycles_context",
        "reserve",
        "set_default_client",
        "set_default_config",
        "stream_reservation",
    }
    assert expected <= set(runcycles.__all__)
