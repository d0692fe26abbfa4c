"""Reading one prompt source into a `datasets` table (`load_table`), and saying in one line why it cannot be read.

Sources: a .jsonl / .json / .csv / .parquet file or a glob pattern of them (the text ones may be compressed), a
directory written by `save_to_disk`, a folder of data files, or a hub dataset name. Each failure is a
ConfigError that names the source, the problem (a bad line as an editor counts it: `tasks/json_rows.py`; a file
that is not UTF-8; rows under a key that `task.dataset.field` does not name; `datasets`' own cache) and the fix.
"""
from __future__ import annotations

import codecs
import errno
import logging
import lzma
import os
from pathlib import Path
from typing import Any

from async_rlhf.config.base import ConfigError
from async_rlhf.config.task import source_files, source_format
from async_rlhf.tasks.json_rows import field_problem, first_bad_row, open_bytes

E = "config error: "
BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}  # datasets' builder names


def load_table(path: str, fmt: str, split: str, split_key: str = "task.dataset.split",
               name: str = "task.dataset", other: str = "point task.dataset.path at another",
               field: str | None = None) -> Any:
    """A `datasets.Dataset` for one source (a .json file's rows under its key `field`, where given); any failure
    is a one-line ConfigError naming the source as `name` and saying `other` as the alternative to fixing it."""
    import datasets

    kind = source_format(path, fmt)
    for file in source_files(path) if kind in BUILDERS else []:  # a pattern's every file (data/train-*.jsonl)
        if file.stat().st_size == 0:  # datasets: "StopIteration"
            raise ConfigError(f"{E}{name}: '{file}' is empty; fix the file, or {other}")
        if kind != "parquet":
            check_utf8(file, name, other)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs a parse error itself, before ours
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # two lines per retry when the Hub is unreachable
    under = {"field": field} if kind == "json" and field is not None else {}
    try:
        if kind in BUILDERS:
            return datasets.load_dataset(BUILDERS[kind], data_files=str(path), split="train", **under)
        table = (datasets.load_from_disk(path) if kind == "disk" else datasets.load_dataset(path) if kind == "folder"
                 else datasets.load_dataset(path, split=split))  # a folder's splits are its files' names
    except Exception as exc:  # datasets raises many types; the user needs the source and the reason
        if under and (found := no_rows_under(path, under["field"])):  # datasets: KeyError 'data'
            raise ConfigError(f"{E}task.dataset.field: no rows under key '{field}' in '{found[0]}' ({found[1]}); "
                              "set it to the key the rows sit under, or unset it for a file of rows") from None
        raise read_failure(exc, kind, path, f"{E}{name}", other, datasets.config.HF_DATASETS_CACHE) from None
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ConfigError(f"{E}{split_key}: no split '{split}' in '{path}' (splits: {', '.join(table)})")
        table = table[split]
    return table


def read_failure(exc: BaseException, kind: str, path: str, name: str, other: str, cache: str) -> ConfigError:
    """Why `datasets` could not read a source, in one line that says what to fix: the file, the name or the
    Hub's reach, or its own cache (an Arrow copy of every file it reads)."""
    if kind in BUILDERS and "corresponds to no data" in root_reason(exc):  # datasets, of a file of blank lines
        return ConfigError(f"{name}: '{path}' has no rows; fix the file, or {other}")
    if kind != "disk" and (problem := cache_problem(innermost(exc), cache)):
        return ConfigError(f"{name}: cannot write the datasets cache while reading '{path}' ({problem}); set "
                           "$HF_DATASETS_CACHE to a writable directory with room for an Arrow copy of the data")
    fix = {"hub": "check the name and this machine's access to the Hub (HF_HUB_OFFLINE=1: its local cache only)",
           "folder": "give it .jsonl, .json, .csv or .parquet files of one kind"}.get(kind, "fix the file")
    where = bad_row(path, kind) if kind in ("jsonl", "json") else None  # Arrow: rows counted from 0
    if where is None and kind in BUILDERS and type(innermost(exc)).__name__ == "CastError":
        where = mixed_columns(path, kind)
    return ConfigError(f"{name}: cannot read '{path}' as {kind}: {where or root_reason(exc)}; {fix}, or {other}")


def mixed_columns(path: str, kind: str) -> str | None:
    """Which files of a pattern have other columns than its first (datasets: "Couldn't cast ... because column
    names don't match"), read one by one: this runs only once reading them together has failed."""
    import datasets

    try:
        columns = {file: datasets.load_dataset(BUILDERS[kind], data_files=str(file), split="train").column_names
                   for file in source_files(path)}
    except Exception:  # noqa: BLE001 - a file that fails alone too: datasets' own reason is said instead
        return None
    first, *rest = columns
    differ = [file for file in rest if set(columns[file]) != set(columns[first])]
    if not differ:
        return None
    shown = "; ".join(f"{file}: {', '.join(columns[file])}" for file in (first, differ[0]))
    return f"the files it matches have different columns ({shown})"


def no_rows_under(path: str, field: str) -> tuple[Path, str] | None:
    """The first file of a JSON source with no rows under its key `field`, and why."""
    return next(((file, why) for file in source_files(path) if (why := field_problem(file, field))), None)


def bad_row(path: str, kind: str) -> str | None:
    """The first bad line of a JSON source, the file named where a pattern matched several."""
    files = source_files(path)
    for file in files:
        if where := first_bad_row(file, kind == "jsonl"):
            return f"{file} {where}" if len(files) > 1 else where
    return None


def check_utf8(path: Path, name: str, other: str) -> None:
    """A text source that is not UTF-8 (a file saved as Latin-1) is a one-line ConfigError naming its first bad
    line: datasets loads a JSON file's bytes as they are and failed only when that row was read (a traceback).
    A compressed file is read through its decompressor; one that does not decompress is named too."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        with open_bytes(path) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(chunk)
                line += chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # its bytes: the chunk, after any bytes held from the one before
        line += exc.object.count(b"\n", 0, exc.start)
        raise ConfigError(f"{E}{name}: line {line} of '{path}' is not UTF-8 text ({exc.reason}); save the file as "
                          f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or {other}") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:  # gzip: BadGzipFile (an OSError), EOFError when cut short
        raise ConfigError(f"{E}{name}: cannot decompress '{path}' ({exc or type(exc).__name__}); compress it again "
                          f"or give it uncompressed, or {other}") from None


def innermost(exc: BaseException) -> BaseException:
    """The error at the bottom of `raise ... from` chains: datasets wraps a parse error ("JSON parse error: ... in
    row 1") in a generic one ("An error occurred while generating the dataset")."""
    while exc.__cause__ is not None:  # the wrapped error (not what failed while handling it)
        exc = exc.__cause__
    return exc


def root_reason(exc: BaseException) -> str:
    """The first line of the innermost error."""
    exc = innermost(exc)
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def cache_problem(exc: BaseException, cache: str | os.PathLike) -> str | None:
    """What is wrong with `datasets`' cache (where it writes its Arrow copy of a file or hub dataset), if that is
    what failed: the disk is full, or the error names a path in, or above, the cache. None otherwise."""
    if not isinstance(exc, OSError):
        return None
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    named = [Path(f) for f in (exc.filename, exc.filename2) if isinstance(f, (str, os.PathLike))]
    root = Path(cache)
    if full or any(p == root or root in p.parents or p in root.parents for p in named):
        return f"{exc.strerror or exc}: '{named[0] if named else root}'"
    return None
