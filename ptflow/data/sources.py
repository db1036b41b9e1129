"""Registered corpora: resolve `dataset_info.json` entries to files, cut them into shards, read their texts.

An entry is LLaMA-Factory's: `{"name": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}`
(a file, or a folder of files of one type) or `{"name": {"hf_hub_url": "org/corpus", "subset": ...,
"split": "train", "revision": ..., "folder": ...}}` (loaded with `datasets.load_dataset`, which with
HF_HUB_OFFLINE=1 reads only the local cache). `num_samples` resamples an entry, `columns.prompt`
names its text column (default `text`).

File types: .json (a list of records, or JSON lines), .jsonl, .csv, .parquet, .txt (one document
per non-blank line), .arrow (IPC stream or file, as `datasets` writes them); .gz/.zst/.zstd
compression of the text formats. A Hub split is read from the arrow files of its local cache.

Each file is cut into shards (byte ranges at line breaks, or groups of parquet row groups / arrow
record batches) whose boundaries depend only on the file's content, so a shard is a stable unit
of the token cache (ptflow/data/shards.py). Everything that can be checked without reading a whole
file (names, paths, types, columns, the first record) is checked by `check_sources` first.

    sources = resolve_sources(section); check_sources(sources)
    texts = read_shard(plan_shards(sources[0])[0])
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptflow.errors import DataError

if TYPE_CHECKING:
    from ptflow.config.schema import DataSection

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".txt": "txt", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
COMPRESSIBLE = {"json", "jsonl", "txt", "csv"}
LINE_FORMATS = {"jsonl", "txt"}

# Shard size: about 1/64 of a file, between these bounds, so 16 workers get several shards of a
# 100 MB file while a 100 GB corpus stays at a few thousand shards. Boundaries are a function of
# the file's bytes only (never of the worker count), so cached shards stay valid.
MIN_SHARD_BYTES = 1 << 20
MAX_SHARD_BYTES = 32 << 20
SHARDS_PER_FILE = 64

# One document per line: a line longer than this (a runaway file, a missing newline) is refused
# with its file:line instead of being read into memory whole. Lines are scanned in SCAN_BYTES
# blocks, so memory stays bounded by the limit, not by the line. PTFLOW_MAX_LINE_BYTES overrides it.
# Small blocks: planning a file's shards scans from every cut to the next line break, and is done
# twice per preparation (the check, then the tokenizing): 1 MiB blocks read a 64-shard file whole.
MAX_LINE_BYTES = 64 << 20
SCAN_BYTES = 64 << 10


def max_line_bytes() -> int:
    return int(os.environ.get("PTFLOW_MAX_LINE_BYTES") or MAX_LINE_BYTES)


@dataclass(frozen=True)
class Source:
    """One registered dataset resolved to local files (a Hub split resolves to its cached arrow files)."""

    name: str
    files: tuple[Path, ...]
    column: str
    format: str
    num_samples: int | None = None
    origin: str = ""  # how it was found, for messages: the file_name path or hf_hub_url

    def describe(self) -> str:
        return f"{self.name!r} ({self.origin})"


@dataclass(frozen=True)
class FileFormat:
    format: str
    compression: str | None = None


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one file: bytes [start, stop) of a line format, row groups or record batches
    [start, stop) of parquet/arrow, or the whole file (start 0, stop -1)."""

    source: str
    file: str
    format: str
    compression: str | None
    column: str
    start: int
    stop: int
    index: int

    @property
    def where(self) -> str:
        return self.file if self.stop < 0 else f"{self.file} [{self.start}:{self.stop}]"


# --------------------------------------------------------------------------- resolution


def read_dataset_info(dataset_dir: Path) -> dict:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"data.dataset_dir: {dataset_dir} has no dataset_info.json "
                        f"(relative paths are resolved from {Path.cwd()}). Register each dataset there, e.g. "
                        '{"my_corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}')
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{info_path}: not valid UTF-8; re-encode the file as UTF-8") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{info_path}: expected an object mapping dataset names to entries (objects)")
    return info


