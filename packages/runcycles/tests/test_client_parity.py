"""CyclesClient and AsyncCyclesClient expose the same methods with the same signatures."""

from __future__ import annotations

import inspect

from runcycles import AsyncCyclesClient, CyclesClient

# sync name -> async name where they differ on purpose
RENAMED = {"close": "aclose", "__enter__": "__aenter__", "__exit__": "__aexit__"}
ASYNC_SPELLINGS = [
    ("httpx.AsyncClient", "httpx.Client"),
    ("httpx.AsyncBaseTransport", "httpx.BaseTransport"),
    ("AsyncIterator", "Iterator"),
    ("AsyncReservationGuard", "ReservationGuard"),
    ("AsyncStreamReservation", "StreamReservation"),
]


def public_names(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


def normalised(signature: inspect.Signature) -> list[tuple[str, object, object, str]]:
    rows: list[tuple[str, object, object, str]] = []
    for param in signature.parameters.values():
        annotation = str(param.annotation)
        for async_spelling, sync_spelling in ASYNC_SPELLINGS:
            annotation = annotation.replace(async_spelling, sync_spelling)
        rows.append((param.name, param.kind, param.default, annotation))
    returned = str(signature.return_annotation)
    for async_spelling, sync_spelling in ASYNC_SPELLINGS:
        returned = returned.replace(async_spelling, sync_spelling)
    rows.append(("return", None, None, returned))
    return rows


def test_same_public_names() -> None:
    sync_names = {RENAMED.get(name, name) for name in public_names(CyclesClient)}

    assert sync_names == public_names(AsyncCyclesClient)


def test_same_signatures() -> None:
    for name in [*public_names(CyclesClient), "__init__", *RENAMED]:
        sync_member = getattr(CyclesClient, name)
        async_member = getattr(AsyncCyclesClient, RENAMED.get(name, name))
        if isinstance(sync_member, property):
            assert isinstance(async_member, property), name
            continue
        assert normalised(inspect.signature(sync_member)) == normalised(
            inspect.signature(async_member)
        ), name


# build a sibling client or a guard; send nothing (the guard reserves when entered)
NO_IO = {"with_options", "reserve", "stream_reservation"}


def test_async_methods_are_coroutines_where_the_sync_ones_do_io() -> None:
    for name in public_names(CyclesClient):
        sync_member = getattr(CyclesClient, name)
        async_member = getattr(AsyncCyclesClient, RENAMED.get(name, name))
        if isinstance(sync_member, property):
            continue
        assert not inspect.iscoroutinefunction(sync_member), name
        iterates = name.startswith("iter_")
        if name in NO_IO:
            assert not inspect.iscoroutinefunction(async_member), name
            continue
        assert inspect.iscoroutinefunction(async_member) is not iterates, name
