"""The server's log: one JSON object per line on stderr, the same from every process of a server
(the front and the evaluation process), carrying event names, ids, sizes and timings, never
payloads, keys or plaintext."""

from __future__ import annotations

import json
import logging
import sys


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the structured fields we attach."""

    FIELDS = ("event", "model", "session", "account", "artifact", "backend", "groups", "key_bytes", "round",
              "message_index", "bytes_in", "bytes_out", "ms", "kind")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        return json.dumps(entry)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("privlora")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
