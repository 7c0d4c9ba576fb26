# Process helpers shared by dev/stack.sh and dev/cluster.sh (sourced): each background process
# runs in its own session, its PID in $PROC_RUN/NAME.pid and its output in $PROC_LOG/NAME.log.
# The sourcing script sets PROC_RUN and PROC_LOG and defines log().

pid_of() { local f="$PROC_RUN/$1.pid"; [[ -f $f ]] && cat "$f" || true; }

is_running() { # a killed process its parent has not reaped yet (a zombie) is not running
  local pid; pid="$(pid_of "$1")"
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# start_bg NAME CMD...: runs CMD in its own session, stdout/stderr to $PROC_LOG/NAME.log
start_bg() {
  local name="$1"; shift
  setsid nohup "$@" >>"$PROC_LOG/$name.log" 2>&1 < /dev/null &
  echo $! >"$PROC_RUN/$name.pid"
}

stop_proc() {
  local name="$1" pid
  pid="$(pid_of "$name")"
  if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then rm -f "$PROC_RUN/$name.pid"; return 0; fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 20 s, killing"; kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$PROC_RUN/$name.pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# proc_status NAME...: one line per process, running (with its pid) or stopped
proc_status() {
  local name
  for name in "$@"; do
    if is_running "$name"; then printf '%-13s running  pid %s\n' "$name" "$(pid_of "$name")"; else printf '%-13s stopped\n' "$name"; fi
  done
}
