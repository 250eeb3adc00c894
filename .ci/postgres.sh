#!/usr/bin/env bash
# A private PostgreSQL server for the tests, on a free loopback port, as an unprivileged user, in a temporary
# directory: Debian's postgresql package (installed here if missing).
#   .ci/postgres.sh start      prints `export THINGPORT_TEST_POSTGRES=...` (eval it) and the data directory
#   .ci/postgres.sh stop DIR   stops the server and removes DIR
#   .ci/postgres.sh down DIR   stops the server, keeping its data;  .ci/postgres.sh up DIR  starts it again
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
case "${1:-}" in
start)
  if [ -z "$bin" ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  user=postgres
  id "$user" >/dev/null 2>&1 || useradd --system --no-create-home "$user"
  dir=$(mktemp -d /tmp/thingport-pg.XXXXXX)
  chown "$user" "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  run() { if [ "$(id -u)" = 0 ]; then su "$user" -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
  run "'$bin/initdb' -D '$dir/data' -U postgres -A trust -E UTF8 --no-locale" >"$dir/initdb.log" 2>&1
  echo "$port" > "$dir/port"
  run "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -t 60 \
      -o \"-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200\" start" >/dev/null
  echo "export THINGPORT_TEST_POSTGRES='host=127.0.0.1 port=$port user=postgres'"
  echo "export THINGPORT_TEST_POSTGRES_DIR='$dir'"
  ;;
stop)
  dir=${2:?the directory start printed}
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null || true
  else
    "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  rm -rf "$dir"
  ;;
down|up)
  dir=${2:?the directory start printed}
  port=$(cat "$dir/port")
  action=stop; [ "$1" = up ] && action=start
  opts="-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200"
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -m fast -w -t 60 -o '$opts' $action" >/dev/null
  else
    "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 -o "$opts" "$action" >/dev/null
  fi
  ;;
*)
  echo "usage: $0 start | stop DIR | down DIR | up DIR" >&2
  exit 64
  ;;
esac
