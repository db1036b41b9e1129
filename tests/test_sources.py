"""Reading registered corpora: every file type, shard boundaries, errors named by file and line, the offline Hub."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_assets import write_dataset_info

from ptflow.config.schema import DataSection
from ptflow.data import sources
from ptflow.data.dataset import open_blocks, prepare_dataset
from ptflow.data.sources import (
    Source,
    check_sources,
    file_format,
    plan_file,
    plan_shards,
    read_shard,
    resolve_sources,
)
from ptflow.errors import DataError

DOCS = ["first document", "second one, with a comma", "third\tdocument", "caf\u00e9 and na\u00efve", "fifth"]


def jsonl(texts, key="text") -> str:
    return "".join(json.dumps({key: t}) + "\n" for t in texts)


def texts_of(path: Path, column: str = "text") -> list[str]:
    fmt = file_format(path)
    source = Source("d", (path,), column, fmt.format)
    return [t for shard in plan_shards(source) for t in read_shard(shard)]


def write_parquet(path: Path, texts, column="text", row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def write_arrow(path: Path, texts, stream=True, batch=2):
    import pyarrow as pa

    table = pa.table({"text": texts})
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for b in table.to_batches(max_chunksize=batch):
            writer.write_batch(b)


@pytest.fixture
def small_shards(monkeypatch):
    """Cut files into ~64-byte shards so tiny files exercise multi-shard reading."""
    monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 64)


# --------------------------------------------------------------------------- file types


def test_every_file_type_reads_the_same_texts(tmp_path):
    import pyarrow as pa

    files = {
        "a.jsonl": jsonl(DOCS),
        "b.json": json.dumps([{"text": t} for t in DOCS]),
        "c.json": jsonl(DOCS),  # JSON lines in a .json file, as datasets accepts
        "d.csv": "text,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(DOCS)),
        "e.txt": "\n".join(DOCS) + "\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS).encode()))
    with pa.output_stream(str(tmp_path / "g.jsonl.zst"), compression="zstd") as f:
        f.write(jsonl(DOCS).encode())
    write_parquet(tmp_path / "h.parquet", DOCS)
    write_arrow(tmp_path / "i.arrow", DOCS, stream=True)
    write_arrow(tmp_path / "j.arrow", DOCS, stream=False)
    for path in sorted(tmp_path.iterdir()):
        assert texts_of(path) == DOCS, path.name


def test_formats_from_names():
    assert file_format(Path("x.JSONL")).format == "jsonl"
    assert file_format(Path("x.jsonl.gz")) == sources.FileFormat("jsonl", "gzip")
    assert file_format(Path("x.txt.zstd")) == sources.FileFormat("txt", "zstd")
    assert file_format(Path("x.parquet.gz")) is None  # parquet compresses itself
    assert file_format(Path("x.docx")) is None


def test_txt_skips_blank_lines_and_strips_crlf(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"one\r\n\r\n  \ntwo\nthree")
    assert texts_of(path) == ["one", "two", "three"]


def test_csv_keeps_quoted_newlines(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('id,text\n1,"line one\nline two"\n2,plain\n')
    assert texts_of(path) == ["line one\nline two", "plain"]


def test_json_lines_keep_unicode_line_separators(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert texts_of(path) == ["a\u2028b"]


# --------------------------------------------------------------------------- shards


def test_shards_end_at_line_breaks_and_cover_the_file(tmp_path, small_shards):
    texts = [f"document number {i} " + "x" * (i % 7) for i in range(40)]
    path = tmp_path / "big.jsonl"
    path.write_text(jsonl(texts))
    shards = plan_file(Source("big", (path,), "text", "jsonl"), path)
    assert len(shards) > 5
    data = path.read_bytes()
    assert shards[0].start == 0 and shards[-1].stop == len(data)
    for a, b in zip(shards, shards[1:]):
        assert a.stop == b.start and data[a.stop - 1: a.stop] == b"\n"
    assert [t for s in shards for t in read_shard(s)] == texts
    assert [s.index for s in shards] == list(range(len(shards)))


def test_shard_boundaries_depend_only_on_the_bytes(tmp_path, small_shards):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl([f"doc {i}" for i in range(30)]))
    copy = shutil.copy(path, tmp_path / "b.jsonl")
    plan = lambda p: [(s.start, s.stop) for s in plan_file(Source("s", (p,), "text", "jsonl"), p)]  # noqa: E731
    assert plan(path) == plan(Path(copy))


def test_parquet_and_arrow_shards_group_row_groups_and_batches(tmp_path, small_shards):
    texts = [f"row {i} " + "y" * 40 for i in range(20)]
    write_parquet(tmp_path / "p.parquet", texts, row_group_size=3)
    write_arrow(tmp_path / "s.arrow", texts, batch=3)
    for path, fmt in ((tmp_path / "p.parquet", "parquet"), (tmp_path / "s.arrow", "arrow")):
        shards = plan_file(Source("x", (path,), "text", fmt), path)
        assert len(shards) > 1
        assert [t for s in shards for t in read_shard(s)] == texts


def test_errors_in_a_later_shard_give_the_files_line_number(tmp_path, small_shards):
    lines = [json.dumps({"text": f"ok {i}"}) for i in range(30)]
    lines[23] = '{"text": "broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    shards = plan_file(Source("bad", (path,), "text", "jsonl"), path)
    bad = next(s for s in shards if s.start <= path.read_bytes().index(b"broken") < s.stop)
    assert bad.index > 0
    with pytest.raises(DataError, match=r"bad\.jsonl:24: malformed JSON \(Unterminated string starting at column 10\)"):
        read_shard(bad)


def test_non_utf8_in_a_later_shard_gives_the_files_line_number(tmp_path, small_shards):
    body = "".join(f"plain line {i}\n" for i in range(20)).encode() + b"caf\xe9\n" + b"tail\n"
    path = tmp_path / "latin.txt"
    path.write_bytes(body)
    with pytest.raises(DataError, match=r"latin\.txt:21: not valid UTF-8 \(byte 0xe9\); re-encode the file as UTF-8"):
        [read_shard(s) for s in plan_file(Source("latin", (path,), "text", "txt"), path)]


# --------------------------------------------------------------------------- errors


def test_gzip_errors_name_file_and_line(tmp_path):
    path = tmp_path / "z.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(DataError, match=r"z\.jsonl\.gz:2: not valid UTF-8"):
        texts_of(path)
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"z\.jsonl\.gz: not valid gzip data"):
        texts_of(path)


def test_columnar_errors_list_columns_and_name_rows(tmp_path):
    write_parquet(tmp_path / "p.parquet", DOCS, column="content")
    with pytest.raises(DataError, match=r"p\.parquet: dataset 'd' has no column 'text' \(found: \['content', 'id'\]\)"):
        texts_of(tmp_path / "p.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: row 1: column 'text' is null"):
        texts_of(tmp_path / "n.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"i\.parquet: column 'text' must hold strings, found int64"):
        texts_of(tmp_path / "i.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        texts_of(tmp_path / "broken.parquet")


def test_csv_without_the_column_lists_columns(tmp_path):
    (tmp_path / "c.csv").write_text("body,id\nx,1\n")
    with pytest.raises(DataError, match=r"c\.csv:1: dataset 'd' has no column 'text' \(found: \['body', 'id'\]\)"):
        texts_of(tmp_path / "c.csv")


def test_json_list_errors(tmp_path):
    (tmp_path / "o.json").write_text('[{"text": "a"}, {"body": "b"}]')
    with pytest.raises(DataError, match=r"o\.json:record 1: dataset 'd' has no column 'text' \(found: \['body'\]\)"):
        texts_of(tmp_path / "o.json")
    (tmp_path / "m.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"m\.json:2: malformed JSON \(Expecting value at column 11\)"):
        texts_of(tmp_path / "m.json")


def section(root: Path, dataset: str, **kw) -> DataSection:
    return DataSection(dataset=dataset, dataset_dir=str(root), **kw)


def test_entry_problems_are_reported_together(tmp_path):
    root = write_dataset_info(tmp_path, {
        "mixed": {"file_name": "mixed"}, "split": {"file_name": "a.jsonl", "split": "validation"},
        "chat": {"file_name": "a.jsonl", "formatting": "sharegpt"}, "ms": {"ms_hub_url": "x/y"},
        "bad_n": {"file_name": "a.jsonl", "num_samples": 0}, "empty_dir": {"file_name": "empty"},
    })
    (root / "a.jsonl").write_text(jsonl(DOCS))
    (root / "mixed").mkdir()
    (root / "mixed" / "x.jsonl").write_text(jsonl(DOCS))
    (root / "mixed" / "y.txt").write_text("text\n")
    (root / "empty").mkdir()
    with pytest.raises(DataError) as info:
        resolve_sources(section(root, "mixed,split,chat,ms,bad_n,empty_dir"))
    message = str(info.value)
    assert "data.dataset 'mixed': " in message and "mixes file types (jsonl, txt)" in message
    assert "entry 'split' has split 'validation', but a local file is one 'train' split" in message
    assert "entry 'chat' has formatting 'sharegpt'" in message
    assert "entry 'ms' uses ms_hub_url, which ptflow does not read" in message
    assert "entry 'bad_n' has num_samples 0; use a positive whole number" in message
    assert "data.dataset 'empty_dir': folder" in message and "has no files" in message


def test_folder_skips_hidden_files_and_reads_in_name_order(tmp_path):
    root = write_dataset_info(tmp_path, {"shards": {"file_name": "shards"}})
    (root / "shards").mkdir()
    (root / "shards" / "b.jsonl").write_text(jsonl(["b"]))
    (root / "shards" / "a.jsonl").write_text(jsonl(["a"]))
    (root / "shards" / ".partial.jsonl").write_text("not json")
    (source,) = resolve_sources(section(root, "shards"))
    assert [f.name for f in source.files] == ["a.jsonl", "b.jsonl"]
    check_sources([source])


# --------------------------------------------------------------------------- the Hub, offline


def populate_hub_cache(cache: Path, repo_id: str, configs: dict[str, dict[str, list[dict]]]) -> None:
    """Write what an earlier online `load_dataset(repo_id, config)` leaves in HF_DATASETS_CACHE."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    for config, splits in configs.items():
        staging = cache.parent / f"staging-{config}"
        files = {}
        for split, rows in splits.items():
            path = staging / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files[split] = str(path)
        builder = Json(cache_dir=str(staging / "build"), dataset_name=name, config_name=config, data_files=files)
        builder.download_and_prepare()
        target = cache / f"{namespace}___{name}" / config / "0.0.0" / ("0" * 40)
        shutil.copytree(builder.cache_dir, target)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets"
    populate_hub_cache(cache, "tiny-org/tiny-corpus", {
        "default": {"train": [{"text": t, "id": i} for i, t in enumerate(DOCS)],
                    "validation": [{"text": "held out text"}]},
    })
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def test_hub_dataset_from_the_offline_cache(tmp_path, hub_cache, tokenizer_artifact, layout):
    from ptflow.data.tokenizer import open_tokenizer

    root = write_dataset_info(tmp_path / "d", {
        "hub": {"hf_hub_url": "tiny-org/tiny-corpus", "subset": "default", "split": "train", "revision": "main"},
        "hub_val": {"hf_hub_url": "tiny-org/tiny-corpus", "split": "validation"},
    })
    (source,) = resolve_sources(section(root, "hub"))
    assert source.format == "arrow" and all(f.is_relative_to(hub_cache) for f in source.files)
    artifact = prepare_dataset(section(root, "hub", cutoff_len=4, eval_dataset="hub_val"), tokenizer_artifact, layout)
    tok = open_tokenizer(tokenizer_artifact.path)
    expected = [i for t in DOCS for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    blocks, _ = open_blocks(artifact, "train")
    assert blocks.ravel().tolist() == expected[: len(expected) // 4 * 4]
    assert artifact.stats["sources"]["hub"]["documents"] == len(DOCS)
    assert artifact.stats["sources"]["hub_val (eval)"]["documents"] == 1
    assert np.asarray(open_blocks(artifact, "eval")[0]).size == 4


def test_hub_errors(tmp_path, hub_cache):
    root = write_dataset_info(tmp_path / "d", {
        "missing": {"hf_hub_url": "tiny-org/not-cached"},
        "bad_split": {"hf_hub_url": "tiny-org/tiny-corpus", "split": "test"},
        "bad_column": {"hf_hub_url": "tiny-org/tiny-corpus", "columns": {"prompt": "content"}},
    })
    with pytest.raises(DataError) as info:
        resolve_sources(section(root, "missing,bad_split,bad_column"))
    message = str(info.value)
    assert "entry 'missing' (hf_hub_url 'tiny-org/not-cached'" in message
    assert "not in the local datasets cache and HF_HUB_OFFLINE=1 forbids downloading it" in message
    assert "entry 'bad_split'" in message and 'Unknown split "test"' in message
    assert "entry 'bad_column'" in message and "has no column 'content' (found: ['id', 'text'])" in message


# --------------------------------------------------------------------------- overlong lines (bounded memory)


LONG_LINE_FILES = {  # name -> content with an overlong document on line 3
    "long.jsonl": jsonl(["a", "b"]) + json.dumps({"text": "x" * 5000}) + "\n" + jsonl(["c"]),
    "long.txt": "a\nb\n" + "y" * 5000 + "\nc\n",
}


@pytest.fixture
def small_line_limit(monkeypatch):
    """A 1000-byte line limit and 256-byte scan blocks: the overlong line spans blocks and shards."""
    monkeypatch.setenv("PTFLOW_MAX_LINE_BYTES", "1000")
    monkeypatch.setattr(sources, "SCAN_BYTES", 256)


@pytest.mark.parametrize("name", sorted(LONG_LINE_FILES))
@pytest.mark.parametrize("shards", ["one shard", "small shards"])
def test_overlong_line_is_refused_with_file_line_and_limit(tmp_path, small_line_limit, monkeypatch, name, shards):
    if shards == "small shards":  # the line crosses a shard boundary: caught while planning, before reading
        monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 64)
    path = tmp_path / name
    path.write_text(LONG_LINE_FILES[name])
    source = Source("d", (path,), "text", file_format(path).format)
    pattern = rf"{name}:3: line is longer than 1,000 bytes .*PTFLOW_MAX_LINE_BYTES"
    with pytest.raises(DataError, match=pattern):
        [t for shard in plan_shards(source) for t in read_shard(shard)]
    if shards == "small shards":  # pre-checks plan every file's shards, so they see it before any stage runs
        with pytest.raises(DataError, match=pattern):
            check_sources([source])
    else:  # pre-checks read the first record only; tokenizing reads the rest and stops there
        check_sources([source])


def test_overlong_first_line_is_refused_by_the_peek_and_in_gzip(tmp_path, small_line_limit):
    (tmp_path / "first.txt").write_text("z" * 5000 + "\nshort\n")
    (tmp_path / "later.jsonl.gz").write_bytes(gzip.compress(LONG_LINE_FILES["long.jsonl"].encode()))
    for name, line in (("first.txt", 1), ("later.jsonl.gz", 3)):
        path = tmp_path / name
        source = Source("d", (path,), "text", file_format(path).format)
        with pytest.raises(DataError, match=rf"{name}:{line}: line is longer than 1,000 bytes"):
            check_sources([source]) if line == 1 else [t for s in plan_shards(source) for t in read_shard(s)]


def test_lines_at_the_limit_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PTFLOW_MAX_LINE_BYTES", "1000")
    (tmp_path / "edge.txt").write_text("q" * 1000 + "\n" + "r" * 1000)  # last line has no line break
    assert texts_of(tmp_path / "edge.txt") == ["q" * 1000, "r" * 1000]
