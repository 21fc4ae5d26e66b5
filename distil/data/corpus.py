"""A run's sources as pieces that can be read anywhere, in a fixed order.

A source is a local file or folder (.txt: one document per line; .jsonl/.json/.parquet: a text
column), an s3:// prefix, or a hub data set. Files are cut into *ranges* -- byte ranges of at
most RANGE_BYTES for line-based files, row groups for parquet -- so that a 16 GB text file is
read by many tasks at once, each holding one range in memory (Ray Data's `read_text` reads a
whole file in one task). A range owns the lines that *start* inside it (Hadoop's rule for
splitting text), so every line is read exactly once and no UTF-8 character is ever cut.

`plan()` lists the ranges on the driver (file listings and parquet footers only); `read()`
turns one range into its documents, wherever it runs: in this process, or in a Ray Data task
on any node of the cluster (distil/data/prepared.py). The order of documents is the order of the
sources, of the files in a source (sorted), and of the ranges in a file: the same on one
process or a hundred.
"""

from __future__ import annotations

# Imports inside functions: pyarrow and `datasets` where a range or a hub data set is read (in Ray
# Data tasks too); a config check never loads them.
import json
from dataclasses import dataclass
from pathlib import Path

from distil.errors import UserError
from distil.storage.paths import S3, is_s3

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
RANGE_BYTES = 32 << 20  # text per read task: its tokens take ~1x the text's size in the task
# Records of a hub data set tokenized together, in this process or in a Ray task alike: the
# batches are what the packer is fed, so the prepared data is the same only with the same batches.
HUB_BATCH_ROWS = 4096
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Range:
    """One piece of one file: bytes [start, end) of a line-based file (lines starting there),
    a whole .json file, or one row group of a parquet file."""

    path: str  # a local path, or bucket/key in S3
    kind: str  # text | jsonl | json | parquet
    start: int = 0
    end: int = 0
    row_group: int = 0
    s3: bool = False


@dataclass(frozen=True)
class Reading:
    """What a reader needs besides the range: which column holds the text, and how to reach S3."""

    text_field: str = "text"
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10


def local_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if not p.exists():
        raise UserError(f"{source} does not exist", where="data.sources", fix="correct the path")
    files = sorted(f for f in p.rglob("*") if f.suffix in FORMATS and f.is_file()) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise UserError(f"folder {p} holds no {'/'.join(FORMATS)} files", where="data.sources")
    for f in files:
        if f.suffix not in FORMATS:
            raise UserError(
                f"{f}: unknown file type {f.suffix!r}", where="data.sources", fix=f"use one of {', '.join(FORMATS)}"
            )
    return files


def _filesystem(reading: Reading, s3: bool):
    from pyarrow import fs

    if not s3:
        return fs.LocalFileSystem()
    from distil.storage.arrow_fs import s3_filesystem

    return s3_filesystem(reading.endpoint_url, reading.region, reading.max_attempts)


def file_ranges(path: str, size: int, s3: bool, reading: Reading, range_bytes: int = RANGE_BYTES) -> list[Range]:
    kind = FORMATS[Path(path).suffix]
    if kind in ("text", "jsonl"):
        return [Range(path, kind, a, min(a + range_bytes, size), s3=s3) for a in range(0, max(size, 1), range_bytes)]
    if kind == "json":
        return [Range(path, kind, 0, size, s3=s3)]
    import pyarrow.parquet as pq

    try:
        with _filesystem(reading, s3).open_input_file(path) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise UserError(
            f"cannot read {path} as parquet: {str(e).splitlines()[0][:200]}", where="data.sources"
        ) from None
    return [Range(path, kind, row_group=g, s3=s3) for g in range(groups)]


# -- reading one range ---------------------------------------------------------------------------


def _line_bytes(f, start: int, end: int) -> tuple[bytes, int]:
    """(the bytes of the lines that start in [start, end), where they begin in the file)."""
    pos = start
    if start > 0:  # the line that began before `start` belongs to the range before
        f.seek(start - 1)
        while True:
            block = f.read(_CHUNK)
            if not block:
                return b"", pos
            cut = block.find(b"\n")
            if cut >= 0:
                pos += cut
                break
            pos += len(block)
    if pos >= end:
        return b"", pos
    f.seek(pos)
    parts = [f.read(end - pos)]
    while parts[-1] and not parts[-1].endswith(b"\n"):  # finish the last line, past `end`
        block = f.read(_CHUNK)
        if not block:
            break
        cut = block.find(b"\n")
        parts.append(block if cut < 0 else block[: cut + 1])
        if cut >= 0:
            break
    return b"".join(parts), pos


