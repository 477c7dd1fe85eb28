"""Tool-level authorization (Cedar) and rate limits for the inbound MCP proxy.

Pure decision modules (model, cedar_text, engine, schema, answers, limits config) and two thin
adapters: `ratelimit` (the `limits` storage) and `gate` (what the proxy calls).
"""
