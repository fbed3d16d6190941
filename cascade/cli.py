"""What the `key=value` command lines of moe's tools share (`cascade.calibrate`, `cascade.evaluate`).

Each tool declares its options as {key: (type, default)} and its required keys;
`run` parses, fills the defaults, calls the tool and turns a bad input into one
`error:` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

Options = dict[str, tuple[type, Any]]


def parse_key_values(argv: list[str], options: Options, required: dict[str, str], usage: str) -> dict[str, Any]:
    """`key=value` arguments to typed values, defaults filled in.

    Args:
        argv: the arguments.
        options: {key: (type, default)}; type is str, int or float.
        required: {key: placeholder} of the keys without a default (`small`: "CKPT").
        usage: appended to the message of an unknown or missing key.
    Raises:
        ValueError: naming the key.
    """
    args: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in options:
            raise ValueError(f"unknown argument {item!r}; {usage}")
        kind = options[key][0]
        try:
            args[key] = kind(value)
        except ValueError:
            raise ValueError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    for key, placeholder in required.items():
        if key not in args:
            raise ValueError(f"{key}={placeholder} is required; {usage}")
    return {key: args.get(key, default) for key, (_, default) in options.items()}


def run(tool: Callable[..., Any], argv: Optional[list[str]], options: Options, required: dict[str, str],
        usage: str) -> None:
    """The `main` of a tool: bad input is one `error:` line on stderr and exit status 2."""
    try:
        tool(**parse_key_values(sys.argv[1:] if argv is None else argv, options, required, usage))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_positive_ints(options: dict[str, Any], *keys: str) -> None:
    """ValueError naming the first key whose value is not an integer >= 1."""
    for key in keys:
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes `payload` as indented JSON through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
