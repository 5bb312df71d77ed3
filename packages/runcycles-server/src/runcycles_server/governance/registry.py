"""The action-kind registry a server enforces: the built-in kinds plus the operator's.

Built-in kinds come from :mod:`runcycles.action_kinds` (the spec's ``x-action-kind-registry``)
and cannot be changed. Operators add ``custom.<org>.<operation>[.<qualifier>]`` kinds in a
declaration file (YAML or JSON; CUSTOM.* NAMESPACE RULES of ``cycles-action-kinds``)::

    kinds:
      - kind: custom.acme.erp.invoice.post
        risk_class: external_side_effect        # required
        description: Post an invoice to the ERP  # optional from here on
        policy_key_spec: {resource_type: ledger}
        mcp_tool_prefixes: [erp_invoice_]

(a bare list of entries works too). :meth:`Registry.load` refuses a bad file with a
:class:`DeclarationError` that names the file, the entry and the fix. At request time
:meth:`Registry.check_kind` rejects a malformed kind and an undeclared ``custom.*`` kind with
``400 INVALID_REQUEST``; any other unregistered kind is accepted as ``side_effect`` with no
policy-key routing (UNREGISTERED KIND HANDLING).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from runcycles import action_kinds
from runcycles.exceptions import CyclesConfigError
from runcycles.models import ActionRiskClass
from runcycles_server.errors import LedgerError
from runcycles_server.governance.kind_descriptions import DESCRIPTIONS

__all__ = ["DeclarationError", "KindInfo", "Registry"]

_DIMENSIONS: Final = ("host", "recipient_domain", "resource_type", "path_prefix")
_ENTRY_FIELDS: Final = ("kind", "risk_class", "description", "policy_key_spec", "mcp_tool_prefixes")
_RISK_CLASSES: Final = ", ".join(c.value for c in ActionRiskClass)
_DEFAULT_LIMIT: Final = 50
_MAX_LIMIT: Final = 100


class DeclarationError(ValueError):
    """A custom-kind declaration file is unusable; the message says where and what to fix."""


@dataclass(frozen=True, slots=True)
class KindInfo:
    """One kind the registry knows.

    ``policy_dimensions`` are the :class:`~runcycles.models.ActionPolicyKeys` fields its
    quota allowlists match on (a kind routes on nothing else); ``resource_type`` names what
    ``policy_keys.resource_type`` designates for it (``"table"``).
    """

    kind: str
    risk_class: ActionRiskClass
    policy_dimensions: frozenset[str] = frozenset()
    resource_type: str | None = None
    description: str | None = None
    mcp_tool_prefixes: tuple[str, ...] = ()
    custom: bool = False
    deprecated: bool = False
    replacement_kind: str | None = None


def _builtin_infos() -> dict[str, KindInfo]:
    infos: dict[str, KindInfo] = {}
    for kind in action_kinds.BUILTIN_KINDS:
        entry = action_kinds.builtin(kind)
        assert entry is not None
        infos[kind] = KindInfo(
            kind=kind,
            risk_class=entry.risk_class,
            policy_dimensions=entry.policy_dimensions,
            resource_type=entry.resource_type,
            description=DESCRIPTIONS.get(kind),
            mcp_tool_prefixes=entry.tool_prefixes,
        )
    return infos


_BUILTINS: Final = _builtin_infos()
_ORDER: Final = {kind: index for index, kind in enumerate(action_kinds.BUILTIN_KIND_ORDER)}
_BUILTIN_PREFIXES: Final = {p: i.kind for i in _BUILTINS.values() for p in i.mcp_tool_prefixes}


@dataclass(frozen=True, slots=True, eq=False)
class Registry:
    """Built-in kinds plus declared custom kinds; immutable, shared by every request.

    ``warnings`` lists what the loader accepted but an operator should know (a custom tool
    prefix that overlaps a built-in one: the built-in kind keeps precedence).
    """

    custom: Mapping[str, KindInfo] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """Read a custom-kind declaration file (``.json``, otherwise YAML).

        Raises:
            DeclarationError: the file is missing, unparsable, or an entry breaks a rule.
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise DeclarationError(
                f"{source}: cannot read the custom action-kind declarations ({exc.strerror}): "
                "check the path"
            ) from None
        try:
            data: Any = json.loads(text) if source.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            fmt = "JSON" if source.suffix == ".json" else "YAML"
            raise DeclarationError(f"{source}: not valid {fmt}: {exc}") from None
        return cls.from_declarations(data, source=str(source))

    @classmethod
    def from_declarations(cls, data: Any, *, source: str = "<declarations>") -> Registry:
        """Build a registry from parsed declarations (``{"kinds": [...]}`` or a list).

        Raises:
            DeclarationError: as :meth:`load`, naming ``source``.
        """
        if data is None:
            return cls()
        if isinstance(data, Mapping):
            extra = sorted(set(data) - {"kinds"})
            if extra:
                raise DeclarationError(
                    f"{source}: unknown top-level key(s) {', '.join(map(repr, extra))}: "
                    "put the declarations in a list under 'kinds'"
                )
            data = data.get("kinds") or []
        if not isinstance(data, list):
            raise DeclarationError(
                f"{source}: expected a list of kind declarations (or a 'kinds:' list), "
                f"got {type(data).__name__}"
            )
        custom: dict[str, KindInfo] = {}
        warnings: list[str] = []
        for index, entry in enumerate(data):
            info = _parse_entry(entry, f"{source}: entry {index + 1}")
            where = f"{source}: entry {index + 1} ({info.kind})"
            if info.kind in custom:
                raise DeclarationError(f"{where}: declared twice; keep one declaration")
            for prefix in info.mcp_tool_prefixes:
                owner = _overlapping_builtin(prefix)
                if owner is not None:
                    warnings.append(
                        f"{where}: mcp_tool_prefixes entry {prefix!r} overlaps the built-in "
                        f"kind {owner}'s prefixes; the built-in kind takes precedence"
                    )
            custom[info.kind] = info
        return cls(custom=custom, warnings=tuple(warnings))

    # --------------------------------------------------------------------------- lookups

    def info(self, kind: str) -> KindInfo | None:
        """Return what the registry knows of ``kind`` (``None``: unregistered, not custom)."""
        return _BUILTINS.get(kind) or self.custom.get(kind)

    def check_kind(self, kind: object, *, field: str = "action.kind") -> str:
        """Return ``kind`` if a reservation (or a policy) may name it.

        ``field`` is where the kind came from, for the message (``action_quotas[0].action_kind``).

        Raises:
            LedgerError: ``INVALID_REQUEST`` for a malformed kind, or a ``custom.*`` kind
                not declared on this server.
        """
        if isinstance(kind, str) and field == "action.kind" and not action_kinds.is_custom(kind):
            # A request may send any kind string (the base protocol's Action.kind): outside
            # the registry it is an unregistered kind, governed as side_effect.
            return kind
        problem = _kind_problem(kind) if isinstance(kind, str) else _uncached_problem(kind)
        if problem is not None:
            raise LedgerError("INVALID_REQUEST", f"{field}: {problem}")
        assert isinstance(kind, str)
        if action_kinds.is_custom(kind) and kind not in self.custom:
            declared = ", ".join(sorted(self.custom)) or "none"
            raise LedgerError(
                "INVALID_REQUEST",
                f"{field}: custom action kind {kind!r} is not registered: custom.* kinds must be "
                f"declared on the server (declared: {declared}); declare it with its risk_class "
                "or use a registry kind",
            )
        return kind

    def risk_class(self, kind: str) -> ActionRiskClass:
        """Return the risk class of ``kind`` (``side_effect`` for unregistered non-custom kinds).

        Raises:
            LedgerError: as :meth:`check_kind` for an undeclared ``custom.*`` kind.
        """
        info = self.info(self.check_kind(kind))
        return info.risk_class if info is not None else ActionRiskClass.SIDE_EFFECT

    def policy_dimensions(self, kind: str) -> frozenset[str]:
        """Return the ``policy_keys`` fields quota allowlists of ``kind`` match on."""
        info = self.info(kind)
        return info.policy_dimensions if info is not None else frozenset()

    def deprecated_replacement(self, kind: str) -> str | None:
        """Return the kind to migrate to if ``kind`` is deprecated (the deprecation header)."""
        info = self.info(kind)
        if info is None or not info.deprecated:
            return None
        return info.replacement_kind or action_kinds.UNKNOWN_CALL

    # ---------------------------------------------------------------------------- bodies

    def kind_body(self, kind: str, *, include_custom: bool = False) -> dict[str, Any] | None:
        """Return the wire ``ActionKind`` of ``kind`` (exact match), or ``None`` (a 404)."""
        info = _BUILTINS.get(kind) or (self.custom.get(kind) if include_custom else None)
        return None if info is None else _kind_body(info)

    def etag(self, *, include_custom: bool = False) -> str:
        """Return the ``ETag`` of the listing: a quoted digest of every entry it can show."""
        body = self.registry_body(
            include_custom=include_custom, include_deprecated=True, limit=_MAX_LIMIT
        )
        kinds = list(body["kinds"])
        while body["has_more"]:
            body = self.registry_body(
                include_custom=include_custom,
                include_deprecated=True,
                limit=_MAX_LIMIT,
                cursor=body["next_cursor"],
            )
            kinds += body["kinds"]
        digest = hashlib.sha256(json.dumps(kinds, sort_keys=True).encode()).hexdigest()
        return f'"{action_kinds.REGISTRY_VERSION}-{digest[:16]}"'

    def registry_body(
        self,
        *,
        risk_class: str | None = None,
        include_deprecated: bool = False,
        include_custom: bool = False,
        cursor: str | None = None,
        limit: int = _DEFAULT_LIMIT,
    ) -> dict[str, Any]:
        """Return one page of the wire ``ActionKindRegistry`` (``GET /v1/action-kinds``).

        Built-in kinds in registry order, then (only if ``include_custom``: the public list
        leaves them out) custom kinds by name. ``cursor`` is the ``next_cursor`` of the
        previous page.

        Raises:
            LedgerError: ``INVALID_REQUEST`` for an unknown ``risk_class``, a ``limit``
                outside 1..100 or a cursor this registry did not issue.
        """
        if risk_class is not None and risk_class not in {c.value for c in ActionRiskClass}:
            raise LedgerError(
                "INVALID_REQUEST", f"risk_class {risk_class!r} is not one of {_RISK_CLASSES}"
            )
        if not 1 <= limit <= _MAX_LIMIT:
            raise LedgerError("INVALID_REQUEST", f"limit must be 1..{_MAX_LIMIT}, got {limit}")
        infos: list[KindInfo] = sorted(_BUILTINS.values(), key=lambda i: _ORDER[i.kind])
        if include_custom:
            infos.extend(self.custom[k] for k in sorted(self.custom))
        infos = [
            i
            for i in infos
            if (risk_class is None or i.risk_class.value == risk_class)
            and (include_deprecated or not i.deprecated)
        ]
        start = 0
        if cursor is not None:
            names = [i.kind for i in infos]
            if cursor not in names:
                raise LedgerError(
                    "INVALID_REQUEST",
                    f"cursor {cursor!r} is not a next_cursor of this listing: start again "
                    "without cursor",
                )
            start = names.index(cursor) + 1
        page = infos[start : start + limit]
        more = start + limit < len(infos)
        body: dict[str, Any] = {
            "version": action_kinds.REGISTRY_VERSION,
            "kinds": [_kind_body(i) for i in page],
            "has_more": more,
        }
        if more:
            body["next_cursor"] = page[-1].kind
        return body


