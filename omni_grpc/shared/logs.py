"""Logging for both processes (`omni-grpc serve` and the gateway): operators' text lines, or one JSON object per
line (`--log-format json`, python-json-logger) carrying the same fields as the text line (each request line passes
its fields as `extra`)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata

LOG_FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries are chatty at INFO; operators want one line per request from us.
_NOISY = ("diffusers", "transformers", "httpx", "huggingface_hub")


def add_logging_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, level: str = "INFO") -> None:
    parser.add_argument("--log-level", default=level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="text lines, or one JSON object per line"
    )


def add_version_flag(parser: argparse.ArgumentParser, distribution: str) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version_of(distribution)}")


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def configure_logging(level: str, log_format: str = "text", logger: str | None = None) -> None:
    """The process's logging (`logger`: only that one's, where the host process owns the rest, as Ray does)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    root = logging.getLogger(logger)
    root.handlers[:] = [handler]
    root.setLevel(level)
    if logger is not None:
        root.propagate = False
        return
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)
