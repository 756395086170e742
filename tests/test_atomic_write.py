"""Whole-or-nothing writes (mace_ops.atomic_write), and bench results written through them."""
import json
import os

import pytest

from bench.common import write_json
from mace_ops.atomic_write import write_bytes_atomic


def test_replaces_whole_with_new_file_permissions(tmp_path):
    path = tmp_path / "deep" / "out.bin"
    write_bytes_atomic(str(path), b"old")
    write_bytes_atomic(str(path), b"new contents")
    assert path.read_bytes() == b"new contents"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(str(path), b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_json_leaves_the_old_results_when_the_payload_cannot_be_written(tmp_path):
    path = tmp_path / "results.json"
    write_json(str(path), {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    with pytest.raises(TypeError):
        write_json(str(path), {"rows": [object()]})      # not JSON: fails before the file is touched
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
