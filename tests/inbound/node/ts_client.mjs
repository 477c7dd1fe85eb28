// The official TypeScript MCP SDK client: initialize, tools/list, tools/call over streamable HTTP
// with a bearer token. Usage: node ts_client.mjs <url> <token|-> <tool> <json-arguments>
// Prints one JSON line: {"server": ..., "tools": [...], "result": <CallToolResult>} or {"error": ...}.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, tool, args] = process.argv.slice(2);
const headers = token && token !== "-" ? { Authorization: `Bearer ${token}` } : {};
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: "outrider-ts-interop", version: "1.0.0" });
try {
  await client.connect(transport);
  const tools = await client.listTools();
  const result = await client.callTool({ name: tool, arguments: JSON.parse(args) });
  console.log(
    JSON.stringify({
      server: client.getServerVersion(),
      protocol: transport.protocolVersion ?? null,
      session: transport.sessionId ?? null,
      tools: tools.tools.map((t) => t.name),
      result,
    }),
  );
  await transport.terminateSession().catch(() => {});
  await client.close();
} catch (error) {
  console.log(JSON.stringify({ error: String(error && error.message ? error.message : error), code: error?.code ?? null }));
  process.exitCode = 3;
}
