"""The inbound path: port 15006, caller authentication, MCP proxying to the app on localhost."""
