"""JSON-RPC / MCP message facts, parsed once per message and shared by policy, telemetry and audit.

The inbound proxy owns the parsing; telemetry and audit only read `McpMessage`.
"""

from __future__ import annotations

from dataclasses import dataclass

JsonRpcId = str | int | None


@dataclass(frozen=True)
class McpMessage:
    """One JSON-RPC message of an MCP exchange (a request, notification or response)."""

    kind: str  # "request" | "notification" | "response" | "invalid"
    method: str | None = None  # e.g. "tools/call"
    id: JsonRpcId = None
    tool_name: str | None = None  # params.name for tools/call
    prompt_name: str | None = None  # params.name for prompts/get
    resource_uri: str | None = None  # params.uri for resources/read, subscribe, ...
    arguments: dict[str, object] | None = None  # params.arguments (never logged unless configured)
    is_error: bool = False  # response: JSON-RPC error, or result.isError for tool results
    error_code: int | None = None

    @property
    def target(self) -> str | None:
        """The semantic-convention `{target}` of the span name: the tool, prompt or resource."""
        return self.tool_name or self.prompt_name or self.resource_uri
