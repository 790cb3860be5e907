#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API + artifact proxy) that latentforge jobs log to.
#
#   infra/mlflow/start_server.sh                                  # 127.0.0.1:5000, ./mlflow.db + ./mlartifacts
#   infra/mlflow/start_server.sh --artifacts s3://YOUR-BUCKET/mlflow-artifacts
#   infra/mlflow/start_server.sh --backend postgres --db postgresql://mlflow@db.internal:5432/mlflow \
#       --artifacts /shared/mlflow/artifacts
#   infra/mlflow/start_server.sh --host 10.0.1.23                 # a cluster head: reachable by the workers
#   infra/mlflow/start_server.sh --print-command                  # print the mlflow command, start nothing
#
# Then point the jobs at it: MLFLOW_TRACKING_URI=http://HOST:PORT (or mlflow.tracking_uri in the config).
#
# Choices, and why:
# - Bound to 127.0.0.1 unless --host says otherwise. The server has no authentication: anyone who can
#   reach the port can read and delete runs. On a cluster the training workers must reach it (rank 0
#   logs from a worker node, not from the head), so there pass the head's PRIVATE address and keep the
#   port closed to the outside (cloud security group / a ClusterIP Service); never a public address.
# - --workers 1: one process is plenty for one training run (only rank 0 logs) and used ~0.9 GB;
#   MLflow's default of 4 worker processes used ~2.3 GB (both measured with SQLite).
# - Artifacts go through the server (--serve-artifacts, no --default-artifact-root): clients upload to
#   http://HOST:PORT and the server writes to --artifacts, so only this machine needs credentials for
#   the shared URI (s3://... or a mounted path). Experiments created against another store keep theirs.
# - SQLite (default) is one file: fine for one team's runs, but keep it on a local disk (SQLite locking
#   over NFS is unreliable) and back it up: a cluster head's disk is deleted with the head.
#   Postgres is the choice for anything long-lived or shared; it needs psycopg2 on this machine
#   (pip install psycopg2-binary). Keep the password out of the URI (it would show in `ps`): use
#   PGPASSWORD or ~/.pgpass, which libpq reads.
# - The script ends by exec'ing mlflow in the foreground: run it under nohup/systemd, or as a container's
#   main process; stop it with Ctrl-C or by its process id.
#
# Every option has an environment variable (MLFLOW_BACKEND, MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_HOST,
# MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS, MLFLOW_BIN); options win over variables.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: infra/mlflow/start_server.sh [options] [-- extra `mlflow server` arguments]

  --backend sqlite|postgres  backend store (default: sqlite)
  --db PATH_OR_URI           sqlite: a file path (default ./mlflow.db, the file jobs run without a
                             server log to) or a sqlite:/// URI;
                             postgres: postgresql://USER@HOST:PORT/DB (password via PGPASSWORD or ~/.pgpass)
  --artifacts PATH_OR_URI    artifact destination: s3://bucket/prefix, gs://..., or a (shared) directory
                             (default ./mlartifacts, where jobs run without a server put them)
  --host ADDRESS             interface to bind (default 127.0.0.1; a cluster head: its private address)
  --port N                   (default 5000)
  --workers N                server worker processes (default 1: ~0.9 GB; MLflow's own default 4: ~2.3 GB)
  --allowed-hosts LIST       Host headers the server accepts (MLflow's DNS-rebinding guard). Unset:
                             MLflow's default, localhost and private IPs (clients using an IP address).
                             Set: it REPLACES that default, so this script adds localhost and 127.0.0.1
                             back (for tunnels); patterns may use *, e.g. a Kubernetes Service name:
                             'latentforge-mlflow,latentforge-mlflow:*'
  --print-command            print the mlflow command line and exit without starting it
  -h, --help                 this text
EOF
}

backend=${MLFLOW_BACKEND:-sqlite}
db=${MLFLOW_DB:-}
artifacts=${MLFLOW_ARTIFACTS:-}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-1}
allowed_hosts=${MLFLOW_ALLOWED_HOSTS:-}
mlflow_bin=${MLFLOW_BIN:-mlflow}
print_only=0
extra=()

