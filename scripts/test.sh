#!/usr/bin/env bash
# One command for a fresh machine: venv, install, make sure Postgres and Redis answer, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
. .venv/bin/activate

pg_up() { python - <<'PY'
import asyncio, asyncpg, sys
async def main():
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=3)
    await conn.close()
try:
    asyncio.run(main())
except Exception:
    sys.exit(1)
PY
}
redis_up() { python -c "import redis, sys; sys.exit(0 if redis.Redis(host='127.0.0.1', port=6379, socket_timeout=3).ping() else 1)" 2>/dev/null; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "PostgreSQL is not answering on 127.0.0.1:5432; starting it (see DEVELOPERS.md)"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  fi
  pg_up || { echo "ERROR: PostgreSQL is not running on 127.0.0.1:5432 (trust auth, user postgres) and could not be started. Install and start it; see DEVELOPERS.md." >&2; exit 1; }
fi
if ! redis_up; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "Redis is not answering on 127.0.0.1:6379; starting it (see DEVELOPERS.md)"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 1 30); do redis_up && break; sleep 1; done
  fi
  redis_up || { echo "ERROR: Redis is not running on 127.0.0.1:6379 and could not be started. Install and start it; see DEVELOPERS.md." >&2; exit 1; }
fi

# The dashboard tests drive Debian's chromium through playwright (no browser download); install it once.
command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

ruff check app workers tests bench
exec python -m pytest "$@"