def resolve_sources(section: "DataSection", names: list[str] | None = None) -> list[Source]:
    """Map dataset names (default: `data.dataset`) to files, checking every name, file and type at once."""
    dataset_dir = Path(section.dataset_dir).expanduser()
    info = read_dataset_info(dataset_dir)
    info_path = dataset_dir / "dataset_info.json"
    key = "data.dataset" if names is None else "data.eval_dataset"
    sources, problems = [], []
    for name in section.dataset if names is None else names:
        entry = info.get(name)
        if entry is None:
            problems.append(f"{key}: {name!r} is not in {info_path} (it has: {', '.join(sorted(info)) or 'nothing'})")
            continue
        try:
            sources.append(_resolve_entry(name, entry, dataset_dir, info_path, key))
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise DataError("\n  - ".join(problems))
    return sources


def _resolve_entry(name: str, entry: dict, dataset_dir: Path, info_path: Path, key: str) -> Source:
    unsupported = [k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
    if unsupported and "file_name" not in entry and "hf_hub_url" not in entry:
        raise DataError(f"{info_path}: entry {name!r} uses {unsupported[0]}, which ptflow does not read; "
                        "download the data and register it with file_name, or use hf_hub_url")
    formatting = entry.get("formatting", "alpaca")
    if formatting != "alpaca":
        raise DataError(f"{info_path}: entry {name!r} has formatting {formatting!r}; pretraining reads one text "
                        "column: drop formatting and set columns.prompt to that column")
    column = (entry.get("columns") or {}).get("prompt", "text")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1):
        raise DataError(f"{info_path}: entry {name!r} has num_samples {num_samples!r}; use a positive whole number")
    if "hf_hub_url" in entry:
        return _resolve_hub(name, entry, column, num_samples, info_path)
    if "file_name" not in entry:
        raise DataError(f"{info_path}: entry {name!r} needs file_name (a file or folder under {dataset_dir}) "
                        "or hf_hub_url (a Hub dataset id)")
    split = entry.get("split", "train")
    if split != "train":
        raise DataError(f"{info_path}: entry {name!r} has split {split!r}, but a local file is one 'train' split; "
                        "register each split's file as its own dataset (e.g. use it as data.eval_dataset)")
    path = dataset_dir / entry["file_name"]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{key} {name!r}: folder {path} has no files")
    elif path.is_file():
        files = [path]
    elif path.exists():  # a FIFO, a device (a link to /dev/zero): reading it would block or never end
        raise DataError(f"{key} {name!r}: {path} is not a regular file (nor a folder); give a data file")
    else:
        raise DataError(f"{key} {name!r}: file {path} does not exist")
    formats = {}
    for f in files:
        fmt = file_format(f)
        if fmt is None:
            raise DataError(f"{key} {name!r}: {f} is not a readable type; use .json, .jsonl, .csv, .parquet, .txt "
                            "or .arrow (text types may be .gz or .zst compressed)")
        formats[f] = fmt
    kinds = {fmt.format for fmt in formats.values()}
    if len(kinds) != 1:
        raise DataError(f"{key} {name!r}: {path} mixes file types ({', '.join(sorted(kinds))}); "
                        "a folder must hold files of one type")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"{key} {name!r}: {f} is not readable (permission denied); fix its permissions")
    return Source(name, tuple(files), column, kinds.pop(), num_samples, str(path))


def file_format(path: Path) -> FileFormat | None:
    """The format (and compression) a file name says it has; None for an unknown type."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (compression and fmt not in COMPRESSIBLE):
        return None
    return FileFormat(fmt, compression)


def _resolve_hub(name: str, entry: dict, column: str, num_samples: int | None, info_path: Path) -> Source:
    """Load a Hub split through `datasets` (offline: from the local cache only) and use its arrow files."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    repo = entry["hf_hub_url"]
    kwargs = {"name": entry.get("subset"), "data_dir": entry.get("folder"), "split": entry.get("split", "train"),
              "revision": entry.get("revision"), "cache_dir": os.environ.get("HF_DATASETS_CACHE")}
    where = f"{info_path}: entry {name!r} (hf_hub_url {repo!r}, subset {kwargs['name']!r}, split {kwargs['split']!r})"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        ds = load_dataset(repo, **kwargs)
    except ConnectionError as exc:
        if not offline:
            raise  # the network is down: transient, the task is retried
        raise DataError(f"{where}: not in the local datasets cache and HF_HUB_OFFLINE=1 forbids downloading it "
                        f"({exc}). Load it once with network access, or unset HF_HUB_OFFLINE") from None
    except (ValueError, FileNotFoundError, DatasetsError) as exc:
        raise DataError(f"{where}: {exc}. Fix subset/split/folder in the entry") from None
    files = tuple(Path(f["filename"]) for f in ds.cache_files)
    if not files:
        raise DataError(f"{where}: loaded in memory with no cache files to read; "
                        "download it as files and register it with file_name")
    if column not in ds.column_names:
        raise DataError(f"{where}: has no column {column!r} (found: {sorted(ds.column_names)}); "
                        "set columns.prompt in dataset_info.json")
    if len(ds) == 0:
        raise DataError(f"{where}: the split has no rows")
    return Source(name, files, column, "arrow", num_samples, f"hub {repo}")


