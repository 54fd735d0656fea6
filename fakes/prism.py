"""Twilio's OpenAPI contract, served by Stoplight Prism, as a check on recorded requests.

:class:`Prism` runs ``tests/node/node_modules/.bin/prism mock`` (npm ``@stoplight/prism-cli``
5, installed by ``scripts/test.sh`` from tests/node/package-lock.json) on a free port of
127.0.0.1 against a patched copy of Twilio's OpenAPI contract ``twilio_api_v2010.json`` (the
twilio-oai documents shipped in the npm package ``@twilio-alpha/mcp``, locked in the same file).
:meth:`Prism.validate` replays requests recorded by :class:`~fakes.fake_twilio.FakeTwilio`
(same method, path, query string, body, Content-Type and Authorization) and returns every
contract violation as ``"POST /2010-04-01/.../IncomingPhoneNumbers/PN....json: <reason>"``.

Prism quirks met, and what is done about each (see :func:`patch_spec` and :meth:`Prism.check`):

- Form arrays (``StatusCallbackEvent`` on Calls...) are rejected as "must be array" unless the
  spec carries ``encoding: {style: form, explode: true}`` for them: patched in, for every
  array property of every form body. (With an encoding, Prism also rejects unescaped reserved
  characters in the raw value; the SDK percent-encodes them.)
- Unknown form parameters pass: Prism decodes a form body into the schema's own properties
  before validating it, dropping any other parameter (so ``additionalProperties: false`` does
  not help). Twilio ignores unknown parameters too, so a typo such as ``VoiceURL`` would be
  silently lost: form parameter names are checked here, case-sensitively, against the
  operation's body schema.
- Prism matches query parameter names case-insensitively (it reports ``pagesize``, not
  ``PageSize``) and lets unknown ones through: query names are checked here the same way.
- ``VoiceApplicationSid=""`` (how Twilio detaches an application from a number) is rejected by
  the spec's ``^AP...`` pattern although Twilio accepts it: exactly that violation is ignored,
  in :func:`_false_positive`, the one place that knows about it.
- Prism ignores formats it does not know (``phone-number``, ``iso-country-code``...: any string
  passes) but does check ``uri``: an empty URL (``VoiceUrl=""``, ``StatusCallback=""``, how one
  would clear it) IS reported; Twilio's spec does not document "" for those, so it stays a
  violation: send only the fields that must change.
- Prism names parameters in lower case in its messages (``path parameter sid``, ``query
  parameter pagesize``); messages are passed on as Prism wrote them, plus the value sent.
- Prism also checks its own canned responses against the spec and logs the (many) mismatches
  of Twilio's examples; without ``--errors`` they do not change the answer, and are ignored.
- A list call without ``limit`` pages forever against Prism's canned example (its
  ``next_page_uri`` is not null): irrelevant here, requests are replayed one by one and the
  answer's body is not followed.
- Prism checks only that a Basic ``Authorization`` header is present (401 otherwise), not the
  credentials: a request the fake refused for bad credentials is still a valid request.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

from fakes.fake_twilio import RecordedRequest

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / "tests" / "node" / "node_modules"
#: The contract, as scripts/test.sh installed it from tests/node/package-lock.json.
SPEC = (
    NODE_MODULES
    / "@twilio-alpha"
    / "mcp"
    / "twilio-oai"
    / "spec"
    / "json"
    / "twilio_api_v2010.json"
)

#: Voice Insights' contract (insights.twilio.com), from the same package: ``Prism(INSIGHTS_SPEC)``.
INSIGHTS_SPEC = SPEC.with_name("twilio_insights_v1.json")

PRISM_BIN = NODE_MODULES / ".bin" / "prism"
FORM = "application/x-www-form-urlencoded"
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def patch_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` patched for Prism (see the module docstring)."""
    spec = copy.deepcopy(spec)
    for item in spec.get("paths", {}).values():
        for method in _METHODS:
            content = item.get(method, {}).get("requestBody", {}).get("content", {})
            media = content.get(FORM)
            if media is None:
                continue
            schema = media.get("schema", {})
            if "$ref" in schema or schema.get("type", "object") != "object":
                continue
            encoding = media.setdefault("encoding", {})
            for name, prop in schema.get("properties", {}).items():
                if prop.get("type") == "array":
                    encoding.setdefault(name, {"style": "form", "explode": True})
    return spec


