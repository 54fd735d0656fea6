#!/usr/bin/env bash
# The test command (README, and .ci/run): lint, type-check, then the whole suite.
CRCTL_SYNC=dev
source "$(dirname "$0")/_venv.sh"
cd "$root"
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== node tools (tests/node: twilio SDK, twilio-run)"
# The TwiML and Serverless tests run the Node twilio SDK and twilio-run: they must run, never skip.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "error: node (>= 20) and npm are required for tests/test_twiml_node.py and tests/test_serverless.py" >&2
  exit 1
fi
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || { echo "error: node >= 20 is required (twilio-run 5), found $(node --version)" >&2; exit 1; }
stamp=tests/node/node_modules/.installed
if [ ! -f "$stamp" ] || [ tests/node/package-lock.json -nt "$stamp" ] || [ tests/node/package.json -nt "$stamp" ]; then
  started=$SECONDS
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
  touch "$stamp"
  echo "npm ci: $((SECONDS - started)) s"
fi
echo "== redis-server (the scale-out tests run their own)"
"$root/scripts/ensure_redis.sh" >/dev/null
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
