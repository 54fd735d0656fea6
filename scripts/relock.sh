#!/usr/bin/env bash
# Refresh uv.lock to the newest versions pyproject.toml allows, then run the test command on
# them. Commit uv.lock only if the tests pass: it is what every fresh clone and CI install.
source "$(dirname "$0")/_venv.sh"
cd "$root"
"$uv" lock --upgrade --python python3 "$@"
exec ./scripts/test.sh
