"""Atomic writes leave the old file or the new one, never a partial one or a stray temporary."""

import os

import pytest

from wise_callback.files import write_atomically, write_text_atomically


def test_write_replaces_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "history.jsonl"
    target.write_text("old\n")
    write_text_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl"]


def test_a_failing_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def half_then_fail(temporary):
        temporary.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail, fsync=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
