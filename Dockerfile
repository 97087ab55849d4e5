# syntax=docker/dockerfile:1.7
#
# ClaudeCluster container images, built from the repository root:
#
#   docker build -t claudecluster:local .                         # target "runtime" (default)
#   docker build --target claude -t claudecluster-claude:local .  # adds the Claude Code CLI
#
# "runtime" holds the three binaries (claudecluster, claudecluster-producer,
# claudecluster-consumer) and runs `claudecluster serve` by default: the whole
# system in one process with its embedded queue and store. Compose and
# Kubernetes pick the role with the command. "claude" is the worker image for
# TASK_EXECUTOR=claude: the same binaries plus the `claude` CLI and git.
#
# Both run as the non-root user 1001 under tini, which forwards SIGTERM so the
# worker can finish its in-flight tasks (SHUTDOWN_GRACE_MS) before it exits.

ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm
ARG NODE_VERSION=22
ARG CLAUDE_CODE_VERSION=2.1.332

# ---------------------------------------------------------------------------
# Build the three release binaries.
FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS builder
WORKDIR /src
COPY . .
# The registry and target directories are BuildKit cache mounts, so a rebuild
# after a source change recompiles only the workspace crates. Cache mounts are
# not part of the layer, hence the copy to /out inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --package claudecluster \
        --package claudecluster-producer \
        --package claudecluster-consumer \
    && mkdir -p /out \
    && cp target/release/claudecluster \
          target/release/claudecluster-producer \
          target/release/claudecluster-consumer /out/

# ---------------------------------------------------------------------------
# Fetch the Claude Code CLI. The npm package installs a self-contained native
# executable for the platform, so the final image needs no Node.js.
FROM node:${NODE_VERSION}-${DEBIAN_SUITE}-slim AS claude-cli
ARG CLAUDE_CODE_VERSION
RUN npm install --global --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
    && cp -L "$(npm prefix --global)/bin/claude" /claude \
    && HOME=/tmp DISABLE_AUTOUPDATER=1 /claude --version

# ---------------------------------------------------------------------------
# What every final image shares: CA certificates (TLS to the model API and to
# managed NATS/Redis), curl for health checks, tini, the user and its
# writable directories.
FROM debian:${DEBIAN_SUITE}-slim AS os-base
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ca-certificates curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1001 claudecluster \
    && useradd --system --uid 1001 --gid 1001 --create-home \
        --home-dir /home/claudecluster --shell /usr/sbin/nologin claudecluster \
    && mkdir -p /var/lib/claudecluster/data /var/lib/claudecluster/work \
    && chown -R 1001:1001 /var/lib/claudecluster
# HOST: a container must listen on all interfaces to be reachable.
# DATA_DIR: the embedded store of `claudecluster serve`.
# WORK_DIR: per-task working directories of the worker (an emptyDir in
# Kubernetes, where the root file system is read-only).
ENV HOST=0.0.0.0 \
    DATA_DIR=/var/lib/claudecluster/data \
    WORK_DIR=/var/lib/claudecluster/work
WORKDIR /home/claudecluster

# ---------------------------------------------------------------------------
# Worker image for the claude executor.
FROM os-base AS claude
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=claude-cli /claude /usr/local/bin/claude
COPY --from=builder /out/ /usr/local/bin/
# The CLI must not update itself or phone home from inside a worker.
ENV TASK_EXECUTOR=claude \
    DISABLE_AUTOUPDATER=1 \
    DISABLE_TELEMETRY=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
USER 1001:1001
EXPOSE 3001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["claudecluster-consumer"]

# ---------------------------------------------------------------------------
# Default image: all binaries, no Claude CLI (echo and command executors).
FROM os-base AS runtime
COPY --from=builder /out/ /usr/local/bin/
USER 1001:1001
EXPOSE 3000 3001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["claudecluster", "serve"]
