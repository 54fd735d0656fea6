"""``crctl twiml export --serverless``: the project's files, served for real, and safe re-exports.

The project is served by the real ``twilio-run start``, its HTTP body compared byte for byte with
the Python rendering.

twilio-run and the Functions runtime handler come from ``tests/node`` (``npm ci``, run by
``scripts/test.sh``); the exported folder gets a ``node_modules`` link to it instead of a second
install. twilio-run has no host option: ``tests/node/loopback.js`` keeps it on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from relay_server.socket_tokens import SocketTokens
from tests.support import AUTH_TOKEN, RelayServer, TwilioCaller, config, free_port
from twiml_templates import load_template, preset_names, render
from twiml_templates.serverless import (
    MANIFEST,
    PROTECTED_FUNCTION,
    PUBLIC_FUNCTION,
    RUNTIME_HANDLER_VERSION,
    TWILIO_RUN_VERSION,
    TWILIO_VERSION,
    ExportError,
    export_serverless,
)

NODE_DIR = Path(__file__).parent / "node"
NODE_MODULES = NODE_DIR / "node_modules"
URL = "wss://relay.example.com/ws"
FILES = {
    "package.json",
    ".twilioserverlessrc",
    PUBLIC_FUNCTION,
    PROTECTED_FUNCTION,
    ".env.example",
    ".gitignore",
    "README.md",
}
#: The relay's CRCTL_SOCKET_SECRET, given to the served functions in their .env.
SOCKET_SECRET = "test-socket-secret-0123456789"
CALL_SID = "CA" + "0" * 32
#: A call's one-time query as the functions put it into the url attribute (XML-escaped).
SOCKET_QUERY = re.compile(r"\?callSid=(CA\w+)&amp;token=([0-9]+\.[\w-]+\.[\w-]+)")
#: Text a JavaScript literal must carry unchanged: quotes, backslashes, template-literal and
#: comment look-alikes, U+2028 (a line end in JS source), non-BMP characters.
TRICKY = 'Hi "there" & <you>, C:\\path\\ ${x} `tick` */ // \u2028 ¡olé! 👋 \\u0041'


def xml_for(name: str, **sets: object) -> str:
    return render(load_template(name), url=URL, sets=sets or None)


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "node_modules" not in p.parts
    }


def js_literal(source: str, name: str) -> str:
    """The value of ``const NAME = "…";`` in a generated function."""
    match = re.search(rf"^const {name} = (.*);$", source, re.M)
    assert match is not None, source
    return str(json.loads(match[1]))


def served_xml(source: str) -> str:
    """The document a generated function serves (when not minting a socket URL)."""
    return js_literal(source, "TWIML_HEAD") + js_literal(source, "TWIML_TAIL")


def socket_query_of(body: bytes) -> tuple[str, str]:
    """The query a function put into the socket URL (unescaped), and the body without it."""
    text = body.decode("utf-8")
    match = SOCKET_QUERY.search(text)
    assert match is not None, text
    query = f"callSid={match[1]}&token={match[2]}"
    return query, (text[: match.start()] + text[match.end() :])


def npm_version(package: str) -> str:
    manifest = NODE_MODULES / package / "package.json"
    assert manifest.is_file(), (
        f"{package} missing: run scripts/test.sh (npm ci --prefix tests/node)"
    )
    return str(json.loads(manifest.read_text())["version"])


# -- the project ----------------------------------------------------------------------------


def test_export_writes_a_deployable_project(tmp_path: Path) -> None:
    xml = xml_for("basic", welcomeGreeting=TRICKY)
    folder = tmp_path / "My Relay TwiML"
    result = export_serverless(xml, folder, name="basic")

    assert sorted(result.written) == sorted(FILES)
    assert result.unchanged == result.kept == result.overwritten == []
    assert set(files_in(folder)) == FILES | {MANIFEST}

    package = json.loads((folder / "package.json").read_text())
    assert package["name"] == "my-relay-twiml"  # the Service name: URL-safe
    assert package["private"] is True
    assert package["dependencies"] == {
        "twilio": TWILIO_VERSION,
        "@twilio/runtime-handler": RUNTIME_HANDLER_VERSION,
    }
    assert package["devDependencies"] == {"twilio-run": TWILIO_RUN_VERSION}
    # twilio-run refuses a runtime handler version that is not exact
    assert re.fullmatch(r"\d+\.\d+\.\d+", package["dependencies"]["@twilio/runtime-handler"])
    assert package["engines"]["node"] in ("20", "22")
    rc = json.loads((folder / ".twilioserverlessrc").read_text())
    assert rc["runtime"] == f"node{package['engines']['node']}"
    assert {"commands", "environments", "projects"} <= set(rc)

    for rel in (PUBLIC_FUNCTION, PROTECTED_FUNCTION):
        source = (folder / rel).read_text(encoding="utf-8")
        assert source.startswith('// Generated by `crctl twiml export` from template "basic".')
        assert "re-export" in source.lower()
        assert served_xml(source) == xml  # the rendered document, cut at the socket URL's end
        assert js_literal(source, "TWIML_HEAD").endswith(f'url="{URL}')
        assert "\u2028" not in source  # escaped: a line end in JS source
        assert "response.setBody(TWIML_HEAD + TWIML_TAIL);" in source
        assert "context.CRCTL_SOCKET_SECRET" in source
        assert "callback(null, response);" in source
    assert PROTECTED_FUNCTION.endswith(".protected.js")
    # Twilio drops ".protected" from the path: the two must not claim the same one
    assert Path(PUBLIC_FUNCTION).stem != Path(PROTECTED_FUNCTION).stem.removesuffix(".protected")

    env = (folder / ".env.example").read_text()
    assert re.search(r"^ACCOUNT_SID=AC", env, re.M) and re.search(r"^AUTH_TOKEN=", env, re.M)
    assert re.search(r"^CRCTL_SOCKET_SECRET=\S", env, re.M)
    ignored = (folder / ".gitignore").read_text().splitlines()
    assert {"node_modules/", ".env"} <= set(ignored)
    readme = (folder / "README.md").read_text()
    assert "twilio serverless:deploy" in readme
    assert "/conversation-relay-signed" in readme and PUBLIC_FUNCTION in readme

    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["template"] == "basic"
    assert manifest["files"] == {
        rel: hashlib.sha256(content).hexdigest()
        for rel, content in files_in(folder).items()
        if rel != MANIFEST
    }


def test_export_pins_what_the_tests_run(tmp_path: Path) -> None:
    """The exported package.json names the versions tests/node installs (and serves with)."""
    export_serverless(xml_for("basic"), tmp_path, name="basic")
    package = json.loads((tmp_path / "package.json").read_text())
    tools = json.loads((NODE_DIR / "package.json").read_text())["devDependencies"]
    assert package["dependencies"]["@twilio/runtime-handler"] == npm_version(
        "@twilio/runtime-handler"
    )
    assert tools["twilio"] == package["dependencies"]["twilio"] == "^5.13.0"
    assert tools["twilio-run"] == package["devDependencies"]["twilio-run"]
    major, minor, _ = (int(x) for x in npm_version("twilio").split("."))
    assert major == 5 and minor >= 13


# -- served by twilio-run --------------------------------------------------------------------


@dataclass
class Served:
    folder: Path
    base: str
    log: Path

    def get(self, path: str, *, data: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.base + path, data=body)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``twilio-run start`` on a free loopback port, serving an exported project."""
    folder = tmp_path_factory.mktemp("served") / "relay-twiml"
    export_serverless(xml_for("basic"), folder, name="basic")
    (folder / "node_modules").symlink_to(NODE_MODULES.resolve(), target_is_directory=True)
    (folder / "assets").mkdir()
    (folder / "assets" / "secret.private.txt").write_text("private")
    (folder / ".env").write_text(f"CRCTL_SOCKET_SECRET={SOCKET_SECRET}\n")
    node = shutil.which("node")
    assert node, "node is required for this test (scripts/test.sh checks for it)"
    npm_version("twilio-run")
    port = free_port()
    log = folder.parent / "twilio-run.log"
    preload = f"--require {(NODE_DIR / 'loopback.js').resolve()}"
    env = {**os.environ, "NODE_OPTIONS": f"{os.environ.get('NODE_OPTIONS', '')} {preload}"}
    env.pop("FORCE_COLOR", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                node,
                str(NODE_MODULES / "twilio-run" / "bin" / "twilio-run.js"),
                "start",
                "--cwd",
                str(folder),
                "--port",
                str(port),
                "--log-level",
                "debug",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the function forks die with it
        )
    server = Served(folder, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"twilio-run exited:\n{log.read_text()}"
            try:
                if server.get("/conversation-relay")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"twilio-run did not answer:\n{log.read_text()}"
            time.sleep(0.1)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop twilio-run and whatever is left of its process group (forked function runners)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=5)


