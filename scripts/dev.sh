#!/usr/bin/env bash
# Run crctl from this checkout on a fresh machine: ./scripts/dev.sh serve
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/crctl "$@"
