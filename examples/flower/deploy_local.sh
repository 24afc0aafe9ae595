#!/usr/bin/env bash
# fipa on a local Flower deployment, the whole round trip on loopback (flwr >= 1.42):
# a SuperLink, one SuperNode per client (each holding only its own partition), `flwr run` of this app, the run's
# status, and everything stopped again (also on failure, Ctrl-C or SIGTERM).
#
#   examples/flower/deploy_local.sh [--nodes N] [--timeout S] WORK_DIR [OVERRIDES [OUTPUT_DIR]]
#
#   WORK_DIR    logs (superlink.log, supernode<K>.log, flwr_run.log, flwr_ls.json), the Flower homes and ports.env;
#               created if missing. Keep it outside examples/flower.
#   OVERRIDES   fipa-train overrides, e.g. "experiment=regression_1d_m2 aggregator=fipa client=scaffold"
#               (default: the app's, "experiment=regression_1d_m2 aggregator=fipa federation.rounds=3")
#   OUTPUT_DIR  where fipa writes metrics.csv, summary.json, config.yaml, model.pt (default WORK_DIR/output)
#   --nodes N   SuperNodes, partition-id 0..N-1: the task's number of clients (default 2, regression_1d_m2's)
#   --timeout S give up on the run after S seconds (default 3600)
#
# Needs `flwr` and fipa installed in the active environment (the python next to `flwr`, or $PYTHON).
# Exit status 0 iff the run ended "finished:completed".
set -u -o pipefail

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "deploy_local.sh: $*" >&2; exit 2; }

NODES=2
TIMEOUT=3600
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:?--nodes N}; shift 2 ;;
    --timeout) TIMEOUT=${2:?--timeout S}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ $# -le 3 ] || { usage >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got $NODES"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, got $TIMEOUT"

FLWR=$(command -v flwr) || die "flwr is not on PATH: activate the environment with fipa and flwr (pip install -e '.[flower]')"
BIN=$(dirname "$FLWR")
PYTHON=${PYTHON:-$BIN/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3) || die "no python next to $FLWR"
for tool in flower-superlink flower-supernode flower-superexec flwr-serverapp flwr-clientapp; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (Flower starts it by name)"
done
"$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("fipa") and u.find_spec("flwr")))' ||
  die "$PYTHON cannot import fipa and flwr: the SuperLink and SuperNodes run fipa from this environment"

