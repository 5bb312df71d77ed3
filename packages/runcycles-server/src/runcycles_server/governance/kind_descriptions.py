"""The built-in action kinds' descriptions, as ``x-action-kind-registry`` words them.

Kept apart from the registry logic because it is data: the ``description`` of each
``ActionKind`` body on ``GET /v1/action-kinds``. A test checks it against the spec file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["DESCRIPTIONS"]

DESCRIPTIONS: Final[Mapping[str, str]] = {
    "llm.completion": "LLM text completion or chat call (may trigger further actions)",
    "llm.embedding": "Generate embedding vector for text",
    "llm.structured_output": (
        "LLM call with structured output constraint (JSON schema, function calling, tool "
        "use). Distinct from llm.completion for providers that bill differently."
    ),
    "agent.spawn": (
        "Spawn a child agent or sub-task with its own execution context. Governs fan-out: "
        "each spawned agent inherits or derives a budget scope."
    ),
    "agent.delegate": (
        "Delegate a task to a named agent or agent pool. The delegate may execute actions "
        "under its own policy scope."
    ),
    "agent.message": (
        "Send a message to another agent within the same runtime or cluster. Enables agent-"
        "to-agent coordination and protocol exchanges."
    ),
    "agent.human_escalation": (
        "Escalate a decision or task to a human operator. Externally visible: triggers a "
        "notification and blocks until human response."
    ),
    "web.search": "Web search query (read-only, no side effects)",
    "http.get": "HTTP GET to an external endpoint",
    "http.post": "HTTP POST to an external endpoint",
    "http.put": "HTTP PUT/PATCH to an external endpoint",
    "http.delete": "HTTP DELETE to an external endpoint",
    "http.graphql": (
        "Execute a GraphQL query or mutation. Classified as side_effect because a single "
        "request may contain both reads and writes."
    ),
    "message.email.send": "Send an email to one or more recipients",
    "message.slack.post": "Post a message to a Slack channel or user",
    "message.sms.send": "Send an SMS message",
    "message.chat.post": (
        "Post a message to a chat platform (Teams, Discord, Mattermost, etc.). Use "
        "message.slack.post for Slack-specific routing; use this for other platforms."
    ),
    "db.query": "Read-only database query (SELECT)",
    "db.write": "Database write (INSERT, UPDATE, DELETE, UPSERT)",
    "db.schema_change": "Database schema modification (DDL: CREATE, ALTER, DROP)",
    "crm.record.read": "Read a CRM record",
    "crm.record.write": "Create or update a CRM record",
    "crm.record.delete": "Delete a CRM record (typically irreversible)",
    "file.read": "Read a file from local or shared storage",
    "file.write": "Write or create a file in local or shared storage",
    "file.delete": "Delete a file from storage",
    "code.exec": "Execute arbitrary code in a sandbox or interpreter",
    "code.deploy": "Deploy code to a runtime environment",
    "code.lint": (
        "Run static analysis, linting, or type-checking on code. Read-only inspection with no"
        " state modification."
    ),
    "vector.query": "Vector similarity search (read-only)",
    "vector.upsert": "Insert or update vectors in a vector store",
    "vector.delete": (
        "Delete vectors or documents from a vector store. Irreversible data loss for the "
        "affected embeddings."
    ),
    "memory.read": (
        "Read from agent long-term memory, knowledge base, or RAG retrieval store. Includes "
        "semantic search over memory."
    ),
    "memory.write": (
        "Write to agent long-term memory or knowledge base. Includes storing conversation "
        "summaries, facts, or documents for future retrieval."
    ),
    "memory.delete": (
        "Delete entries from agent long-term memory or knowledge base. Irreversible data loss"
        " without backups."
    ),
    "reasoning.plan": (
        "Generate or revise an execution plan. Typically involves LLM calls to decompose a "
        "goal into steps. Operators can quota to cap runaway planning loops."
    ),
    "reasoning.reflect": (
        "Self-evaluation or critique loop where the agent reviews its own output. Consumes "
        "LLM calls; operators can quota to prevent infinite self-correction."
    ),
    "calendar.read": "Read calendar events or availability",
    "calendar.write": "Create or modify calendar events",
    "payment.charge": "Initiate a payment charge or transaction",
    "payment.refund": "Issue a payment refund",
    "image.generate": (
        "AI image generation from a text prompt or reference image. Billed on submit "
        "regardless of downstream use. Examples: DALL-E, Stable Diffusion, Midjourney, "
        "Imagen."
    ),
    "image.edit": "AI-assisted image editing, inpainting, or outpainting.",
    "video.generate": (
        "AI video generation. high_risk: expensive (large billing events), long-running "
        "(minutes to hours), irreversible output. Examples: Sora, RunwayML, Pika."
    ),
    "video.transcode": "Transcode or re-encode an existing video file.",
    "audio.generate": (
        "AI audio generation: text-to-speech, voice cloning, or music generation. Examples: "
        "ElevenLabs, OpenAI TTS, Suno."
    ),
    "audio.transcribe": (
        "Transcribe audio or video to text. Source audio is not modified. Examples: Whisper, "
        "Deepgram."
    ),
    "vision.analyze": (
        "Analyze an image using a vision model. Includes scene description, object detection,"
        " visual question answering, and chart interpretation."
    ),
    "vision.ocr": (
        "Extract text from images or scanned documents via OCR. May use specialized OCR "
        "services or vision LLMs."
    ),
    "vision.parse_document": (
        "Parse a document (PDF, scan, form) into structured data. Includes table extraction, "
        "form field recognition, and layout analysis."
    ),
    "social.post.create": (
        "Publish a post to a social platform or public-facing channel. Irreversible once "
        "visible. Examples: Twitter/X, LinkedIn, Reddit."
    ),
    "social.post.delete": (
        "Delete a previously published post. Irreversible and externally visible."
    ),
    "social.dm.send": (
        "Send a direct message on a social platform. Not public, but still an external "
        "irreversible communication."
    ),
    "notification.push.send": (
        "Send a push notification to a mobile device or browser. High-volume sends have "
        "reputational impact. Examples: FCM, APNs."
    ),
    "notification.webhook.trigger": (
        "Trigger an outbound webhook to a pre-configured endpoint. Distinct from http.post: "
        "target is registered, not ad-hoc."
    ),
    "storage.upload": "Upload a file or object to cloud storage (S3, GCS, Azure Blob).",
    "storage.download": "Download a file or object from cloud storage. May incur egress costs.",
    "storage.delete": "Delete an object from cloud storage. Irreversible without versioning.",
    "document.create": "Create a document, spreadsheet, or page in a workspace tool.",
    "document.edit": (
        "Edit or update an existing document, spreadsheet, or page in a workspace tool."
    ),
    "document.share": (
        "Share a document with external users or make it publicly accessible. "
        "external_side_effect because it grants access to third parties and the permission "
        "change is immediately visible outside the system."
    ),
    "unknown.call": (
        "Fallback for MCP tool calls that cannot be normalized to a registered kind. "
        "risk_class=side_effect is conservative and safe. Operators SHOULD configure policies"
        " for specific kinds rather than relying on this fallback."
    ),
}
