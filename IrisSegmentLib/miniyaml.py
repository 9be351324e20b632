"""The subset of YAML that config files use, for machines without PyYAML (the GPU machine).

Reads block mappings, block sequences (indented or not), one-line flow lists and mappings of
scalars, quoted and plain scalars resolved as YAML 1.1 does (null, bool, int, float, string) and
comments; writes block mappings with flow lists. `safe_load`, `safe_dump` and `YAMLError` mirror
PyYAML's names, so `config.py` uses whichever is installed. Anchors, tags, multi-line scalars and
nested flow collections are refused with `YAMLError`.
"""
from __future__ import annotations

import json
import math
import re

_NULL = {"", "~", "null", "Null", "NULL"}
_BOOL = {v: True for v in ("true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON")}
_BOOL |= {v: False for v in ("false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF")}
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)")
_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?")
_SPECIAL = {".inf": math.inf, ".Inf": math.inf, ".INF": math.inf, ".nan": math.nan, ".NaN": math.nan, ".NAN": math.nan}
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")


class YAMLError(ValueError):
    pass


def _scalar(text: str):
    t = text.strip()
    if t[:1] in ("'", '"'):
        if len(t) < 2 or t[-1] != t[0]:
            raise YAMLError(f"unclosed quote in {t!r}")
        if t[0] == "'":
            return t[1:-1].replace("''", "'")
        try:
            return json.loads(t)
        except ValueError as e:
            raise YAMLError(f"bad double-quoted string {t!r}: {e}") from None
    if t[:1] in ("[", "{", "&", "*", "!", "|", ">"):
        raise YAMLError(f"unsupported YAML value {t!r}")
    if t in _NULL:
        return None
    if t in _BOOL:
        return _BOOL[t]
    if _INT.fullmatch(t):
        return int(t.replace("_", ""))
    if _FLOAT.fullmatch(t):
        return float(t.replace("_", ""))
    if t.lstrip("+-") in _SPECIAL:
        return -_SPECIAL[t[1:]] if t[0] == "-" else _SPECIAL[t.lstrip("+")]
    return t


def _split_flow(body: str) -> list[str]:
    """Comma-separated items of a one-line flow collection (quotes respected, no nesting)."""
    items, cur, quote = [], "", ""
    for ch in body:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[]{}":
            raise YAMLError(f"nested flow collections are not supported: {body!r}")
        elif ch == ",":
            items.append(cur)
            cur = ""
            continue
        cur += ch
    if quote:
        raise YAMLError(f"unclosed quote in {body!r}")
    items.append(cur)
    return [] if items == [""] else [i for i in items if i.strip()]


def _value(text: str):
    t = text.strip()
    if t[:1] == "[":
        if t[-1:] != "]":
            raise YAMLError(f"unclosed flow list {t!r}")
        return [_scalar(i) for i in _split_flow(t[1:-1])]
    if t[:1] == "{":
        if t[-1:] != "}":
            raise YAMLError(f"unclosed flow mapping {t!r}")
        pairs = [_key_value(i) for i in _split_flow(t[1:-1])]
        return {k: _scalar(v) for k, v in pairs}
    return _scalar(t)


def _key_value(text: str) -> tuple[str, str]:
    """'key: rest' -> (key, rest); the key is plain or quoted, `rest` may be empty."""
    m = re.fullmatch(r"""('[^']*'|"[^"]*"|[^:'"]+?):(?:\s+(.*))?""", text.strip())
    if not m:
        raise YAMLError(f"expected 'key: value', got {text.strip()!r}")
    return str(_scalar(m.group(1))), m.group(2) or ""


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _lines(text: str) -> list[tuple[int, str]]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YAMLError(f"line {n}: tabs are not allowed for indentation")
        line = _strip_comment(raw)
        if line.strip() and line.strip() not in ("---", "..."):
            out.append((len(line) - len(line.lstrip(" ")), line.strip()))
    return out


def _block(lines: list[tuple[int, str]], i: int, indent: int):
    """The block starting at lines[i] (indented `indent`): a mapping or a sequence; returns (value, next i)."""
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        seq = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1] == "-" or lines[i][1].startswith("- ")):
            seq.append(_value(lines[i][1][1:]))
            i += 1
        return seq, i
    mapping = {}
    while i < len(lines) and lines[i][0] == indent:
        key, rest = _key_value(lines[i][1])
        i += 1
        if rest.strip():
            mapping[key] = _value(rest)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("-"))):
            mapping[key], i = _block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    return mapping, i


def safe_load(text: str):
    lines = _lines(text)
    if not lines:
        return None
    value, i = _block(lines, 0, lines[0][0])
    if i != len(lines):
        raise YAMLError(f"unexpected indentation at {lines[i][1]!r}")
    return value


def _dump_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        r = repr(v)
        if "e" in r and "." not in r:  # YAML 1.1 floats need a '.' in the mantissa
            r = r.replace("e", ".0e")
        return r if "." in r else r + ".0"
    if isinstance(v, str):
        return v if _PLAIN.fullmatch(v) and _scalar(v) == v else json.dumps(v)
    raise YAMLError(f"cannot write {type(v).__name__} values")


def _dump_inline(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_dump_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_dump_scalar(k)}: {_dump_scalar(x)}" for k, x in v.items()) + "}"
    return _dump_scalar(v)


def safe_dump(data: dict, sort_keys: bool = True) -> str:
    """Block mappings; lists and empty mappings inline."""
    lines: list[str] = []

    def emit(mapping: dict, pad: str) -> None:
        for k in sorted(mapping) if sort_keys else mapping:
            v = mapping[k]
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{_dump_scalar(k)}:")
                emit(v, pad + "  ")
            else:
                lines.append(f"{pad}{_dump_scalar(k)}: {_dump_inline(v)}")

    if not isinstance(data, dict):
        raise YAMLError("only mappings are written")
    emit(data, "")
    return "\n".join(lines) + "\n"
