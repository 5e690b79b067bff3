"""The read-only check of every query over the views (`factory sql`, the report, `factory show`): one statement
that only reads, or a refusal that says what was sent."""

from __future__ import annotations

import re

import duckdb

from factory.core.errors import UserInputError

# PRAGMAs that only describe the catalog or the engine. Every other one is refused: some read or write files
# (import_database, profiling_output) and some change settings.
SAFE_PRAGMAS = frozenset(
    {
        "table_info",
        "show_tables",
        "show_tables_expanded",
        "show_databases",
        "database_list",
        "database_size",
        "storage_info",
        "version",
        "platform",
        "functions",
        "collations",
        "show",
    }
)
_REFUSAL = "factory sql runs one read-only query (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, a few PRAGMAs)"
_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.S)
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:(ANALY[SZ]E)\b\s*)?(?:\(([^)]*)\)\s*)?(.*)$", re.S | re.I)


def _refuse(what: str) -> UserInputError:
    return UserInputError(f"{_REFUSAL}: got {what}")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one statement that only reads: SELECT-like statements, EXPLAIN of a SELECT without
    ANALYZE (which would run the statement, a COPY TO included), PRAGMAs in SAFE_PRAGMAS and their CALL form.

    DuckDB's settings confine file access too, but a COPY TO a file the views read is allowed by them, so
    this check is what keeps the warehouse unwritable through `factory sql`.
    """
    try:
        statements = con.extract_statements(sql)
    except ValueError:  # a statement type the Python API cannot name (e.g. UPDATE EXTENSIONS)
        raise _refuse(" ".join(_COMMENTS.sub(" ", sql).split()[:2]).upper() or "nothing") from None
    if not statements:
        raise _refuse("nothing (an empty query)")
    if len(statements) != 1:
        raise _refuse(f"{len(statements)} statements")
    statement = statements[0]
    try:
        kind = statement.type
    except ValueError:
        raise _refuse(" ".join(_COMMENTS.sub(" ", statement.query).split()[:2]).upper()) from None
    text = _COMMENTS.sub(" ", statement.query).strip()
    if kind == duckdb.StatementType.SELECT:
        return
    if kind == duckdb.StatementType.EXPLAIN:
        match = _EXPLAIN.match(text)
        if match is None:
            raise _refuse("EXPLAIN")
        analyze, options, inner = match.groups()
        if analyze or (options and re.search(r"\bANALY[SZ]E\b", options, re.I)):
            raise _refuse("EXPLAIN ANALYZE")
        try:
            inner_kinds = [s.type for s in con.extract_statements(inner)]
        except (ValueError, duckdb.Error):
            raise _refuse("EXPLAIN of a statement that is not a query") from None
        if inner_kinds != [duckdb.StatementType.SELECT]:
            raise _refuse(f"EXPLAIN {' '.join(k.name for k in inner_kinds)}")
        return
    if kind == duckdb.StatementType.PRAGMA:
        match = re.match(r"PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.I)
        name = match.group(1).lower() if match else "?"
        if name in SAFE_PRAGMAS and "=" not in text:
            return
        raise _refuse(f"PRAGMA {name}")
    if kind == duckdb.StatementType.CALL:
        match = re.match(r"CALL\s+pragma_([A-Za-z_][A-Za-z0-9_]*)\s*\(", text, re.I)
        if match and match.group(1).lower() in SAFE_PRAGMAS:
            return
        raise _refuse("CALL")
    # The statement's own first word reads better than DuckDB's type name (INSTALL is of type LOAD).
    raise _refuse(text.split()[0].upper() if text else kind.name)
