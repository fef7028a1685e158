#!/usr/bin/env bash
# A local two-node Ray cluster on 127.0.0.1, for developing against more than one node.
#
#   cluster/local_cluster.sh start     # head (resource head: 1) + worker node (resource worker: 1)
#   cluster/local_cluster.sh status    # the two nodes' processes and `ray status`
#   cluster/local_cluster.sh stop      # kills exactly these two nodes, forgets their address
#   cluster/local_cluster.sh env       # `eval "$(cluster/local_cluster.sh env)"` sets RAY_ADDRESS
#
# Why two nodes on one machine: placement bugs (a path that exists on one node only, work pinned
# to a node name, a job that assumes its driver and its workers share a process) stay hidden on
# a one-node cluster. Each node gets its own custom resource (`head: 1`, `worker: 1`), so a test
# can place work by resource and check where it ran - the same way work is placed on the GPU
# cluster (ray_cluster.yaml), never by node name.
#
# Why every port is explicit: Ray's defaults (6379, 8265, 10001, 52365, ...) are taken by any
# other Ray on the machine (a `ray.init()` in a notebook, a test session, a colleague's cluster),
# and two raylets on one host must not share node-manager, object-manager, agent, runtime-env or
# metrics ports. All of them are picked free at start (worker processes bind OS-chosen ports).
# Why not `ray stop`: it kills every Ray process of the user on the machine. Each node here runs
# `ray start --block` in its own session; stop kills those two process groups only.
# Loopback, as far as Ray allows: the dashboard and job API bind 127.0.0.1, but Ray resolves
# `--node-ip-address 127.0.0.1` to the host's own IP and its GCS and raylets listen on every
# interface. Keep token auth on unless the machine is yours alone.
# Why a temp dir of its own: `ray start --head` writes the "current cluster" file under its temp
# dir, and a bare `ray.init()` elsewhere would then join this cluster.
#
# Settings (environment):
#   LOCAL_CLUSTER_DIR   state + logs folder (default: outputs/local_cluster; state in cluster.env)
#   HEAD_CPUS, WORKER_CPUS (default 2 each), OBJECT_STORE_MB (per node, default 512)
#   GCS_PORT, DASHBOARD_PORT (default: free ports)
#   RAY_AUTH_MODE       token (default) or disabled. With token, Ray 2.60's token auth is on: the
#                       token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#                       (generated there by `ray get-auth-token --generate` if none exists), and
#                       every client (`ray job submit`, `serve deploy`) finds it the same way.
#                       Tests use disabled for throwaway clusters; anything shared keeps token.
#   Secrets: the nodes inherit this shell's environment, so `export OPENAI_API_KEY=...` before
#   `start` gives every job the key from the node side; never put it in a runtime env.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${LOCAL_CLUSTER_DIR:-$ROOT/outputs/local_cluster}
STATE=$STATE_DIR/cluster.env
RAY=${RAY:-$ROOT/.venv/bin/ray}
[ -x "$RAY" ] || RAY=$(command -v ray) || { echo "error: no ray executable" >&2; exit 1; }
PYTHON=$(dirname "$RAY")/python
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-2}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-512}
START_TIMEOUT_S=${START_TIMEOUT_S:-120}
STOP_GRACE_S=${STOP_GRACE_S:-20}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Ray 2.60 drains a node for up to 30 s on SIGTERM (for Serve HA), and a node that has run a job
# rarely goes idle by itself: a dev cluster need not wait that long to stop.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-3}
# Jobs run `python ...`: make that the interpreter that has this project and Ray installed.
export PATH="$(dirname "$RAY"):$PATH"

die() { echo "error: $*" >&2; exit 1; }

# A node is its `ray start --block` process and the process group it leads. Check the pid too:
# right after `setsid ... &` the child exists before setsid() has made its group.
alive() { [ -n "${1:-}" ] && { kill -0 "$1" || kill -0 -- "-$1"; } 2>/dev/null; }

