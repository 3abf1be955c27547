"""Local and cloud paths through one API (``ilvr_jax.storage``, on etils.epath): every helper
on a ``gs://`` bucket (in memory, through epath's fsspec backend, ``tests/fake_bucket.py``)
behaves as on a local directory; local paths keep ``os.path`` semantics (relative paths, an
atomic write); a bucket path without its storage package is one clear line."""

from __future__ import annotations

import importlib.util
import io
import os

import pytest

from ilvr_jax import storage

_spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "fake_bucket.py"))
fake_bucket = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_bucket)
fake_bucket = fake_bucket.load()


@pytest.fixture
def bucket():
    with fake_bucket.install() as fs:
        yield fs


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
    """The same directory tree API on a local directory and on the bucket."""
    if request.param == "local":
        yield str(tmp_path / "root")
    else:
        with fake_bucket.install():
            yield "gs://test-bucket/root"


def test_files_and_directories_behave_alike(root):
    storage.makedirs(storage.join(root, "sub", "deeper"))
    assert storage.isdir(root) and storage.isdir(storage.join(root, "sub"))
    a = storage.join(root, "a.json")
    storage.write_text(a, '{"x": 1}')
    assert storage.read_text(a) == '{"x": 1}' and storage.read_bytes(a) == b'{"x": 1}'
    assert storage.isfile(a) and not storage.isdir(a) and not storage.isfile(storage.join(root, "sub"))
    assert storage.getsize(a) == 8 and storage.exists(a) and not storage.exists(storage.join(root, "none"))
    storage.write_bytes(storage.join(root, "sub", "w.safetensors"), b"\0" * 16)
    storage.write_text(storage.join(root, "sub", "t.txt"), "t")
    storage.write_text(storage.join(root, "b.jsonl"), "")
    assert sorted(storage.listdir(root)) == ["a.json", "b.jsonl", "sub"]
    assert [storage.basename(p) for p in storage.glob(root, "*.json*")] == ["a.json", "b.jsonl"]
    assert storage.dirname(a) == root and storage.basename(a) == "a.json"
    with storage.open_file(storage.join(root, "sub", "t.txt")) as f:
        assert f.read() == "t"
    # Copies, renames, removal.
    copy = storage.join(root, "copy")
    storage.copy_tree(storage.join(root, "sub"), copy)
    assert sorted(storage.listdir(copy)) == ["deeper", "t.txt", "w.safetensors"]
    assert storage.read_bytes(storage.join(copy, "w.safetensors")) == b"\0" * 16
    storage.copy_file(a, storage.join(root, "c.json"))
    storage.replace(storage.join(root, "c.json"), storage.join(root, "d.json"))
    assert storage.read_text(storage.join(root, "d.json")) == '{"x": 1}'
    assert not storage.exists(storage.join(root, "c.json"))
    storage.remove(storage.join(root, "d.json"))
    storage.makedirs(storage.join(root, "aside"))     # a directory moved aside (checkpoints do)
    storage.replace(copy, storage.join(root, "aside", "copy"))
    assert not storage.exists(copy)
    assert sorted(storage.listdir(storage.join(root, "aside", "copy"))) == ["deeper", "t.txt", "w.safetensors"]
    storage.rmtree(storage.join(root, "aside"))
    assert sorted(storage.listdir(root)) == ["a.json", "b.jsonl", "sub"]


def test_local_copy_holds_the_small_files(root):
    storage.makedirs(storage.join(root, "model", "nested"))
    for name, data in (("tokenizer.json", b"{}"), ("config.json", b"{}"), ("model.safetensors", b"w" * 64),
                       ("nested/x", b"x")):
        storage.write_bytes(storage.join(root, "model", name), data)
    local = storage.local_copy(storage.join(root, "model"))
    if storage.is_local(root):
        assert local == storage.join(root, "model")    # a local directory is used in place
    else:
        assert storage.is_local(local) and sorted(os.listdir(local)) == ["config.json", "tokenizer.json"]
        assert open(os.path.join(local, "tokenizer.json"), "rb").read() == b"{}"


def test_append_file_keeps_earlier_content_and_is_readable_after_each_flush(root):
    storage.makedirs(root)
    path = storage.join(root, "log.jsonl")
    storage.write_text(path, "old\n")
    f = storage.AppendFile(path)
    f.write("one\n")
    f.flush()
    assert storage.read_text(path) == "old\none\n"   # visible after the flush (a bucket object rewritten)
    f.write("two\n")
    f.close()
    assert storage.read_text(path) == "old\none\ntwo\n"
    b = storage.AppendFile(storage.join(root, "events"), binary=True)
    b.write(b"\x00\x01")
    b.flush(fsync=True)
    b.close()
    assert storage.read_bytes(storage.join(root, "events")) == b"\x00\x01"


def test_path_or_file_opens_as_pil_expects(root):
    from PIL import Image

    storage.makedirs(root)
    png = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(png, format="PNG")
    path = storage.join(root, "x.png")
    storage.write_bytes(path, png.getvalue())
    with Image.open(storage.path_or_file(path)) as im:
        assert im.size == (3, 2) and im.getpixel((0, 0)) == (10, 20, 30)


def test_local_paths_keep_os_path_semantics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.makedirs("rel/dir")
    storage.write_text("rel/dir/f.txt", "x")
    assert (tmp_path / "rel" / "dir" / "f.txt").read_text() == "x"
    assert storage.abspath("rel") == str(tmp_path / "rel") and storage.join("rel", "f") == os.path.join("rel", "f")
    assert not storage.isabs("rel") and storage.isabs("/abs") and storage.isabs("gs://b/x")
    assert os.listdir(tmp_path / "rel" / "dir") == ["f.txt"]      # the temporary file was renamed away
    assert storage.abspath("gs://b/run/") == "gs://b/run" and storage.join("gs://b", "x", "y") == "gs://b/x/y"


def test_a_bucket_path_without_its_package_is_one_line(monkeypatch):
    monkeypatch.setattr(storage, "_installed", lambda package: False)
    with pytest.raises(storage.StorageError) as e:
        storage.read_text("gs://bucket/data.jsonl")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gs://bucket/data.jsonl: gs:// paths need gcsfs or tensorflow")
    assert "pip install gcsfs" in msg
    with pytest.raises(storage.StorageError, match="unsupported storage scheme ftp://"):
        storage.exists("ftp://host/x")
    storage.check_backend("/local/path")   # local paths need nothing


def test_local_copies_replace_a_file_whole_so_a_reader_never_sees_part_of_it(tmp_path):
    """The processes of one run copy the same files into a shared workdir while others read
    them: a copy lands by rename, so a reader that opened the old file keeps reading all of
    it (a truncating copy would cut it to nothing), and no temporary file is left."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "tokenizer_config.json").write_text('{"new": true}')
    (src / "sub" / "x.json").write_text("[1]")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer_config.json").write_text('{"old": "' + "o" * 10000 + '"}')
    with open(dst / "tokenizer_config.json") as reader:
        storage.copy_tree(str(src), str(dst))
        assert reader.read() == '{"old": "' + "o" * 10000 + '"}'
    assert (dst / "tokenizer_config.json").read_text() == '{"new": true}'
    assert (dst / "sub" / "x.json").read_text() == "[1]"
    assert sorted(p.name for p in dst.rglob("*")) == ["sub", "tokenizer_config.json", "x.json"]
