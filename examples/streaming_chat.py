"""Stream a chat reply under a reservation; a reader that walks away still pays for what it read.

Run it with ``uv run --all-packages python examples/streaming_chat.py``. Offline it streams a
scripted reply. With your own key (``OPENAI_API_KEY``) and ``pip install openai`` it streams
a real ``gpt-4o-mini`` reply instead and charges the usage OpenAI reports.

The first reply is read to the end; the second reader stops after three chunks. Both
reservations commit what was consumed (``stream_outcome`` tells how each ended).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

from _local import cycles_config, tenant_of

from runcycles import CyclesClient, StreamUsage, stream_reservation

MODEL = "gpt-4o-mini"
PRICE_IN, PRICE_OUT = 15, 60  # µ¢ per token (gpt-4o-mini list prices)


def price(usage: StreamUsage) -> int:
    return usage.tokens_input * PRICE_IN + usage.tokens_output * PRICE_OUT


def scripted_stream(prompt: str, usage: StreamUsage) -> Iterator[str]:
    usage.add_input_tokens(len(prompt.split()))
    reply = "Budgets stop runaway agents before they spend, not after."
    for word in reply.split(" "):
        usage.add_output_tokens(1)
        yield word + " "


def openai_stream(prompt: str, usage: StreamUsage) -> Iterator[str]:  # pragma: no cover
    from openai import OpenAI  # type: ignore[import-not-found,unused-ignore]  # the user's own install

    stream = OpenAI().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:  # the last chunk carries the exact counts
            usage.add_tokens(input=chunk.usage.prompt_tokens, output=chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.delta.content:
                yield choice.delta.content


def chat(client: CyclesClient, prompt: str) -> Generator[str, None, None]:
    source = openai_stream if os.environ.get("OPENAI_API_KEY") else scripted_stream
    with stream_reservation(
        client,
        estimate=200 * PRICE_OUT + 100 * PRICE_IN,  # worst case for max_tokens=200
        action_kind="llm.completion",
        action_name=MODEL,
        cost_fn=price,
    ) as stream:
        yield from source(prompt, stream.usage)


def main() -> None:
    with cycles_config(budget=1_000_000) as config, CyclesClient(config) as client:
        print("".join(chat(client, "Why put a budget on an agent?")))

        reader = chat(client, "Tell me a long story")
        for _, chunk in zip(range(3), reader, strict=False):
            print(chunk, end="")
        reader.close()  # the reader walks away: partial usage is committed
        print("...\n")

        page = client.list_reservations(
            tenant=tenant_of(config), limit=10, include="committed_metadata"
        ).data
        assert page is not None
        for summary in page.reservations:
            committed = summary.committed.amount if summary.committed else 0
            outcome = (summary.committed_metadata or {}).get("stream_outcome", "-")
            print(
                f"{summary.reservation_id}  {summary.status:9}  reserved "
                f"{summary.reserved.amount:,} µ¢, committed {committed:,} µ¢ ({outcome})"
            )
        balances = client.get_balances(tenant=tenant_of(config)).data
        assert balances is not None
        spent = balances.balances[0].spent
        print(f"spent so far: {spent.amount if spent else 0:,} µ¢")


if __name__ == "__main__":
    main()
