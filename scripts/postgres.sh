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
port=${PGPORT_SPECTR:-55432}
as=()
[ "$(id -u)" = 0 ] && as=(runuser -u postgres --)   # initdb refuses to run as root
mkdir -p "$dir" && chmod 777 "$dir"
"${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U spectr >/dev/null
"${as[@]}" "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
"$bin/createdb" -h 127.0.0.1 -p "$port" -U spectr spectr_test
echo "export SPECTR_TEST_POSTGRES_URL=postgresql+psycopg://spectr@127.0.0.1:$port/spectr_test"
echo "export SPECTR_TEST_POSTGRES_STOP='$bin/pg_ctl -D $dir/data stop'"
