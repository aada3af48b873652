#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on loopback and prints the SQLAlchemy URL for the registry tests.
# Usage: eval "$(bash scripts/postgres.sh DIR)"   ->  exports SPECTR_TEST_POSTGRES_URL
set -euo pipefail
dir=${1:?data directory}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ]; then
  (apt-get install -y -q postgresql >/dev/null 2>&1 || true)
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
[ -n "$bin" ] || { echo "echo 'PostgreSQL is not installable here' >&2"; exit 0; }
# A free loopback port unless one is given: a server left over from an aborted run must not make this one fail.
port=${PGPORT_SPECTR:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
as=()
[ "$(id -u)" = 0 ] && as=(runuser -u postgres --)   # initdb refuses to run as root
mkdir -p "$dir" && chmod 777 "$dir"
"${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U spectr >/dev/null
# A server that does not start fails the caller's eval (not a silent skip of the PostgreSQL tests).
if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" \
    -w start >/dev/null; then
  echo "echo 'PostgreSQL did not start on port $port: see $dir/log' >&2; false"; exit 0
fi
"$bin/createdb" -h 127.0.0.1 -p "$port" -U spectr spectr_test
echo "export SPECTR_TEST_POSTGRES_URL=postgresql+psycopg://spectr@127.0.0.1:$port/spectr_test"
echo "export SPECTR_TEST_POSTGRES_STOP='$bin/pg_ctl -D $dir/data stop'"
