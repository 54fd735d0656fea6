# Sourced by the scripts: make $root/.venv hold exactly what uv.lock pins (what the tests last
# passed with), this checkout installed in it as editable. CRCTL_SYNC=dev adds the test tools.
# The caller's working folder is left as it was (crctl imports --agent modules from it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# uv itself is pinned too, and comes from PyPI into .tools/ the first time (about 8 s).
uv_version=0.13.9
uv="$root/.tools/bin/uv"
case "$("$uv" --version 2>/dev/null || true)" in
  "uv $uv_version" | "uv $uv_version "*) ;;
  *)
    echo "crctl: installing uv $uv_version into .tools/ (once)" >&2
    rm -rf "$root/.tools"
    python3 -m venv "$root/.tools"
    "$root/.tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version" \
      2>/dev/null || "$root/.tools/bin/python" -m pip install --disable-pip-version-check "uv==$uv_version"
    ;;
esac
# Bytecode compiled at install: a first run (and the tests' parallel CLI runs) start warm.
export UV_PROJECT_ENVIRONMENT="$root/.venv" UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1 UV_COMPILE_BYTECODE=1
if [ "${CRCTL_SYNC:-}" = dev ]; then
  # Exactly the lock, test tools included: a package the lock does not name is removed.
  "$uv" sync --project "$root" --frozen --quiet
else
  # The relay and CLI only; leaves the test tools alone if a test run installed them.
  "$uv" sync --project "$root" --frozen --quiet --no-dev --inexact
fi
