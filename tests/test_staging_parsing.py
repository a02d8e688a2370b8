"""Pure logic of staging: SRC:DEST parsing, paths inside the job, sizes and
the cross-checks of uploads and volumes.  Fast, no root."""
import os

import pytest

import jrun


def spec(*argv):
    return jrun.parse_run(list(argv) + ["true"])


@pytest.mark.parametrize("text,src,dest", [
    ("/data/in.csv", "/data/in.csv", "/work/in.csv"),
    ("/data/dir/", "/data/dir", "/work/dir"),
    ("/data/in.csv:x.csv", "/data/in.csv", "/work/x.csv"),
    ("/data/in.csv:sub/x.csv", "/data/in.csv", "/work/sub/x.csv"),
    ("/data/in.csv:/opt/app/", "/data/in.csv", "/opt/app/in.csv"),
    ("/data/in.csv:sub/", "/data/in.csv", "/work/sub/in.csv"),
    ("/data/in.csv:/", "/data/in.csv", "/in.csv"),
    ("/data/in.csv:/opt//a/./b", "/data/in.csv", "/opt/a/b"),
    ("/data/in.csv:.", "/data/in.csv", "/work"),
])
def test_parse_upload(text, src, dest):
    up = jrun.parse_upload(text)
    assert (up.src, up.dest) == (src, dest)


# Issue 16: a relative DEST (and the default one, SRC's name) is under /work,
# the upload area, whatever -w says; '/' at the end receives SRC under its own
# name; an absolute DEST is itself.  Each with and without -w, through parse_run.
@pytest.mark.parametrize("workdir", [None, "/work/src", "/srv/app", "/"])
@pytest.mark.parametrize("text,dest", [
    ("/p/proj", "/work/proj"),              # default DEST
    ("/p/proj:src", "/work/src"),           # relative DEST
    ("/p/proj:a/b", "/work/a/b"),
    ("/p/proj:out/", "/work/out/proj"),     # trailing '/'
    ("/p/proj:/opt/app/", "/opt/app/proj"),
    ("/p/proj:/opt/app", "/opt/app"),       # absolute DEST
])
def test_upload_dest_is_under_work_whatever_the_workdir(workdir, text, dest):
    s = spec("--upload", text, *(("-w", workdir) if workdir else ()))
    assert s.uploads[0].dest == dest
    assert s.workdir == (workdir or "/work")


def test_upload_dot_to_src_with_workdir_src_lands_where_the_command_starts(tmp_path, monkeypatch):
    """The README's Makefile line: `--upload .:src -w /work/src -- make check`."""
    monkeypatch.chdir(tmp_path)
    s = spec("--upload", ".:src", "-w", "/work/src")
    assert (s.uploads[0].src, s.uploads[0].dest, s.workdir) == (str(tmp_path), "/work/src", "/work/src")


def test_parse_upload_relative_src_is_absolute_from_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jrun.parse_upload("rel/x").src == str(tmp_path / "rel" / "x")


@pytest.mark.parametrize("text,fragment", [
    ("", "not SRC[:DEST]"), (":x", "not SRC[:DEST]"), ("/a:", "not SRC[:DEST]"),
    ("/", "host's root"), ("/a:../../etc/x", "'..'"), ("/a:/etc/../x", "'..'"), ("/a:..", "'..'"),
    ("/a:/proc/self", "/proc"), ("/a:/sys", "/sys"), ("/a:/dev/shm/x", "/dev"),
])
def test_parse_upload_refuses(text, fragment):
    with pytest.raises(jrun.UsageError) as e:
        jrun.parse_upload(text)
    assert "--upload" in str(e.value) and fragment in str(e.value)


@pytest.mark.parametrize("text,src,dest,ro", [
    ("/srv/data:/data", "/srv/data", "/data", False),
    ("/srv/data:/data:ro", "/srv/data", "/data", True),
    ("/srv/data/:/data/:rw", "/srv/data", "/data", False),
    ("/run/app.sock:/run/app.sock", "/run/app.sock", "/run/app.sock", False),
])
def test_parse_volume(text, src, dest, ro):
    v = jrun.parse_volume(text)
    assert (v.src, v.dest, v.read_only) == (src, dest, ro)


