"""Export a rendered TwiML document as a Twilio Serverless project (``crctl twiml export``).

The project deploys as it is with ``twilio serverless:deploy`` (or ``twilio-run deploy``). Its two
functions answer with exactly the bytes of the document crctl rendered: the XML is embedded as a
JSON-escaped JavaScript string literal and sent as the body of a ``Twilio.Response``, which the
Functions runtime sends as UTF-8 without touching it. For a call (a request with a ``CallSid``)
the ``<ConversationRelay url>`` gets the call's one-time query, ``?callSid=…&token=…``, minted
with Node's crypto exactly as the relay mints it (``relay_server.socket_tokens``) under the
``CRCTL_SOCKET_SECRET`` of the Functions environment, which the relay must share.

Re-exporting is safe: ``.crctl-export.json`` records the sha256 of every file the export wrote.
A file whose content no longer matches its record was changed by the user and is kept (the new
version goes beside it as ``<file>.crctl-new``) unless ``force=True``; files the user never
touched are replaced, missing ones created, and files the export does not write are left alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from twiml_templates.errors import TemplatesError
from twiml_templates.files import write_atomic

#: The record of what the last export wrote: ``{"files": {relative path: sha256}}``.
MANIFEST = ".crctl-export.json"
#: Suffix of the new version of a file the user changed.
NEW_SUFFIX = ".crctl-new"
#: The public function (``/conversation-relay``) and the signed one. Twilio derives a function's
#: path from its file name without ``.protected``, so the two need different names: a
#: ``conversation-relay.protected.js`` would claim ``/conversation-relay`` too, which twilio-run
#: refuses ("Duplicate. Path /conversation-relay already exists").
PUBLIC_FUNCTION = "functions/conversation-relay.js"
PROTECTED_FUNCTION = "functions/conversation-relay-signed.protected.js"
#: The twilio helper library (``conversationRelay()`` since 5.13) and the Functions runtime
#: handler: twilio-run requires an exact version of the latter (npm view @twilio/runtime-handler).
TWILIO_VERSION = "^5.13.0"
RUNTIME_HANDLER_VERSION = "2.1.0"
#: For ``npm start`` (``twilio-run start``) and ``npm run deploy``; not uploaded.
TWILIO_RUN_VERSION = "^5.0.1"
#: What create-twilio-function and twilio-run 5 write (``engines``, ``.twilioserverlessrc``).
NODE_MAJOR = "22"
RUNTIME = f"node{NODE_MAJOR}"

_MAX_SERVICE_NAME = 50
#: Seconds a socket URL minted by the function stays valid (the relay's default lifetime).
SOCKET_TOKEN_LIFETIME = 90
_RELAY_URL = re.compile(r'<ConversationRelay\b[^>]*?\surl="([^"]*)"')


class ExportError(TemplatesError):
    """The export cannot be written (the folder is a file, a target is a folder, …)."""


@dataclass
class ExportResult:
    """What an export did, as paths relative to ``directory`` (POSIX separators)."""

    directory: Path
    #: Created or replaced (including user-changed files overwritten with ``force``).
    written: list[str] = field(default_factory=list)
    #: Already had exactly the new content.
    unchanged: list[str] = field(default_factory=list)
    #: Changed by the user since the last export: left as they are, the new version written
    #: beside them as ``<file>.crctl-new``.
    kept: list[str] = field(default_factory=list)
    #: The subset of ``written`` that had been changed by the user (``force=True``).
    overwritten: list[str] = field(default_factory=list)

    @property
    def new_versions(self) -> list[str]:
        """The ``.crctl-new`` files written for ``kept``."""
        return [path + NEW_SUFFIX for path in self.kept]


def export_serverless(
    xml: str,
    directory: Path,
    *,
    name: str,
    force: bool = False,
    service_name: str | None = None,
) -> ExportResult:
    """Write (or update) the Serverless project in ``directory`` that answers with ``xml``.

    ``name`` is the template's name (shown in the generated files). ``service_name`` is the
    package and Twilio Service name; by default the folder's name, made URL-safe.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory}: exists and is not a folder")
    if service_name is None:
        service_name = _service_name(directory.resolve().name)
    elif _service_name(service_name) != service_name:
        raise ExportError(
            f"service name {service_name!r}: allowed: lowercase letters, digits and '-', "
            f"at most {_MAX_SERVICE_NAME} characters, starting with a letter"
        )
    if _RELAY_URL.search(xml) is None:
        raise ExportError("the TwiML has no <ConversationRelay url=...>: nothing to export")
    files = project_files(xml, name=name, service_name=service_name)
    recorded = _read_manifest(directory)
    result = ExportResult(directory=directory)
    record: dict[str, str] = {}

    for rel in files:  # check every target first: an error leaves the folder untouched
        target = directory / rel
        if target.is_dir() or target.is_symlink():
            raise ExportError(f"{target}: is a folder or a link; move it away and export again")
        for parent in target.relative_to(directory).parents:
            if (directory / parent).exists() and not (directory / parent).is_dir():
                raise ExportError(f"{directory / parent}: exists and is not a folder")

    for rel, content in files.items():
        target = directory / rel
        digest = _sha256(content)
        if not target.exists():
            _write(target, content)
            result.written.append(rel)
            record[rel] = digest
            continue
        current = target.read_bytes()
        untouched = recorded.get(rel) == _sha256(current)
        if current == content:
            result.unchanged.append(rel)
            record[rel] = digest
        elif untouched or force:
            if not untouched:
                result.overwritten.append(rel)
            _write(target, content)
            result.written.append(rel)
            record[rel] = digest
        else:
            # Changed by the user (or not written by crctl): keep it, offer the new version.
            _write(directory / (rel + NEW_SUFFIX), content)
            result.kept.append(rel)
            if rel in recorded:
                record[rel] = recorded[rel]
            continue
        _drop_stale_new_version(directory / (rel + NEW_SUFFIX), content)

    manifest = {
        "generator": "crctl twiml export",
        "template": name,
        "files": dict(sorted(record.items())),
    }
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file() or manifest_path.read_bytes() != manifest_bytes:
        _write(manifest_path, manifest_bytes)
    return result


