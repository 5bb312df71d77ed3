"""``runcycles.action_kinds``: the registry's data matches the spec, and the checks explain."""

from __future__ import annotations

import pytest

from runcycles import action_kinds
from runcycles.action_kinds import kind_for_tool, risk_class, validate_kind
from runcycles.exceptions import CyclesConfigError
from runcycles.models import ActionRiskClass
from runcycles.testing.spec import ACTION_KINDS_SPEC, load_spec

REGISTRY = load_spec(ACTION_KINDS_SPEC)["x-action-kind-registry"]


def test_the_module_holds_exactly_the_spec_registry():
    assert REGISTRY["version"] == action_kinds.REGISTRY_VERSION
    spec = {entry["kind"]: entry for entry in REGISTRY["kinds"]}
    assert set(spec) == action_kinds.BUILTIN_KINDS
    assert tuple(entry["kind"] for entry in REGISTRY["kinds"]) == action_kinds.BUILTIN_KIND_ORDER
    for kind, entry in spec.items():
        info = action_kinds.builtin(kind)
        assert info is not None
        assert info.risk_class.value == entry["risk_class"], kind
        keys = entry.get("policy_key_spec") or {}
        assert info.policy_dimensions == {name for name, value in keys.items() if value}, kind
        assert info.resource_type == keys.get("resource_type"), kind
        assert info.tool_prefixes == tuple(entry.get("mcp_tool_prefixes") or ()), kind


def test_every_kind_has_its_constant():
    constants = {
        name: value
        for name, value in vars(action_kinds).items()
        if name.isupper()
        and name not in ("CUSTOM_PREFIX", "REGISTRY_VERSION", "MAX_KIND_LENGTH")
        and not name.startswith("_")
        and isinstance(value, str)
    }
    assert set(constants.values()) == action_kinds.BUILTIN_KINDS
    for name, value in constants.items():
        assert name == value.upper().replace(".", "_")
        assert name in action_kinds.__all__
    assert action_kinds.MESSAGE_EMAIL_SEND == "message.email.send"


@pytest.mark.parametrize(
    "kind",
    ["llm.completion", "message.email.send", "custom.acme.erp.invoice.post", "tool.call", "a.b"],
)
def test_valid_kinds_are_returned(kind: str):
    assert validate_kind(kind) == kind


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("", "is empty"),
        ("x" * 65, "65 characters long; the protocol allows 64"),
        ("LLM.Completion", "capital letters: kinds are lower case ('llm.completion')"),
        ("web search", "dot-separated segments"),
        ("llm..completion", "dot-separated segments"),
        ("1llm.completion", "dot-separated segments"),
        ("search", "has no category: write <category>.<operation> (did you mean 'web.search'?)"),
        ("custom.acme", "custom.<org>.<operation>"),
    ],
)
def test_malformed_kinds_are_refused_saying_what_is_wrong(kind: str, message: str):
    with pytest.raises(CyclesConfigError) as caught:
        validate_kind(kind)
    assert message in str(caught.value)
    assert repr(kind) in str(caught.value)


def test_unregistered_kinds_are_refused_only_when_asked_with_a_suggestion():
    assert validate_kind("llm.completon") == "llm.completon"
    with pytest.raises(CyclesConfigError, match=r"did you mean 'llm\.completion'") as caught:
        validate_kind("llm.completon", registered_only=True)
    assert "not in the Cycles registry (v0.1.26)" in str(caught.value)
    with pytest.raises(CyclesConfigError, match="UNKNOWN_CALL"):
        validate_kind("tool.call", registered_only=True)
    assert validate_kind("custom.acme.crm.sync", registered_only=True)


def test_custom_kinds_must_be_declared_when_the_declarations_are_given():
    declared = {"custom.acme.erp.post": "high_risk"}
    assert validate_kind("custom.acme.erp.post", custom_kinds=declared)
    with pytest.raises(CyclesConfigError, match=r"not declared on the server \(declared: custom"):
        validate_kind("custom.acme.erp.delete", custom_kinds=declared)


def test_risk_class_follows_the_registry_the_declarations_and_the_fallback():
    assert risk_class("payment.charge") is ActionRiskClass.HIGH_RISK
    assert risk_class("llm.completion") is ActionRiskClass.SIDE_EFFECT
    assert risk_class("proprietary.action") is ActionRiskClass.SIDE_EFFECT
    declared = {"custom.acme.erp.post": "external_side_effect"}
    assert risk_class("custom.acme.erp.post", declared) is ActionRiskClass.EXTERNAL_SIDE_EFFECT
    with pytest.raises(CyclesConfigError, match="not declared"):
        risk_class("custom.acme.erp.delete", declared)
    with pytest.raises(CyclesConfigError, match="use one of read_only"):
        risk_class("custom.acme.erp.post", {"custom.acme.erp.post": "scary"})


def test_policy_dimensions():
    assert action_kinds.policy_dimensions("message.email.send") == {"host", "recipient_domain"}
    assert action_kinds.policy_dimensions("db.write") == {"resource_type"}
    assert action_kinds.policy_dimensions("llm.completion") == frozenset()
    assert action_kinds.policy_dimensions("not.registered") == frozenset()


@pytest.mark.parametrize(
    ("tool", "kind"),
    [
        ("send_email", "message.email.send"),
        ("Send_Email_Now", "message.email.send"),
        ("s3_put_object", "storage.upload"),
        ("openai_chat_completion", "llm.completion"),
        ("frobnicate", "unknown.call"),
    ],
)
def test_kind_for_tool_uses_the_spec_prefixes(tool: str, kind: str):
    assert kind_for_tool(tool) == kind


def test_kind_for_tool_prefers_the_longest_prefix_and_takes_a_default():
    prefixes = [
        (prefix, info.kind)
        for kind in action_kinds.BUILTIN_KINDS
        if (info := action_kinds.builtin(kind)) is not None
        for prefix in info.tool_prefixes
    ]
    for prefix, kind in prefixes:
        longer = [k for p, k in prefixes if p.startswith(prefix) and len(p) > len(prefix)]
        if not longer:
            assert kind_for_tool(prefix + "x") == kind
    assert kind_for_tool("frobnicate", default="custom.acme.misc.call") == "custom.acme.misc.call"