@pytest.mark.parametrize("text,fragment", [
    ("/a", "not SRC:DEST"), ("/a:/b:ro:x", "not SRC:DEST"), ("/a:/b:RO", "not SRC:DEST"),
    (":/b", "not SRC:DEST"), ("/a:", "not SRC:DEST"), ("a:/b", "SRC must be an absolute"),
    ("/a:b", "DEST must be an absolute"), ("/a:/", "root itself"), ("/a:/x/../y", "'..'"),
    ("/a:/proc", "/proc"), ("/a:/sys/fs", "/sys"), ("/a:/dev", "/dev"),
])
def test_parse_volume_refuses(text, fragment):
    with pytest.raises(jrun.UsageError) as e:
        jrun.parse_volume(text)
    assert "-v/--volume" in str(e.value) and fragment in str(e.value)


def test_proc_prefix_is_not_proc():
    assert jrun.parse_volume("/a:/process").dest == "/process"
    assert jrun.parse_upload("/a:/devices/x").dest == "/devices/x"


@pytest.mark.parametrize("text,value", [("25%", "25%"), ("100%", "100%"), ("512M", str(512 << 20)),
                                        ("2G", str(2 << 30)), ("64", str(64 << 20))])
def test_parse_workdir_size(text, value):
    assert jrun.parse_workdir_size(text) == value


@pytest.mark.parametrize("text", ["0", "0%", "101%", "%", "x%", "12Q", "-1G"])
def test_parse_workdir_size_refuses(text):
    with pytest.raises(jrun.UsageError, match="--workdir-size"):
        jrun.parse_workdir_size(text)


def test_rootfs_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jrun.parse_rootfs("minimal") == ("minimal", None)
    assert jrun.parse_rootfs("host") == ("host", None)
    assert jrun.parse_rootfs("./img") == (str(tmp_path / "img"), None)
    assert jrun.parse_rootfs("img") == (None, "img")  # a bare word names an image (tests/test_images.py)
    with pytest.raises(jrun.UsageError, match="--rootfs"):
        jrun.parse_rootfs("")


def test_staging_defaults():
    s = spec()
    assert s.uploads == () and s.volumes == () and s.workdir == "/work"
    assert s.workdir_size == jrun.DEFAULT_WORKDIR_SIZE == "25%"
    assert s.rootfs == "minimal" and not s.read_only


def test_workdir_is_normalized():
    assert spec("-w", "//srv/./app/").workdir == "/srv/app"
    assert spec("-w", "/").workdir == "/"


def _check(*argv):
    jrun.check_staging_paths(spec(*argv))


def test_cross_checks():
    _check("-v", "/a:/data", "-v", "/b:/database", "--upload", "/x:/data2/x")
    with pytest.raises(jrun.UsageError, match="inside the other"):
        _check("-v", "/a:/data", "-v", "/b:/data/sub")
    with pytest.raises(jrun.UsageError, match="inside the other"):
        _check("-v", "/a:/data", "-v", "/b:/data")
    with pytest.raises(jrun.UsageError, match="inside the volume /work"):
        _check("-v", "/a:/work", "--upload", "/x")
    with pytest.raises(jrun.UsageError, match="inside the volume /data"):
        _check("-v", "/a:/data", "--upload", "/x:/data/")


def test_env_keys_are_ascii():
    with pytest.raises(jrun.UsageError, match="--env"):
        spec("-e", "CAFÉ=1")


def test_env_file_with_nul_is_refused(tmp_path):
    f = tmp_path / "env"
    f.write_bytes(b"A=1\x002\n")
    with pytest.raises(jrun.UsageError, match="env:1"):
        spec("--env-file", str(f))


def test_workdir_bytes():
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert jrun.workdir_bytes(spec()) == ram // 4
    assert jrun.workdir_bytes(spec("--workdir-size", "1G")) == 1 << 30
