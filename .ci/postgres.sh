#!/usr/bin/env bash
# The store tests need a real PostgreSQL server: by default the local one on
# 127.0.0.1:5432 (user postgres, trust auth), or KONGTIE_TEST_DATABASE_URL.
# Starts the local cluster if it is installed but stopped; otherwise fails
# loudly. Never skips.
set -euo pipefail

url="${KONGTIE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

answers() {
    if command -v psql >/dev/null; then
        psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
    else
        # No client here: at least the default port must accept.
        (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
    fi
}

if ! answers && [ -z "${KONGTIE_TEST_DATABASE_URL:-}" ] && command -v pg_ctlcluster >/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        echo "starting the local PostgreSQL $version cluster"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 30); do
        answers && break
        sleep 1
    done
fi

if ! answers; then
    echo "FATAL: PostgreSQL does not answer at $url." >&2
    echo "The store tests need it: start the server, or set KONGTIE_TEST_DATABASE_URL" >&2
    echo "to one where this user may CREATE DATABASE." >&2
    exit 1
fi
if command -v psql >/dev/null; then
    psql "$url" -Atqc 'SELECT version()'
fi