@functools.lru_cache(maxsize=4096)
def _kind_problem(kind: str) -> str | None:
    """What is wrong with the format of ``kind`` (``None``: fine); cached, kinds repeat."""
    return _uncached_problem(kind)


def _uncached_problem(kind: object) -> str | None:
    try:
        action_kinds.validate_kind(kind)  # type: ignore[arg-type]
    except CyclesConfigError as exc:
        return str(exc)
    return None


def _kind_body(info: KindInfo) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": info.kind, "risk_class": info.risk_class.value}
    spec: dict[str, Any] = {d: True for d in _DIMENSIONS if d in info.policy_dimensions}
    if info.resource_type is not None:
        spec["resource_type"] = info.resource_type
    if spec:
        body["policy_key_spec"] = spec
    if info.description is not None:
        body["description"] = info.description
    body["mcp_tool_prefixes"] = list(info.mcp_tool_prefixes)
    if info.deprecated:
        body["deprecated"] = True
        body["replacement_kind"] = info.replacement_kind or action_kinds.UNKNOWN_CALL
    return body


def _overlapping_builtin(prefix: str) -> str | None:
    for builtin_prefix, kind in _BUILTIN_PREFIXES.items():
        if prefix.startswith(builtin_prefix) or builtin_prefix.startswith(prefix):
            return kind
    return None


