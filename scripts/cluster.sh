#!/usr/bin/env bash
# A local Cape cluster on this machine (docs/cluster.md): PostgreSQL, an S3 server, the key
# service (`cape kms serve`), N `cape serve` nodes using them and HAProxy in front, all on
# loopback ports.
#
#   bash scripts/cluster.sh up [--nodes N] [--enclaves N]   # prints Ready: https://HOST:PORT
#   bash scripts/cluster.sh status                          # each part, and each node's /readyz
#   bash scripts/cluster.sh down                            # stops and removes everything
#
# State lives in $CAPE_CLUSTER_DIR (default /tmp/cape-cluster): PostgreSQL's data directory,
# the key service's data directory (master key, keys, the cluster's attestation root), the
# nodes' configurations, data directories and logs, and the operator's directory whose
# tls/ca.pem and attestation/root.pem clients need. Nodes share no directory: each gets its
# own copies of the TLS certificate, the token signing key and the node token. Needs `bash scripts/setup.sh test`
# (moto's S3 server stands in for S3: docs/mocks.md), Debian's postgresql and haproxy.
# Nodes listen on loopback ports (no network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
STATE="${CAPE_CLUSTER_DIR:-/tmp/cape-cluster}"
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1

die() { echo "Error: $*" >&2; exit 1; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() {  # PostgreSQL refuses to run as root; the postgres user cannot read every directory
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
readyz() {  # readyz URL -> HTTP status of URL/readyz (000 when unreachable)
    "$PY" - "$1" "$STATE/shared/tls/ca.pem" <<'EOF'
import ssl, sys, urllib.error, urllib.request
try:
    context = ssl.create_default_context(cafile=sys.argv[2])
    with urllib.request.urlopen(sys.argv[1] + "/readyz", context=context, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print("000")
EOF
}

start_node() {  # start_node INDEX: waits for its Ready: line
    local i="$1" dir="$STATE/node$1"
    mkdir -p "$dir/logs"
    CAPE_CONFIG_DIR="$dir/cli" setsid "$PY" -c "from cape.cli.app import main; main()" serve \
        --config "$dir/cape.toml" --data-dir "$dir/data" \
        >>"$dir/logs/stdout.log" 2>>"$dir/logs/stderr.log" </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 1 900); do
        grep -q '^Ready: ' "$dir/logs/stdout.log" 2>/dev/null && return 0
        alive "$dir/pid" || { tail -5 "$dir/logs/stderr.log" >&2; die "node$i exited"; }
        sleep 0.1
    done
    die "node$i did not become ready (logs: $dir/logs)"
}

up() {
    local nodes=3 enclaves=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes="${2:?}"; shift 2 ;;
            --enclaves) enclaves="${2:?}"; shift 2 ;;
            *) die "unknown option $1 (up [--nodes N] [--enclaves N])" ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1 to 99"
    [[ "$enclaves" =~ ^[1-9][0-9]?$ ]] || die "--enclaves must be 1 to 64"
    [ -e "$STATE" ] && die "$STATE exists: run 'bash scripts/cluster.sh down' first"
    [ -x "$PY" ] || die "no .venv: run 'bash scripts/setup.sh test' first"
    [ -n "$(pg_bin)" ] || die "PostgreSQL is not installed (apt-get install postgresql)"
    command -v haproxy >/dev/null || die "haproxy is not installed (apt-get install haproxy)"
    "$PY" -c "import moto.server, psycopg, boto3" 2>/dev/null \
        || die "moto[server], psycopg or boto3 missing: run 'bash scripts/setup.sh test'"
    mkdir -p "$STATE/shared" && chmod 0711 "$STATE"

    # PostgreSQL: a throw-away cluster, trusted on loopback only.
    local pg_port; pg_port="$(free_port)"
    mkdir -p "$STATE/postgres"
    [ "$(id -u)" = 0 ] && chown postgres: "$STATE/postgres"
    as_pg "$(pg_bin)/initdb" -D "$STATE/postgres/data" -U postgres --auth trust \
        --no-instructions >"$STATE/postgres/initdb.log" 2>&1 || die "initdb failed"
    as_pg "$(pg_bin)/pg_ctl" -D "$STATE/postgres/data" -l "$STATE/postgres/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -c port=$pg_port -c unix_socket_directories=''" \
        start >/dev/null || die "PostgreSQL did not start ($STATE/postgres/server.log)"
    "$PY" -c "import psycopg; psycopg.connect(host='127.0.0.1', port=$pg_port, user='postgres', autocommit=True).execute('CREATE DATABASE cape')"

    # The S3 server and the bucket.
    local s3_port; s3_port="$(free_port)"
    setsid "$PY" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$STATE/s3.log" 2>&1 </dev/null &
    echo $! >"$STATE/s3.pid"
    for _ in $(seq 1 300); do
        "$PY" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$s3_port').create_bucket(Bucket='cape')" 2>/dev/null && break
        sleep 0.1
    done

    # The operator's material: the TLS certificate every node shows (here from a local CA),
    # the token signing key and the node token the key service expects.
    "$PY" -c "from pathlib import Path; from cape.platform.tls import ensure_tls; from cape.host.tokens import TokenIssuer; ensure_tls(Path('$STATE/shared/tls'), '127.0.0.1'); TokenIssuer.open(Path('$STATE/shared'))"
    (umask 077 && "$PY" -c "import secrets; print(secrets.token_hex(32))" >"$STATE/shared/node.token")

    # The key service: keys, master key and the cluster's one attestation root.
    local kms_port; kms_port="$(free_port)"
    mkdir -p "$STATE/kms"
    setsid "$PY" -c "from cape.cli.app import main; main()" kms serve \
        --listen "127.0.0.1:$kms_port" --data-dir "$STATE/kms/data" \
        --node-token-file "$STATE/shared/node.token" \
        >"$STATE/kms/stdout.log" 2>"$STATE/kms/stderr.log" </dev/null &
    echo $! >"$STATE/kms/pid"
    for _ in $(seq 1 600); do
        grep -q '^Ready: ' "$STATE/kms/stdout.log" 2>/dev/null && break
        alive "$STATE/kms/pid" || { tail -5 "$STATE/kms/stderr.log" >&2; die "the key service exited"; }
        sleep 0.1
    done
    grep -q '^Ready: ' "$STATE/kms/stdout.log" || die "the key service did not start ($STATE/kms)"
    local pin; pin="$(sed -n 's/^  Certificate pin: *//p' "$STATE/kms/stdout.log")"
    mkdir -p "$STATE/shared/attestation"
    cp "$STATE/kms/data/attestation/root.pem" "$STATE/shared/attestation/root.pem"

    local ports=() i
    for i in $(seq 0 $((nodes - 1))); do
        ports+=("$(free_port)")
        mkdir -p "$STATE/node$i/tls" "$STATE/node$i/data/auth"
        chmod 0700 "$STATE/node$i" "$STATE/node$i/data" "$STATE/node$i/data/auth"
        cp -p "$STATE/shared/tls/server.pem" "$STATE/shared/tls/server.key" "$STATE/node$i/tls/"
        cp -p "$STATE/shared/auth/signing.key" "$STATE/node$i/data/auth/signing.key"
        cp -p "$STATE/shared/node.token" "$STATE/node$i/node.token"
        cat >"$STATE/node$i/cape.toml" <<EOF
node_name = "node$i"
port = ${ports[$i]}
enclaves = $enclaves
database_url = "postgresql+psycopg://postgres@127.0.0.1:$pg_port/cape"
blob_store = "s3://cape/bundles"
blob_endpoint_url = "http://127.0.0.1:$s3_port"
key_service_url = "https://127.0.0.1:$kms_port"
key_service_pin = "$pin"
key_service_token_file = "$STATE/node$i/node.token"
tls_cert = "$STATE/node$i/tls/server.pem"
tls_key = "$STATE/node$i/tls/server.key"
log_format = "json"
EOF
    done
    start_node 0  # migrates the database; the others wait for its lock
    local starting=()
    for i in $(seq 1 $((nodes - 1))); do start_node "$i" & starting+=($!); done
    for i in "${starting[@]}"; do wait "$i" || die "a node did not start"; done

    local lb_port; lb_port="$(free_port)"
    {
        printf 'global\n    maxconn 4000\n'
        printf 'defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 300s\n'
        printf '    timeout server 300s\n    retries 3\n    option redispatch\n'
        printf 'frontend cape\n    bind 127.0.0.1:%s\n    default_backend nodes\n' "$lb_port"
        printf 'backend nodes\n    balance roundrobin\n    option httpchk GET /readyz\n'
        printf '    http-check expect status 200\n'
        printf '    default-server check check-ssl verify none inter 500ms fall 2 rise 1\n'
        for i in $(seq 0 $((nodes - 1))); do
            printf '    server node%s 127.0.0.1:%s\n' "$i" "${ports[$i]}"
        done
    } >"$STATE/haproxy.cfg"
    haproxy -f "$STATE/haproxy.cfg" -D -p "$STATE/haproxy.pid" || die "haproxy did not start"
    echo "https://127.0.0.1:$lb_port" >"$STATE/url"
    for _ in $(seq 1 300); do
        [ "$(readyz "https://127.0.0.1:$lb_port")" = 200 ] && break
        sleep 0.1
    done
    echo "CA file:           $STATE/shared/tls/ca.pem"
    echo "Attestation root:  $STATE/shared/attestation/root.pem"
    echo "Key service:       https://127.0.0.1:$kms_port (pin $pin)"
    echo "Nodes:             $nodes, logs under $STATE/node*/logs"
    echo "Ready: https://127.0.0.1:$lb_port"
}

status() {
    [ -d "$STATE" ] || { echo "no cluster ($STATE does not exist)"; return 1; }
    local bad=0 i dir port
    if as_pg "$(pg_bin)/pg_ctl" -D "$STATE/postgres/data" status >/dev/null 2>&1; then
        echo "postgresql: running"
    else
        echo "postgresql: stopped"; bad=1
    fi
    if alive "$STATE/s3.pid"; then echo "s3: running"; else echo "s3: stopped"; bad=1; fi
    if alive "$STATE/kms/pid"; then
        echo "key service: running, $(sed -n 's/^Ready: //p' "$STATE/kms/stdout.log")"
    else
        echo "key service: stopped"; bad=1
    fi
    if alive "$STATE/haproxy.pid"; then
        echo "haproxy: running, $(cat "$STATE/url") /readyz $(readyz "$(cat "$STATE/url")")"
    else
        echo "haproxy: stopped"; bad=1
    fi
    for dir in "$STATE"/node*/; do
        i="$(basename "$dir")"
        port="$(sed -n 's/^port = //p' "$dir/cape.toml")"
        if alive "$dir/pid"; then
            echo "$i: running, https://127.0.0.1:$port /readyz $(readyz "https://127.0.0.1:$port")"
        else
            echo "$i: stopped"; bad=1
        fi
    done
    return "$bad"
}

down() {
    [ -d "$STATE" ] || { echo "no cluster ($STATE does not exist)"; return 0; }
    local pidfile
    for pidfile in "$STATE"/node*/pid "$STATE/haproxy.pid" "$STATE/s3.pid" "$STATE/kms/pid"; do
        if alive "$pidfile"; then kill -TERM "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    for pidfile in "$STATE"/node*/pid "$STATE/haproxy.pid" "$STATE/s3.pid" "$STATE/kms/pid"; do
        for _ in $(seq 1 300); do alive "$pidfile" || break; sleep 0.1; done
        if alive "$pidfile"; then kill -KILL "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    if [ -d "$STATE/postgres/data" ]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$STATE/postgres/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$STATE"
    echo "cluster removed"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    status) status ;;
    down) down ;;
    *) die "usage: bash scripts/cluster.sh up [--nodes N] [--enclaves N] | status | down" ;;
esac
