"""Template files: TOML for ConversationRelay attributes, languages, parameters and action.

They set ``<ConversationRelay>`` attributes, ``<Language>`` entries, ``<Parameter>``s and the
``<Connect action method>``, validated with :mod:`schema`.

A template may ``extends = "basic"`` (a preset or another file, relative to it): its tables are
merged over the parent's (``relay``, ``connect``, ``parameters`` key by key; ``language``, when
given, replaces the parent's list). A key set to ``""`` removes an inherited value.

Shape::

    description = "What this template is for"
    extends = "basic"          # optional

    [connect]                  # optional
    action = "/action"         # absolute https URL, or a path on the relay's host
    method = "POST"

    [relay]                    # <ConversationRelay> attributes, camelCase
    welcomeGreeting = "Hi!"
    interruptible = "any"

    [[language]]               # <Language> entries
    code = "es-MX"
    ttsProvider = "Google"

    [parameters]               # <Parameter name value>
    customerId = "42"
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twiml_templates import schema
from twiml_templates.errors import TemplateError

PRESETS = Path(__file__).parent / "presets"
#: Where a project keeps its own templates (``crctl twiml list`` shows them).
USER_DIR = Path("twiml")
_TOP_KEYS = ("description", "extends", "connect", "relay", "language", "parameters")


@dataclass
class Template:
    """A template after inheritance; values are in their wire form (strings)."""

    name: str
    path: Path
    description: str = ""
    relay: dict[str, str] = field(default_factory=dict)
    connect: dict[str, str] = field(default_factory=dict)
    languages: list[dict[str, str]] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    #: Files of the inheritance chain, the template itself first.
    chain: list[Path] = field(default_factory=list)


def preset_names() -> list[str]:
    """The templates shipped with crctl."""
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def user_templates(folder: Path | None = None) -> list[Path]:
    """The project's own template files (``./twiml/*.toml``)."""
    folder = USER_DIR if folder is None else folder
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def find(name: str, *, base: Path | None = None, exclude: Path | None = None) -> Path:
    """The file for ``name``: a .toml path, a template beside ``base``, in ./twiml/, or a preset.

    A path is relative to ``base``, the folder of the template that extends it.

    A preset's own ``extends`` only ever names presets, so what the shipped presets produce
    never depends on the folder crctl runs in. ``exclude`` (the extending file) lets
    ``./twiml/basic.toml`` extend the preset ``basic`` it shadows.
    """
    if name.endswith(".toml"):
        candidates = [(base / name) if base is not None else Path(name)]
    elif base is not None and base.resolve() == PRESETS.resolve():
        candidates = [PRESETS / f"{name}.toml"]
    else:
        folders = [base] if base is not None else []
        candidates = [f / f"{name}.toml" for f in [*folders, USER_DIR, PRESETS]]
    for path in candidates:
        if path.is_file() and (exclude is None or path.resolve() != exclude):
            return path
    known = ", ".join([*preset_names(), *(p.stem for p in user_templates())])
    raise TemplateError(f"no template {name!r}; known: {known} (or a path to a .toml file)")


def load_template(name: str | Path) -> Template:
    """Load and validate a template (a name or a path), with its parents merged in."""
    path = Path(name) if isinstance(name, Path) else find(name)
    raw, chain, owners = _merged(path, [])
    template = Template(name=path.stem, path=path, chain=chain)
    template.description = str(raw.get("description", ""))

    def file(key: str) -> Path:
        return owners.get(key, path)

    template.relay = _checked(raw.get("relay", {}), schema.RELAY, file, "relay")
    template.connect = _checked(raw.get("connect", {}), schema.CONNECT, file, "connect")
    if "method" in template.connect and "action" not in template.connect:
        del template.connect["method"]  # a method means nothing without an action
    for i, entry in enumerate(raw.get("language", [])):
        key = f"language[{i}]"
        checked = _checked(entry, schema.LANGUAGE, file, key)
        if "code" not in checked:
            raise TemplateError(f"{file('language')}: key {key}.code is required")
        template.languages.append(checked)
    for key, value in raw.get("parameters", {}).items():
        if isinstance(value, (dict, list)) or not key:
            raise TemplateError(
                f"{file(f'parameters.{key}')}: key parameters.{key}: value {value!r} is not "
                "allowed; allowed: a name with text"
            )
        if value != "":
            template.parameters[key] = (
                schema.boolean(value) if isinstance(value, bool) else str(value)
            )
    check_combination(template.relay, template.languages, file)
    return template