# --------------------------------------------------------------------------- shards


def plan_shards(source: Source) -> list[Shard]:
    """Every shard of every file of a source, in reading order."""
    return [shard for file in source.files for shard in plan_file(source, file)]


def plan_file(source: Source, file: Path) -> list[Shard]:
    fmt = file_format(file) or FileFormat(source.format)  # a Hub split's cache files are arrow
    kind = fmt.format
    if kind == "json" and not fmt.compression and _first_byte(file) != b"[":
        kind = "jsonl"  # `datasets` reads a .json file of JSON lines too
    ranges = [(0, -1)]
    if fmt.compression is None:
        if kind in LINE_FORMATS:
            ranges = _line_ranges(file)
        elif kind == "parquet":
            ranges = _parquet_ranges(file)
        elif kind == "arrow":
            ranges = _arrow_ranges(file)
    return [Shard(source.name, str(file), kind, fmt.compression, source.column, start, stop, i)
            for i, (start, stop) in enumerate(ranges)]


def shard_bytes(size: int) -> int:
    return min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, size // SHARDS_PER_FILE))


def _first_byte(file: Path) -> bytes:
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1]


def _line_ranges(file: Path) -> list[tuple[int, int]]:
    size = file.stat().st_size
    step = shard_bytes(size)
    ranges, start = [], 0
    with open(file, "rb") as f:
        while start < size:
            end = size if start + step >= size else _end_of_line(f, start + step, size)  # shards end at line breaks
            ranges.append((start, end))
            start = end
    return ranges or [(0, 0)]


def _end_of_line(f, pos: int, size: int) -> int:
    """Offset just past the first line break at or after `pos` (or the end), scanning in blocks."""
    f.seek(pos)
    scanned, cap = 0, max_line_bytes()
    while block := f.read(SCAN_BYTES):
        found = block.find(b"\n")
        if found >= 0:
            return pos + scanned + found + 1
        scanned += len(block)
        if scanned > cap:
            raise _line_too_long(f.name, _count_lines(f.name, pos), cap)
    return size


def _line_too_long(file: str, line: int, cap: int) -> DataError:
    return DataError(f"{file}:{line}: line is longer than {cap:,} bytes ({cap / (1 << 20):g} MiB), the limit for one "
                     "document per line; it is not read into memory. Add the missing line breaks (split the document), "
                     "or raise the limit with PTFLOW_MAX_LINE_BYTES")


def _check_line(raw: bytes, file: str, line: int | None, offset: int, cap: int) -> bytes:
    """`raw` as read with readline(cap + 1): refuse it when the line goes on past the limit."""
    if len(raw) - raw.endswith(b"\n") > cap:
        raise _line_too_long(file, line or _count_lines(file, offset), cap)
    return raw


def _group(sizes: list[int]) -> list[tuple[int, int]]:
    step = shard_bytes(sum(sizes))
    ranges, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= step:
            ranges.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes) or not ranges:
        ranges.append((start, len(sizes)))
    return ranges


def _parquet_ranges(file: Path) -> list[tuple[int, int]]:
    meta = _parquet_file(file).metadata
    return _group([meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)])


def _arrow_ranges(file: Path) -> list[tuple[int, int]]:
    return _group([batch.nbytes for batch in _arrow_batches(file)])


def _parquet_file(file: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{file}: not a readable parquet file ({exc}); re-export it") from None


def _arrow_batches(file: Path) -> Iterator[Any]:
    import pyarrow as pa

    source = pa.memory_map(str(file))
    try:
        if source.read(6) == b"ARROW1":
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            source.seek(0)
            yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{file}: not a readable arrow file ({exc}); write it with datasets' save_to_disk or "
                        "pyarrow.ipc") from None


