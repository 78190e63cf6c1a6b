"""hstu.files: files written whole, and a new file never replacing one that appeared meanwhile."""
import pytest

from hstu.files import file_in_the_way, write_text_atomically


def test_a_file_written_whole_replaces_the_old_one(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("first")
    write_text_atomically(path, "second")
    assert path.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_without_replace_an_existing_file_is_kept(tmp_path):
    """What two evaluations racing for one out_file rely on: the second write fails and loses nothing."""
    write_text_atomically(tmp_path / "new.json", "mine", replace=False)
    assert (tmp_path / "new.json").read_text() == "mine"
    with pytest.raises(FileExistsError):
        write_text_atomically(tmp_path / "new.json", "theirs", replace=False)
    assert (tmp_path / "new.json").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["new.json"]  # no temporary file left


def test_file_in_the_way_names_the_file_that_blocks_a_folder(tmp_path):
    (tmp_path / "notes").write_text("x")
    assert file_in_the_way(tmp_path / "notes") == tmp_path / "notes"
    assert file_in_the_way(tmp_path / "notes" / "a" / "b") == tmp_path / "notes"
    assert file_in_the_way(tmp_path / "new" / "a") is None
    assert file_in_the_way(tmp_path) is None
