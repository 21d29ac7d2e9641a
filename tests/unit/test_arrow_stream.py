"""Arrow streams: readable after a crash-cut tail, resumed in place, never duplicated."""

import pyarrow as pa
import pytest

from steer_batch.eval.arrow_stream import ArrowStream, read_table

SCHEMA = pa.schema([("k", pa.int32()), ("text", pa.string())])


def rows(lo, hi):
    return [{"k": k, "text": f"row {k}"} for k in range(lo, hi)]


def test_batches_are_readable_while_writing_and_after_close(tmp_path):
    path = tmp_path / "t.arrow"
    writer, done = ArrowStream.open(path, SCHEMA)
    assert done.num_rows == 0
    writer.write(rows(0, 3))
    assert read_table(path).column("k").to_pylist() == [0, 1, 2]  # no close needed
    writer.write(rows(3, 5))
    writer.close()
    assert read_table(path).column("k").to_pylist() == [0, 1, 2, 3, 4]
    assert pa.ipc.open_stream(str(path)).read_all().num_rows == 5  # a plain Arrow reader agrees


@pytest.mark.parametrize("cut", [1, 7, 40])
def test_a_cut_tail_is_skipped_and_resume_appends_after_the_last_whole_batch(tmp_path, cut):
    path = tmp_path / "t.arrow"
    with ArrowStream.open(path, SCHEMA)[0] as writer:
        writer.write(rows(0, 3))
        writer.write(rows(3, 6))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8 - cut])  # a crash inside the last batch (8 = end-of-stream marker)
    assert read_table(path).column("k").to_pylist() == [0, 1, 2]
    writer, done = ArrowStream.open(path, SCHEMA, resume=True)
    assert done.column("k").to_pylist() == [0, 1, 2]
    writer.write(rows(3, 6))
    writer.close()
    assert read_table(path).column("k").to_pylist() == [0, 1, 2, 3, 4, 5]


def test_resume_refuses_another_schema_and_foreign_files(tmp_path):
    path = tmp_path / "t.arrow"
    with ArrowStream.open(path, SCHEMA)[0] as writer:
        writer.write(rows(0, 1))
    found, wanted = r"\[.k: int32., .text: string.\]", r"\[.k: int64.\]"
    with pytest.raises(ValueError, match=f"has the columns {found}, this steer-batch writes {wanted}"):
        ArrowStream.open(path, pa.schema([("k", pa.int64())]), resume=True)
    (tmp_path / "x.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        read_table(tmp_path / "x.arrow")