# --------------------------------------------------------------------------- reading


def read_shard(shard: Shard, limit: int | None = None) -> list[str]:
    """The texts of one shard (at most `limit`), in order; bad bytes, JSON or columns name file and line."""
    file = Path(shard.file)
    try:
        if shard.format in LINE_FORMATS:
            return _texts_from_lines(_lines(shard, limit), shard, limit)
        if shard.format == "json":
            return _read_json_list(_read_all(shard), shard, limit)
        if shard.format == "csv":
            return _read_csv(_read_all(shard), shard, limit)
        return _read_columnar(shard, limit)
    except FileNotFoundError:
        raise DataError(f"{file}: dataset {shard.source!r}: the file disappeared while reading it") from None
    except PermissionError:
        raise DataError(f"{file}: dataset {shard.source!r}: not readable (permission denied)") from None


def _lines(shard: Shard, limit: int | None) -> Iterator[tuple[int | None, str]]:
    """(line number or None when not yet counted, text) of each line of a line-format shard."""
    cap = max_line_bytes()
    if shard.compression:
        with _open_compressed(shard) as f:
            try:
                for i, raw in enumerate(iter(lambda: f.readline(cap + 1), b""), 1):
                    yield i, _decode(_check_line(raw, shard.file, i, 0, cap), shard, i)
            except OSError as exc:
                raise DataError(f"{shard.file}: not valid {shard.compression} data ({exc}); re-compress it") from None
        return
    with open(shard.file, "rb") as f:
        f.seek(shard.start)
        if limit is not None:  # a peek (pre-checks): read line by line, not the whole shard
            pos = shard.start
            while pos < shard.stop:
                raw = _check_line(f.readline(cap + 1), shard.file, None, pos, cap)
                if not raw:
                    break
                pos += len(raw)
                yield None, _decode(raw, shard, None, pos - len(raw))
            return
        data = f.read(shard.stop - shard.start)
    if len(data) > cap:  # only then can a line be over the limit (shards end at line breaks)
        _check_lines(data, shard, cap)
    yield from ((None, line) for line in _decode(data, shard, None, shard.start).split("\n"))


def _check_lines(data: bytes, shard: Shard, cap: int) -> None:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > cap:
            raise _line_too_long(shard.file, _count_lines(shard.file, shard.start + start), cap)
        start = end + 1


def _line_number(shard: Shard, offset: int) -> int:
    return _count_lines(shard.file, offset)


