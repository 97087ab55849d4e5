#!/usr/bin/env node
// Publishes task messages straight onto the ClaudeCluster task stream, the
// way another system would, with the official NATS client for Node.js.
//
// Usage: node direct-publish.mjs <nats-url> <subject> <payload>...
//
// Each payload is the message body as given, or `@<file>` to read it from a
// file. The Nats-Msg-Id header (JetStream's duplicate detection) is the
// body's "id" when the body is a JSON object that has one, otherwise a fresh
// UUID. Every publish waits for the stream's acknowledgement; one JSON line
// per message is printed: {"id", "stream", "seq", "duplicate"}.
import { readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { connect, headers } from "nats";

const [url, subject, ...payloads] = process.argv.slice(2);
if (!url || !subject || payloads.length === 0) {
  console.error("usage: node direct-publish.mjs <nats-url> <subject> <payload|@file>...");
  process.exit(2);
}

// The task id in a body, if it has one.
function taskId(body) {
  try {
    const doc = JSON.parse(body.toString("utf8"));
    if (doc && typeof doc === "object" && typeof doc.id === "string") {
      return doc.id;
    }
  } catch {
    // Not JSON: still published, with a message id of its own.
  }
  return undefined;
}

const nc = await connect({ servers: url, name: "direct-publish" });
try {
  const js = nc.jetstream();
  for (const payload of payloads) {
    const body = payload.startsWith("@")
      ? readFileSync(payload.slice(1))
      : Buffer.from(payload, "utf8");
    const task = taskId(body);
    const id = task ?? randomUUID();
    const h = headers();
    h.set("Nats-Msg-Id", id);
    if (task) {
      h.set("ClaudeCluster-Task-Id", task);
    }
    const ack = await js.publish(subject, body, { headers: h });
    console.log(JSON.stringify({ id, stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate }));
  }
} finally {
  await nc.drain();
}
