"""``CyclesCallbackHandler``: budget every model and tool call of any LangChain runnable."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from runcycles import AdapterCall, CallPlan, CyclesAdapter, CyclesClient, CyclesConfig
from runcycles_langchain._hooks import LangChainHooks

__all__ = ["CyclesCallbackHandler"]


class CyclesCallbackHandler(
    LangChainHooks, CyclesAdapter[CallPlan | None, Any], BaseCallbackHandler
):
    """Reserve before every model and tool call of a run, commit after; a denial stops it.

    Pass it per run, ``runnable.invoke(input, config={"callbacks": [handler]})``, to any
    runnable: an agent, a chain, a bare chat model or LLM. ``raise_error`` is on, so a denial
    (:class:`~runcycles.BudgetExceededError`...) reaches the caller of ``invoke`` before the
    call runs. Calls are keyed by LangChain's ``run_id`` (a repeated callback never reserves
    or charges twice); whatever a run leaves open is released when its top-level run ends or
    fails. Sync and async runs alike: under ``ainvoke``/``astream`` LangChain calls it from
    worker threads, so the run's event loop never waits on the Cycles server.

    Args:
        client: The client (default: one from ``config`` or the ``CYCLES_*`` variables,
            closed by :meth:`close`).
        config: Builds the client when ``client`` is not given.
        model: The model to price calls at when LangChain does not name one.
        **options: :class:`~runcycles.AdapterOptions` (``tenant``, ``tool_estimates``,
            ``fail_open``, ``dry_run``, ``pricer``...). Tools with no estimate are not metered.
    """

    raise_error = True

    def __init__(
        self,
        client: CyclesClient | None = None,
        *,
        config: CyclesConfig | None = None,
        model: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(client, config=config, model=model, **options)
        self._roots: dict[UUID, UUID] = {}

    def _track(self, run_id: UUID, parent_run_id: UUID | None) -> str:
        """The top-level run of ``run_id`` (the adapter's run id), remembered."""
        root = self._roots.get(parent_run_id, parent_run_id) if parent_run_id else run_id
        self._roots[run_id] = root
        return str(root)

    def _untrack(self, run_id: UUID) -> str:
        return str(self._roots.pop(run_id, run_id))

    def _begin(self, kw: dict[str, Any], plan: CallPlan | None, tool: str = "") -> AdapterCall:
        """Reserve for the call ``kw`` describes (a denial raises: nothing stays tracked)."""
        run_id = kw["run_id"]
        try:
            call = self.begin(self._track(run_id, kw.get("parent_run_id")), run_id, plan)
            return self.check_tool(call, tool) if tool else call
        except BaseException:
            self._untrack(run_id)
            raise

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kw: Any) -> None:
        """Remember which run this step belongs to."""
        self._track(run_id, kw.get("parent_run_id"))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kw: Any) -> None:
        """A top-level run ended: release whatever it left open."""
        self._roots.pop(run_id, None)
        if kw.get("parent_run_id") is None:
            self.end_run(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        """A top-level run failed: release whatever it left open."""
        self.on_chain_end(None, run_id=run_id, **kw)

    def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
        """Reserve the model call's worst case (its model and ``max_tokens``, priced)."""
        params, meta = kw.get("invocation_params") or {}, kw.get("metadata") or {}
        model = params.get("model") or params.get("model_name") or meta.get("ls_model_name")
        plan = self.model_plan(model, params.get("max_tokens") or meta.get("ls_max_tokens"))
        self._begin(kw, plan)

    def on_llm_start(self, serialized: Any, prompts: Any, **kw: Any) -> None:
        """Reserve the LLM call's worst case."""
        self.on_chat_model_start(serialized, prompts, **kw)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kw: Any) -> None:
        """Commit the call's usage, priced."""
        self.end(self._untrack(run_id), run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        """Release the call's reservation."""
        self.fail(self._untrack(run_id), run_id, error)

    def on_tool_start(self, serialized: Any, input_str: str, **kw: Any) -> None:
        """Reserve the tool's estimate; refuse a tool the budget's caps forbid."""
        name = str((serialized or {}).get("name") or kw.get("name"))
        self._begin(kw, self.tool_plan(name), name)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kw: Any) -> None:
        """Commit the tool's estimate."""
        self.end(self._untrack(run_id), run_id, None)

    on_tool_error = on_llm_error
