// k6 load test for a ClaudeCluster intake: POST /tasks with a prompt and a
// priority under ramping stages, the shape of the deployment guide's load
// test.
//
//   k6 run loadtest/k6/submit-tasks.js
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e PEAK_VUS=200 loadtest/k6/submit-tasks.js
//
// It checks that every submit is accepted (202 with a task id) and, for a
// sample of tasks, that they reach a final state. It is provided for users
// who already run k6; the project's own figures come from
// `claudecluster-loadgen` and `scripts/bench` (see loadtest/README.md),
// which also measure queue wait and end-to-end latency without coordinated
// omission.

import http from "k6/http";
import { check, sleep } from "k6";
import { Counter, Trend } from "k6/metrics";

const BASE_URL = __ENV.BASE_URL || "http://127.0.0.1:3000";
const PEAK_VUS = parseInt(__ENV.PEAK_VUS || "100", 10);
// One task in FOLLOW_EVERY is polled until it finishes.
const FOLLOW_EVERY = parseInt(__ENV.FOLLOW_EVERY || "50", 10);
const FOLLOW_TIMEOUT_S = parseFloat(__ENV.FOLLOW_TIMEOUT_S || "30");

const FINAL_STATES = ["succeeded", "failed", "timed_out", "cancelled", "dead_lettered"];

const submitted = new Counter("claudecluster_tasks_submitted");
const succeeded = new Counter("claudecluster_tasks_succeeded");
const endToEnd = new Trend("claudecluster_task_end_to_end", true);

export const options = {
  scenarios: {
    ramp: {
      executor: "ramping-vus",
      startVUs: 0,
      stages: [
        { duration: "30s", target: Math.max(1, Math.floor(PEAK_VUS / 4)) },
        { duration: "1m", target: PEAK_VUS },
        { duration: "2m", target: PEAK_VUS },
        { duration: "30s", target: 0 },
      ],
      gracefulRampDown: "10s",
    },
  },
  thresholds: {
    http_req_failed: ["rate<0.01"],
    "http_req_duration{name:submit}": ["p(95)<50", "p(99)<200"],
    checks: ["rate>0.99"],
  },
};

const params = {
  headers: { "Content-Type": "application/json" },
  tags: { name: "submit" },
};

function submitTask() {
  const body = JSON.stringify({
    prompt: `k6 load test task from VU ${__VU}, iteration ${__ITER}`,
    priority: 1 + Math.floor(Math.random() * 10),
    metadata: { source: "k6" },
  });
  const res = http.post(`${BASE_URL}/tasks`, body, params);
  const accepted = check(res, {
    "submit answered 202": (r) => r.status === 202,
    "submit returned a task id": (r) => {
      try {
        return typeof r.json("id") === "string";
      } catch (e) {
        return false;
      }
    },
  });
  if (!accepted) {
    return null;
  }
  submitted.add(1);
  return res.json("id");
}

function follow(id, startedAt) {
  const deadline = startedAt + FOLLOW_TIMEOUT_S * 1000;
  let delay = 0.01;
  while (Date.now() < deadline) {
    const res = http.get(`${BASE_URL}/tasks/${id}`, { tags: { name: "get" } });
    if (res.status === 200) {
      const state = res.json("state");
      if (FINAL_STATES.includes(state)) {
        endToEnd.add(Date.now() - startedAt);
        if (state === "succeeded") {
          succeeded.add(1);
        }
        check(state, { "followed task succeeded": (s) => s === "succeeded" });
        return;
      }
    }
    sleep(delay);
    delay = Math.min(delay * 2, 1);
  }
  check(null, { "followed task finished in time": () => false });
}

export default function () {
  const startedAt = Date.now();
  const id = submitTask();
  if (id !== null && __ITER % FOLLOW_EVERY === 0) {
    follow(id, startedAt);
  }
}
