// Drives a ClaudeCluster MCP server with the official TypeScript SDK
// (@modelcontextprotocol/sdk), for the end-to-end tests in tests/e2e/mcp.rs.
// It prints one JSON object per line on standard output ({"event": ...});
// the Rust test reads them and asserts. Anything else goes to standard error.
//
// Usage:
//   node mcp-client.mjs flow      <target>        submit, wait with progress, get
//   node mcp-client.mjs errors    <target>        wrong calls, then a good one
//   node mcp-client.mjs cancel    <target>        abort a wait after its first progress,
//                                                 then wait for a line on standard input
//   node mcp-client.mjs alternate <url1> <url2>   one client, requests alternating between two intakes
//
// <target> is the intake's MCP endpoint (http://host:port/mcp), or
// `stdio <command> <intake-url>` to start `<command> mcp --url <intake-url>`
// and talk to it over standard input and output.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';

const WAIT_OPTIONS = { resetTimeoutOnProgress: true, timeout: 120_000 };

function emit(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// The first text block of a tool result, parsed as JSON.
function textJson(result) {
  return JSON.parse(result.content[0].text);
}

function transportFor(target) {
  if (target[0] === 'stdio') {
    const [, command, url] = target;
    return new StdioClientTransport({
      command,
      args: ['mcp', '--url', url],
      env: { ...process.env, LOG_LEVEL: 'warn' },
      stderr: 'inherit',
    });
  }
  return new StreamableHTTPClientTransport(new URL(target[0]));
}

async function connect(transport) {
  const client = new Client({ name: 'claudecluster-e2e-ts', version: '1.0.0' });
  await client.connect(transport);
  return client;
}

async function flow(target) {
  const transport = transportFor(target);
  const client = await connect(transport);
  const { tools } = await client.listTools();
  emit('tools', {
    protocolVersion: transport.protocolVersion ?? null,
    sessionId: transport.sessionId ?? null,
    tools: tools.map((t) => ({
      name: t.name,
      description: t.description,
      input: t.inputSchema,
      output: t.outputSchema ?? null,
    })),
  });
  // callTool validates structuredContent against the tool's output schema.
  const submitted = await client.callTool({
    name: 'submit_task',
    arguments: { prompt: 'hello from typescript', priority: 7, metadata: { via: 'ts' } },
  });
  emit('submitted', { record: submitted.structuredContent, text: textJson(submitted) });
  const id = submitted.structuredContent.id;
  const progress = [];
  const waited = await client.callTool(
    { name: 'wait_for_task', arguments: { id, max_wait_secs: 120 } },
    undefined,
    {
      ...WAIT_OPTIONS,
      onprogress: (p) => {
        progress.push(p);
        emit('progress', p);
      },
    },
  );
  const got = await client.callTool({ name: 'get_task', arguments: { id } });
  const listed = await client.callTool({ name: 'list_tasks', arguments: { limit: 5 } });
  emit('done', {
    progress,
    waited: waited.structuredContent,
    isError: waited.isError ?? false,
    got: got.structuredContent,
    listed: listed.structuredContent,
  });
  await client.close();
}

async function errors(target) {
  const client = await connect(transportFor(target));
  const outcomes = {};
  try {
    await client.callTool({ name: 'no_such_tool', arguments: {} });
    outcomes.unknownTool = { thrown: false };
  } catch (e) {
    outcomes.unknownTool = { thrown: true, code: e.code, message: e.message };
  }
  const calls = {
    wrongType: { name: 'submit_task', arguments: { prompt: 'x', priority: 'high' } },
    missingField: { name: 'submit_task', arguments: {} },
    unknownField: { name: 'submit_task', arguments: { prompt: 'x', prio: 3 } },
    oversizedPrompt: { name: 'submit_task', arguments: { prompt: 'x'.repeat(100_001) } },
    badBatchItem: { name: 'submit_tasks', arguments: { tasks: [{ prompt: 'a' }, { prompt: 'b', timeout_ms: 0 }] } },
    badId: { name: 'get_task', arguments: { id: 'not-a-uuid' } },
    unknownTask: { name: 'get_task', arguments: { id: '0190b3a6-2f6e-7cc3-a2c1-4a3f6e0c9d11' } },
    waitTooLong: { name: 'wait_for_task', arguments: { id: '0190b3a6-2f6e-7cc3-a2c1-4a3f6e0c9d11', max_wait_secs: 601 } },
    badState: { name: 'list_tasks', arguments: { state: 'done' } },
  };
  for (const [key, call] of Object.entries(calls)) {
    const result = await client.callTool(call);
    outcomes[key] = { isError: result.isError ?? false, body: textJson(result) };
  }
  // Still healthy: a good call on the same client.
  const ok = await client.callTool({ name: 'submit_task', arguments: { prompt: 'after the errors' } });
  outcomes.afterwards = { isError: ok.isError ?? false, state: ok.structuredContent?.state };
  emit('errors', outcomes);
  await client.close();
}

async function cancel(target) {
  const client = await connect(transportFor(target));
  const submitted = await client.callTool({ name: 'submit_task', arguments: { prompt: 'never picked up' } });
  const id = submitted.structuredContent.id;
  const abort = new AbortController();
  let error = null;
  try {
    await client.callTool(
      { name: 'wait_for_task', arguments: { id, max_wait_secs: 600 } },
      undefined,
      {
        ...WAIT_OPTIONS,
        signal: abort.signal,
        onprogress: (p) => {
          emit('progress', p);
          abort.abort('enough');
        },
      },
    );
  } catch (e) {
    error = String(e?.message ?? e);
  }
  emit('cancelled', { id, error });
  // Stay connected until the test has seen the intake end the wait, so the
  // cancellation, not the client going away, is what ended it.
  await new Promise((resolve) => process.stdin.once('data', resolve));
  const got = await client.callTool({ name: 'get_task', arguments: { id } });
  emit('done', { state: got.structuredContent.state });
  await client.close();
}

async function alternate(urls) {
  const targets = urls.map((u) => new URL(u));
  const served = targets.map(() => 0);
  const sessionIds = [];
  let next = 0;
  // Every HTTP request of this one client goes to the next intake in turn.
  const fetchAlternating = async (input, init) => {
    const original = new URL(input instanceof Request ? input.url : String(input));
    const index = next++ % targets.length;
    const target = new URL(original.pathname + original.search, targets[index]);
    const response = await fetch(target, init);
    if (response.headers.get('mcp-session-id')) sessionIds.push(response.headers.get('mcp-session-id'));
    if (init?.method === 'POST') served[index] += 1;
    return response;
  };
  const client = await connect(new StreamableHTTPClientTransport(targets[0], { fetch: fetchAlternating }));
  const results = [];
  const record = (name, result) => {
    results.push({ name, isError: result.isError ?? false });
    return result.structuredContent;
  };
  const { tools } = await client.listTools();
  results.push({ name: 'tools/list', isError: tools.length !== 6 });
  const ids = [];
  for (let i = 0; i < 4; i += 1) {
    const task = record('submit_task', await client.callTool({ name: 'submit_task', arguments: { prompt: `alternate ${i}` } }));
    ids.push(task.id);
  }
  const finished = [];
  for (const id of ids) {
    const waited = record(
      'wait_for_task',
      await client.callTool({ name: 'wait_for_task', arguments: { id, max_wait_secs: 60 } }, undefined, WAIT_OPTIONS),
    );
    finished.push({ id, state: waited.state, output: waited.result?.output ?? null });
    record('get_task', await client.callTool({ name: 'get_task', arguments: { id } }));
  }
  record('list_tasks', await client.callTool({ name: 'list_tasks', arguments: { limit: 10 } }));
  emit('alternated', { served, sessionIds, results, finished });
  await client.close();
}

const [scenario, ...rest] = process.argv.slice(2);
const scenarios = { flow, errors, cancel };
try {
  if (scenario === 'alternate') {
    await alternate(rest);
  } else if (scenarios[scenario]) {
    await scenarios[scenario](rest);
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  process.exit(0);
} catch (e) {
  console.error(e);
  emit('failed', { error: String(e?.stack ?? e) });
  process.exit(1);
}
