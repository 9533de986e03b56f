# Helpers for lab scenarios. A scenario is lab/scenarios/NAME.sh, run by the guest's /init with bash; it
# starts with `. "$LAB/scenarios/lib.sh"` and ends with exit status 0 for PASS (anything else, or being killed at
# the time limit, is FAIL). Use `fail "why"` to stop with a reason that lands in the summary.
#
# Set by /init for every scenario:
#   LAB                  /lab (scenarios in $LAB/scenarios)
#   LAB_SCENARIO         this scenario's name
#   LAB_WORK             an empty scratch directory on tmpfs, removed after the scenario
# After the scenario /init kills every process left (workloads, restored trees, relays), so scenarios need not.
#   LAB_PORT_BASE        first of 100 TCP ports reserved for this scenario
#   HOSTA, HOSTB         the two "hosts": network namespaces /run/netns/hosta and /run/netns/hostb, joined by a veth
#   HOSTA_ADDR, HOSTB_ADDR   10.91.0.1 and 10.91.0.2
#   PHAUL_CRIU           /usr/sbin/criu (bookworm's CRIU 3.17)
# Tools in the guest: bash (this shell), busybox, Debian's criu, ip/ss (iproute2), nsenter/unshare (util-linux), socat, jq, and
# phaul, phaul-workload, phaul-demo, phaul-external-caller, lab-fd-accept in /usr/local/bin; /etc/phaul/plugins.toml lists the
# pid, shared and external plugins (pid uses shared by default). Kernel modules beyond lab/guest-modules are not
# in the guest: add them there.
#
# Helpers (details at each one below):
#   log MSG...                 print a line tagged with the scenario name
#   fail MSG...                record MSG as the reason and exit 1
#   in_a CMD... / in_b CMD...  run CMD in host A's / host B's network namespace
#   wait_for SECS CMD...       poll CMD every 0.1 s until it succeeds; status 1 after SECS seconds
#   pid_gone PID               true if no process PID exists
#   netns_of PID               print the network namespace of PID (net:[inode])
#   start_workload KIND NAME [ARGS...]   phaul-workload KIND in host A; sets WORKLOAD_PID, WORKLOAD_STATE
#   probe PID STATE_DIR [SECS] probe a workload; sets PROBE_STATE (the state.json text); status 1 if not ok
#   state_get STATE_DIR FILTER jq FILTER on STATE_DIR/state.json
#   migrate NAME PID [ARGS...] phaul serve in B, phaul migrate pid PID in A (ARGS appended), connected by TCP
#                              across the veth (LAB_TRANSPORT: fds or relay); emits the JSON report as REPORT NAME; sets
#                              MIGRATE_STATUS, SERVE_STATUS, MIGRATE_REPORT (file), RESTORED_PID; status = phaul
#                              migrate's exit status
#   throttle RATE              limit what host A sends to host B to RATE (tc units: 16mibps = 16 MiB/s); the
#                              channel's speed then no longer depends on how fast the emulated CPU is
#   unthrottle                 remove that limit (/init also removes it after every scenario)
#   report LABEL FILE          send the JSON document FILE back to the host (lab/results/.../reports/SCENARIO/LABEL.json)
#   expect_json FILE FILTER [MSG]   fail unless jq -e FILTER holds on FILE

: "${LAB:=/lab}" "${LAB_SCENARIO:=manual}" "${LAB_WORK:=/tmp/lab/manual}" "${LAB_PORT_BASE:=7000}"
: "${LAB_EMIT:=/dev/null}" "${HOSTA:=hosta}" "${HOSTB:=hostb}" "${HOSTA_ADDR:=10.91.0.1}" "${HOSTB_ADDR:=10.91.0.2}"
mkdir -p "$LAB_WORK"
_lab_port=$LAB_PORT_BASE

log() { echo "[$LAB_SCENARIO] $*"; }

fail() {
  log "FAIL: $*"
  printf '%s\n' "$*" > "$LAB_WORK/.reason"
  exit 1
}

in_a() { nsenter --net=/run/netns/"$HOSTA" -- "$@"; }
in_b() { nsenter --net=/run/netns/"$HOSTB" -- "$@"; }