die() { echo "start_server.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) need_value "$@"; backend=$2; shift 2 ;;
        --db) need_value "$@"; db=$2; shift 2 ;;
        --artifacts) need_value "$@"; artifacts=$2; shift 2 ;;
        --host) need_value "$@"; host=$2; shift 2 ;;
        --port) need_value "$@"; port=$2; shift 2 ;;
        --workers) need_value "$@"; workers=$2; shift 2 ;;
        --allowed-hosts) need_value "$@"; allowed_hosts=$2; shift 2 ;;
        --print-command) print_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, got '$workers'"

absolute() {  # a local path made absolute (the directory need not exist yet)
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "${1#./}" ;;
    esac
}

case $backend in
    sqlite)
        db=${db:-./mlflow.db}
        if [[ $db == sqlite:///* ]]; then
            db_file=${db#sqlite:///}
            [[ $db_file == /* ]] || db_file=$(absolute "$db_file")
        elif [[ $db == *://* ]]; then
            die "--backend sqlite takes a file path or a sqlite:/// URI, got '$db'"
        else
            db_file=$(absolute "$db")
        fi
        backend_uri="sqlite:///$db_file"  # an absolute path gives sqlite://// (four slashes)
        ;;
    postgres)
        [[ $db == postgresql://* || $db == postgresql+*://* ]] \
            || die "--backend postgres needs --db postgresql://USER@HOST:PORT/DB, got '${db:-nothing}'"
        if [[ $db =~ ://[^/@]*:[^/@]*@ ]]; then
            echo "start_server.sh: warning: the database password is in the URI and will show in 'ps';" \
                 "prefer PGPASSWORD or ~/.pgpass" >&2
        fi
        backend_uri=$db
        ;;
    *) die "--backend must be sqlite or postgres, got '$backend'" ;;
esac

artifacts=${artifacts:-./mlartifacts}
if [[ $artifacts != *://* ]]; then
    artifacts=$(absolute "$artifacts")
fi

cmd=("$mlflow_bin" server
     --backend-store-uri "$backend_uri"
     --serve-artifacts --artifacts-destination "$artifacts"
     --host "$host" --port "$port"
     --workers "$workers")
if [[ -n $allowed_hosts ]]; then
    # MLflow drops its default list when this is given: keep loopback (SSH / kubectl port-forward).
    cmd+=(--allowed-hosts "$allowed_hosts,localhost,localhost:*,127.0.0.1,127.0.0.1:*")
fi
cmd+=("${extra[@]}")

if [[ $print_only == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

command -v "$mlflow_bin" >/dev/null \
    || die "'$mlflow_bin' not found: activate the environment that has mlflow (source .venv/bin/activate) or set MLFLOW_BIN"
if [[ $backend == sqlite ]]; then
    mkdir -p "$(dirname "$db_file")"
else
    mlflow_python=$(head -n 1 "$(command -v "$mlflow_bin")" | sed -n 's/^#!//p')
    if [[ -n $mlflow_python ]] && ! $mlflow_python -c "import psycopg2" 2>/dev/null; then
        die "the postgres backend needs psycopg2 next to mlflow: pip install psycopg2-binary"
    fi
fi
if [[ $artifacts != *://* ]]; then
    mkdir -p "$artifacts"
fi
case $host in
    127.0.0.1|localhost|::1) ;;
    *) echo "start_server.sh: note: binding $host: every machine that can reach $host:$port can read and" \
            "change runs (no authentication); keep the port closed to anything but the cluster" >&2 ;;
esac

echo "start_server.sh: backend $backend_uri, artifacts $artifacts" >&2
echo "start_server.sh: jobs log here with MLFLOW_TRACKING_URI=http://$host:$port" >&2
exec "${cmd[@]}"