def _false_positive(item: dict[str, Any], rec: RecordedRequest) -> bool:
    """Violations Prism reports although Twilio accepts the request.

    Two, both an empty value that clears a setting on a number: ``VoiceApplicationSid=""``
    detaches the application (Twilio's documented way; the spec's ``^AP[0-9a-fA-F]{32}$``
    pattern and minLength 34 reject it), and ``VoiceUrl=""`` removes the voice webhook (how a
    number that had none gets it back after crctl pointed it somewhere; the spec's
    ``format: uri`` rejects it). Every other field, and any non-empty bad value, stays strict.
    """
    cleared = ("VoiceApplicationSid", "VoiceUrl")
    location = item.get("location") or []
    return (
        len(location) == 2
        and location[0] == "body"
        and location[1] in cleared
        and rec.form.get(location[1]) == ""
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prism:
    """``prism mock`` of a Twilio API on 127.0.0.1, as a subprocess.

    The 2010-04-01 API by default; ``Prism(INSIGHTS_SPEC)`` serves Voice Insights v1.
    """

    def __init__(
        self,
        spec: Path = SPEC,
        *,
        binary: Path = PRISM_BIN,
        startup_timeout: float = 30.0,
    ) -> None:
        self.spec_path = spec
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port = 0
        self.base_url = ""
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> Self:
        """Patch the spec into a temp dir, start Prism, return once it answers."""
        if self._proc is not None:
            raise RuntimeError("Prism already started")
        if not self.binary.exists():
            raise RuntimeError(
                f"{self.binary} not found: run `npm ci --prefix tests/node` (scripts/test.sh does)"
            )
        if not self.spec_path.exists():
            raise RuntimeError(
                f"Twilio OpenAPI spec not found at {self.spec_path}: run "
                "`npm ci --prefix tests/node` (scripts/test.sh does)"
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="crctl-prism-"))
        patched = self._tmp / self.spec_path.name
        patched.write_text(json.dumps(patch_spec(self.spec)))
        self.log_path = self._tmp / "prism.log"
        try:
            for _attempt in range(3):  # the free port may be taken before Prism binds it
                self.port = _free_port()
                if self._launch(patched):
                    self.base_url = f"http://127.0.0.1:{self.port}"
                    return self
            raise RuntimeError(f"Prism did not start; log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, patched: Path) -> bool:
        assert self.log_path is not None
        cmd = [str(self.binary), "mock", "-h", "127.0.0.1", "-p", str(self.port), str(patched)]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            with contextlib.suppress(OSError):
                self._request("GET", "/", timeout=1)
                return True
            time.sleep(0.05)
        self._kill()
        raise RuntimeError(f"Prism did not answer in {self.startup_timeout} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Kill Prism's process group; remove the temp dir."""
        self._kill()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                return

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- the contract ---------------------------------------------------------------
    @cached_property
    def spec(self) -> dict[str, Any]:
        """The unpatched spec."""
        spec: dict[str, Any] = json.loads(self.spec_path.read_text())
        return spec

    @cached_property
    def _operations(self) -> list[tuple[re.Pattern[str], dict[str, Any]]]:
        """(path regex, path item), concrete paths before templated ones (as Prism does)."""
        ops = []
        for template, item in self.spec["paths"].items():
            parts = re.split(r"(\{[^}]+\})", template)
            regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
            ops.append((template.count("{"), re.compile(regex), item))
        ops.sort(key=lambda op: op[0])
        return [(regex, item) for _, regex, item in ops]

    def declared_names(self, method: str, path: str) -> tuple[set[str], set[str]] | None:
        """The parameter names the contract declares for this operation.

        A pair (query parameter names, form body parameter names); None for an unknown
        operation (left to Prism to report).
        """
        for regex, item in self._operations:
            if regex.fullmatch(path):
                op = item.get(method.lower())
                if op is None:
                    return None
                params = [*item.get("parameters", []), *op.get("parameters", [])]
                query = {p["name"] for p in params if p.get("in") == "query"}
                content = op.get("requestBody", {}).get("content", {})
                form = set(content.get(FORM, {}).get("schema", {}).get("properties", {}))
                return query, form
        return None

    def _unknown_names(self, rec: RecordedRequest) -> list[str]:
        """Query and form parameters the contract does not declare.

        Case-sensitive: Prism matches query names case-insensitively and drops unknown form
        parameters.
        """
        declared = self.declared_names(rec.method, rec.path)
        if declared is None:
            return []
        query, form = declared
        problems = [
            f"query parameter {name!r} is not in the contract"
            for name in rec.query
            if name not in query
        ]
        problems += [
            f"form parameter {name!r} is not in the contract"
            for name in rec.form
            if name not in form
        ]
        return problems

    def _request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def check(self, rec: RecordedRequest) -> list[str]:
        """The contract violations of one request (empty: Prism accepts it)."""
        where = f"{rec.method} {rec.path}"
        problems = [f"{where}: {problem}" for problem in self._unknown_names(rec)]
        headers = {"Accept": "application/json"}
        for key, value in rec.headers.items():
            if key.lower() in ("authorization", "content-type"):
                headers[key] = value
        target = quote(rec.path, safe="/:@!$&'()*+,;=-._~") + (
            f"?{rec.raw_query}" if rec.raw_query else ""
        )
        if self._proc is None:
            raise RuntimeError("Prism is not running")
        status, raw = self._request(rec.method, target, rec.body or None, headers)
        if status < 400:
            return problems
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        items = answer.get("validation") if isinstance(answer, dict) else None
        if status == 422 and isinstance(items, list):
            for item in items:
                if _false_positive(item, rec):
                    continue
                problems.append(f"{where}: {self._describe(item, rec)}")
        else:
            reason = ""
            if isinstance(answer, dict):
                reason = " - ".join(str(answer[k]) for k in ("title", "detail") if k in answer)
            problems.append(f"{where}: HTTP {status} {reason or repr(raw[:200])}")
        return problems

    @staticmethod
    def _describe(item: dict[str, Any], rec: RecordedRequest) -> str:
        message = str(item.get("message") or item)
        location = item.get("location") or []
        if len(location) == 2 and location[0] == "body" and location[1] in rec.form:
            message += f" (sent {rec.form[location[1]]!r})"
        elif len(location) == 2 and location[0] == "query":
            sent = {k.lower(): v for k, v in rec.query.items()}.get(str(location[1]).lower())
            if sent is not None:
                message += f" (sent {sent!r})"
        return message

    def validate(self, requests: Iterable[RecordedRequest]) -> list[str]:
        """Every contract violation of ``requests``, in order (empty: all conform)."""
        return [problem for rec in requests for problem in self.check(rec)]
