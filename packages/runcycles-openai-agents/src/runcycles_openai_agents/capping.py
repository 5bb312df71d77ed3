"""Caps that reach the model call itself, whatever settings the runner resolved.

The SDK resolves a call's ``ModelSettings`` before ``on_llm_start`` runs, so a hook cannot
always change them. The runner hands the model the same input list it gave the hook: the hook
files the reservation's ``max_tokens`` cap under that list, and these wrappers apply it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import ModelSettings
from agents.models.interface import Model, ModelProvider

Caps = dict[int, tuple[object, int]]
"""``id(input list)`` → (the list, the cap), filed by ``on_llm_start``."""


def _capped(caps: Caps, input: object, settings: ModelSettings) -> ModelSettings:
    entry = caps.get(id(input))
    if entry is None or entry[0] is not input:
        return settings
    if settings.max_tokens is not None and settings.max_tokens <= entry[1]:
        return settings
    return settings.resolve(ModelSettings(max_tokens=entry[1]))


def _delegate(name: str) -> Callable[..., Any]:
    return lambda self, *args, **kwargs: getattr(self.inner, name)(*args, **kwargs)


class CappedModel(Model):
    """A model whose calls get the ``max_tokens`` cap of their Cycles reservation."""

    def __init__(self, inner: Model, caps: Caps) -> None:
        self.inner, self._caps = inner, caps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # ``model`` (its name) and the like

    async def get_response(
        self, system_instructions: Any, input: Any, model_settings: ModelSettings, *args: Any,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Call the inner model with this call's settings, capped."""
        settings = _capped(self._caps, input, model_settings)
        return await self.inner.get_response(system_instructions, input, settings, *args, **kwargs)

    def stream_response(
        self, system_instructions: Any, input: Any, model_settings: ModelSettings, *args: Any,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Stream from the inner model with this call's settings, capped."""
        settings = _capped(self._caps, input, model_settings)
        return self.inner.stream_response(system_instructions, input, settings, *args, **kwargs)


class CappedProvider(ModelProvider):
    """A provider whose models are :class:`CappedModel`."""

    def __init__(self, inner: ModelProvider, caps: Caps) -> None:
        self.inner, self._caps = inner, caps

    def get_model(self, model_name: str | None) -> Model:
        """Return the inner provider's model, capped."""
        return CappedModel(self.inner.get_model(model_name), self._caps)


# Methods with a default on the SDK's base classes (by version): forwarded, not inherited.
for _cls, _names in ((CappedModel, ("close", "get_retry_advice", "_cleanup_on_run_end")),
                     (CappedProvider, ("aclose",))):  # fmt: skip
    for _name in _names:
        if hasattr(_cls.__mro__[1], _name):
            setattr(_cls, _name, _delegate(_name))
