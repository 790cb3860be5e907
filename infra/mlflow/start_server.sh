#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API + artifact proxy) that latentforge jobs log to.
#
#   infra/mlflow/start_server.sh                                  # 127.0.0.1:5000, ./mlflow.db + ./mlartifacts
#   infra/mlflow/start_server.sh --artifacts s3://YOUR-BUCKET/mlflow-artifacts
#   infra/mlflow/start_server.sh --backend postgres --db postgresql://mlflow@db.internal:5432/mlflow \
#       --artifacts /shared/mlflow/artifacts
#   infra/mlflow/start_server.sh --host 10.0.1.23                 # a cluster head: reachable by the workers
#   infra/mlflow/start_server.sh --auth --host 0.0.0.0            # logins required (a Kubernetes pod)
#   infra/mlflow/start_server.sh --print-command                  # print the mlflow command, start nothing
#
# Then point the jobs at it: MLFLOW_TRACKING_URI=http://HOST:PORT (or mlflow.tracking_uri in the config),
# and with --auth also MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#
# Choices, and why:
# - Bound to 127.0.0.1 unless --host says otherwise. Without --auth anyone who can reach the port can
#   read and delete runs. On a cluster the training workers must reach it (rank 0 logs from a worker
#   node, not from the head), so there pass the head's PRIVATE address and keep the port closed to the
#   outside (cloud security group / a ClusterIP Service and a NetworkPolicy); never a public address.
# - --auth: MLflow's basic-auth app (pip extra mlflow[auth]). Every request but /health needs a login.
#   The secrets come from the environment under the names MLflow itself reads, never from arguments
#   (`ps` shows those) or files: MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD create the admin
#   account when the user store has none of that name (later changes of the variables change nothing:
#   rotate through MLflow's update-password API), MLFLOW_FLASK_SERVER_SECRET_KEY signs the UI's forms.
#   The jobs log in as that account. Users the admin adds get --auth-default-permission on what nobody
#   granted them: NO_PERMISSIONS unless told, so a new account sees nothing until the admin grants it.
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
# MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS, MLFLOW_AUTH=1, MLFLOW_AUTH_DB,
# MLFLOW_AUTH_DEFAULT_PERMISSION, MLFLOW_BIN); options win over variables.
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
  --auth                     require a login (MLflow's basic-auth app). Reads MLFLOW_AUTH_ADMIN_USERNAME,
                             MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters; creates the admin account once)
                             and MLFLOW_FLASK_SERVER_SECRET_KEY from the environment. Clients log in with
                             MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
  --auth-db PATH_OR_URI      users and permissions (default: basic_auth.db next to the SQLite --db;
                             --backend postgres: required, a file path or a postgresql:// URI)
  --auth-default-permission NO_PERMISSIONS|READ|EDIT|MANAGE
                             what an account may do where nobody granted it anything (default NO_PERMISSIONS)
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
auth=${MLFLOW_AUTH:-0}
auth_db=${MLFLOW_AUTH_DB:-}
auth_permission=${MLFLOW_AUTH_DEFAULT_PERMISSION:-}
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
        --auth) auth=1; shift ;;
        --auth-db) need_value "$@"; auth_db=$2; shift 2 ;;
        --auth-default-permission) need_value "$@"; auth_permission=$2; shift 2 ;;
        --print-command) print_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, got '$workers'"
[[ $auth == 0 || $auth == 1 ]] || die "MLFLOW_AUTH must be 0 or 1, got '$auth'"
if [[ $auth == 0 && -n $auth_db$auth_permission ]]; then
    die "--auth-db and --auth-default-permission only apply with --auth"
fi
auth_permission=${auth_permission:-NO_PERMISSIONS}
case $auth_permission in
    NO_PERMISSIONS|READ|EDIT|MANAGE) ;;
    *) die "--auth-default-permission must be NO_PERMISSIONS, READ, EDIT or MANAGE, got '$auth_permission'" ;;
esac

absolute() {  # a local path made absolute (the directory need not exist yet)
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "${1#./}" ;;
    esac
}

sqlite_file() {  # a file path or sqlite:/// URI -> the absolute file; anything else: empty
    local file
    case $1 in
        sqlite:///*) file=${1#sqlite:///} ;;
        *://*) return 0 ;;
        *) file=$1 ;;
    esac
    absolute "$file"
}

case $backend in
    sqlite)
        db=${db:-./mlflow.db}
        db_file=$(sqlite_file "$db")
        [[ -n $db_file ]] || die "--backend sqlite takes a file path or a sqlite:/// URI, got '$db'"
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

auth_file= auth_uri=
if [[ $auth == 1 ]]; then
    if [[ -z $auth_db ]]; then
        [[ $backend == sqlite ]] \
            || die "--auth with --backend postgres needs --auth-db (a file path or a postgresql:// URI)"
        auth_db=$(dirname "$db_file")/basic_auth.db
    fi
    auth_file=$(sqlite_file "$auth_db")
    auth_uri=${auth_file:+sqlite:///$auth_file}
    auth_uri=${auth_uri:-$auth_db}
fi

cmd=("$mlflow_bin" server
     --backend-store-uri "$backend_uri"
     --serve-artifacts --artifacts-destination "$artifacts"
     --host "$host" --port "$port"
     --workers "$workers")
if [[ $auth == 1 ]]; then
    cmd+=(--app-name basic-auth)
fi
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
if [[ $auth == 1 ]]; then
    for var in MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
        [[ -n ${!var:-} ]] || die "--auth needs $var in the environment (see infra/mlflow/README.md)"
        [[ ${!var} != REPLACE-* ]] \
            || die "$var is still the REPLACE-... placeholder of the Secret manifest: give it a real value"
    done
    [[ -z $auth_file ]] || mkdir -p "$(dirname "$auth_file")"
    # No secret in it: the admin account comes from the environment. Every server worker reads it.
    # auth_cache_ttl_seconds: a login is checked against its scrypt hash at most once a minute per
    # worker instead of on every request (~0.1 s of CPU each: training logs every few seconds); a
    # password changed through the API takes effect at once on the worker that changed it, on others
    # within the minute.
    MLFLOW_AUTH_CONFIG_PATH=$(mktemp "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX")
    printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nauth_cache_ttl_seconds = %s\n' \
        "$auth_permission" "$auth_uri" 60 > "$MLFLOW_AUTH_CONFIG_PATH"
    export MLFLOW_AUTH_CONFIG_PATH
fi
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
    *) [[ $auth == 1 ]] \
        || echo "start_server.sh: note: binding $host: every machine that can reach $host:$port can read and" \
                "change runs (no --auth); keep the port closed to anything but the cluster" >&2 ;;
esac

echo "start_server.sh: backend $backend_uri, artifacts $artifacts${auth_uri:+, users $auth_uri}" >&2
echo "start_server.sh: jobs log here with MLFLOW_TRACKING_URI=http://$host:$port" >&2
exec "${cmd[@]}"