def project_files(xml: str, *, name: str, service_name: str) -> dict[str, bytes]:
    """The files of the project, by relative path (POSIX), as bytes."""
    return {
        "package.json": _json(
            {
                "name": service_name,
                "version": "0.0.0",
                "private": True,
                "description": f"ConversationRelay TwiML from the crctl template {name}",
                "scripts": {"start": "twilio-run", "deploy": "twilio-run deploy"},
                "dependencies": {
                    "@twilio/runtime-handler": RUNTIME_HANDLER_VERSION,
                    "twilio": TWILIO_VERSION,
                },
                "devDependencies": {"twilio-run": TWILIO_RUN_VERSION},
                "engines": {"node": NODE_MAJOR},
            }
        ),
        ".twilioserverlessrc": _json(
            {"commands": {}, "environments": {}, "projects": {}, "runtime": RUNTIME}
        ),
        PUBLIC_FUNCTION: _function(xml, name=name, protected=False),
        PROTECTED_FUNCTION: _function(xml, name=name, protected=True),
        ".env.example": _ENV_EXAMPLE.encode(),
        ".gitignore": _GITIGNORE.encode(),
        "README.md": _readme(name=name, service_name=service_name).encode(),
    }


def _function(xml: str, *, name: str, protected: bool) -> bytes:
    file = PROTECTED_FUNCTION if protected else PUBLIC_FUNCTION
    path = "/conversation-relay-signed" if protected else "/conversation-relay"
    if protected:
        access = [
            f"// Protected ({path}): Twilio runs it only for requests that carry a valid",
            "// X-Twilio-Signature from your account. Point your phone number here.",
            "// (Locally, `twilio-run start` does not check signatures.)",
        ]
    else:
        access = [
            f"// Public ({path}): anyone with the URL gets this TwiML. For a phone number, prefer",
            f"// {PROTECTED_FUNCTION.removeprefix('functions/')}, for which Twilio checks the "
            "request signature.",
        ]
    match = _RELAY_URL.search(xml)
    assert match is not None  # checked by export_serverless
    cut = match.end(1)  # the end of the url attribute's value
    separator = "&amp;" if "?" in match[1] else "?"
    lines = [
        f"// Generated by `crctl twiml export` from template {_js_string(name, ascii=True)}.",
        "// Re-exporting replaces this file unless you edited it; then the new version is",
        f"// written beside it as {Path(file).name}{NEW_SUFFIX}.",
        *access,
        "'use strict';",
        "",
        "const crypto = require('crypto');",
        "",
        "// The TwiML exactly as crctl rendered it (sent as is, UTF-8), cut at the end of the",
        "// <ConversationRelay url>: a call's socket URL gets its one-time query there.",
        f"const TWIML_HEAD = {_js_string(xml[:cut])};",
        f"const TWIML_TAIL = {_js_string(xml[cut:])};",
        f"const SEPARATOR = {_js_string(separator)};",
        f"const LIFETIME_SECONDS = {SOCKET_TOKEN_LIFETIME};",
        "",
        "// The relay accepts each call's socket URL once, and only with a token minted for the",
        "// call under the secret it shares with this function (CRCTL_SOCKET_SECRET): a captured",
        "// handshake opens nothing. Token: <expires>.<nonce>.<HMAC-SHA256 of",
        '// "<expires>\\n<nonce>\\n<CallSid>", base64url>.',
        "function socketQuery(secret, callSid) {",
        "  const expires = Math.floor(Date.now() / 1000) + LIFETIME_SECONDS;",
        "  const nonce = crypto.randomBytes(12).toString('base64url');",
        "  const mac = crypto",
        "    .createHmac('sha256', secret)",
        "    .update(`${expires}\\n${nonce}\\n${callSid}`)",
        "    .digest('base64url');",
        "  const token = `${expires}.${nonce}.${mac}`;",
        "  return `callSid=${encodeURIComponent(callSid)}&amp;token=${token}`;",
        "}",
        "",
        "exports.handler = function (context, event, callback) {",
        "  const response = new Twilio.Response();",
        "  response.appendHeader('Content-Type', 'text/xml; charset=utf-8');",
        "  const callSid = event.CallSid;",
        "  if (!callSid) {",
        "    // Not a call (a browser, curl): the document as rendered, which opens no socket.",
        "    response.setBody(TWIML_HEAD + TWIML_TAIL);",
        "    return callback(null, response);",
        "  }",
        "  const secret = context.CRCTL_SOCKET_SECRET;",
        "  if (!secret) {",
        "    return callback(",
        "      new Error(",
        "        'CRCTL_SOCKET_SECRET is not set: give the Functions environment ' +",
        "          'the value the relay has (.env before deploying, or the Console)'",
        "      )",
        "    );",
        "  }",
        "  response.setBody(TWIML_HEAD + SEPARATOR + socketQuery(secret, String(callSid)) +"
        " TWIML_TAIL);",
        "  return callback(null, response);",
        "};",
        "",
    ]
    return "\n".join(lines).encode("utf-8")