def _merged(path: Path, seen: list[Path]) -> tuple[dict[str, Any], list[Path], dict[str, Path]]:
    """The template at ``path`` merged over its parents, the chain of files, and key origins.

    Which file set each key (``relay.voice``, ``language``…), so errors name the right one.
    """
    if path.resolve() in seen:
        raise TemplateError(f"{path}: extends itself (through {', '.join(map(str, seen))})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read it: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from exc
    for key in raw:
        if key not in _TOP_KEYS:
            raise TemplateError(
                f"{path}: key {key}: {schema.unknown_key(key, _TOP_KEYS)} "
                f"(top-level keys: {', '.join(_TOP_KEYS)})"
            )
    for table in ("relay", "connect", "parameters"):
        if table in raw and not isinstance(raw[table], dict):
            raise TemplateError(f"{path}: key {table} must be a table ([{table}])")
    if "language" in raw and not (
        isinstance(raw["language"], list) and all(isinstance(x, dict) for x in raw["language"])
    ):
        raise TemplateError(f"{path}: key language must be a list of tables ([[language]])")
    own = {f"{t}.{k}": path for t in ("relay", "connect", "parameters") for k in raw.get(t, {})}
    if "language" in raw:
        own["language"] = path
    parent_name = raw.get("extends")
    if not parent_name:
        return raw, [path], own
    parent_path = find(str(parent_name), base=path.parent, exclude=path.resolve())
    parent, chain, owners = _merged(parent_path, [*seen, path.resolve()])
    merged = dict(parent)
    for table in ("relay", "connect", "parameters"):
        combined = {**parent.get(table, {}), **raw.get(table, {})}
        merged[table] = {k: v for k, v in combined.items() if v != ""}
    if "language" in raw:
        merged["language"] = raw["language"]
    merged["description"] = raw.get("description", "")
    return merged, [path, *chain], {**owners, **own}


def _checked(
    values: dict[str, Any],
    attrs: dict[str, schema.Attr],
    file: Callable[[str], Path],
    table: str,
) -> dict[str, str]:
    result: dict[str, str] = {}
    owner = table.split("[")[0]
    for key, value in values.items():
        where = file(f"{owner}.{key}") if owner != "language" else file("language")
        if key not in attrs:
            hint = schema.unknown_key(key, attrs)
            if owner == "language" and key in schema.RELAY:
                hint = "not a <Language> attribute; it belongs in [relay]"
            raise TemplateError(f"{where}: key {table}.{key}: {hint}")
        if value == "":
            continue
        try:
            result[key] = attrs[key].check(value)
        except ValueError as exc:
            raise TemplateError(
                f"{where}: key {table}.{key}: value {value!r} is not {exc}"
            ) from None
    return result


def check_combination(
    relay: dict[str, str],
    languages: list[dict[str, str]],
    file: Path | Callable[[str], Path],
) -> None:
    """Rules across attributes (Twilio docs: <ConversationRelay>).

    ``multi`` needs Deepgram nova-2/3-general (and ElevenLabs TTS in a
    ``<Language code="multi">``); ``eotThreshold`` needs Deepgram flux.
    """

    def where(key: str) -> Path:
        return file(key) if callable(file) else file

    stt = relay.get("transcriptionProvider", "Deepgram")
    model = relay.get("speechModel", "nova-3-general" if stt == "Deepgram" else "telephony")
    if relay.get("transcriptionLanguage") == "multi" and (
        stt != "Deepgram" or model not in schema.MULTI_MODELS
    ):
        raise TemplateError(
            f"{where('relay.transcriptionLanguage')}: key relay.transcriptionLanguage: value "
            "'multi' needs transcriptionProvider "
            f"Deepgram with speechModel {' or '.join(schema.MULTI_MODELS)} "
            f"(here {stt}, {model})"
        )
    for key in ("eotThreshold", "eagerEotThreshold"):
        if key in relay and (stt != "Deepgram" or model not in schema.FLUX_MODELS):
            raise TemplateError(
                f"{where('relay.' + key)}: key relay.{key}: value {relay[key]!r} only works with "
                f"transcriptionProvider Deepgram and speechModel "
                f"{' or '.join(schema.FLUX_MODELS)} (here {stt}, {model})"
            )
    for i, lang in enumerate(languages):
        if lang.get("code") != "multi":
            continue
        tts = lang.get("ttsProvider", relay.get("ttsProvider", "ElevenLabs"))
        lang_stt = lang.get("transcriptionProvider", stt)
        lang_model = lang.get("speechModel", model)
        if tts != "ElevenLabs" or lang_stt != "Deepgram" or lang_model not in schema.MULTI_MODELS:
            raise TemplateError(
                f"{where('language')}: key language[{i}].code: value 'multi' needs ttsProvider "
                "ElevenLabs and "
                f"transcriptionProvider Deepgram with speechModel "
                f"{' or '.join(schema.MULTI_MODELS)} (here {tts}, {lang_stt}, {lang_model})"
            )