def test_twilio_run_uses_the_exported_runtime_handler(served: Served) -> None:
    """Not twilio-run's built-in fallback: the @twilio/runtime-handler the package pins."""
    log = served.log.read_text(errors="replace")
    assert f"@twilio/runtime-handler version: {RUNTIME_HANDLER_VERSION}" in log
    assert "http://localhost:" in log and "/conversation-relay-signed" in log


@pytest.mark.parametrize("name", [*preset_names(), "tricky-text"])
def test_served_body_is_the_python_rendering_byte_for_byte(served: Served, name: str) -> None:
    """Each template exported over the same served folder answers exactly the rendered bytes.

    twilio-run reloads functions on every request; GET and a Twilio-style form POST both answer
    exactly the rendered bytes.
    """
    xml = xml_for("multilingual", welcomeGreeting=TRICKY) if name == "tricky-text" else None
    xml = xml or xml_for(name)
    result = export_serverless(xml, served.folder, name=name)
    assert result.kept == []
    expected = xml.encode("utf-8")
    webhook = {"CallSid": CALL_SID, "From": "+15550100001", "To": "+15550100002"}
    tokens = SocketTokens(SOCKET_SECRET.encode())
    for path in ("/conversation-relay", "/conversation-relay-signed"):
        status, content_type, body = served.get(path)
        assert (status, content_type) == (200, "text/xml; charset=utf-8")
        assert body == expected  # not a call: no socket URL of its own
        # a call: the same bytes but for the call's one-time query in the socket URL
        status, content_type, body = served.get(path, data=webhook)
        assert (status, content_type) == (200, "text/xml; charset=utf-8"), body
        query, rest = socket_query_of(body)
        assert rest == xml
        assert tokens.check(query).call_sid == CALL_SID  # minted as the relay mints it


