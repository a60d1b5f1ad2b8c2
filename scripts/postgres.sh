#!/usr/bin/env bash
# A PostgreSQL server for Prefect's, on this machine, from Debian's `postgresql` package
# (apt-get install -y postgresql; docker/compose.yaml runs the same thing as a container).
#
#   bash scripts/postgres.sh start DIR [PORT]   # first time: a new cluster in DIR; prints the URL
#   export PREFECT_API_DATABASE_CONNECTION_URL=$(bash scripts/postgres.sh url DIR)
#   avr server                                   # Prefect's server on that database
#   bash scripts/postgres.sh stop DIR
#
# Why Debian's server and not a pip-shipped one: it is the server docker/compose.yaml and most
# operators run (a packaged, security-maintained 15.x with `pg_trgm`, which Prefect's migrations
# need), and it starts in about a second. PostgreSQL refuses to run as root, so as root the cluster
# belongs to the `postgres` user and DIR must be a directory that user can reach (not under a 0700
# parent such as pytest's /tmp/pytest-of-root). It listens on 127.0.0.1 only, with trust
# authentication for local connections: a database for one machine's Prefect server, not a shared one.
set -euo pipefail
cmd=${1:?usage: postgres.sh start|stop|url DIR [PORT]}
dir=${2:?usage: postgres.sh start|stop|url DIR [PORT]}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [[ -z "$bin" ]]; then
  echo "postgres.sh: no PostgreSQL server here (apt-get install -y postgresql)" >&2
  exit 2
fi
as_owner() {            # run as the cluster's owner: `postgres` when we are root, else ourselves
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
data=$dir/data

case $cmd in
  start)
    port=${3:-5432}
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] && chown postgres: "$dir"
    if [[ ! -f $data/PG_VERSION ]]; then
      as_owner "$bin/initdb" -D "$data" -U prefect --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    echo "$port" >"$dir/port"; [[ $(id -u) == 0 ]] && chown postgres: "$dir/port"
    # sockets in DIR, TCP on loopback only; fsync off is NOT set: a crash test relies on durability
    as_owner "$bin/pg_ctl" -D "$data" -w -t 60 -l "$dir/server.log" \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
      || { tail -20 "$dir/server.log" >&2; exit 1; }
    if ! as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U prefect -d postgres -tAc \
        "select 1 from pg_database where datname='prefect'" | grep -q 1; then
      as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
    fi
    PGOPTIONS="-c client_min_messages=warning" as_owner "$bin/psql" -q -h 127.0.0.1 -p "$port" -U prefect \
      -d prefect -c "create extension if not exists pg_trgm"
    echo "postgresql+asyncpg://prefect@127.0.0.1:$port/prefect"
    ;;
  url)
    echo "postgresql+asyncpg://prefect@127.0.0.1:$(cat "$dir/port")/prefect"
    ;;
  stop)
    [[ -f $data/postmaster.pid ]] && as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "postgres.sh: unknown command $cmd (start, stop, url)" >&2
    exit 2
    ;;
esac
