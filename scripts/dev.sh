#!/usr/bin/env bash
# Run crctl from this checkout on a fresh machine, in the folder you are in:
#   ./scripts/dev.sh up --no-tunnel --call example
source "$(dirname "$0")/_venv.sh"
exec "$root/.venv/bin/crctl" "$@"
