"""Ledger rows written in tests as the ledger writer writes them: one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ollama_proxy.api.record import RequestRecord
from ollama_proxy.store import db, ledger


def insert(conn: sqlite3.Connection, records: Sequence[RequestRecord], *,
           fold: bool = False) -> list[int]:
    """Insert ``records`` (their row ids); ``fold``: into the summaries too, as the
    writer does a moment later."""
    with db.transaction(conn):
        ids = ledger.insert_rows(conn, records)
        if fold:
            ledger.fold(conn, 10**9)
    return ids