_now_ds() { read -r _u _ < /proc/uptime; _s=${_u%.*}; _f=${_u#*.}; echo $((_s * 10 + ${_f%?})); }

wait_for() {
  _wf_end=$(( $(_now_ds) + $1 * 10 ))
  shift
  until "$@"; do
    [ "$(_now_ds)" -ge "$_wf_end" ] && return 1
    sleep 0.1
  done
  return 0
}

pid_gone() { ! kill -0 "$1" 2>/dev/null; }

netns_of() { readlink "/proc/$1/ns/net"; }

_next_port() { _lab_port=$((_lab_port + 1)); }

_listening() { # NETNS-RUNNER PORT: a TCP listener on PORT in that namespace
  [ -n "$($1 ss -Hltn "sport = :$2" 2>/dev/null)" ]
}

# start_workload KIND NAME [ARGS...]: `phaul-workload KIND --state-dir $LAB_WORK/NAME ARGS...` in host A (pid 1 of
# its own pid namespace, session leader). Waits until it published its first state. Sets WORKLOAD_PID (the
# workload's pid here, to migrate) and WORKLOAD_STATE (its state directory).
start_workload() {
  _kind=$1 _name=$2
  shift 2
  WORKLOAD_STATE=$LAB_WORK/$_name
  mkdir -p "$WORKLOAD_STATE"
  in_a phaul-workload "$_kind" --state-dir "$WORKLOAD_STATE" "$@" > "$LAB_WORK/$_name.out" 2> "$LAB_WORK/$_name.err" &
  wait_for 60 grep -q '^PID ' "$LAB_WORK/$_name.out" ||
    fail "phaul-workload $_kind did not start: $(cat "$LAB_WORK/$_name.err")"
  WORKLOAD_PID=$(awk '/^PID / {print $2; exit}' "$LAB_WORK/$_name.out")
  wait_for 120 test -s "$WORKLOAD_STATE/state.json" || fail "workload $_kind published no state in 120 s"
  log "workload $_kind started: pid $WORKLOAD_PID, state in $WORKLOAD_STATE"
}

state_get() { jq -r "$2" "$1/state.json"; }

_probe_answered() { [ "$(jq -r .nonce "$1/state.json" 2>/dev/null)" = "$2" ]; }

# probe PID STATE_DIR [SECS]: write a fresh nonce to STATE_DIR/probe, send SIGUSR1 to PID, wait (default 60 s)
# until state.json shows that nonce; status 0 if it then says "ok": true. PROBE_STATE holds state.json.
probe() {
  _p_pid=$1 _p_dir=$2 _p_secs=${3:-60}
  _nonce=$(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 1000000000 + 1 ))
  echo "$_nonce" > "$_p_dir/probe"
  kill -USR1 "$_p_pid" || { PROBE_STATE=""; log "probe: cannot signal $_p_pid"; return 1; }
  if ! wait_for "$_p_secs" _probe_answered "$_p_dir" "$_nonce"; then
    PROBE_STATE=$(cat "$_p_dir/state.json" 2>/dev/null)
    log "probe of $_p_pid: no answer to nonce $_nonce in ${_p_secs}s; state: $PROBE_STATE"
    return 1
  fi
  PROBE_STATE=$(cat "$_p_dir/state.json")
  if [ "$(printf '%s' "$PROBE_STATE" | jq -r .ok)" = true ]; then
    log "probe of $_p_pid: ok (nonce $_nonce, counter $(printf '%s' "$PROBE_STATE" | jq -r .counter))"
    return 0
  fi
  log "probe of $_p_pid: NOT ok: $(printf '%s' "$PROBE_STATE" | jq -r .detail)"
  return 1
}

# throttle RATE: a token bucket on host A's veth (the direction that carries pages), so that a migration's speed
# is set by the scenario, not by how fast qemu emulates this CPU: a workload dirtying or growing faster than RATE
# then cannot converge on any machine. The burst holds several TSO/GSO segments (up to 64 KiB each); the queue is
# kept short (100 ms) so that pages a post-copy restore asks for do not wait behind seconds of queued data.
throttle() {
  in_a tc qdisc replace dev veth-a root tbf rate "$1" burst 256kb latency 100ms ||
    fail "cannot throttle veth-a to $1 (is sch_tbf in lab/guest-modules?)"
  log "host A -> host B throttled to $1"
}

unthrottle() { in_a tc qdisc del dev veth-a root 2>/dev/null || true; }

# report LABEL FILE: send FILE (one JSON document) to the host as reports/$LAB_SCENARIO/LABEL.json.
report() {
  _r_json=$(jq -c . "$2" 2>/dev/null) || { log "report $1: $2 is not JSON"; return 1; }
  printf '@@REPORT %s %s %s\n' "$LAB_SCENARIO" "$1" "$_r_json" > "$LAB_EMIT"
  log "report $1 sent ($(printf '%s' "$_r_json" | wc -c) bytes)"
}

expect_json() {
  jq -e "$2" "$1" > /dev/null 2>&1 || fail "${3:-expected $2 in $(basename "$1")}"
  log "ok: $2"
}

_show_logs() { # print the tail of every log of a failed migration
  for _f in "$@"; do
    [ -s "$_f" ] || continue
    echo "----- $_f (last 40 lines)"
    tail -n 40 "$_f"
  done
}

# migrate NAME PID [ARGS...]: migrate the tree rooted at PID from host A to host B: `phaul serve` runs in B,
# `phaul migrate pid PID --json --dst-rpid FILE ARGS...` in A.
#
# How the two meet depends on LAB_TRANSPORT:
#   fds (default)  like phaul-testbed: three TCP connections across the veth (A connects to B_ADDR on one port
#                  per channel, B accepts them with lab-fd-accept), handed to both sides as --fdrpc 3 --fdmem 4
#                  --fdfs 5.
#   relay          `phaul serve --listen 127.0.0.1:PS --once` in B and `phaul migrate --to 127.0.0.1:PA` in A
#                  (phaul listens on loopback only), joined by two socat relays (A 127.0.0.1:PA -> B B_ADDR:PB ->
#                  B 127.0.0.1:PS), as phaul suggests for real machines (an SSH tunnel). NOTE: relays may reorder
#                  the memory and filesystem connections, which phaul serve (as of this writing) accepts strictly
#                  in order, so this mode fails now and then ("a memory connection arrived for session X, but
#                  session X is being served").
#
# Afterwards: MIGRATE_STATUS and SERVE_STATUS (exit statuses), MIGRATE_REPORT (the --json report, also sent to
# the host as REPORT NAME), RESTORED_PID (from --dst-rpid; empty if none). Logs: $LAB_WORK/NAME/. Returns
# MIGRATE_STATUS. On failure it prints phaul's and CRIU's logs.
migrate() {
  _m=$1 _m_pid=$2
  shift 2
  _mw=$LAB_WORK/$_m
  mkdir -p "$_mw/src-img" "$_mw/dst-img"
  rm -f "$_mw/rpid"
  _serve_common=(phaul --log-file "$_mw/serve.log" -v serve --img-path "$_mw/dst-img" --rpid-dir "$_mw")
  # LAB_TARGET: what to migrate instead of `pid PID` (e.g. "cmd counter" for a fixture host type).
  _target=(pid "$_m_pid")
  [ -n "${LAB_TARGET:-}" ] && read -ra _target <<< "$LAB_TARGET"
  _migrate_common=(phaul --log-file "$_mw/migrate.log" -v migrate "${_target[@]}" --json --img-path "$_mw/src-img"
                   --dst-rpid rpid)
  case "${LAB_TRANSPORT:-fds}" in
    fds)
      _next_port; _p1=$_lab_port; _next_port; _p2=$_lab_port; _next_port; _p3=$_lab_port
      in_b lab-fd-accept 3 "$_p1" 4 "$_p2" 5 "$_p3" -- "${_serve_common[@]}" --fdrpc 3 --fdmem 4 --fdfs 5 \
        > "$_mw/serve.out" 2> "$_mw/serve.err" &
      _serve=$!
      log "migrate $_m: phaul migrate pid $_m_pid $* (fds 3/4/5: TCP $HOSTA_ADDR -> $HOSTB_ADDR:$_p1/$_p2/$_p3)"
      _t0=$(_now_ds)
      MIGRATE_STATUS=0
      in_a bash -c '
        set -u
        deadline=$((SECONDS + 30))
        for fp in 3:$1 4:$2 5:$3; do
          until eval "exec ${fp%%:*}<>/dev/tcp/$0/${fp#*:}" 2>/dev/null; do
            [ $SECONDS -lt $deadline ] || { echo "lab: cannot connect to $0:${fp#*:}" >&2; exit 2; }
            sleep 0.05
          done
        done
        shift 3
        exec "$@" --fdrpc 3 --fdmem 4 --fdfs 5' "$HOSTB_ADDR" "$_p1" "$_p2" "$_p3" "${_migrate_common[@]}" "$@" \
        > "$_mw/report.json" 2> "$_mw/migrate.err" || MIGRATE_STATUS=$?
      ;;
    relay)
      _next_port; _ps=$_lab_port; _next_port; _pb=$_lab_port; _next_port; _pa=$_lab_port
      in_b "${_serve_common[@]}" --listen "127.0.0.1:$_ps" --once --insecure-loopback > "$_mw/serve.out" 2> "$_mw/serve.err" &
      _serve=$!
      in_b socat "TCP-LISTEN:$_pb,bind=$HOSTB_ADDR,fork,reuseaddr" "TCP:127.0.0.1:$_ps" 2> "$_mw/relay-b.err" &
      in_a socat "TCP-LISTEN:$_pa,bind=127.0.0.1,fork,reuseaddr" "TCP:$HOSTB_ADDR:$_pb" 2> "$_mw/relay-a.err" &
      wait_for 30 _listening in_b "$_ps" || fail "phaul serve is not listening: $(cat "$_mw/serve.err")"
      wait_for 10 _listening in_b "$_pb" || fail "the relay in B is not listening: $(cat "$_mw/relay-b.err")"
      wait_for 10 _listening in_a "$_pa" || fail "the relay in A is not listening: $(cat "$_mw/relay-a.err")"
      log "migrate $_m: phaul migrate pid $_m_pid $* (A 127.0.0.1:$_pa -> B $HOSTB_ADDR:$_pb -> B 127.0.0.1:$_ps)"
      _t0=$(_now_ds)
      MIGRATE_STATUS=0
      in_a "${_migrate_common[@]}" --to "127.0.0.1:$_pa" --insecure-loopback "$@" > "$_mw/report.json" 2> "$_mw/migrate.err" ||
        MIGRATE_STATUS=$?
      ;;
    *) fail "LAB_TRANSPORT must be fds or relay, not ${LAB_TRANSPORT}" ;;
  esac
  _t1=$(_now_ds)
  SERVE_STATUS=0
  if wait_for 60 pid_gone_or_zombie "$_serve"; then
    wait "$_serve" || SERVE_STATUS=$?
  else
    log "phaul serve did not exit within 60 s of phaul migrate"
    kill -9 "$_serve" 2>/dev/null
    SERVE_STATUS=255
  fi
  MIGRATE_REPORT=$_mw/report.json
  RESTORED_PID=$(cat "$_mw/rpid" 2>/dev/null || true)
  log "migrate $_m: phaul migrate exit $MIGRATE_STATUS, phaul serve exit $SERVE_STATUS, $(( (_t1 - _t0) / 10 )).$(( (_t1 - _t0) % 10 )) s, restored pid ${RESTORED_PID:-none}"
  report "$_m" "$MIGRATE_REPORT" || true
  if [ -s "$MIGRATE_REPORT" ]; then
    jq -r '"  outcome \(.outcome), memory \(.memory.strategy) (\(.memory.reason)), frozen \(.frozen_ms // "-") ms, total \(.total_ms) ms",
           (.rounds[] | "  round \(.round) \(.kind): \(.pages_written) pages written, \(.pages_skipped_parent) skipped, \(.duration_ms) ms")' \
      "$MIGRATE_REPORT" 2>/dev/null
  fi
  if [ "$MIGRATE_STATUS" != 0 ] || [ "$SERVE_STATUS" != 0 ]; then
    _show_logs "$_mw/migrate.err" "$_mw/serve.err" "$_mw/migrate.log" "$_mw/serve.log" "$_mw"/src-img/*/*.log \
      "$_mw"/dst-img/*/*.log "$_mw"/src-img/*/*/*.log "$_mw"/dst-img/*/*/*.log "$_mw"/src-img/*.log "$_mw"/dst-img/*.log
  fi
  return "$MIGRATE_STATUS"
}

# True once PID has exited (a child of this shell stays a zombie until `wait`).
pid_gone_or_zombie() {
  pid_gone "$1" && return 0
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]
}