def _count_lines(file: str, offset: int) -> int:
    """1-based line number of the byte at `offset` of an uncompressed file (counted only for an error message)."""
    count = 0
    with open(file, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decode(data: bytes, shard: Shard, line: int | None, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line or _line_number(shard, offset + exc.start)
        with open(shard.file, "rb") as f:
            head = f.read(2)
        if head in UTF16_BOMS:
            raise DataError(f"{shard.file}: is UTF-16 text (byte-order mark 0x{head.hex()}); re-encode it as UTF-8, "
                            f"e.g. iconv -f UTF-16 -t UTF-8") from None
        raise DataError(f"{shard.file}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "re-encode the file as UTF-8") from None


def _texts_from_lines(lines: Iterator[tuple[int | None, str]], shard: Shard, limit: int | None) -> list[str]:
    texts = []
    if shard.format == "txt":
        for _, line in lines:
            line = line.rstrip("\r\n")
            if line.strip():  # blank lines separate documents, they are not documents
                texts.append(line)
                if limit is not None and len(texts) >= limit:
                    break
        return texts
    loads, base = json.loads, None
    for i, (number, line) in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = loads(line)
            if type(record) is dict and type(record.get(shard.column)) is str:  # the common case, checked fast
                texts.append(record[shard.column])
            else:
                texts.append(_text_of(record, shard, number or _nth_line(shard, i)))
        except json.JSONDecodeError as exc:
            where = number or _nth_line(shard, i)
            raise DataError(f"{shard.file}:{where}: malformed JSON ({exc.msg.removesuffix(' at')} at column "
                            f"{exc.colno}); fix or remove that line") from None
        if limit is not None and len(texts) >= limit:
            break
    return texts


def _nth_line(shard: Shard, i: int) -> int:
    return _line_number(shard, shard.start) + i


def _text_of(record: object, shard: Shard, where: object) -> str:
    if isinstance(record, dict):
        value = record.get(shard.column, _MISSING)
        if isinstance(value, str):
            return value
        if value is not _MISSING:
            kind = "null" if value is None else type(value).__name__
            raise DataError(f"{shard.file}:{where}: column {shard.column!r} must be a string, got {kind}")
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{shard.file}:{where}: dataset {shard.source!r} has no column {shard.column!r} "
                    f"(found: {found}); set columns.prompt in dataset_info.json")


_MISSING = object()


def _open_compressed(shard: Shard):
    import pyarrow as pa

    try:
        return io.BufferedReader(pa.input_stream(shard.file, compression=shard.compression))
    except OSError as exc:
        raise DataError(f"{shard.file}: cannot open it as {shard.compression} ({exc})") from None


def _read_all(shard: Shard) -> str:
    if shard.compression:
        try:
            with _open_compressed(shard) as f:
                data = f.read()
        except OSError as exc:
            raise DataError(f"{shard.file}: not valid {shard.compression} data ({exc}); re-compress it") from None
    else:
        data = Path(shard.file).read_bytes()
    return _decode(data, shard, None)


def _read_json_list(text: str, shard: Shard, limit: int | None) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{shard.file}:{exc.lineno}: malformed JSON ({exc.msg.removesuffix(' at')} at column "
                        f"{exc.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{shard.file}: expected a JSON list of records (or one JSON record per line)")
    records = records if limit is None else records[:limit]
    return [r[shard.column] if type(r) is dict and type(r.get(shard.column)) is str else _text_of(r, shard, f"record {i}")
            for i, r in enumerate(records)]


def _read_csv(text: str, shard: Shard, limit: int | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    if shard.column not in reader.fieldnames:
        raise DataError(f"{shard.file}:1: dataset {shard.source!r} has no column {shard.column!r} "
                        f"(found: {sorted(reader.fieldnames)}); set columns.prompt in dataset_info.json")
    texts = []
    try:
        for row in reader:
            value = row[shard.column]
            if value is None:
                raise DataError(f"{shard.file}:{reader.line_num}: row has no value for column {shard.column!r}")
            texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    except csv.Error as exc:
        raise DataError(f"{shard.file}:{reader.line_num}: malformed CSV ({exc})") from None
    return texts


def _read_columnar(shard: Shard, limit: int | None) -> list[str]:
    import pyarrow as pa

    file = Path(shard.file)
    if shard.format == "parquet":
        pf = _parquet_file(file)
        names = pf.schema_arrow.names
        if shard.column not in names:
            _no_column(shard, names)
        stop = pf.metadata.num_row_groups if shard.stop < 0 else shard.stop
        tables = [pf.read_row_group(i, columns=[shard.column]) for i in range(shard.start, stop)]
        columns = [t.column(0) for t in tables]
        row0 = sum(pf.metadata.row_group(i).num_rows for i in range(shard.start))
    else:
        columns, row0 = [], 0
        stop = shard.stop
        for i, batch in enumerate(_arrow_batches(file)):
            if i < shard.start:
                row0 += batch.num_rows
                continue
            if 0 <= stop <= i:
                break
            if shard.column not in batch.schema.names:
                _no_column(shard, batch.schema.names)
            columns.append(batch.column(shard.column))
    texts = []
    for column in columns:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{file}: column {shard.column!r} must hold strings, found {column.type}")
        if column.null_count:
            values = column.to_pylist()
            raise DataError(f"{file}: row {row0 + len(texts) + values.index(None)}: column {shard.column!r} is null")
        texts.extend(column.to_pylist())
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


def _no_column(shard: Shard, names: list[str]):
    raise DataError(f"{shard.file}: dataset {shard.source!r} has no column {shard.column!r} (found: {sorted(names)}); "
                    "set columns.prompt in dataset_info.json")


def check_sources(sources: list[Source]) -> None:
    """Read the first record of every file so column, type and syntax errors surface before tokenizing."""
    for source in sources:
        for file in source.files:
            first = plan_file(source, file)[0]
            if not read_shard(first, limit=1) and not _any_text(source, file):
                raise DataError(f"{file}: dataset {source.name!r} has no documents (empty file)")


def _any_text(source: Source, file: Path) -> bool:
    return any(read_shard(shard, limit=1) for shard in plan_file(source, file)[1:])
