"""Governance registry: built-in and declared custom kinds, declaration files, wire bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from runcycles import action_kinds
from runcycles.models import ActionRiskClass
from runcycles.testing.spec import ACTION_KINDS_SPEC, load_spec, schema_validator
from runcycles_server.errors import LedgerError
from runcycles_server.governance import DeclarationError, KindInfo, Registry

ERP = {"kind": "custom.acme.erp.post", "risk_class": "high_risk"}
E = "kinds: [{kind: custom.acme.erp.post, risk_class: high_risk, "


def registry(*entries: Mapping[str, object]) -> Registry:
    return Registry.from_declarations({"kinds": list(entries)})


def test_builtin_bodies_are_the_spec_registry_entries():
    spec = load_spec(ACTION_KINDS_SPEC)["x-action-kind-registry"]["kinds"]
    reg = Registry()
    for entry in spec:
        assert reg.risk_class(entry["kind"]).value == entry["risk_class"]
        body = reg.kind_body(entry["kind"])
        expected = {**entry, "description": " ".join(entry["description"].split())}
        assert body == expected, entry["kind"]


def test_unregistered_non_custom_kind_defaults_to_side_effect_without_policy_keys():
    reg = Registry()
    assert reg.check_kind("proprietary.action") == "proprietary.action"
    assert reg.risk_class("proprietary.action").value == "side_effect"
    assert reg.policy_dimensions("proprietary.action") == frozenset()


def test_undeclared_custom_kind_is_a_400_naming_the_kind():
    with pytest.raises(LedgerError) as caught:
        Registry().check_kind("custom.acme.erp.post")
    assert caught.value.code == "INVALID_REQUEST"
    assert caught.value.status == 400
    assert "custom.acme.erp.post" in caught.value.message
    assert "not registered" in caught.value.message
    with pytest.raises(LedgerError):
        Registry().risk_class("custom.acme.erp.post")


def test_declared_custom_kind_uses_its_risk_class_and_key_spec():
    reg = registry({**ERP, "policy_key_spec": {"host": True, "resource_type": "ledger"}})
    assert reg.check_kind("custom.acme.erp.post") == "custom.acme.erp.post"
    assert reg.risk_class("custom.acme.erp.post").value == "high_risk"
    assert reg.policy_dimensions("custom.acme.erp.post") == {"host", "resource_type"}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("LLM.completion", "capital"),
        ("llm", "category"),
        ("custom.acme", "custom.<org>.<operation>"),
        ("", "empty"),
        ("a." + "b" * 70, "64"),
        ("tool call", "segments"),
    ],
)
def test_malformed_kinds_are_a_400_saying_why(kind: str, words: str):
    with pytest.raises(LedgerError) as caught:
        Registry().check_kind(kind, field="action_quotas[0].action_kind")
    assert caught.value.code == "INVALID_REQUEST"
    assert caught.value.message.startswith("action_quotas[0].action_kind: ")
    assert words in caught.value.message


def test_non_string_kind_is_refused():
    with pytest.raises(LedgerError, match="not a string"):
        Registry().check_kind(42)


def test_load_reads_yaml_and_json(tmp_path: Path):
    yml = tmp_path / "kinds.yaml"
    yml.write_text(
        "kinds:\n  - kind: custom.acme.erp.post\n    risk_class: high_risk\n"
        "    description: Post to the ERP\n    mcp_tool_prefixes: [erp_post_]\n"
    )
    js = tmp_path / "kinds.json"
    js.write_text(json.dumps([ERP]))
    for path in (yml, js):
        reg = Registry.load(path)
        assert set(reg.custom) == {"custom.acme.erp.post"}
        assert reg.warnings == ()
    assert Registry.load(yml).custom["custom.acme.erp.post"].description == "Post to the ERP"


def test_empty_declaration_file_declares_nothing(tmp_path: Path):
    path = tmp_path / "kinds.yaml"
    path.write_text("")
    assert Registry.load(path).custom == {}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("kinds: [{risk_class: high_risk}]", "entry 1: missing 'kind'"),
        (
            "kinds: [{kind: custom.acme.erp.post}]",
            "entry 1 (custom.acme.erp.post): missing 'risk_class'",
        ),
        (
            "kinds: [{kind: custom.acme.erp.post, risk_class: scary}]",
            "risk_class 'scary' is not one of",
        ),
        ("kinds: [{kind: acme.erp.post, risk_class: high_risk}]", "not in the custom. namespace"),
        (
            "kinds: [{kind: llm.completion, risk_class: read_only}]",
            "built-in kinds cannot be redeclared",
        ),
        ("kinds: [{kind: custom.acme, risk_class: high_risk}]", "custom.<org>.<operation>"),
        ("kinds: [{kind: custom.Acme.erp, risk_class: high_risk}]", "capital"),
        (
            "kinds: [{kind: custom.acme.erp.post, risk_class: high_risk, colour: red}]",
            "unknown field(s) 'colour'",
        ),
        (
            E + "policy_key_spec: {port: true}}]",
            "policy_key_spec has unknown field(s) 'port'",
        ),
        (
            E + "policy_key_spec: {host: yes please}}]",
            "policy_key_spec.host must be true or false",
        ),
        (
            E + "policy_key_spec: {resource_type: true}}]",
            "resource_type names the resource",
        ),
        (
            "kinds: [{kind: custom.acme.erp.post, risk_class: high_risk, mcp_tool_prefixes: erp_}]",
            "mcp_tool_prefixes must be a list",
        ),
        (
            "kinds:\n - {kind: custom.acme.a.b, risk_class: read_only}\n"
            " - {kind: custom.acme.a.b, risk_class: read_only}",
            "entry 2 (custom.acme.a.b): declared twice",
        ),
        ("custom_kinds: []", "unknown top-level key(s) 'custom_kinds'"),
        ("kinds: custom.acme.erp.post", "expected a list"),
        ("kinds: [custom.acme.erp.post]", "entry 1: expected a mapping"),
        ("kinds: [unclosed", "not valid YAML"),
    ],
)
def test_declaration_errors_name_the_file_the_entry_and_the_fix(
    tmp_path: Path, content: str, words: str
):
    path = tmp_path / "kinds.yaml"
    path.write_text(content)
    with pytest.raises(DeclarationError) as caught:
        Registry.load(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert words in message, message
    assert isinstance(caught.value, ValueError)


def test_missing_file_and_bad_json_are_declaration_errors(tmp_path: Path):
    with pytest.raises(DeclarationError, match="cannot read"):
        Registry.load(tmp_path / "absent.yaml")
    bad = tmp_path / "kinds.json"
    bad.write_text("{")
    with pytest.raises(DeclarationError, match="not valid JSON"):
        Registry.load(bad)


def test_prefix_overlapping_a_builtin_one_is_a_warning_not_an_error():
    reg = registry({**ERP, "mcp_tool_prefixes": ["send_email_erp", "erp_"]})
    assert len(reg.warnings) == 1
    assert "send_email_erp" in reg.warnings[0]
    assert "message.email.send" in reg.warnings[0]


def test_kind_body_and_registry_body_match_the_spec():
    kind_schema = schema_validator("ActionKind", ACTION_KINDS_SPEC)
    page_schema = schema_validator("ActionKindRegistry", ACTION_KINDS_SPEC)
    reg = registry({**ERP, "description": "d", "policy_key_spec": {"resource_type": "ledger"}})
    email = reg.kind_body("message.email.send")
    assert email is not None
    kind_schema.validate(email)
    assert email["policy_key_spec"] == {"host": True, "recipient_domain": True}
    db = reg.kind_body("db.write")
    assert db is not None
    assert db["policy_key_spec"] == {"resource_type": "table"}
    custom = reg.kind_body("custom.acme.erp.post", include_custom=True)
    assert custom is not None
    kind_schema.validate(custom)
    page = reg.registry_body(limit=100)
    page_schema.validate(page)
    assert page["version"] == action_kinds.REGISTRY_VERSION
    assert [k["kind"] for k in page["kinds"]] == list(action_kinds.BUILTIN_KIND_ORDER)
    assert page["has_more"] is False


def test_custom_kinds_are_not_public_by_default():
    reg = registry(ERP)
    assert reg.kind_body("custom.acme.erp.post") is None
    assert "custom.acme.erp.post" not in [k["kind"] for k in reg.registry_body(limit=100)["kinds"]]
    listed = reg.registry_body(limit=100, include_custom=True)["kinds"]
    assert listed[-1]["kind"] == "custom.acme.erp.post"
    assert reg.kind_body("no.such") is None


def test_registry_pages_and_filters():
    reg = Registry()
    seen: list[str] = []
    cursor = None
    while True:
        page = reg.registry_body(limit=7, cursor=cursor)
        seen += [k["kind"] for k in page["kinds"]]
        if not page["has_more"]:
            assert "next_cursor" not in page
            break
        cursor = page["next_cursor"]
    assert seen == list(action_kinds.BUILTIN_KIND_ORDER)
    high = reg.registry_body(risk_class="high_risk", limit=100)["kinds"]
    assert {k["kind"] for k in high} == {
        k for k in action_kinds.BUILTIN_KINDS if reg.risk_class(k).value == "high_risk"
    }
    for bad in ({"risk_class": "scary"}, {"limit": 0}, {"limit": 101}, {"cursor": "nope"}):
        with pytest.raises(LedgerError) as caught:
            reg.registry_body(**bad)
        assert caught.value.code == "INVALID_REQUEST"


def test_no_builtin_kind_is_deprecated_in_this_registry_version():
    reg = Registry()
    assert all(reg.deprecated_replacement(k) is None for k in action_kinds.BUILTIN_KINDS)
    assert reg.deprecated_replacement("proprietary.action") is None


def test_a_deprecated_kind_names_its_replacement_and_is_listed_only_on_request():
    old = KindInfo(
        "custom.acme.old.op",
        ActionRiskClass.SIDE_EFFECT,
        custom=True,
        deprecated=True,
        replacement_kind="custom.acme.new.op",
    )
    bare = KindInfo(
        "custom.acme.older.op", ActionRiskClass.SIDE_EFFECT, custom=True, deprecated=True
    )
    reg = Registry(custom={old.kind: old, bare.kind: bare})
    assert reg.deprecated_replacement(old.kind) == "custom.acme.new.op"
    assert reg.deprecated_replacement(bare.kind) == "unknown.call"
    assert reg.check_kind(old.kind) == old.kind  # deprecated kinds stay usable
    listed = [k["kind"] for k in reg.registry_body(limit=100, include_custom=True)["kinds"]]
    assert old.kind not in listed
    body = reg.registry_body(limit=100, include_custom=True, include_deprecated=True)
    schema_validator("ActionKindRegistry", ACTION_KINDS_SPEC).validate(body)
    entry = next(k for k in body["kinds"] if k["kind"] == old.kind)
    assert (entry["deprecated"], entry["replacement_kind"]) == (True, "custom.acme.new.op")


def test_etag_changes_with_the_listing_only():
    plain = Registry()
    assert plain.etag() == Registry().etag()
    assert plain.etag().startswith(f'"{action_kinds.REGISTRY_VERSION}-')
    declared = registry(ERP)
    assert declared.etag() == plain.etag()  # custom kinds are not in the public listing
    assert declared.etag(include_custom=True) != plain.etag(include_custom=True)


def test_a_registry_can_be_hashed_and_compared_by_identity():
    reg = registry(ERP)
    assert {reg: 1}[reg] == 1


def test_a_request_may_send_any_non_custom_kind_but_a_policy_may_not():
    registry = Registry()
    # Action.kind is a free string in the base protocol: unregistered kinds are side_effect.
    assert registry.check_kind("k") == "k"
    assert registry.check_kind("tool.call") == "tool.call"
    assert registry.risk_class("k").value == "side_effect"
    with pytest.raises(LedgerError, match="denied_action_kinds"):
        registry.check_kind("k", field="denied_action_kinds[0]")
    with pytest.raises(LedgerError, match="not registered"):
        registry.check_kind("custom.acme.erp.post")
