"""The canonical action kinds of the Cycles registry, and checks for the kinds you send.

Policies name action kinds (``denied_action_kinds: [payment.charge]``, an email quota on
``message.email.send``), so a reservation must send the registry's kind for what it does,
not a free string::

    from runcycles import action_kinds

    Action(kind=action_kinds.MESSAGE_EMAIL_SEND, name="sendgrid",
           policy_keys=ActionPolicyKeys(host="api.sendgrid.com"))
    action_kinds.validate_kind("custom.acme.erp.invoice.post")   # returns it, or raises
    action_kinds.kind_for_tool("send_email")                      # "message.email.send"

The data is the registry of ``cycles-action-kinds-v0.1.26.yaml`` (``x-action-kind-registry``,
version :data:`REGISTRY_VERSION`): each kind's risk class, the ``policy_keys`` dimensions its
policies use, and the tool-name prefixes the spec maps to it. Kinds outside it are of two
sorts. ``custom.<org>.<operation>[...]`` kinds are the operator's: a server rejects one it
was not told about (``400``). Any other unregistered kind (``tool.call``) is accepted and
treated as ``side_effect``, but no policy can match it by its policy keys: prefer a registry
kind (``unknown.call`` when nothing fits).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from runcycles.exceptions import CyclesConfigError
from runcycles.models import ActionRiskClass

__all__ = [
    "AGENT_DELEGATE",
    "AGENT_HUMAN_ESCALATION",
    "AGENT_MESSAGE",
    "AGENT_SPAWN",
    "AUDIO_GENERATE",
    "AUDIO_TRANSCRIBE",
    "BUILTIN_KINDS",
    "BUILTIN_KIND_ORDER",
    "BuiltinKind",
    "CALENDAR_READ",
    "CALENDAR_WRITE",
    "CODE_DEPLOY",
    "CODE_EXEC",
    "CODE_LINT",
    "CRM_RECORD_DELETE",
    "CRM_RECORD_READ",
    "CRM_RECORD_WRITE",
    "CUSTOM_PREFIX",
    "DB_QUERY",
    "DB_SCHEMA_CHANGE",
    "DB_WRITE",
    "DOCUMENT_CREATE",
    "DOCUMENT_EDIT",
    "DOCUMENT_SHARE",
    "FILE_DELETE",
    "FILE_READ",
    "FILE_WRITE",
    "HTTP_DELETE",
    "HTTP_GET",
    "HTTP_GRAPHQL",
    "HTTP_POST",
    "HTTP_PUT",
    "IMAGE_EDIT",
    "IMAGE_GENERATE",
    "LLM_COMPLETION",
    "LLM_EMBEDDING",
    "LLM_STRUCTURED_OUTPUT",
    "MEMORY_DELETE",
    "MEMORY_READ",
    "MEMORY_WRITE",
    "MESSAGE_CHAT_POST",
    "MESSAGE_EMAIL_SEND",
    "MESSAGE_SLACK_POST",
    "MESSAGE_SMS_SEND",
    "NOTIFICATION_PUSH_SEND",
    "NOTIFICATION_WEBHOOK_TRIGGER",
    "PAYMENT_CHARGE",
    "PAYMENT_REFUND",
    "REASONING_PLAN",
    "REASONING_REFLECT",
    "REGISTRY_VERSION",
    "SOCIAL_DM_SEND",
    "SOCIAL_POST_CREATE",
    "SOCIAL_POST_DELETE",
    "STORAGE_DELETE",
    "STORAGE_DOWNLOAD",
    "STORAGE_UPLOAD",
    "UNKNOWN_CALL",
    "VECTOR_DELETE",
    "VECTOR_QUERY",
    "VECTOR_UPSERT",
    "VIDEO_GENERATE",
    "VIDEO_TRANSCODE",
    "VISION_ANALYZE",
    "VISION_OCR",
    "VISION_PARSE_DOCUMENT",
    "WEB_SEARCH",
    "builtin",
    "is_builtin",
    "is_custom",
    "kind_for_tool",
    "policy_dimensions",
    "risk_class",
    "validate_kind",
]

REGISTRY_VERSION: Final = "0.1.26"
"""Version of the registry this module holds (``x-action-kind-registry.version``)."""
CUSTOM_PREFIX: Final = "custom."
"""Prefix of operator-defined kinds: ``custom.<org>.<operation>[.<qualifier>...]``."""
MAX_KIND_LENGTH: Final = 64

LLM_COMPLETION: Final = "llm.completion"
LLM_EMBEDDING: Final = "llm.embedding"
LLM_STRUCTURED_OUTPUT: Final = "llm.structured_output"
AGENT_SPAWN: Final = "agent.spawn"
AGENT_DELEGATE: Final = "agent.delegate"
AGENT_MESSAGE: Final = "agent.message"
AGENT_HUMAN_ESCALATION: Final = "agent.human_escalation"
WEB_SEARCH: Final = "web.search"
HTTP_GET: Final = "http.get"
HTTP_POST: Final = "http.post"
HTTP_PUT: Final = "http.put"
HTTP_DELETE: Final = "http.delete"
HTTP_GRAPHQL: Final = "http.graphql"
MESSAGE_EMAIL_SEND: Final = "message.email.send"
MESSAGE_SLACK_POST: Final = "message.slack.post"
MESSAGE_SMS_SEND: Final = "message.sms.send"
MESSAGE_CHAT_POST: Final = "message.chat.post"
DB_QUERY: Final = "db.query"
DB_WRITE: Final = "db.write"
DB_SCHEMA_CHANGE: Final = "db.schema_change"
CRM_RECORD_READ: Final = "crm.record.read"
CRM_RECORD_WRITE: Final = "crm.record.write"
CRM_RECORD_DELETE: Final = "crm.record.delete"
FILE_READ: Final = "file.read"
FILE_WRITE: Final = "file.write"
FILE_DELETE: Final = "file.delete"
CODE_EXEC: Final = "code.exec"
CODE_DEPLOY: Final = "code.deploy"
CODE_LINT: Final = "code.lint"
VECTOR_QUERY: Final = "vector.query"
VECTOR_UPSERT: Final = "vector.upsert"
VECTOR_DELETE: Final = "vector.delete"
MEMORY_READ: Final = "memory.read"
MEMORY_WRITE: Final = "memory.write"
MEMORY_DELETE: Final = "memory.delete"
REASONING_PLAN: Final = "reasoning.plan"
REASONING_REFLECT: Final = "reasoning.reflect"
CALENDAR_READ: Final = "calendar.read"
CALENDAR_WRITE: Final = "calendar.write"
PAYMENT_CHARGE: Final = "payment.charge"
PAYMENT_REFUND: Final = "payment.refund"
IMAGE_GENERATE: Final = "image.generate"
IMAGE_EDIT: Final = "image.edit"
VIDEO_GENERATE: Final = "video.generate"
VIDEO_TRANSCODE: Final = "video.transcode"
AUDIO_GENERATE: Final = "audio.generate"
AUDIO_TRANSCRIBE: Final = "audio.transcribe"
VISION_ANALYZE: Final = "vision.analyze"
VISION_OCR: Final = "vision.ocr"
VISION_PARSE_DOCUMENT: Final = "vision.parse_document"
SOCIAL_POST_CREATE: Final = "social.post.create"
SOCIAL_POST_DELETE: Final = "social.post.delete"
SOCIAL_DM_SEND: Final = "social.dm.send"
NOTIFICATION_PUSH_SEND: Final = "notification.push.send"
NOTIFICATION_WEBHOOK_TRIGGER: Final = "notification.webhook.trigger"
STORAGE_UPLOAD: Final = "storage.upload"
STORAGE_DOWNLOAD: Final = "storage.download"
STORAGE_DELETE: Final = "storage.delete"
DOCUMENT_CREATE: Final = "document.create"
DOCUMENT_EDIT: Final = "document.edit"
DOCUMENT_SHARE: Final = "document.share"
UNKNOWN_CALL: Final = "unknown.call"

# Kind, risk class, policy-key dimensions (``resource_type=<name>`` names the resource), and
# on the next line the tool-name prefixes the spec maps to the kind (``-`` for none).
_REGISTRY: Final = """
llm.completion side_effect -
    llm_ chat_ complete_ openai_chat anthropic_ generate_text