def test_protected_function_is_not_checked_locally(served: Served) -> None:
    """twilio-run start does not enforce X-Twilio-Signature on .protected functions.

    Only Twilio does, once deployed: unsigned and wrongly signed requests get the TwiML locally. The
    README and the function's comment say so. A private asset, by contrast, is refused.
    """
    export_serverless(xml_for("basic"), served.folder, name="basic")
    expected = xml_for("basic").encode()
    assert served.get("/conversation-relay-signed") == (200, "text/xml; charset=utf-8", expected)
    signed_wrong = urllib.request.Request(
        served.base + "/conversation-relay-signed",
        data=b"CallSid=CA1",
        headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
    )
    with urllib.request.urlopen(signed_wrong, timeout=10) as response:
        assert response.status == 200
        assert socket_query_of(response.read())[1] == expected.decode()
    assert served.get("/secret.txt")[0] == 403


def test_user_edit_is_served_and_kept_on_re_export(served: Served) -> None:
    export_serverless(xml_for("basic"), served.folder, name="basic")
    function = served.folder / PUBLIC_FUNCTION
    edited = function.read_text().replace(
        "response.setBody(TWIML_HEAD + TWIML_TAIL);", "response.setBody('<R/>');"
    )
    function.write_text(edited)
    result = export_serverless(xml_for("handoff"), served.folder, name="handoff")
    assert result.kept == [PUBLIC_FUNCTION]
    # the user's version is served, and the .crctl-new beside it is not a function
    assert served.get("/conversation-relay")[2] == b"<R/>"
    assert served.get("/conversation-relay-signed")[2] == xml_for("handoff").encode()
    assert served.get("/conversation-relay.js.crctl-new")[0] == 404
    export_serverless(xml_for("basic"), served.folder, name="basic", force=True)
    assert served.get("/conversation-relay")[2] == xml_for("basic").encode()


