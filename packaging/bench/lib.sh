# Shared by the benchmarks in packaging/bench (front-door, element). Source it; do not run it.
# The sourcing script sets BENCH (its name, for messages) first, and uses the globals below:
#   SRV_PID      the server process being measured (nginx master, or ours)
#   H2_C         h2load clients; WRK_T, WRK_C: wrk threads and connections
#   RUN_LIMIT    upper bound in seconds on any one load-generator run
#   TMP          the script's temp dir
# and defines `measure SCENARIO SERVER ARGS...`, which `pair` calls.
# shellcheck shell=bash
# shellcheck disable=SC2034 # R_* and U_* are results for the sourcing script

die() { echo "$BENCH bench: $*" >&2; exit 1; }
log() { echo "-- $*" >&2; }

# --- tools -----------------------------------------------------------------------------------
ensure_packages() { # package...: installs those not installed yet, with apt-get
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
}
need_commands() { # command...
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || die "$t is missing"
  done
}

# --- processes -------------------------------------------------------------------------------
stop_pid() { # pid signal: signal, wait up to 10 s, then KILL
  local pid=$1 sig=${2:-TERM}
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# --- ports -----------------------------------------------------------------------------------
declare -A TAKEN=()
EPHEMERAL_LO=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range)
PORT_LO=$((EPHEMERAL_LO > 20000 ? 10000 : 2000))
free_port() { # variable: sets it to a free port, none of them twice
  local p
  for _ in $(seq 1 200); do
    # Below the ephemeral range, so the clients' own connections cannot take it meanwhile.
    p=$((PORT_LO + RANDOM % (EPHEMERAL_LO - PORT_LO)))
    [ -n "${TAKEN[$p]:-}" ] && continue
    if ! ss -Htan "( sport = :$p )" | grep -q .; then
      TAKEN[$p]=1
      printf -v "$1" '%s' "$p"
      return
    fi
  done
  die "no free port found"
}