llm.embedding read_only -
    embed_ embedding_ openai_embed get_embedding encode_text
llm.structured_output side_effect host
    structured_output json_mode function_call
agent.spawn side_effect -
    spawn_agent create_agent fork_agent new_agent
agent.delegate side_effect host
    delegate_ handoff_ assign_agent route_to_agent
agent.message side_effect -
    send_to_agent agent_message a2a_send inter_agent
agent.human_escalation external_side_effect recipient_domain
    escalate_ human_review request_approval ask_human
web.search read_only -
    search_ web_search search
http.get read_only host
    http_get fetch_url get_url
http.post external_side_effect host
    http_post post_url call_api api_call
http.put external_side_effect host
    http_put http_patch update_api
http.delete external_side_effect host
    http_delete delete_api
http.graphql side_effect host
    graphql_ gql_query gql_mutate
message.email.send external_side_effect host,recipient_domain
    send_email email_ smtp_ sendgrid_
message.slack.post external_side_effect host
    slack_ post_slack send_slack
message.sms.send external_side_effect recipient_domain
    send_sms sms_ twilio_
message.chat.post external_side_effect host
    teams_ discord_ mattermost_ chat_send post_message
db.query read_only resource_type=table
    db_query query_db sql_query select_
db.write side_effect resource_type=table
    db_write db_insert db_update db_delete sql_write