def _decode(data: bytes, where: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where} is not UTF-8 text (byte {offset + e.start} cannot be decoded; binary, or another "
            "encoding such as Latin-1)",
            where="data.sources",
            fix=f"convert it, e.g. iconv -f latin1 -t utf-8 {Path(where).name} > {Path(where).stem}.utf8.txt",
        ) from None


def _text_of(obj, field: str, where: str) -> str | None:
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{where} has a record without a {field!r} field (it has: {keys})",
            where="data.text_field",
            fix="set data.text_field to the field holding the text",
        )
    text = obj[field]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} holds {type(text).__name__}, not text", where="data.text_field")
    return text


def read(r: Range, reading: Reading) -> list[str]:
    """The documents of one range: lines (text), records' text fields (jsonl, json, parquet);
    empty and whitespace-only documents left out. A line ends at \\n; a \\r before it is dropped."""
    where = f"{S3}{r.path}" if r.s3 else r.path
    with _filesystem(reading, r.s3).open_input_file(r.path) as f:
        if r.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            if reading.text_field not in pf.schema_arrow.names:
                raise UserError(
                    f"{where} has no column {reading.text_field!r} (columns: {pf.schema_arrow.names})",
                    where="data.text_field",
                    fix="set data.text_field to the column holding the text",
                )
            column = pf.read_row_group(r.row_group, columns=[reading.text_field]).column(0)
            return [t for t in column.to_pylist() if isinstance(t, str) and t.strip()]
        data, offset = (f.read(), 0) if r.kind == "json" else _line_bytes(f, r.start, r.end)
    text = _decode(data, where, offset)
    if r.kind == "json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}, line {e.lineno})", where="data.sources") from None
        texts = [_text_of(rec, reading.text_field, where) for rec in records]
        return [t for t in texts if t and t.strip()]
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if r.kind == "text":
        return [line for line in lines if line.strip()]
    out = []
    for line in lines:
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{where} holds a line that is not JSON ({e.msg})",
                    where="data.sources",
                    fix="give JSON Lines: one JSON object a line",
                ) from None
            t = _text_of(record, reading.text_field, where)
            if t and t.strip():
                out.append(t)
    return out


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class HubSet:
    """A hub data set, loaded (downloaded, not tokenized) on the driver: a `datasets.Dataset`,
    tokenized `HUB_BATCH_ROWS` records at a time."""

    name: str
    dataset: object


def _unreachable(source: str, e: Exception) -> UserError:
    return UserError(
        f"cannot load data set {source!r}: {str(e).splitlines()[0]}",
        where="data.sources",
        fix="give an existing local path, an s3:// URI, or a reachable hub data set",
    )


def hub_version(source: str, data) -> str:
    """What identifies a hub data set's content without downloading it: `datasets` resolves the
    revision to the repository's commit (the builder's hash) and hashes the resolved data files
    with their ETags or mtimes into the config id, so a data set updated on the hub, or a local
    `data_files` edited, gets a new fingerprint."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(source, data.hub_config, cache_dir=data.cache_dir, **data.hub_kwargs)
    except Exception as e:  # the hub raises many types; all mean "cannot get this data set"
        raise _unreachable(source, e) from None
    return f"{builder.hash}/{builder.config_id}"


def load_hub(source: str, data, text_field: str) -> HubSet:
    import datasets

    try:
        ds = datasets.load_dataset(source, data.hub_config, split="train", cache_dir=data.cache_dir, **data.hub_kwargs)
    except Exception as e:
        raise _unreachable(source, e) from None
    if text_field not in ds.column_names:
        raise UserError(
            f"{source} has no column {text_field!r} (columns: {ds.column_names})",
            where="data.text_field",
            fix="set data.text_field to the column holding the text",
        )
    return HubSet(source, ds.select_columns([text_field]))


def plan(data, reading: Reading, listing: list[dict]) -> list[list[Range] | HubSet]:
    """The sources as segments in order: runs of file ranges, and hub data sets. `listing` is the
    source listing the fingerprint covers (distil/data/prepared.py `source_listing`): the files read
    are exactly the files fingerprinted."""
    segments: list[list[Range] | HubSet] = []
    for entry in listing:
        name = entry["name"]
        if name.startswith("hub:"):
            segments.append(load_hub(name.removeprefix("hub:"), data, reading.text_field))
            continue
        s3 = is_s3(name)
        ranges = file_ranges(name.removeprefix(S3) if s3 else name, entry["size"], s3, reading)
        if segments and isinstance(segments[-1], list):
            segments[-1].extend(ranges)
        else:
            segments.append(ranges)
    return segments