def test_a_socket_url_with_a_query_gets_the_calls_query_after_an_escaped_ampersand(
    served: Served,
) -> None:
    xml = render(load_template("basic"), url=URL + "?shop=7")
    assert 'url="wss://relay.example.com/ws?shop=7"' in xml
    export_serverless(xml, served.folder, name="basic")
    body = served.get("/conversation-relay", data={"CallSid": CALL_SID})[2].decode()
    assert f'url="{URL}?shop=7&amp;callSid={CALL_SID}&amp;token=' in body
    relay_el = ET.fromstring(body).find("Connect/ConversationRelay")
    assert relay_el is not None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(relay_el.attrib["url"]).query)
    assert query["shop"] == ["7"] and query["callSid"] == [CALL_SID]


async def test_the_relay_accepts_a_socket_url_minted_by_the_function_once(
    served: Served,
) -> None:
    """A call's TwiML from the exported function opens the relay's socket (same secret), once.

    A relay with another secret refuses it.
    """
    export_serverless(xml_for("basic"), served.folder, name="basic")
    public = "https://relay.example.com"  # the relay the exported URL names
    settings = {"public_url": public, "agent": "echo", "socket_secret": SOCKET_SECRET}
    call = {"CallSid": CALL_SID}
    query = socket_query_of(served.get("/conversation-relay-signed", data=call)[2])[0]
    with RelayServer(config(**settings)) as relay:
        caller = await TwilioCaller(relay, call_sid=CALL_SID, public_url=public).connect(
            query=query
        )
        await caller.prompt("hello")
        assert await caller.reply_text() == "You said: hello"
        await caller.hangup()
        replay = TwilioCaller(relay, call_sid=CALL_SID, public_url=public)
        with pytest.raises(InvalidStatus) as refused:
            await replay.connect(query=query)
        assert refused.value.response.status_code == 403
    other = {**settings, "socket_secret": "another-secret"}
    fresh = socket_query_of(served.get("/conversation-relay", data=call)[2])[0]
    with RelayServer(config(**other)) as relay:
        with pytest.raises(InvalidStatus) as refused:
            await TwilioCaller(relay, call_sid=CALL_SID, public_url=public).connect(query=fresh)
        assert refused.value.response.status_code == 403
    assert AUTH_TOKEN  # the relays check signatures with the test auth token, as Twilio signs


# -- re-exporting ----------------------------------------------------------------------------


