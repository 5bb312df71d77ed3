"""One ``Usage`` for @cycles, stream reservations and guards, priced by one ``Pricer``."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runcycles import (
    ModelPrice,
    Pricer,
    StreamUsage,
    UnknownActualError,
    Usage,
    cycles,
    stream_reservation,
)
from runcycles.streaming import priced

PRICER = Pricer(overrides={"m": ModelPrice(input_per_mtok="1", output_per_mtok="2")}, builtin=False)
OPTIONS: dict[str, Any] = {"estimate": 50_000, "action_kind": "llm.completion", "action_name": "m"}


def test_actual_may_return_a_usage_priced_by_the_pricer(fake: Any, client: Any) -> None:
    @cycles(
        estimate=50_000,
        actual=lambda reply: Usage(input_tokens=1_000, output_tokens=500, model="m"),
        client=client,
        pricer=PRICER,
    )
    def call() -> str:
        return "reply"

    assert call() == "reply"
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 200_000  # 1,000 x $1/M + 500 x $2/M
    metrics = commit["metrics"]
    assert (metrics["tokens_input"], metrics["tokens_output"]) == (1_000, 500)
    assert metrics["model_version"] == "m"
    assert "latency_ms" in metrics  # what @cycles measured is kept


async def test_async_actual_usage_of_an_unknown_model_is_an_unknown_actual(
    fake: Any, aclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(
        estimate=50_000,
        actual=lambda reply: Usage(input_tokens=10, model="nope"),
        client=aclient,
        pricer=PRICER,
        on_unknown_actual="release",
    )
    async def call() -> str:
        return "reply"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert await call() == "reply"
    assert fake.commits() == []
    assert fake.releases()[0]["reason"] == "actual_unknown"
    assert "UnknownModelError" in caplog.text


def test_stream_tokens_priced_by_model(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS, cost_fn=priced(PRICER, model="m")) as stream:
        stream.usage.add_tokens(input=2_000, output=1_000)
    assert fake.commits()[0]["actual"]["amount"] == 400_000


def test_stream_priced_by_the_model_it_reported(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS, cost_fn=priced(PRICER)) as stream:
        stream.usage.set_model_version("m")
        stream.usage.add_output_tokens(10)
    assert fake.commits()[0]["actual"]["amount"] == 2_000


def test_stream_of_an_unpriced_model_raises_unknown_actual(fake: Any, client: Any) -> None:
    with (
        pytest.raises(UnknownActualError, match="UnknownModelError"),
        stream_reservation(client, **OPTIONS, cost_fn=priced(PRICER, model="nope")) as stream,
    ):
        stream.usage.add_output_tokens(10)
    assert fake.commits() == []


def test_stream_usage_converts_to_usage() -> None:
    usage = StreamUsage(tokens_input=3, tokens_output=4, model_version="m")
    assert usage.to_usage() == Usage(input_tokens=3, output_tokens=4, model="m")
    assert usage.to_usage(model="x", provider="p").provider == "p"
