"""Keeping a DataTable in step with a fresh read: only the cells that changed are touched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import RowKey

from mqi_async.ui.cells import Cell

Rows = dict[str, tuple[Cell, ...]]


def row_value(key: RowKey | None) -> str | None:
    """A table row's key as text; Textual hands out None for a row removed meanwhile."""
    value = getattr(key, "value", None)
    return None if value is None else str(value)


def cursor_key(table: DataTable[Any]) -> str | None:
    """The key of the row under the cursor; None for an empty table."""
    if table.row_count == 0:
        return None
    try:
        row = min(max(table.cursor_row, 0), table.row_count - 1)
        return row_value(table.coordinate_to_cell_key(Coordinate(row, 0)).row_key)
    except Exception:
        return None


def sync_table(table: DataTable[Any], rows: Rows, new: Rows, columns: Sequence[str]) -> None:
    """Make `table` show `new` (key -> cells, in order); `rows` is what it shows now.

    Rows that stay where they were are updated cell by cell; rows that left are removed, new
    ones appended. Only when a new row belongs between existing ones (a delivery of an earlier
    fraction arriving late) is the table rebuilt, with the cursor kept on its row.
    """
    kept = [k for k in rows if k in new]
    if list(new) != kept + [k for k in new if k not in rows]:
        _rebuild(table, rows, new)
        return
    for key in [k for k in rows if k not in new]:
        table.remove_row(key)
        del rows[key]
    for key, cells in new.items():
        old = rows.get(key)
        if old is None:
            table.add_row(*cells, key=key)
        elif old != cells:
            for col, before, after in zip(columns, old, cells, strict=True):
                if before != after:
                    table.update_cell(key, col, after, update_width=True)
        rows[key] = cells


def _rebuild(table: DataTable[Any], rows: Rows, new: Rows) -> None:
    selected = cursor_key(table)
    table.clear()
    rows.clear()
    for key, cells in new.items():
        table.add_row(*cells, key=key)
        rows[key] = cells
    if selected in new:
        table.move_cursor(row=list(new).index(selected))