def _js_string(text: str, *, ascii: bool = False) -> str:
    """A JavaScript string literal for ``text`` (JSON, as ``JSON.stringify`` writes it).

    U+2028/U+2029 are escaped too: they end a line in a ``//`` comment and in pre-2019 engines.
    """
    literal = json.dumps(text, ensure_ascii=ascii)
    return literal.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _service_name(folder: str) -> str:
    """A Twilio Service unique name from a folder name: lowercase, digits and '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
    slug = slug.lstrip("0123456789-")[:_MAX_SERVICE_NAME].rstrip("-")
    return slug or "crctl-twiml"


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _read_manifest(directory: Path) -> dict[str, str]:
    """The recorded hashes; an unreadable manifest counts as none.

    Every differing file is then treated as the user's: nothing is lost.
    """
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, str)}


def _drop_stale_new_version(path: Path, content: bytes) -> None:
    """Remove a ``.crctl-new`` left from an earlier export once the file holds its content.

    It is redundant then (only then; anything else there is left alone).
    """
    if path.is_file() and not path.is_symlink() and path.read_bytes() == content:
        path.unlink()


def _write(path: Path, content: bytes) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    try:
        write_atomic(path, content)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write it: {exc.strerror or exc}") from exc


_ENV_EXAMPLE = """\
# Copy to .env to deploy with `npm run deploy` (twilio-run); `twilio serverless:deploy` uses
# your twilio CLI profile instead. twilio-run takes ACCOUNT_SID and AUTH_TOKEN as the deploy
# credentials and does not upload them; any other non-empty variable here is uploaded to the
# Functions environment (context.NAME). Never commit .env.
ACCOUNT_SID=ACxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
AUTH_TOKEN=your_auth_token
# The key the functions mint each call's one-time socket URL with (context.CRCTL_SOCKET_SECRET):
# the very value the relay has as CRCTL_SOCKET_SECRET, or the relay refuses every socket.
# Make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"
CRCTL_SOCKET_SECRET=your_socket_secret
"""

_GITIGNORE = """\
node_modules/
.env
# written by twilio-run deploy (Service and Environment SIDs of this checkout)
.twiliodeployinfo
"""


def _readme(*, name: str, service_name: str) -> str:
    return f"""\
