"""``crctl call`` on a terminal: the prompt_toolkit prompt in a real pseudo-terminal.

Its output is played through a small VT100 screen, so the test sees what the user sees: replies
streaming above the input line, the line being typed intact, history across lines.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

from fakes.fake_llm import Script
from tests.events_support import REPO, subprocess_env
from tests.support import AUTH_TOKEN, PUBLIC_URL, Pty

COLUMNS, ROWS = 100, 30
_CSI = re.compile(r"\x1b\[([?>]?)([0-9;]*)([A-Za-z@])|\x1b[=>]|\x1b\][^\x07]*\x07")


class Screen:
    """Enough of a VT100 for prompt_toolkit and rich: cursor moves, erases, autowrap.

    Colours and modes are ignored. Rows are kept without limit, so nothing scrolls away.
    """

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.row = self.col = 0
        self.autowrap = True

    def _line(self) -> list[str]:
        while len(self.rows) <= self.row:
            self.rows.append([])
        line = self.rows[self.row]
        if len(line) < self.col:
            line.extend(" " * (self.col - len(line)))
        return line

    def _put(self, char: str) -> None:
        if self.col >= self.columns:
            if not self.autowrap:
                self.col = self.columns - 1
            else:
                self.row, self.col = self.row + 1, 0
        line = self._line()
        if self.col < len(line):
            line[self.col] = char
        else:
            line.append(char)
        self.col += 1

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            match = _CSI.match(text, i) if text[i] == "\x1b" else None
            if match:
                self._csi(match)
                i = match.end()
                continue
            char = text[i]
            i += 1
            if char == "\r":
                self.col = 0
            elif char == "\n":
                self.row += 1
            elif char == "\b":
                self.col = max(0, self.col - 1)
            elif char >= " ":
                self._put(char)

    def _csi(self, match: re.Match[str]) -> None:
        private, params, final = match.group(1), match.group(2), match.group(3)
        if match.group(0)[1] != "[":
            return
        n = int(params.split(";")[0]) if params.split(";")[0] else 0
        if private == "?":
            if params == "7":
                self.autowrap = final == "h"
            return
        if final == "A":
            self.row = max(0, self.row - max(n, 1))
        elif final == "B":
            self.row += max(n, 1)
        elif final == "C":
            self.col = min(self.columns - 1, self.col + max(n, 1))
        elif final == "D":
            self.col = max(0, self.col - max(n, 1))
        elif final == "G":
            self.col = max(n, 1) - 1
        elif final == "K":
            line = self._line()
            if n == 0:
                del line[self.col :]
            elif n == 1:
                line[: self.col] = " " * self.col
            else:
                line.clear()
        elif final == "J" and n == 0:
            del self._line()[self.col :]
            del self.rows[self.row + 1 :]

    def lines(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.rows]

    def text(self) -> str:
        return "\n".join(self.lines()).rstrip("\n")

    def cursor_line(self) -> str:
        return self.lines()[self.row] if self.row < len(self.rows) else ""


class Terminal(Pty):
    """``crctl call`` on a pseudo-terminal of COLUMNS x ROWS; what it prints feeds a Screen."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.screen = Screen(COLUMNS)
        super().__init__(args, env, REPO, (ROWS, COLUMNS))

    def received(self, text: str) -> None:
        self.screen.feed(text)

    def snapshot(self) -> tuple[list[str], int, str]:
        """(screen lines, cursor row, the cursor's line)."""
        with self.lock:
            return self.screen.lines(), self.screen.row, self.screen.cursor_line()

    # The timeout turns a hang into a failure that shows the screen (ASYNC109).
    async def until(self, check, what: str, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while True:
            lines, row, current = self.snapshot()
            if check(lines, row, current):
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.raw}"
            assert time.monotonic() < deadline, f"{what}; the screen:\n" + "\n".join(lines)
            await asyncio.sleep(0.02)


def prompt_is(text: str):  # type: ignore[no-untyped-def]
    """The cursor is on the prompt line, which holds exactly ``you> text``."""
    return lambda lines, row, current: current == f"you> {text}".rstrip()


async def test_the_prompt_keeps_the_typed_line_while_a_reply_streams_above_it(
    relay, fake_llm, tmp_path: Path
) -> None:
    story = ["Once", " upon", " a", " time", " a", " fox", " found", " a", " very", " big"]
    story += [" red", " apple", " and", " shared", " it."]
    fake_llm.enqueue(Script(tokens=story, delay=0.12), Script(tokens=["Sure", "."]))
    state = tmp_path / "state"
    env = subprocess_env(state, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    env.pop("NO_COLOR", None)
    args = [sys.executable, "-m", "crctl", "call", relay.base_url]
    term = Terminal(
        [*args, "--auth-token", AUTH_TOKEN, "--public-url", PUBLIC_URL, "--time-scale", "0"], env
    )
    try:
        await term.until(prompt_is(""), "no empty prompt")
        lines, row, _ = term.snapshot()
        assert "agent: Hello! How can I help you today? (welcome greeting)" in lines[:row]

        term.type("tell me a story\r")
        # the reply streams on a line of its own, right above the prompt
        await term.until(
            lambda lines, row, current: (
                lines[row - 1].startswith("agent: Once upon") and current == "you>"
            ),
            "the streaming reply is not above the prompt",
        )
        term.type("and then")  # typed while the agent talks: stays on the prompt line
        await term.until(prompt_is("and then"), "what was typed is not on the prompt line")
        # One wait for both: the screen is read between the reply's last line and the prompt's
        # redraw otherwise (a fresh clone's run caught the prompt line still empty there).
        await term.until(
            lambda lines, row, current: (
                current == "you> and then"
                and any(
                    re.fullmatch(
                        r"agent: Once upon a time a fox found a very big red apple and shared it\."
                        r"  first token \d+ ms",
                        line,
                    )
                    for line in lines[:row]
                )
            ),
            "the finished reply with its first token time was not printed above the prompt "
            "kept with what was typed",
        )
        lines, row, current = term.snapshot()
        assert current == "you> and then"
        assert row == len(lines) - 1  # the prompt is the last line
        assert sum("and then" in line for line in lines) == 1  # never drawn into the output
        assert lines[row - 1].startswith("agent: Once upon")  # the live line is gone
        assert "you> tell me a story" in lines  # the sent line stays where it was typed

        term.type("\x15")  # ^U clears the line
        await term.until(prompt_is(""), "^U did not clear the line")
        term.type("\x1b[A")  # ↑: history
        await term.until(prompt_is("tell me a story"), "↑ did not bring back the last line")
        term.type("\x15/dtmf 5\r")
        await term.until(
            lambda lines, row, current: (
                any(
                    "You said: [The caller pressed 5 on the keypad]" in line for line in lines[:row]
                )
                or any(line.startswith("agent: Sure.") for line in lines[:row])
            ),
            "no answer to the key press",
        )
        term.type("/hangup\r")
        assert await asyncio.to_thread(term.proc.wait, 10) == 0
        await asyncio.sleep(0.2)  # the last output read
        text = term.screen.text()
        assert 'call over: the caller hung up (close 1000 "Closing websocket session")' in text
        assert "Traceback" not in term.raw
    finally:
        term.close()
    history = (state / "call-history").read_text()
    assert "+tell me a story" in history and "+/dtmf 5" in history
    events = [e.kind for e in list(relay.events)]
    assert "dtmf" in events and "session.end" in events