db.schema_change high_risk resource_type=table
    db_migrate alter_table create_table drop_table
crm.record.read read_only resource_type=object_type
    get_contact get_lead crm_read salesforce_get
crm.record.write side_effect resource_type=object_type
    create_contact update_contact crm_write salesforce_create
crm.record.delete external_side_effect resource_type=object_type
    delete_contact crm_delete salesforce_delete
file.read read_only path_prefix
    read_file file_read get_file open_file
file.write local_mutation path_prefix
    write_file file_write create_file save_file
file.delete side_effect path_prefix
    delete_file file_delete remove_file
code.exec high_risk path_prefix
    exec_ run_code python_exec bash_exec js_exec
code.deploy high_risk host
    deploy_ code_publish vercel_deploy lambda_deploy
code.lint read_only path_prefix
    lint_ check_code type_check static_analysis
vector.query read_only resource_type=collection
    vector_search similarity_search pinecone_query
vector.upsert side_effect resource_type=collection
    vector_upsert embed_and_store pinecone_upsert
vector.delete side_effect resource_type=collection
    vector_delete pinecone_delete remove_embedding delete_vectors
memory.read read_only resource_type=store
    memory_read recall_ retrieve_memory rag_query knowledge_search
memory.write local_mutation resource_type=store
    memory_write memorize_ store_memory rag_ingest knowledge_store
memory.delete side_effect resource_type=store
    memory_delete forget_ clear_memory rag_delete
reasoning.plan side_effect -
    plan_ create_plan decompose_ reason_
reasoning.reflect side_effect -
    reflect_ self_evaluate critique_ review_output
calendar.read read_only host
    get_calendar list_events check_availability
calendar.write external_side_effect host
    create_event update_event schedule_meeting
payment.charge high_risk host
    charge_ payment_ stripe_charge process_payment
payment.refund high_risk host
    refund_ issue_refund stripe_refund
image.generate external_side_effect host
    generate_image create_image dalle_ image_gen text_to_image
image.edit external_side_effect host
    edit_image inpaint_ outpaint_ image_edit
video.generate high_risk host
    generate_video create_video text_to_video runway_
video.transcode side_effect host,path_prefix
    transcode_ encode_video ffmpeg_
audio.generate external_side_effect host
    generate_audio text_to_speech tts_ elevenlabs_
audio.transcribe read_only host
    transcribe_ speech_to_text whisper_ deepgram_
vision.analyze side_effect host
    analyze_image vision_ describe_image image_understand gpt4v_
vision.ocr side_effect host
    ocr_ extract_text read_document document_ocr
vision.parse_document side_effect host,path_prefix
    parse_document extract_form pdf_extract document_parse parse_pdf
social.post.create external_side_effect host
    post_tweet create_post publish_ tweet_ linkedin_post
social.post.delete external_side_effect host
    delete_post delete_tweet remove_post