free_ports() {  # N distinct free TCP ports on 127.0.0.1 (all held open at once while picked)
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

load_state() {
  [ -f "$STATE" ] || die "no local cluster state in $STATE (run: $0 start)"
  # shellcheck disable=SC1090
  . "$STATE"
}

cluster_ready() {  # both nodes alive, both agents listening (jobs need the head's), jobs API up
  port_open "$1" && port_open "$2" || return 1
  "$PYTHON" - "$RAY_ADDRESS" <<'EOF' 2>/dev/null
import sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
address = sys.argv[1]
nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")])
JobSubmissionClient(address).list_jobs()
sys.exit(0 if len(nodes) == 2 else 1)
EOF
}

kill_group() {  # stop one node: SIGTERM its `ray start --block`, SIGKILL its group if it lingers
  # The leader alone gets SIGTERM: it drains the node (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, set
  # at start), then stops its children in order (raylet, then GCS) in ~4 s. SIGTERM to the whole
  # group instead makes the GCS wait ~30 s for raylets that are already gone.
  local pgid=$1 i
  alive "$pgid" || return 0
  if [ "$(ps -o pgid= -p "$pgid" | tr -d ' ')" = "$pgid" ]; then  # still that group's leader
    kill -TERM "$pgid" 2>/dev/null || true
  else
    kill -TERM -- "-$pgid" 2>/dev/null || true
  fi
  for i in $(seq $((STOP_GRACE_S * 2))); do
    alive "$pgid" || return 0
    sleep 0.5
  done
  echo "node $pgid still running after ${STOP_GRACE_S}s: SIGKILL to its process group" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
  for i in $(seq 20); do  # until the kernel has taken them down
    alive "$pgid" || return 0
    sleep 0.5
  done
}

start() {
  if [ -f "$STATE" ]; then
    (. "$STATE"; alive "$HEAD_PID" || alive "$WORKER_PID") && \
      die "a local cluster from $STATE is running; stop it first"
    rm -f "$STATE"
  fi
  mkdir -p "$STATE_DIR"
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
      && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
    "$RAY" get-auth-token --generate >/dev/null  # writes ~/.ray/auth_token; never echoed
  fi
  local p
  read -r -a p <<<"$(free_ports 16)"
  local gcs=${GCS_PORT:-${p[0]}} dash=${DASHBOARD_PORT:-${p[1]}}
  local tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/ray-local.XXXXXX")  # short: socket paths must stay < 108
  local common=(--block --node-ip-address 127.0.0.1 --temp-dir "$tmp" --disable-usage-stats
    --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)))
  setsid "$RAY" start --head "${common[@]}" --port "$gcs" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash" --include-dashboard true \
    --ray-client-server-port "${p[2]}" --num-cpus "$HEAD_CPUS" --resources '{"head": 1}' \
    --node-manager-port "${p[3]}" --object-manager-port "${p[4]}" \
    --dashboard-agent-listen-port "${p[5]}" --dashboard-agent-grpc-port "${p[6]}" \
    --runtime-env-agent-port "${p[7]}" --metrics-export-port "${p[8]}" \
    >"$STATE_DIR/head.log" 2>&1 &
  local head_pid=$!
  local i
  for i in $(seq $((START_TIMEOUT_S * 2))); do
    port_open "$gcs" && break
    alive "$head_pid" || { tail -n 20 "$STATE_DIR/head.log" >&2; die "head node exited"; }
    sleep 0.5
  done
  setsid "$RAY" start --address "127.0.0.1:$gcs" "${common[@]}" \
    --num-cpus "$WORKER_CPUS" --resources '{"worker": 1}' \
    --node-manager-port "${p[9]}" --object-manager-port "${p[10]}" \
    --dashboard-agent-listen-port "${p[11]}" --dashboard-agent-grpc-port "${p[12]}" \
    --runtime-env-agent-port "${p[13]}" --metrics-export-port "${p[14]}" \
    >"$STATE_DIR/worker.log" 2>&1 &
  local worker_pid=$!
  cat >"$STATE" <<EOF
RAY_ADDRESS=http://127.0.0.1:$dash
GCS_ADDRESS=127.0.0.1:$gcs
HEAD_PID=$head_pid
WORKER_PID=$worker_pid
RAY_TEMP_DIR=$tmp
RAY_AUTH_MODE=$RAY_AUTH_MODE
EOF
  RAY_ADDRESS=http://127.0.0.1:$dash
  for i in $(seq "$START_TIMEOUT_S"); do
    if cluster_ready "${p[5]}" "${p[11]}"; then
      echo "local Ray cluster up: head (pid $head_pid, $HEAD_CPUS CPUs, head: 1) +" \
        "worker (pid $worker_pid, $WORKER_CPUS CPUs, worker: 1)"
      echo "RAY_ADDRESS=$RAY_ADDRESS  (GCS 127.0.0.1:$gcs, auth $RAY_AUTH_MODE, logs $tmp)"
      return 0
    fi
    if ! alive "$head_pid" || ! alive "$worker_pid"; then
      tail -n 20 "$STATE_DIR/head.log" "$STATE_DIR/worker.log" >&2 || true
      stop >/dev/null
      die "a node exited during start (logs above, and under $tmp)"
    fi
    sleep 1
  done
  tail -n 20 "$STATE_DIR/head.log" "$STATE_DIR/worker.log" >&2 || true
  stop >/dev/null
  die "the local cluster did not come up within ${START_TIMEOUT_S}s"
}

# `ray start --head` writes the GCS address to <temp dir>/ray_current_cluster, and a bare
# `ray.init()` joins whatever that file names. `ray stop` removes it; so does this, for the files
# that name this cluster's GCS port (Ray writes the node's resolved IP there, not 127.0.0.1):
# under our own temp dir, and under Ray's default one (socratic/ray_address.py finds it the same
# way). A file naming another cluster stays.
forget_address() {
  local port=${GCS_ADDRESS##*:} f
  for f in "$RAY_TEMP_DIR/ray_current_cluster" \
      "${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"; do
    [ -f "$f" ] || continue
    [ "$(sed -n '1s/.*:\([0-9]*\)[[:space:]]*$/\1/p' "$f")" = "$port" ] && rm -f "$f"
  done
  return 0
}

stop() {
  load_state
  kill_group "$WORKER_PID"
  kill_group "$HEAD_PID"
  forget_address
  rm -f "$STATE"
  echo "stopped the local Ray cluster (head pid $HEAD_PID, worker pid $WORKER_PID; logs $RAY_TEMP_DIR)"
}

status() {
  load_state
  local n
  for n in HEAD WORKER; do
    local pid_var=${n}_PID
    if alive "${!pid_var}"; then echo "$n node: running (pid ${!pid_var})"
    else echo "$n node: not running (pid ${!pid_var})"; fi
  done
  echo "RAY_ADDRESS=$RAY_ADDRESS GCS_ADDRESS=$GCS_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
  "$RAY" status --address "$GCS_ADDRESS" || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) load_state; echo "export RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