APP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1" || die "cannot create $1"
WORK=$(cd "$1" && pwd)
HAVE_OVERRIDES=0
[ $# -ge 2 ] && HAVE_OVERRIDES=1
OVERRIDES=${2-}
OUTPUT=${3:-$WORK/output}
OUTPUT=$("$PYTHON" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$OUTPUT")
case "$OVERRIDES$OUTPUT" in *"'"*) die "single quotes cannot travel in Flower's --run-config: drop them from the overrides / output dir" ;; esac

# Flower's own settings for every process below (and the processes they start)
export PATH="$BIN:$PATH"                               # SuperLink/SuperNodes start flower-superexec, flwr-*app by name
export FLWR_HOME="$WORK/flwr_home"                     # the CLI's config.toml and the SuperLink's apps, not ~/.flwr
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # the apps run in this environment, no per-run `uv sync`
export FLWR_TELEMETRY_ENABLED=0
mkdir -p "$FLWR_HOME"

# free loopback ports: the SuperLink's (Fleet, ServerAppIo and Control on one HTTP server), then one per SuperNode
read -r LINK_PORT NODE_PORTS < <("$PYTHON" - "$NODES" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(1 + int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
for s in sockets:
    s.close()
PY
)
[ -n "$LINK_PORT" ] || die "could not pick free ports"
printf 'SUPERLINK_PORT=%s\nSUPERNODE_PORTS="%s"\n' "$LINK_PORT" "$NODE_PORTS" >"$WORK/ports.env"
echo "work dir $WORK; SuperLink 127.0.0.1:$LINK_PORT; SuperNode ports $NODE_PORTS; output dir $OUTPUT"

PIDS=() # SuperLink, SuperNodes, flwr run, the log follower
descendants() { # the processes below $1, recursively
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}
wait_gone() { # wait up to $1 tenths of a second for the pids after it to exit
  local n=$1 p alive; shift
  while [ "$n" -gt 0 ]; do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && { alive=1; break; }; done
    [ $alive = 0 ] && return 0
    sleep 0.1; n=$((n - 1))
  done
  return 1
}
cleanup() {
  trap - EXIT INT TERM HUP
  local p c all=() rest=()
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    all+=("$p")
    # a SuperLink's / SuperNode's SuperExec runs detached (own session) and watches it by --parent-pid
    for c in $(pgrep -f -- "--parent-pid $p( |$)"); do all+=("$c"); done
  done
  for p in "${all[@]}"; do for c in $(descendants "$p"); do all+=("$c"); done; done
  [ ${#all[@]} = 0 ] && return
  kill -TERM "${PIDS[@]}" 2>/dev/null # the SuperExecs and the apps they run follow their parents
  if ! wait_gone 150 "${all[@]}"; then
    for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && rest+=("$p"); done
    echo "stopping leftover processes ${rest[*]}" >&2
    kill -TERM "${rest[@]}" 2>/dev/null
    wait_gone 50 "${rest[@]}" || kill -KILL "${rest[@]}" 2>/dev/null
  fi
  wait 2>/dev/null
  echo "stopped the SuperLink and the SuperNodes"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM HUP # exit runs cleanup

cd "$WORK" # the ServerApp runs in the SuperLink's working directory
flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" --disable-runtime-dependency-installation \
  >superlink.log 2>&1 &
LINK_PID=$!
PIDS+=("$LINK_PID")
"$PYTHON" - "$LINK_PORT" "$LINK_PID" <<'PY' || { tail -n 30 superlink.log >&2; die "the SuperLink did not come up (superlink.log)"; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY

K=0
for NODE_PORT in $NODE_PORTS; do # each SuperNode its own Flower home: it installs the app there
  FLWR_HOME="$WORK/node$K" flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" \
    --host 127.0.0.1 --port "$NODE_PORT" --node-config "partition-id=$K num-partitions=$NODES" \
    >"supernode$K.log" 2>&1 &
  PIDS+=($!)
  K=$((K + 1))
done

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$LINK_PORT"
insecure = true
TOML

RUN_CONFIG="output-dir='$OUTPUT'"
[ $HAVE_OVERRIDES = 1 ] && RUN_CONFIG="overrides='$OVERRIDES' $RUN_CONFIG"
echo "flwr run $APP_DIR local --stream --run-config \"$RUN_CONFIG\""
# --stream: returns when the run has ended, with the ServerApp's log; its exit status is not the run's
timeout "$TIMEOUT" flwr run "$APP_DIR" local --stream --run-config "$RUN_CONFIG" >flwr_run.log 2>&1 &
RUN_PID=$!
PIDS+=("$RUN_PID")
tail -n +1 -f --pid="$RUN_PID" flwr_run.log &
PIDS+=($!)
wait "$RUN_PID"
RUN_RC=$?
sleep 0.3 # let the follower print the last lines
RUN_ID=$(grep -o 'Successfully started run [0-9]*' flwr_run.log | awk '{print $4}')
if [ -z "$RUN_ID" ]; then
  echo "flwr run did not start a run (exit status $RUN_RC; see $WORK/flwr_run.log)" >&2
  exit 1
fi
[ $RUN_RC = 124 ] && echo "the run took longer than ${TIMEOUT}s" >&2

STATUS=""
for _ in $(seq 60); do # the status is final once the SuperLink has seen the ServerApp exit
  flwr ls local --run-id "$RUN_ID" --format json >flwr_ls.json 2>flwr_ls.err
  STATUS=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["runs"][0]["status"])' flwr_ls.json 2>/dev/null)
  case "$STATUS" in finished*) break ;; esac
  sleep 0.5
done
echo "run $RUN_ID: ${STATUS:-unknown status} (flwr ls local --run-id $RUN_ID)"
cleanup
case "$STATUS" in
  finished:completed*)
    echo "outputs in $OUTPUT"
    exit 0
    ;;
esac
"$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["runs"][0].get("status-details", ""))' flwr_ls.json >&2 2>/dev/null
echo "the run failed; logs in $WORK (flwr_run.log has the ServerApp's, supernode<K>.log the ClientApps')" >&2
exit 1
