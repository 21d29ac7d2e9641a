"""Arrow IPC streams written as results arrive and readable after a crash.

The file is an Arrow IPC *stream*: a schema message, then one message per record batch, each
written whole and flushed. A killed writer leaves at most a partial last message, which readers
skip; `ArrowStream.open(resume=True)` cuts it off and appends after the last whole batch, so a
resumed run continues the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from steer_batch.errors import SteerBatchError

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC end-of-stream marker


def _scan(path: Path) -> tuple[pa.Schema | None, list[pa.RecordBatch], int]:
    """(schema, whole batches, byte offset after the last whole message) of a possibly cut file."""
    batches: list[pa.RecordBatch] = []
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.MessageReader.open_stream(f)
        schema, end = None, 0
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):  # a message cut short by a crash
                break
            if message.type == "schema":
                schema = pa.ipc.read_schema(message)
            elif message.type == "record batch" and schema is not None:
                batches.append(pa.ipc.read_record_batch(message, schema))
            end = f.tell()
    return schema, batches, end


def read_table(path: str | Path) -> pa.Table:
    """Every whole batch of the stream at `path` (a crash-cut tail is left out)."""
    schema, batches, _ = _scan(Path(path))
    if schema is None:
        raise SteerBatchError(f"{path} is not an Arrow IPC stream (no schema message)")
    return pa.Table.from_batches(batches, schema=schema)


class ArrowStream:
    """Append-only writer: `write(rows)` puts one record batch on disk and flushes it."""

    def __init__(self, path: Path, schema: pa.Schema, sink):
        self.path, self.schema, self._sink = path, schema, sink

    @classmethod
    def open(cls, path: str | Path, schema: pa.Schema, resume: bool = False) -> tuple[ArrowStream, pa.Table]:
        """A writer and the rows already on disk (empty unless resuming an existing file)."""
        path = Path(path)
        if resume and path.exists():
            found, batches, end = _scan(path)
            if found is None:
                raise SteerBatchError(f"{path} is not an Arrow IPC stream; move it away to start afresh")
            if not found.equals(schema):
                columns = [[f"{f.name}: {f.type}" for f in s] for s in (found, schema)]
                raise SteerBatchError(
                    f"{path} has the columns {columns[0]}, this steer-batch writes {columns[1]}: finish it "
                    "with the steer-batch that started it, or move it away to start afresh"
                )
            sink = open(path, "r+b")
            sink.truncate(end)
            sink.seek(end)
            return cls(path, schema, sink), pa.Table.from_batches(batches, schema=schema)
        sink = open(path, "wb")
        sink.write(schema.serialize().to_pybytes())
        sink.flush()
        return cls(path, schema, sink), schema.empty_table()

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        self._sink.write(batch.serialize().to_pybytes())
        self._sink.flush()
        os.fsync(self._sink.fileno())

    def close(self) -> None:
        if not self._sink.closed:
            self._sink.write(_EOS)
            self._sink.close()

    def __enter__(self) -> ArrowStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_table(path: str | Path, table: pa.Table) -> None:
    """`table` as one Arrow IPC stream file at `path`, replacing what was there (summaries, not
    streamed rows: those go through ArrowStream)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