def _parse_entry(entry: object, where: str) -> KindInfo:
    if not isinstance(entry, Mapping):
        raise DeclarationError(
            f"{where}: expected a mapping with kind and risk_class, got {type(entry).__name__}"
        )
    kind = entry.get("kind")
    if kind is None:
        raise DeclarationError(f"{where}: missing 'kind' (custom.<org>.<operation>)")
    where = f"{where} ({kind})" if isinstance(kind, str) else where
    unknown = sorted(str(k) for k in entry if k not in _ENTRY_FIELDS)
    if unknown:
        raise DeclarationError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(_ENTRY_FIELDS)}"
        )
    if not isinstance(kind, str) or not action_kinds.is_custom(kind):
        raise DeclarationError(
            f"{where}: kind {kind!r} is not in the custom. namespace: operator kinds are "
            "custom.<org>.<operation>[.<qualifier>] (built-in kinds cannot be redeclared)"
        )
    try:
        action_kinds.validate_kind(kind)
    except CyclesConfigError as exc:
        raise DeclarationError(f"{where}: {exc}") from None
    risk = entry.get("risk_class")
    if risk is None:
        raise DeclarationError(f"{where}: missing 'risk_class' (one of {_RISK_CLASSES})")
    try:
        risk_class = ActionRiskClass(risk)
    except ValueError:
        raise DeclarationError(
            f"{where}: risk_class {risk!r} is not one of {_RISK_CLASSES}"
        ) from None
    description = entry.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 512):
        raise DeclarationError(f"{where}: description must be a string of at most 512 characters")
    dimensions, resource_type = _parse_key_spec(entry.get("policy_key_spec"), where)
    prefixes = entry.get("mcp_tool_prefixes")
    if prefixes is None:
        prefixes = []
    if not isinstance(prefixes, list) or not all(
        isinstance(p, str) and 0 < len(p) <= 128 for p in prefixes
    ):
        raise DeclarationError(
            f"{where}: mcp_tool_prefixes must be a list of non-empty strings of at most 128 "
            "characters"
        )
    return KindInfo(
        kind=kind,
        risk_class=risk_class,
        policy_dimensions=dimensions,
        resource_type=resource_type,
        description=description,
        mcp_tool_prefixes=tuple(prefixes),
        custom=True,
    )


def _parse_key_spec(spec: object, where: str) -> tuple[frozenset[str], str | None]:
    if spec is None:
        return frozenset(), None
    if not isinstance(spec, Mapping):
        raise DeclarationError(
            f"{where}: policy_key_spec must be a mapping such as {{host: true}}, got "
            f"{type(spec).__name__}"
        )
    unknown = sorted(str(k) for k in spec if k not in _DIMENSIONS)
    if unknown:
        raise DeclarationError(
            f"{where}: policy_key_spec has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(_DIMENSIONS)}"
        )
    dims: set[str] = set()
    resource_type: str | None = None
    for name, value in spec.items():
        if name == "resource_type":
            if not isinstance(value, str) or not value:
                raise DeclarationError(
                    f"{where}: policy_key_spec.resource_type names the resource (a string such "
                    f"as 'table'), got {value!r}"
                )
            resource_type = value
            dims.add(name)
        elif not isinstance(value, bool):
            raise DeclarationError(
                f"{where}: policy_key_spec.{name} must be true or false, got {value!r}"
            )
        elif value:
            dims.add(name)
    return frozenset(dims), resource_type
