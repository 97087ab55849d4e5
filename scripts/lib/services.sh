# shellcheck shell=bash
# Makes sure the services the test suite talks to are there.
#
# NATS (with JetStream) and Redis are used where they already listen on their
# standard loopback ports; otherwise a private instance is started from the
# installed binary on a free loopback port (installing the Debian package
# first when the binary is missing), and CC_TEST_NATS_URL / CC_TEST_REDIS_URL
# point the tests at it. CC_NATS_SERVER_BIN and CC_REDIS_SERVER_BIN name the
# binaries for tests that start (and restart) instances of their own.

CC_SERVICES_DIR=""
CC_SERVICE_PIDS=()

cc_port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

cc_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cc_wait_port() { # port what
  for _ in $(seq 1 100); do
    cc_port_open 127.0.0.1 "$1" && return 0
    sleep 0.1
  done
  echo "error: $2 did not start listening on 127.0.0.1:$1" >&2
  return 1
}

cc_apt_install() { # package...
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: missing $*; install the Debian package(s) $* (apt-get install $*)" >&2
    return 1
  fi
  echo "installing $* ..." >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

cc_find_bin() { # name -> path
  command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || { [ -x "/usr/bin/$1" ] && echo "/usr/bin/$1"; } || true
}

cc_services_up() {
  CC_SERVICES_DIR=$(mktemp -d /tmp/claudecluster-services.XXXXXX)

  local nats_bin redis_bin
  nats_bin=$(cc_find_bin nats-server)
  [ -n "$nats_bin" ] || { cc_apt_install nats-server && nats_bin=$(cc_find_bin nats-server); }
  redis_bin=$(cc_find_bin redis-server)
  [ -n "$redis_bin" ] || { cc_apt_install redis-server && redis_bin=$(cc_find_bin redis-server); }
  export CC_NATS_SERVER_BIN="$nats_bin" CC_REDIS_SERVER_BIN="$redis_bin"

  if [ -z "${CC_TEST_NATS_URL:-}" ]; then
    if cc_port_open 127.0.0.1 4222; then
      export CC_TEST_NATS_URL=nats://127.0.0.1:4222
    else
      local port; port=$(cc_free_port)
      "$nats_bin" -js -a 127.0.0.1 -p "$port" -sd "$CC_SERVICES_DIR/nats" \
        >"$CC_SERVICES_DIR/nats.log" 2>&1 &
      CC_SERVICE_PIDS+=($!)
      cc_wait_port "$port" nats-server
      export CC_TEST_NATS_URL="nats://127.0.0.1:$port"
      echo "started a private nats-server on $CC_TEST_NATS_URL" >&2
    fi
  fi
  if [ -z "${CC_TEST_REDIS_URL:-}" ]; then
    if cc_port_open 127.0.0.1 6379; then
      export CC_TEST_REDIS_URL=redis://127.0.0.1:6379
    else
      local port; port=$(cc_free_port)
      "$redis_bin" --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
        --dir "$CC_SERVICES_DIR" >"$CC_SERVICES_DIR/redis.log" 2>&1 &
      CC_SERVICE_PIDS+=($!)
      cc_wait_port "$port" redis-server
      export CC_TEST_REDIS_URL="redis://127.0.0.1:$port"
      echo "started a private redis-server on $CC_TEST_REDIS_URL" >&2
    fi
  fi
}

cc_services_down() {
  local pid
  for pid in "${CC_SERVICE_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${CC_SERVICE_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "$CC_SERVICES_DIR" ] && rm -rf "$CC_SERVICES_DIR"
}
