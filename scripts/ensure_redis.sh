#!/usr/bin/env bash
# redis-server for the tests (Debian's package), installed when missing; prints its path.
# The tests start their own servers on free ports (tests/redis_support.py); nothing here
# starts or enables a service.
set -euo pipefail
if found=$(command -v redis-server); then
  echo "$found"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: redis-server is needed by the tests and this machine has no apt-get: install Redis 7 so that redis-server is on PATH" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "error: redis-server is missing; install it as root: apt-get install redis-server" >&2; exit 1; }
  sudo=(sudo -n)
fi
echo "installing redis-server (Debian's package) for the tests ..." >&2
export DEBIAN_FRONTEND=noninteractive
# No service is started at install: there is no init system here, and the tests run their own.
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  made_policy=1
fi
trap '[ -n "$made_policy" ] && "${sudo[@]}" rm -f "$policy"' EXIT
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends redis-server >&2
command -v redis-server