# --- CPU and memory accounting ---------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
# Command prefixes that pin the load generator and the server to CPUs of their own (taskset),
# set by a bench script; empty: not pinned.
GEN=()
SRV=()
NCPU=$(nproc)
tree() { # pid: it and its children (nginx master + workers; homelab-matrix + Synapse)
  echo "$1"
  pgrep -P "$1" || true
}
peak_rss_kib() { # [pid]: VmHWM summed over it and its children (default: SRV_PID)
  local sum=0 v p
  for p in $(tree "${1:-$SRV_PID}"); do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
cpu_ticks() { # pid: utime + stime (+ reaped children's) of it and its children
  local sum=0 p
  for p in $(tree "$1"); do
    sum=$((sum + $(awk '{print $14 + $15 + $16 + $17}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}
client_ticks() { # this shell's reaped children: the load generators of the run just measured
  awk '{print $16 + $17}' "/proc/$$/stat"
}
host_ticks() { # user + nice + system + irq + softirq over all CPUs
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat
}
steal_ticks() { # time the hypervisor ran something else while this VM's CPUs wanted to run
  awk '/^cpu / {print $9}' /proc/stat
}
kernel_ticks() { # kernel threads (kthreadd's children: ksoftirqd, kworkers), mostly loopback TCP here
  cat /proc/[0-9]*/stat 2>/dev/null |
    awk '{sub(/^[0-9]+ \(.*\) /, ""); if ($2 == 2 || $2 == 0) s += $12 + $13} END {print s + 0}'
}
listen_drops() { # system-wide TcpExt ListenDrops (SYNs dropped by full accept queues)
  awk '/^TcpExt:/ {if (!h) {for (i = 1; i <= NF; i++) if ($i == "ListenDrops") c = i; h = 1} else print $c}' /proc/net/netstat
}
# usage_begin SERVER_PID [OTHER_PID...] ... run ... usage_end. usage_end sets U_SRV (the
# server's CPU ticks), U_UP (the other pids' ticks: the upstream), U_DROPS (listen drops),
# U_OTHER: the CPU that neither the server, the other pids, the load generator nor kernel
# threads used, i.e. other work on the host (a parallel build or test run), and U_STEAL: the
# CPU the hypervisor gave to other guests (noisy neighbours); both as a percentage of all CPUs
# over the run. Either one above a few percent makes that run's figures suspect.
usage_begin() {
  U_PIDS=("$@")
  U_D0=$(listen_drops)
  U_X0=$(kernel_ticks)
  U_A0=$(usage_others) U_K0=$(client_ticks) U_H0=$(host_ticks) U_T0=$(date +%s.%N) U_ST0=$(steal_ticks)
  U_S0=$(cpu_ticks "${U_PIDS[0]}")
}
usage_end() {
  local s1 a1 k1 h1 t1 x1 st1
  s1=$(cpu_ticks "${U_PIDS[0]}")
  a1=$(usage_others) k1=$(client_ticks) h1=$(host_ticks) t1=$(date +%s.%N) st1=$(steal_ticks)
  x1=$(kernel_ticks)
  U_DROPS=$(($(listen_drops) - U_D0))
  # The load generator's CPU, in % of one CPU: near 100 with it pinned to one CPU, the load
  # generator (not the server) is the ceiling.
  U_GEN=$(awk -v k=$((k1 - U_K0)) -v a="$U_T0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.0f", k / hz / (b - a) * 100}')
  U_SRV=$((s1 - U_S0))
  U_UP=$((a1 - U_A0))
  U_STEAL=$(awk -v s=$((st1 - U_ST0)) -v a="$U_T0" -v b="$t1" -v hz="$CLK_TCK" -v n="$NCPU" \
    'BEGIN {printf "%.0f", s / hz / (b - a) / n * 100}')
  U_OTHER=$(awk -v h=$((h1 - U_H0)) -v k=$((U_SRV + U_UP + k1 - U_K0 + x1 - U_X0)) -v a="$U_T0" -v b="$t1" \
    -v hz="$CLK_TCK" -v n="$NCPU" 'BEGIN {o = (h - k) / hz / (b - a) / n * 100; printf "%.0f", (o < 0 ? 0 : o)}')
}
usage_others() {
  local sum=0 p
  for p in "${U_PIDS[@]:1}"; do
    if [ -n "$p" ]; then sum=$((sum + $(cpu_ticks "$p"))); fi
  done
  echo "$sum"
}
us_per() { # ticks count: microseconds of CPU per unit
  awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN {printf "%.0f", (n > 0 ? d / hz * 1e6 / n : 0)}'
}

# --- load generators -------------------------------------------------------------------------
# Each sets R_RPS, R_P99 (ms), R_REQS, R_BAD (non-2xx + errors) and R_BYTES (bytes received
# over HTTP: headers, bodies and, for h2, frame headers; not TLS records).
run_h2load() { # url logfile [h2load args: -n/-D, -m, -H...]; -c is H2_C
  local url=$1 logf=$2 out
  shift 2
  out=$(timeout "$RUN_LIMIT" "${GEN[@]}" h2load -c "$H2_C" -t 1 --log-file="$logf" "$@" "$url" 2>&1) ||
    die "h2load failed: $out"
  R_RPS=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
  R_REQS=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
  R_BYTES=$(sed -n 's/^traffic: [^(]*(\([0-9]*\)) total.*/\1/p' <<<"$out")
  local failed non2xx
  # "failed" includes the errored and timed-out ones.
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' <<<"$out")
  non2xx=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' <<<"$out" |
    awk '{print $1 + $2 + $3}')
  R_BAD=$((${failed:-0} + ${non2xx:-0}))
  [ "$R_BAD" = 0 ] || log "WARNING: $R_BAD requests failed or were not 2xx: $(grep -E '^(requests|status codes):' <<<"$out" | tr '\n' ' ')"
  # --log-file: start (µs since epoch) TAB status TAB duration (µs) per request.
  R_P99=$(awk -F'\t' '{print $3}' "$logf" | sort -n |
    awk '{v[NR] = $1} END {if (NR == 0) {print "nan"; exit} i = int(NR * 0.99 + 0.999999); if (i > NR) i = NR; printf "%.2f", v[i] / 1000}')
  rm -f "$logf"
}
wrk_ms() { # "1.23ms" | "850.00us" | "1.02s" -> ms
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.2f", v * 60000 }
    else { sub(/s$/, "", v); printf "%.2f", v * 1000 } }'
}
wrk_bytes() { # "1.23MB" (wrk's binary units, 3 significant digits) -> bytes
  awk -v v="$1" 'BEGIN {
    m = 1; if (v ~ /KB$/) m = 1024; else if (v ~ /MB$/) m = 1048576; else if (v ~ /GB$/) m = 1073741824; else if (v ~ /TB$/) m = 1099511627776
    sub(/[KMGT]?B$/, "", v); printf "%.0f", v * m }'
}
run_wrk() { # url duration [wrk args: -H...]; -t/-c are WRK_T/WRK_C
  local url=$1 dur=$2 out
  shift 2
  out=$(timeout "$RUN_LIMIT" "${GEN[@]}" wrk -t"$WRK_T" -c"$WRK_C" -d"$dur" --latency "$@" "$url" 2>&1) ||
    die "wrk failed: $out"
  R_RPS=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  R_P99=$(wrk_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  R_REQS=$(awk '/requests in/ {print $1}' <<<"$out")
  R_BYTES=$(wrk_bytes "$(awk '/requests in/ {print $(NF - 1)}' <<<"$out")")
  local non2xx errs
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
  errs=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p' <<<"$out" |
    awk '{print $1 + $2 + $3 + $4}')
  R_BAD=$((${non2xx:-0} + ${errs:-0}))
  [ "$R_BAD" = 0 ] || log "WARNING: $R_BAD non-2xx responses or socket errors: $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr '\n' ' ')"
}

# --- rounds ----------------------------------------------------------------------------------
# A round whose runs lost more than STEAL_MAX% of the CPUs to the hypervisor (steal) is
# measured again, up to STEAL_RETRIES times, then kept with a warning: a neighbour's burst
# slows one side of a round and decides its ratio.
STEAL_MAX=${STEAL_MAX:-5}
STEAL_RETRIES=${STEAL_RETRIES:-2}
pair() { # scenario args...: measure ours/nginx alternating (ABBA...) over ROUNDS rounds
  local scen=$1 r try worst keep_ours keep_nginx
  shift
  ORDER+=("$scen")
  for r in $(seq 1 "$ROUNDS"); do
    for try in $(seq 0 "$STEAL_RETRIES"); do
      keep_ours=${RES[$scen|ours]:-} keep_nginx=${RES[$scen|nginx]:-}
      if [ $((r % 2)) = 1 ]; then
        measure "$scen" ours "$@"; worst=$U_STEAL; measure "$scen" nginx "$@"
      else
        measure "$scen" nginx "$@"; worst=$U_STEAL; measure "$scen" ours "$@"
      fi
      if [ "$U_STEAL" -gt "$worst" ]; then worst=$U_STEAL; fi
      [ "$worst" -gt "$STEAL_MAX" ] || break
      if [ "$try" = "$STEAL_RETRIES" ]; then
        log "WARNING: $scen round $r kept with ${worst}% steal (over STEAL_MAX=$STEAL_MAX after $STEAL_RETRIES retries)"
      else
        log "$scen round $r: ${worst}% steal (over STEAL_MAX=$STEAL_MAX): measuring the round again"
        RES[$scen|ours]=$keep_ours RES[$scen|nginx]=$keep_nginx
      fi
    done
  done
}

# --- report ----------------------------------------------------------------------------------
# Results are strings of rounds separated by ';', each a space-separated list of fields.
median() { # field: the median over rounds of a numeric field (nan when none is numeric)
  tr ';' '\n' | awk -v f="$1" 'NF && $f ~ /^[0-9.]+$/ {v[++n] = $f}
    END {
      if (!n) { print "nan"; exit }
      for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
      printf "%.2f", (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
    }'
}
maxf() { tr ';' '\n' | awk -v f="$1" 'NF {if ($f > m) m = $f} END {printf "%.0f", m}'; }
sumf() { tr ';' '\n' | awk -v f="$1" 'NF {s += $f} END {printf "%.0f", s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b == 0) print "-"; else printf "%.2f", a / b}'; }
# paired_ratio field "ours rounds" "nginx rounds": the median over rounds of ours/nginx within
# the same round. The two runs of a round are adjacent in time, so a slow spell of the host (a
# noisy neighbour, steal) that spans a few runs skews a round's pair together, not one side's
# median. "-" when a round lacks a number.
paired_ratio() {
  local m
  m=$(awk -v f="$1" -v a="$2" -v b="$3" 'BEGIN {
    na = split(a, ra, ";"); split(b, rb, ";")
    for (i = 1; i <= na; i++) {
      if (ra[i] == "") continue
      split(ra[i], x, " "); split(rb[i], y, " ")
      if (x[f] !~ /^[0-9.]+$/ || y[f] !~ /^[0-9.]+$/ || y[f] == 0) exit
      out = out (x[f] / y[f]) ";"
    }
    printf "%s", out
  }' | median 1)
  if [ "$m" = nan ]; then echo -; else echo "$m"; fi
}
