"""What every `optserve` command's flags share: the parser that says a mistake in one line, the
value parsers, and the checks of directories."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

from optserve.server.core.errors import ConfigError

DEFAULT_PORT = 8470


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class OneLineErrors(argparse.ArgumentParser):
    """A subcommand's parser whose mistakes are one line naming the flag (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def check_writable_dir(flag: str, path: str, fix: str) -> None:
    """The directory exists (created if missing), and can be listed and written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a directory; {fix}")
    try:
        os.makedirs(path, exist_ok=True)
        os.listdir(path)
        with tempfile.TemporaryFile(dir=path, prefix=".optserve-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}; {fix}") from None


def usage_error(message: str) -> int:
    print(f"optserve serve: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


def targets(text: str) -> list[str]:
    """HOST:PORT,... (a sharded model's servers, shard 0 first), each distinct."""
    found = [t.strip() for t in text.split(",")]
    for t in found:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{t!r} is not HOST:PORT (give them comma-separated, e.g. a:8470,b:8470)")
    if len(set(found)) != len(found):
        raise argparse.ArgumentTypeError(f"the addresses must be distinct, got {text!r}")
    return found


def add_placement_flags(p: argparse.ArgumentParser, targets_help: str, split_help: str) -> None:
    """--targets and --split-bytes: where a model is placed and which leaves are split (reshard, upload)."""
    p.add_argument("--targets", metavar="HOST:PORT,...", type=targets, default=None, help=targets_help)
    p.add_argument("--split-bytes", metavar="BYTES", type=int_at_least(1), default=None, help=split_help)
