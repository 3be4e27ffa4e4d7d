"""Logging to stderr, as journald reads it under systemd and as a person reads it in a shell.

Under systemd, stderr goes to the journal, which files a plain line at priority 6 (info) whatever
its level. When $JOURNAL_STREAM names stderr (systemd sets it to the stream's device:inode), each
line of a record (a traceback's too: journald reads lines one by one) starts with its syslog
priority as sd-daemon(3) prefixes it, so `journalctl -p warning` finds warnings and errors, and
carries no timestamp of its own (journald's). Elsewhere lines start with their time.
"""

from __future__ import annotations

import logging
import os
import sys


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with its syslog priority (<3> error, <4> warning, <6> info)."""

    PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITY if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def stderr_is_journal() -> bool:
    """Whether $JOURNAL_STREAM names this process's stderr."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """The root logger at `level` on stderr: `fmt` with the journal's priority prefix, or after the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(fmt) if stderr_is_journal() else logging.Formatter("%(asctime)s " + fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
