"""``cycles_budget_guardrail``: one ``/v1/decide`` before the run; a denial trips it first."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from agents import Agent, GuardrailFunctionOutput, InputGuardrail, RunContextWrapper

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CyclesConfig,
    CyclesError,
    Decision,
    DecisionRequest,
    Subject,
    Unit,
)
from runcycles.adapters import client_config, is_outage

__all__ = ["cycles_budget_guardrail"]

logger = logging.getLogger("runcycles_openai_agents")


def cycles_budget_guardrail(
    *,
    estimate: int,
    unit: Unit | str = Unit.USD_MICROCENTS,
    client: AsyncCyclesClient | None = None,
    config: CyclesConfig | None = None,
    tenant: str | None = None,
    workspace: str | None = None,
    app: str | None = None,
    workflow: str | None = None,
    agent: str | None = None,
    action_kind: str = "agent.run",
    fail_open: bool = True,
    name: str = "cycles_budget",
) -> InputGuardrail[Any]:
    """Return an input guardrail that asks the server whether ``estimate`` fits, before the run.

    The guardrail is blocking (``run_in_parallel=False``): on ``DENY`` the run raises
    ``agents.InputGuardrailTripwireTriggered`` before any model or tool call, and
    ``error.guardrail_result.output.output_info`` says why (``decision``, ``reason_code``).
    Nothing is held: the run's own calls still reserve through :class:`CyclesRunHooks`.

    Args:
        estimate: What the whole run is expected to cost, in ``unit``.
        unit: Unit of ``estimate`` (default ``USD_MICROCENTS``).
        client: The async client (default: one from ``config`` or the ``CYCLES_*`` variables
            for each check, closed after it).
        config: Builds the client when ``client`` is not given (read now, so a bad
            configuration fails here, not at the first run).
        tenant: Subject fields (default: the config's; ``agent``: the agent's name).
        workspace: See ``tenant``.
        app: See ``tenant``.
        workflow: See ``tenant``.
        agent: See ``tenant``.
        action_kind: The decision's action kind; its name is the agent's name.
        fail_open: Let the run start when the server is unreachable (default ``True``); a
            denial trips whatever this says.
        name: The guardrail's name in the SDK's results and traces.
    """
    settings = client_config(client, config)
    fields = {"tenant": tenant, "workspace": workspace, "app": app, "workflow": workflow}
    subject = {k: v or getattr(settings, k) for k, v in fields.items()}

    async def check(
        context: RunContextWrapper[Any], starting: Agent[Any], _input: Any
    ) -> GuardrailFunctionOutput:
        request = DecisionRequest(
            idempotency_key=f"openai-agents-decide-{uuid.uuid4().hex}",
            subject=Subject.model_validate({**subject, "agent": agent or starting.name}),
            action=Action(kind=action_kind, name=starting.name),
            estimate=Amount(unit=Unit(unit), amount=estimate),
        )
        # Without a client: one of its own for this one request, closed after it.
        scope = contextlib.nullcontext(client) if client else AsyncCyclesClient(settings)
        try:
            async with scope as cycles:
                answer = (await cycles.decide(request)).raise_for_error().data
        except CyclesError as error:
            if not (fail_open and is_outage(error)):
                raise
            logger.warning(
                "openai-agents: Cycles unreachable (%s); the run starts (fail_open)", error
            )
            return GuardrailFunctionOutput({"decision": "UNREACHABLE", "error": str(error)}, False)
        info = {"decision": answer.decision.value, "reason_code": answer.reason_code}
        return GuardrailFunctionOutput(info, answer.decision is Decision.DENY)

    return InputGuardrail(guardrail_function=check, name=name, run_in_parallel=False)
