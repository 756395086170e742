"""Path policy (mace_ops.safe_paths): user-typed names resolve only inside the allowed folders."""
import os

import pytest

from mace_ops.safe_paths import PathRefused, files_in_folder, read_text_file, resolve_inside

SECRET = "TOP-SECRET-LINE"


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "input"
    (root / "sub").mkdir(parents=True)
    (root / "list.txt").write_text("ship\ncar\n")
    (root / "sub" / "more.csv").write_text("dog\n")
    outside = tmp_path / "secret.txt"
    outside.write_text(SECRET + "\n")
    os.symlink(outside, root / "link.txt")  # a symlink leading out of the folder
    os.symlink(tmp_path, root / "up")  # a folder symlink leading out
    return root, outside


def roots(root):
    return [("the input folder", str(root))]


def test_relative_names_resolve_inside(tree):
    root, _ = tree
    assert resolve_inside("list.txt", roots(root), "f") == os.path.realpath(root / "list.txt")
    assert resolve_inside("sub/more.csv", roots(root), "f").endswith("more.csv")
    assert read_text_file("sub/more.csv", roots(root), "f") == ("more.csv", "dog\n")


@pytest.mark.parametrize("name", ["SECRET_ABS", "../secret.txt", "sub/../../secret.txt", "~/secret.txt",
                                  "link.txt", "up/secret.txt", "C:\\secret.txt", "list.txt\x00.png", ""])
def test_escapes_are_refused_without_quoting_the_file(tree, name):
    root, outside = tree
    name = str(outside) if name == "SECRET_ABS" else name
    with pytest.raises(PathRefused) as err:
        read_text_file(name, roots(root), "concept_file")
    msg = str(err.value)
    assert msg.startswith("concept_file") and SECRET not in msg and str(outside.parent) not in msg.replace(name, "")


def test_missing_and_outside_files_read_alike(tree):
    root, outside = tree
    a = str(pytest.raises(PathRefused, resolve_inside, "link.txt", roots(root), "f").value)
    b = str(pytest.raises(PathRefused, resolve_inside, "nolink.txt", roots(root), "f").value)
    assert a.replace("link.txt", "X").replace("nolink.txt", "X") == b.replace("nolink.txt", "X")


def test_extension_size_and_encoding(tree, tmp_path):
    root, _ = tree
    (root / "big.txt").write_bytes(b"a\n" * 20)
    (root / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "x.json").write_text("{}")
    with pytest.raises(PathRefused, match="must end with"):
        read_text_file("x.json", roots(root), "f")
    with pytest.raises(PathRefused, match="limit is 10 bytes"):
        read_text_file("big.txt", roots(root), "f", max_bytes=10)
    with pytest.raises(PathRefused, match="not UTF-8"):
        read_text_file("bin.txt", roots(root), "f")


def test_folder_listing_skips_links_out(tree):
    root, _ = tree
    (root / "a.safetensors").write_bytes(b"x")
    os.symlink(tree[1], root / "b.safetensors")
    assert [os.path.basename(p) for p in files_in_folder(str(root), str(root), [".safetensors"])] == ["a.safetensors"]
