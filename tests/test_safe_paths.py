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


# ---- writes (issue 34) ---------------------------------------------------------------------------

from mace_ops.safe_paths import check_save_prefix, resolve_write, resolve_write_pair, where_of  # noqa: E402


@pytest.fixture()
def out(tmp_path):
    root = tmp_path / "output"
    (root / "sub").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text(SECRET)
    os.symlink(victim, root / "evil.pt")  # a file symlink leading out
    os.symlink(tmp_path, root / "up")  # a folder symlink leading out
    return ("the output folder", str(root)), victim


@pytest.mark.parametrize("name", ["VICTIM_ABS", "../victim.pt", "sub/../../victim.pt", "~/x.pt", "evil.pt",
                                  "up/victim.pt", "", "   ", "sub/", "sub/.hidden.pt", "\u200b.pt", "x.pt\x00",
                                  "x.safetensors", "sub"])
def test_writes_stay_in_the_output_folder(out, name):
    root, victim = out
    name = str(victim) if name == "VICTIM_ABS" else name
    with pytest.raises(PathRefused) as err:
        resolve_write_pair(name, root, "path", (".pt",), ".safetensors")
    msg = str(err.value)
    assert msg.startswith("path: ") and SECRET not in msg and str(victim.parent) not in msg.replace(name, "")


def test_write_targets_and_companion(out):
    root, _ = out
    target, side = resolve_write_pair("sub/new/u.pt", root, "path", (".pt",), ".safetensors")
    assert target == os.path.join(os.path.realpath(root[1]), "sub", "new", "u.pt") and side.endswith("u.safetensors")
    os.symlink(os.path.join(root[1], "a.safetensors"), os.path.join(root[1], "a.pt"))  # a.pt -> its own companion
    with pytest.raises(PathRefused, match="would be one file"):
        resolve_write_pair("a.pt", root, "path", (".pt",), ".safetensors")
    assert resolve_write("ok.pt", root, "path") == os.path.join(os.path.realpath(root[1]), "ok.pt")


@pytest.mark.parametrize("prefix", ["", " ", "loras/", "loras/ ", "loras/.x", "\u200b\u2060", "/tmp/x", "../x",
                                    "~/x", "up/x", "loras/../../x"])
def test_save_prefixes_refused(out, prefix):
    with pytest.raises(PathRefused, match="^filename_prefix: "):
        check_save_prefix(prefix, out[0])


def test_save_prefix_accepted(out):
    assert check_save_prefix(" loras/mace_erasure ", out[0]) == "loras/mace_erasure"


def test_labels_are_named_once_and_unreadable_reads_as_missing(tree, monkeypatch):
    root, _ = tree
    two = [("the loras folders", str(root)), ("the loras folders", str(root / "sub"))]
    assert where_of(two) == "the loras folders"
    msg = str(pytest.raises(PathRefused, resolve_inside, "none.txt", two, "f").value)
    assert "the loras folders or the loras folders" not in msg
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("list.txt"))
    a = str(pytest.raises(PathRefused, resolve_inside, "list.txt", roots(root), "f").value)
    b = str(pytest.raises(PathRefused, resolve_inside, "none.txt", roots(root), "f").value)
    assert a.replace("list.txt", "X") == b.replace("none.txt", "X")
