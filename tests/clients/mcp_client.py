"""Drives a ClaudeCluster MCP server with the official Python SDK (PyPI `mcp`),
for the end-to-end tests in tests/e2e/mcp.rs.

It prints one JSON object per line on standard output ({"event": ...}); the
Rust test reads them and asserts. Anything else goes to standard error.

Usage:
    python mcp_client.py flow   <target>   submit, wait with progress, get
    python mcp_client.py cancel <target>   cancel a wait after its first progress,
                                           then wait for a line on standard input

<target> is the intake's MCP endpoint (http://host:port/mcp), or
`stdio <command> <intake-url>` to start `<command> mcp --url <intake-url>` and
talk to it over standard input and output.
"""

import json
import os
import sys
import traceback

import anyio
from mcp import Client, StdioServerParameters


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def server_for(target):
    if target[0] == "stdio":
        _, command, url = target
        env = dict(os.environ, LOG_LEVEL="warn")
        return StdioServerParameters(command=command, args=["mcp", "--url", url], env=env)
    return target[0]


def text_json(result):
    return json.loads(result.content[0].text)


async def flow(target):
    async with Client(server_for(target)) as client:
        tools = (await client.list_tools()).tools
        emit(
            "tools",
            protocolVersion=client.protocol_version,
            tools=[
                {"name": t.name, "hasOutputSchema": t.output_schema is not None}
                for t in tools
            ],
        )
        submitted = await client.call_tool(
            "submit_task",
            {"prompt": "hello from python", "metadata": {"via": "python"}},
        )
        record = submitted.structured_content
        emit("submitted", record=record, text=text_json(submitted))
        progress = []

        async def on_progress(value, total, message):
            progress.append({"progress": value, "total": total, "message": message})
            emit("progress", progress=value, message=message)

        waited = await client.call_tool(
            "wait_for_task",
            {"id": record["id"], "max_wait_secs": 120},
            progress_callback=on_progress,
        )
        got = await client.call_tool("get_task", {"id": record["id"]})
        emit(
            "done",
            progress=progress,
            waited=waited.structured_content,
            isError=bool(waited.is_error),
            got=got.structured_content,
        )


async def cancel(target):
    async with Client(server_for(target)) as client:
        submitted = await client.call_tool("submit_task", {"prompt": "never picked up"})
        task_id = submitted.structured_content["id"]
        first_progress = anyio.Event()

        async def on_progress(value, total, message):
            emit("progress", progress=value, message=message)
            first_progress.set()

        finished = False
        async with anyio.create_task_group() as group:

            async def wait():
                nonlocal finished
                await client.call_tool(
                    "wait_for_task",
                    {"id": task_id, "max_wait_secs": 600},
                    progress_callback=on_progress,
                )
                finished = True

            group.start_soon(wait)
            await first_progress.wait()
            # Abandon the call the way an anyio program does: cancel its scope.
            group.cancel_scope.cancel()
        emit("cancelled", id=task_id, finished=finished)
        # Stay connected until the test has seen the intake end the wait, so
        # the cancellation, not the client going away, is what ended it.
        await anyio.to_thread.run_sync(sys.stdin.readline)
        got = await client.call_tool("get_task", {"id": task_id})
        emit("done", state=got.structured_content["state"])


async def main(argv):
    scenario, target = argv[0], argv[1:]
    scenarios = {"flow": flow, "cancel": cancel}
    if scenario not in scenarios:
        raise SystemExit(f"unknown scenario {scenario}")
    await scenarios[scenario](target)


if __name__ == "__main__":
    try:
        anyio.run(main, sys.argv[1:])
    except BaseException as error:  # report everything, including cancellation
        if isinstance(error, SystemExit) and not error.code:
            raise
        traceback.print_exc()
        emit("failed", error=repr(error))
        sys.exit(1)
