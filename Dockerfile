# crctl's relay (`crctl serve`) in a container: the locked dependencies (uv.lock), a non-root
# user, listening on 0.0.0.0:8080. compose.yaml runs two of these behind haproxy with Redis.
#
#   docker build -t crctl .
#   docker run -p 8080:8080 -e TWILIO_AUTH_TOKEN=... -e CRCTL_PUBLIC_URL=https://relay.example.com \
#       -e OPENAI_API_KEY=sk-... crctl
#
# The relay refuses to listen on an open address (0.0.0.0) without TWILIO_AUTH_TOKEN: every
# webhook and socket upgrade must then carry a valid X-Twilio-Signature.
FROM python:3.11-slim-bookworm

# uv pinned as scripts/_venv.sh pins it, from PyPI; it installs exactly uv.lock.
ARG UV_VERSION=0.13.9
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_PROGRESS=1 \
    UV_PROJECT_ENVIRONMENT=/opt/crctl/venv
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/crctl/src
# The dependencies first (their layer is reused until uv.lock changes), then crctl itself,
# installed into the venv (not editable): the source folder is not needed at run time.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY README.md ./
COPY crctl ./crctl
COPY relay_server ./relay_server
COPY twiml_templates ./twiml_templates
RUN uv sync --frozen --no-dev --no-editable \
    && rm -rf /root/.cache

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/crctl crctl
USER crctl
# The working folder is the app dir (--agent/--tools modules are imported from it; mount
# yours here) and holds no .env; call events (SQLite) go to the state folder.
WORKDIR /home/crctl
ENV PATH=/opt/crctl/venv/bin:$PATH \
    CRCTL_STATE_DIR=/home/crctl/.crctl

EXPOSE 8080
# /healthz answers 200 while the process serves (also while it drains live calls); the load
# balancer routes new calls by /readyz instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM (docker stop's signal) starts the relay's graceful stop.
STOPSIGNAL SIGTERM
CMD ["crctl", "serve", "--host", "0.0.0.0", "--port", "8080"]
