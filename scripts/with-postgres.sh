#!/usr/bin/env bash
# Run a command beside a throwaway PostgreSQL server (Debian's package, installed if missing and
# we are root). The command gets CKPTSCOPE_TEST_DATABASE_URL, an admin URL the tests use to make a
# fresh database per test. The server and its files are removed when the command ends.
#   scripts/with-postgres.sh COMMAND [ARGS...]
# Exits 75 (without running COMMAND) when PostgreSQL cannot be set up here.
set -euo pipefail
port="${CKPTSCOPE_PG_PORT:-54329}"
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
pgbin="$(find_bin)"
if [ -z "$pgbin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql) >/dev/null
        pgbin="$(find_bin)"
    fi
fi
if [ -z "$pgbin" ]; then
    echo "with-postgres: PostgreSQL is not installed (apt-get install postgresql)" >&2
    exit 75
fi
dir="$(mktemp -d /tmp/ckptscope-pg.XXXXXX)"
as_owner=()
if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
    chown postgres: "$dir"
    as_owner=(runuser -u postgres --)
fi
stop() {
    "${as_owner[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap stop EXIT
"${as_owner[@]}" "$pgbin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
"${as_owner[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses='' -c fsync=off -c max_connections=300" start >/dev/null
export CKPTSCOPE_TEST_DATABASE_URL="postgresql+psycopg://postgres@/postgres?host=$dir&port=$port"
echo "with-postgres: PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on $dir:$port"
"$@"