def test_re_export_of_the_same_document_rewrites_nothing(tmp_path: Path) -> None:
    xml = xml_for("multilingual")
    export_serverless(xml, tmp_path, name="multilingual")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    time.sleep(0.01)
    result = export_serverless(xml, tmp_path, name="multilingual")
    assert result.written == result.kept == []
    assert sorted(result.unchanged) == sorted(FILES)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_re_export_replaces_untouched_files_and_keeps_edited_ones(tmp_path: Path) -> None:
    export_serverless(xml_for("basic"), tmp_path, name="basic")
    function = tmp_path / PUBLIC_FUNCTION
    mine = function.read_text().replace("'use strict';", "'use strict';\n// my change")
    function.write_text(mine)
    (tmp_path / "functions" / "extra.js").write_text("// mine\n")
    (tmp_path / ".env").write_text("AUTH_TOKEN=secret\n")

    new_xml = xml_for("low-latency")
    result = export_serverless(new_xml, tmp_path, name="low-latency")
    assert result.kept == [PUBLIC_FUNCTION]
    assert result.new_versions == [PUBLIC_FUNCTION + ".crctl-new"]
    # the other function, README and package.json changed with the template: replaced
    assert {PROTECTED_FUNCTION, "README.md", "package.json"} <= set(result.written)
    assert function.read_text() == mine
    new_version = (tmp_path / (PUBLIC_FUNCTION + ".crctl-new")).read_text()
    assert served_xml(new_version) == new_xml and "low-latency" in new_version
    assert served_xml((tmp_path / PROTECTED_FUNCTION).read_text()) == new_xml
    assert (tmp_path / "functions" / "extra.js").read_text() == "// mine\n"
    assert (tmp_path / ".env").read_text() == "AUTH_TOKEN=secret\n"

    # still the user's on the next export; the manifest does not adopt their file
    again = export_serverless(xml_for("dtmf-menu"), tmp_path, name="dtmf-menu")
    assert again.kept == [PUBLIC_FUNCTION]
    assert function.read_text() == mine
    assert "dtmf-menu" in (tmp_path / (PUBLIC_FUNCTION + ".crctl-new")).read_text()

    forced = export_serverless(xml_for("dtmf-menu"), tmp_path, name="dtmf-menu", force=True)
    assert forced.kept == []
    assert forced.overwritten == [PUBLIC_FUNCTION] and PUBLIC_FUNCTION in forced.written
    assert served_xml(function.read_text()) == xml_for("dtmf-menu")
    assert not (tmp_path / (PUBLIC_FUNCTION + ".crctl-new")).exists()  # now redundant
    assert (tmp_path / "functions" / "extra.js").read_text() == "// mine\n"
    assert (tmp_path / ".env").read_text() == "AUTH_TOKEN=secret\n"

    # after force the file is crctl's again: the next export replaces it without asking
    later = export_serverless(xml_for("basic"), tmp_path, name="basic")
    assert later.kept == [] and PUBLIC_FUNCTION in later.written


def test_re_export_recreates_deleted_files(tmp_path: Path) -> None:
    export_serverless(xml_for("basic"), tmp_path, name="basic")
    original = (tmp_path / "README.md").read_bytes()
    (tmp_path / "README.md").unlink()
    result = export_serverless(xml_for("basic"), tmp_path, name="basic")
    assert result.written == ["README.md"]
    assert (tmp_path / "README.md").read_bytes() == original


@pytest.mark.parametrize("manifest", [None, "{not json", '{"files": []}'])
def test_files_crctl_did_not_record_are_never_overwritten(
    tmp_path: Path, manifest: str | None
) -> None:
    """A differing file counts as the user's in an existing project or with no sound manifest.

    An existing project is, say, one with create-twilio-function's package.json; a manifest may be
    lost or broken.
    """
    export_serverless(xml_for("basic"), tmp_path, name="basic")
    (tmp_path / "package.json").write_text('{"name": "theirs"}\n')
    if manifest is None:
        (tmp_path / MANIFEST).unlink()
    else:
        (tmp_path / MANIFEST).write_text(manifest)
    function = (tmp_path / PUBLIC_FUNCTION).read_bytes()
    result = export_serverless(xml_for("handoff"), tmp_path, name="handoff")
    # everything that differs is kept (the functions hold other TwiML, README another name);
    # identical files are simply adopted
    differing = {"package.json", PUBLIC_FUNCTION, PROTECTED_FUNCTION, "README.md"}
    assert set(result.kept) == differing
    assert set(result.unchanged) == FILES - differing
    assert result.written == []
    assert (tmp_path / "package.json").read_text() == '{"name": "theirs"}\n'
    assert (tmp_path / PUBLIC_FUNCTION).read_bytes() == function
    assert json.loads((tmp_path / "package.json.crctl-new").read_text())["dependencies"]
    recorded = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert set(recorded) == FILES - differing


def test_export_refuses_a_file_as_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_serverless(xml_for("basic"), target, name="basic")
    (tmp_path / "dir" / "README.md").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"README\.md"):
        export_serverless(xml_for("basic"), tmp_path / "dir", name="basic")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "functions").write_text("a file")
    with pytest.raises(ExportError, match="functions: exists and is not a folder"):
        export_serverless(xml_for("basic"), tmp_path / "other", name="basic")
    # nothing was written before the error
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["README.md"]
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["functions"]