# {service_name}: ConversationRelay TwiML on Twilio Serverless

Generated by `crctl twiml export` from the template `{name}`. Both functions answer with the
TwiML document crctl rendered, as `text/xml; charset=utf-8`, byte for byte but for the call's
one-time socket URL (below): `<Connect><ConversationRelay url="wss://…">` sends the call to
your relay, wherever it runs.

## Deploy

```bash
twilio serverless:deploy        # twilio CLI with the serverless plugin, your CLI profile
# or, without the CLI: cp .env.example .env (fill in ACCOUNT_SID, AUTH_TOKEN), then
npm install && npm run deploy      # twilio-run deploy
```

The deploy prints the function URLs, e.g. `https://{service_name}-1234-dev.twil.io/…`.
Try it locally first: `npm install && npm start` (twilio-run on http://localhost:3000).

## The socket secret

For a call, the functions add the call's one-time query to the socket URL
(`?callSid=…&token=…`), minted with `CRCTL_SOCKET_SECRET` from the Functions environment; the
relay accepts each URL once, and only with a token made with its own `CRCTL_SOCKET_SECRET`. Set
the same value on both sides: in `.env` before deploying (see `.env.example`; twilio-run
uploads it), or in the Console (Functions → your service → Environment Variables). Without it
the functions answer a call with an error (500), and with another value the relay refuses the
socket (HTTP 403, logged as "bad socket token").

## Point your number at it

Console → Phone Numbers → your number → Voice Configuration → "A call comes in":
Function, service `{service_name}`, path `/conversation-relay-signed` (or Webhook, HTTP POST,
its full URL). The same goes for a TwiML App's Voice Request URL.

## Files

- `{PROTECTED_FUNCTION}`: `/conversation-relay-signed`, **protected**: Twilio runs it
  only for requests signed by your account (`X-Twilio-Signature`). Use this one for calls.
  (`twilio-run start` does not check signatures locally.)
- `{PUBLIC_FUNCTION}`: `/conversation-relay`, public: the same TwiML for anyone with the
  URL (a browser, curl).
- `package.json`: the service name (`{service_name}`), `twilio` and the exact
  `@twilio/runtime-handler` version that Twilio Functions runs.
- `.twilioserverlessrc`: settings of twilio-run and `twilio serverless`: the Node.js runtime
  ({RUNTIME}).
- `.env.example`: the variables a deploy may use; copy it to `.env` (never committed).
- `.gitignore`: `node_modules/`, `.env`, `.twiliodeployinfo`.
- `.crctl-export.json`: what crctl wrote last (sha256 per file), for safe re-exports.

## Changing the TwiML

Change the template and export again (`crctl twiml export {name} --url wss://… --serverless .`).
Files you never edited are replaced. A file you edited is kept as it is: the new version is
written beside it as `<file>{NEW_SUFFIX}` and the export says so; merge it by hand, or
export with `--force` to overwrite your edits.
"""