social.dm.send external_side_effect host,recipient_domain
    send_dm send_message dm_ direct_message
notification.push.send external_side_effect host
    send_push push_notification fcm_ apns_ notify_
notification.webhook.trigger external_side_effect host
    trigger_webhook send_webhook webhook_notify
storage.upload side_effect host,path_prefix
    upload_file s3_put gcs_upload blob_upload
storage.download read_only host,path_prefix
    download_file s3_get gcs_download blob_download
storage.delete side_effect host,path_prefix
    delete_object s3_delete gcs_delete blob_delete
document.create side_effect host
    create_doc create_document new_page notion_create
document.edit side_effect host
    edit_doc update_document modify_page notion_update gdocs_edit
document.share external_side_effect host,recipient_domain
    share_doc share_document grant_access set_permissions
unknown.call side_effect -
    -
"""


@dataclass(frozen=True)
class BuiltinKind:
    """One kind of the registry.

    Attributes:
        kind: The kind string (``"message.email.send"``).
        risk_class: Its risk class (risk-class quotas count by it).
        policy_dimensions: The :class:`~runcycles.models.ActionPolicyKeys` fields its
            policies match on (``{"host", "recipient_domain"}``); servers ignore the others.
        resource_type: What ``policy_keys.resource_type`` names for it (``"table"``), if any.
        tool_prefixes: Tool-name prefixes that map to it (:func:`kind_for_tool`).
    """

    kind: str
    risk_class: ActionRiskClass
    policy_dimensions: frozenset[str]
    resource_type: str | None
    tool_prefixes: tuple[str, ...]


def _parse(table: str) -> dict[str, BuiltinKind]:
    lines = table.strip().splitlines()
    kinds: dict[str, BuiltinKind] = {}
    for head, prefixes in zip(lines[::2], lines[1::2], strict=True):
        kind, risk, keys = head.split()
        dims = [] if keys == "-" else keys.split(",")
        resource = next((d.split("=", 1)[1] for d in dims if d.startswith("resource_type=")), None)
        names = frozenset(d.split("=", 1)[0] for d in dims)
        words = prefixes.split()
        kinds[kind] = BuiltinKind(
            kind, ActionRiskClass(risk), names, resource, tuple(w for w in words if w != "-")
        )
    return kinds


_KINDS: Final = _parse(_REGISTRY)
BUILTIN_KINDS: Final = frozenset(_KINDS)
"""Every kind of the registry."""
BUILTIN_KIND_ORDER: Final = tuple(_KINDS)
"""The registry's kinds in the spec's order (by category, ``unknown.call`` last)."""
_BY_PREFIX: Final = sorted(
    ((prefix, info.kind) for info in _KINDS.values() for prefix in info.tool_prefixes),
    key=lambda item: -len(item[0]),
)
_SEGMENT: Final = re.compile(r"[a-z][a-z0-9_]*")


def builtin(kind: str) -> BuiltinKind | None:
    """Return the registry entry of ``kind`` (``None`` if it is not a built-in kind)."""
    return _KINDS.get(kind)


def is_builtin(kind: str) -> bool:
    """Return whether ``kind`` is in the registry."""
    return kind in _KINDS


def is_custom(kind: str) -> bool:
    """Return whether ``kind`` is in the operators' ``custom.`` namespace."""
    return kind.startswith(CUSTOM_PREFIX)


def policy_dimensions(kind: str) -> frozenset[str]:
    """Return the ``policy_keys`` fields policies of ``kind`` match on (empty if none/unknown)."""
    info = _KINDS.get(kind)
    return info.policy_dimensions if info is not None else frozenset()


def risk_class(
    kind: str, custom_kinds: Mapping[str, ActionRiskClass | str] | None = None
) -> ActionRiskClass:
    """Return the risk class a server gives ``kind``.

    A built-in kind has its registry class; a ``custom.*`` kind the class declared in
    ``custom_kinds``; any other kind ``side_effect`` (the spec's fallback).

    Raises:
        CyclesConfigError: ``kind`` is a ``custom.*`` kind not in ``custom_kinds`` (a server
            rejects it), or its declared class is not a risk class.
    """
    info = _KINDS.get(kind)
    if info is not None:
        return info.risk_class
    if is_custom(kind):
        declared = (custom_kinds or {}).get(kind)
        if declared is None:
            raise CyclesConfigError(
                f"custom action kind {kind!r} is not declared: declare it (with its risk class) "
                "on the server, which rejects undeclared custom.* kinds with 400"
            )
        try:
            return ActionRiskClass(declared)
        except ValueError:
            classes = ", ".join(c.value for c in ActionRiskClass)
            raise CyclesConfigError(
                f"custom action kind {kind!r} declares risk class {declared!r}; use one of "
                f"{classes}"
            ) from None
    return ActionRiskClass.SIDE_EFFECT


def validate_kind(
    kind: str,
    *,
    registered_only: bool = False,
    custom_kinds: Mapping[str, object] | None = None,
) -> str:
    """Return ``kind`` if a server accepts it as an action kind, else raise saying why.

    A kind is dot-separated segments of lowercase letters, digits and ``_`` (each starting
    with a letter), at most 64 characters, with at least a category and an operation
    (``web.search``). A ``custom.*`` kind needs an organisation too
    (``custom.acme.erp.post``) and, when ``custom_kinds`` (the kinds declared on the server)
    is given, must be one of them.

    Args:
        kind: The kind to check.
        registered_only: Also refuse a non-custom kind outside the registry (such kinds are
            accepted by servers, as ``side_effect``, but no policy key matching applies).
        custom_kinds: The ``custom.*`` kinds declared on the server, if known.

    Raises:
        CyclesConfigError: What is wrong with ``kind``, and what to send instead.
    """
    problem = _format_problem(kind)
    if problem is not None:
        raise CyclesConfigError(f"action kind {kind!r} {problem}")
    if kind in _KINDS:
        return kind
    if is_custom(kind):
        if custom_kinds is not None and kind not in custom_kinds:
            declared = ", ".join(sorted(custom_kinds)) or "none"
            raise CyclesConfigError(
                f"custom action kind {kind!r} is not declared on the server (declared: "
                f"{declared}); the server rejects undeclared custom.* kinds with 400"
            )
        return kind
    if registered_only:
        raise CyclesConfigError(
            f"action kind {kind!r} is not in the Cycles registry (v{REGISTRY_VERSION})"
            f"{_suggestion(kind)}; use a registry kind (action_kinds.UNKNOWN_CALL when none "
            "fits) or declare an operator kind custom.<org>.<operation>"
        )
    return kind


def kind_for_tool(tool_name: str, default: str = UNKNOWN_CALL) -> str:
    """Return the registry kind the spec's tool-name conventions give ``tool_name``.

    The longest registry prefix the lower-cased name starts with wins (``send_email`` is
    ``message.email.send``, ``s3_put_object`` is ``storage.upload``); ``default``
    (``unknown.call``) when none does.
    """
    name = tool_name.lower()
    for prefix, kind in _BY_PREFIX:
        if name.startswith(prefix):
            return kind
    return default


def _format_problem(kind: object) -> str | None:
    if not isinstance(kind, str):
        return f"is a {type(kind).__name__}, not a string"
    if not kind:
        return "is empty: send a registry kind such as 'llm.completion'"
    if len(kind) > MAX_KIND_LENGTH:
        return f"is {len(kind)} characters long; the protocol allows {MAX_KIND_LENGTH}"
    segments = kind.split(".")
    if not all(_SEGMENT.fullmatch(segment) for segment in segments):
        if kind != kind.lower():
            return f"has capital letters: kinds are lower case ({kind.lower()!r})"
        return (
            "is not dot-separated segments of lowercase letters, digits and _ (each starting "
            "with a letter), e.g. 'message.email.send'"
        )
    if segments[0] == "custom" and len(segments) < 3:
        return (
            "is not custom.<org>.<operation>[.<qualifier>]: name an organisation and an operation"
        )
    if len(segments) < 2:
        return f"has no category: write <category>.<operation>{_suggestion(kind)}"
    return None


def _suggestion(kind: str) -> str:
    close = difflib.get_close_matches(kind, list(_KINDS), n=1, cutoff=0.6)
    if not close:
        close = [k for k in _KINDS if kind in k.split(".")][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""
