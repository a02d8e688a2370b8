"""Images: jrun rootfs import / ls / rm and --rootfs NAME.

The archives are built here with tarfile and json (there is no registry):
docker-archives (docker and podman save; docker 25's OCI form), OCI image
layouts and oci-archives, plain rootfs tarballs, multi-layer images with
whiteouts and opaque directories, a multi-platform index, and hostile ones.
Pure logic first; then the real jrun, as root: every import -> run -> rm
round trip, the image config honoured, the stored tree unchanged, the store
under concurrency, gc and jobs, and each attack with the host's canary files
checked and nothing left in the store; last a cross-check with podman's own
`podman save`, where podman is installed.
"""
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

import pytest

import jrun as J
from conftest import JRUN, ROOT, jrun_in_pty, needs_root, state_dirs

STORE = J.HOST.image_dir
MINIMAL = "/var/lib/jrun/rootfs"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {None: "application/vnd.oci.image.layer.v1.tar", "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def _launcher():
    """How this file starts jrun.  `python3 jrun.py` compiles the whole file
    at every start (about 130 ms here, most of a jrun run) and this file
    starts jrun some 120 times, so it imports jrun from a bytecode cache
    instead, as the installed entry point does.  $JRUN, if set, is used."""
    if os.environ.get("JRUN"):
        return JRUN
    import py_compile

    py_compile.compile(os.path.join(ROOT, "jrun.py"), doraise=True)  # read even under PYTHONDONTWRITEBYTECODE
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); from jrun import main; sys.exit(main())"
            % ROOT]


JRUN_FAST = _launcher()


def jrun(*args, timeout=60, check=None):
    """Run jrun with ARGS; the CompletedProcess (text), its exit status checked if CHECK."""
    p = subprocess.run(JRUN_FAST + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert p.returncode == check, "exit %d, wanted %d\nstdout: %s\nstderr: %s" % (
            p.returncode, check, p.stdout, p.stderr)
    return p


try:
    import zstandard
except ImportError:
    zstandard = None
needs_zstd = pytest.mark.skipif(zstandard is None, reason="the zstandard package is not installed (pip install zstandard)")


# ---------------------------------------------------------------------------
# Archive builders
# ---------------------------------------------------------------------------

def f(name, data=b"", mode=0o644, uid=0, gid=0):
    ti = tarfile.TarInfo(name)
    data = data.encode() if isinstance(data, str) else data
    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), mode, uid, gid, 1_600_000_000
    return ti, data


def entry(name, kind, target="", mode=0o755):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, target, mode, 1_600_000_000
    if kind == tarfile.CHRTYPE:
        ti.devmajor, ti.devminor = 8, 0  # sda
    return ti, None


def d(name, mode=0o755):
    return entry(name, tarfile.DIRTYPE, mode=mode)


def sym(name, target):
    return entry(name, tarfile.SYMTYPE, target, 0o777)


def hard(name, target):
    return entry(name, tarfile.LNKTYPE, target, 0o644)


def tar_of(entries, base=None):
    """Uncompressed tar of ENTRIES ((TarInfo, data) pairs) in order, after
    the tree BASE (a directory) if given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        if base:
            t.add(base, arcname=".", filter=lambda ti: None if ti.name == "./.jrun-rootfs" else ti)
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data, kind):
    if kind == "gzip":
        return gzip.compress(data, 1, mtime=0)
    if kind == "xz":
        return lzma.compress(data, preset=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


_base = []


def base_layer():
    """The minimal rootfs (busybox, /etc) as a layer."""
    if not _base:
        _base.append(tar_of([], MINIMAL))
    return _base[0]


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_of(layers, cfg=None, arch="amd64", variant=None):
    c = {"architecture": arch, "os": "linux", "created": "2026-01-01T00:00:00Z", "config": cfg or {},
         "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}
    if variant:
        c["variant"] = variant
    return c


class Layout:
    """An OCI image layout written in DIRECTORY."""

    def __init__(self, directory):
        self.dir = str(directory)
        os.makedirs(os.path.join(self.dir, "blobs", "sha256"), exist_ok=True)
        self.manifests = []

    def blob(self, data, media):
        digest = sha(data)
        with open(self.path(digest), "wb") as fh:
            fh.write(data)
        return {"mediaType": media, "digest": digest, "size": len(data)}

    def path(self, digest):
        return os.path.join(self.dir, "blobs", "sha256", digest[7:])

    def image(self, layers, cfg=None, compression="gzip", arch="amd64", variant=None, ref="test:1",
              platform=True, config=None):
        """Add an image of LAYERS (uncompressed tars); returns (manifest descriptor, manifest)."""
        config = config or config_of(layers, cfg, arch, variant)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": self.blob(json.dumps(config).encode(), OCI_CONFIG),
                    "layers": [self.blob(compress(x, compression), LAYER_TYPES[compression]) for x in layers]}
        desc = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        if platform:
            desc["platform"] = dict({"architecture": arch, "os": "linux"}, **({"variant": variant} if variant else {}))
        if ref:
            desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.manifests.append(desc)
        return desc, manifest

    def close(self):
        with open(os.path.join(self.dir, "index.json"), "w") as fh:
            json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}, fh)
        with open(os.path.join(self.dir, "oci-layout"), "w") as fh:
            json.dump({"imageLayoutVersion": "1.0.0"}, fh)
        return self.dir


def tar_dir(directory, path):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(directory)):
            t.add(os.path.join(directory, name), arcname=name)
    return str(path)


def oci_layout(directory, layers, cfg=None, **kw):
    lay = Layout(directory)
    lay.image(layers, cfg, **kw)
    return lay.close()


def oci_archive(path, layers, cfg=None, **kw):
    return tar_dir(oci_layout(str(path) + ".layout", layers, cfg, **kw), path)


def docker_archive(path, layers, cfg=None, arch="amd64", tags=("test:1",), docker25=False, diff_ids=None):
    """docker save / podman save: manifest.json, <hex>.json and a tar per
    layer; docker 25's is an OCI layout with manifest.json beside it."""
    config = config_of(layers, cfg, arch)
    if diff_ids:
        config["rootfs"]["diff_ids"] = diff_ids
    config = json.dumps(config).encode()
    if docker25:
        lay = Layout(str(path) + ".layout")
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": lay.blob(config, OCI_CONFIG),
                    "layers": [lay.blob(x, LAYER_TYPES[None]) for x in layers]}
        desc = lay.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        desc["annotations"] = {"io.containerd.image.name": "docker.io/library/" + tags[0]}
        lay.manifests.append(desc)
        lay.close()
        entry_ = {"Config": "blobs/sha256/" + sha(config)[7:], "RepoTags": list(tags),
                  "Layers": ["blobs/sha256/" + sha(x)[7:] for x in layers]}
        with open(os.path.join(lay.dir, "manifest.json"), "w") as fh:
            json.dump([entry_], fh)
        return tar_dir(lay.dir, path)
    members, names = [], []
    for x in layers:
        members.append(f(sha(x)[7:] + "/layer.tar", x))
        names.append(sha(x)[7:] + "/layer.tar")
    members.append(f(sha(config)[7:] + ".json", config))
    members.append(f("manifest.json", json.dumps([{"Config": sha(config)[7:] + ".json", "RepoTags": list(tags),
                                                  "Layers": names}])))
    with open(path, "wb") as fh:
        fh.write(tar_of(members))
    return str(path)


def tarball(path, data, kind=None):
    with open(path, "wb") as fh:
        fh.write(compress(data, kind))
    return str(path)


# ---------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, rel", [("./etc/passwd", "etc/passwd"), ("/etc/x", "etc/x"), ("a//b/./c/", "a/b/c"),
                                       ("./", ""), (".", ""), ("/", ""), ("usr/..bin", "usr/..bin")])
def test_entry_names_are_relative_to_the_image(name, rel):
    assert J.entry_path(name) == rel


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/..", "/../etc/passwd", "./.."])
def test_entry_names_with_dotdot_are_refused(name):
    with pytest.raises(J.UsageError, match="leaves the image"):
        J.entry_path(name)


@pytest.mark.parametrize("base, hidden", [(".wh.x", "x"), (".wh..wh..opq", ""), (".wh..hidden", ".hidden"),
                                          (".wh..wh.plnk", None), ("x", None), ("wh.x", None)])
def test_whiteout_names(base, hidden):
    assert J.whiteout_target(base) == hidden


@pytest.mark.parametrize("base", [".wh.", ".wh..", ".wh..."])
def test_whiteouts_of_dot_and_dotdot_are_refused(base):
    with pytest.raises(J.UsageError, match="names no entry"):
        J.whiteout_target(base)


def test_platforms():
    host = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    assert J.parse_platform(None) == ("linux", host, None)
    assert J.parse_platform("linux/arm64/v8") == ("linux", "arm64", "v8")
    assert J.parse_platform("linux/x86_64") == ("linux", "amd64", None)
    for bad in ("linux", "linux/", "/amd64", "a/b/c/d"):
        with pytest.raises(J.UsageError, match="--platform"):
            J.parse_platform(bad)
    arm64 = J.config_platform({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert arm64 == ("linux", "arm64", None)
    assert J.platform_matches(arm64, ("linux", "arm64", "v8")) and J.platform_matches(arm64, ("linux", "arm64", None))
    arm7 = J.config_platform({"os": "linux", "architecture": "arm", "variant": "v7"})
    assert J.platform_matches(arm7, ("linux", "arm", None)) and not J.platform_matches(arm7, ("linux", "arm", "v6"))
    assert not J.platform_matches(("linux", "amd64", None), ("windows", "amd64", None))


@pytest.mark.parametrize("digest", ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32,
                                    "sha256:" + "0" * 63, 42])
def test_a_digest_never_becomes_a_path_outside_blobs(digest):
    with pytest.raises(J.UsageError):
        J._blob_name({"digest": digest, "size": 1}, "x")
    assert J._blob_name({"digest": "sha256:" + "ab" * 32, "size": 1}, "x") == "blobs/sha256/" + "ab" * 32


def test_rootfs_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert J.parse_rootfs("minimal") == ("minimal", None)
    assert J.parse_rootfs("host") == ("host", None)
    assert J.parse_rootfs("py") == (None, "py")
    assert J.parse_rootfs("./py") == (str(tmp_path / "py"), None)
    assert J.parse_rootfs("srv/py") == (str(tmp_path / "srv/py"), None)
    assert J.parse_rootfs("/srv/py") == ("/srv/py", None)
    assert J.parse_rootfs(".") == (str(tmp_path), None)
    for bad in ("", "-x", "_x", "a b", "x" * 64):
        with pytest.raises(J.UsageError, match="--rootfs"):
            J.parse_rootfs(bad)


def test_an_image_job_may_leave_command_and_workdir_to_the_image():
    s = J.parse_run(["--rootfs", "py"])
    assert s.image == "py" and s.rootfs is None and s.command == () and s.workdir is None
    assert J.parse_run(["--rootfs", "py", "-w", "/srv", "true"]).workdir == "/srv"
    assert J.parse_run(["--rootfs", "py", "--upload", "/etc/hosts", "true"]).uploads[0].dest == "/work/hosts"
    with pytest.raises(J.UsageError, match="no COMMAND"):
        J.parse_run(["--rootfs", "./py"])


@pytest.mark.parametrize("args, fragment", [
    (("../x", "f"), "rootfs import: NAME: '../x' is not a valid name"),
    (("minimal", "f"), "rootfs import: NAME: 'minimal' is a --rootfs of its own, never an image's name"),
    (("x", "f", "--platform", "linux"), "rootfs import: --platform: 'linux' is not OS/ARCH"),
    (("x", "f", "--max-size", "12Q"), "rootfs import: --max-size: '12Q' is not a size"),
    (("x", "f", "--max-files", "0"), "rootfs import: --max-files: '0' is out of range"),
    (("x",), "the following arguments are required: FILE|DIR")])
def test_import_arguments_are_checked_first(args, fragment, capfd):
    assert J.main(["rootfs", "import"] + list(args)) == 125  # before anything is read or made
    err = capfd.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def defaults(**kw):
    out = {k: [] for k in J.DEFAULTS_KEYS}
    out.update(kw)
    return out


def image_spec(argv, **kw):
    return J.image_job_spec(J.parse_run(["--rootfs", "img"] + argv), "/store/img/rootfs", defaults(**kw))


def test_the_image_config_gives_defaults_and_the_command_line_wins():
    d = dict(env=["PATH=/opt/bin:/bin", "FOO=image", "BAR=image"], workdir=["/app"], user=["1000:100"],
             entrypoint=["/entry.sh"], cmd=["serve", "--port", "80"])
    s = image_spec([], **d)
    assert s.rootfs == "/store/img/rootfs" and s.workdir == "/app" and s.user == ("1000", "100")
    assert s.command == ("/entry.sh", "serve", "--port", "80")
    assert dict(s.env) == {"PATH": "/opt/bin:/bin", "FOO": "image", "BAR": "image"}
    s = image_spec(["-e", "FOO=cli", "-w", "/tmp", "-u", "0", "--", "sh", "-c", "x"], **d)
    assert dict(s.env)["FOO"] == "cli" and dict(s.env)["BAR"] == "image"
    assert s.workdir == "/tmp" and s.user == ("0", None)
    assert s.command == ("/entry.sh", "sh", "-c", "x")  # COMMAND replaces Cmd; the Entrypoint stays
    assert image_spec(["ls"], cmd=["bash"]).command == ("ls",)
    assert image_spec([], cmd=["bash"]).workdir == "/work"
    assert image_spec([], cmd=["x"], workdir=["rel/../dir"]).workdir == "/dir"


def test_the_image_config_is_refused_where_it_cannot_apply():
    with pytest.raises(J.UsageError, match="no COMMAND given, and image img has no Entrypoint or Cmd"):
        image_spec([])
    with pytest.raises(J.UsageError, match="the image's User 'a b'"):
        image_spec(["true"], user=["a b"])
    with pytest.raises(J.UsageError, match="--cap-add: image img runs as its User 'app'"):
        image_spec(["--cap-add", "NET_ADMIN", "true"], user=["app"])
    assert image_spec(["--cap-add", "NET_ADMIN", "-u", "0", "true"], user=["app"]).user == ("0", None)


def test_defaults_file_round_trip(tmp_path):
    cfg = {"Env": ["A=1", "B=x=y", "NL=a\nb"], "WorkingDir": "/w", "User": "u", "Entrypoint": ["e", ""],
           "Cmd": ["c1", "c 2"]}
    (tmp_path / "defaults").write_bytes(J.encode_defaults(cfg))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        got = J.read_defaults(fd)
    finally:
        os.close(fd)
    assert got == {"env": ["A=1", "B=x=y", "NL=a\nb"], "workdir": ["/w"], "user": ["u"], "entrypoint": ["e", ""],
                   "cmd": ["c1", "c 2"]}
    assert J.encode_defaults({}) == b""


def test_image_config_types_are_checked():
    assert J.image_config({"config": {"Env": ["A=1"], "Cmd": None, "User": ""}}, "x") == {"Env": ["A=1"]}
    for bad in ({"Env": "A=1"}, {"Cmd": [1]}, {"WorkingDir": ["/"]}, {"Env": ["A=\0"]}):
        with pytest.raises(J.UsageError, match="config"):
            J.image_config({"config": bad}, "x")


# ---------------------------------------------------------------------------
# The real thing, as root
# ---------------------------------------------------------------------------

root_only = needs_root


def _name(prefix="img"):
    return "jrt-%s-%s" % (prefix, uuid.uuid4().hex[:8])


def _mine(name):
    """What the store holds of image NAME: itself, its builds, retired trees, its lock."""
    try:
        entries = os.listdir(STORE)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e == name or e.startswith((".new-%s." % name, ".old-%s." % name))
                  or e == ".lock-" + name)


@pytest.fixture
def name():
    n = _name()
    yield n
    for e in _mine(n):  # no job runs on it any more: removed directly (a jrun rootfs rm costs 0.25 s)
        shutil.rmtree(os.path.join(STORE, e), ignore_errors=True)
        if os.path.lexists(os.path.join(STORE, e)):
            os.unlink(os.path.join(STORE, e))


def imp(name, source, *opts, check=0):
    return jrun("rootfs", "import", name, source, *opts, check=check)


def run(name, *args, check=0):
    return jrun("--net", "none", "--rootfs", name, *args, check=check)


def record(name):
    with open(os.path.join(STORE, name, "image.json")) as fh:
        return json.load(fh)


def tree(name):
    return os.path.join(STORE, name, "rootfs")


def marker_layer(text):
    return tar_of([f("etc/marker", text + "\n")])


FORMATS = ["docker-archive", "docker-archive-25", "oci-layout", "oci-archive", "oci-archive-uncompressed",
           pytest.param("oci-archive-zstd", marks=needs_zstd), "tar", "tar.gz", "tar.xz",
           pytest.param("tar.zst", marks=needs_zstd)]


def build(fmt, tmp_path, layers, cfg=None):
    path = tmp_path / ("img." + fmt)
    if fmt.startswith("docker-archive"):
        return docker_archive(path, layers, cfg, docker25=fmt.endswith("25"))
    if fmt == "oci-layout":
        return oci_layout(tmp_path / "layout", layers, cfg)
    if fmt.startswith("oci-archive"):
        kind = {"oci-archive": "gzip", "oci-archive-zstd": "zstd"}.get(fmt)
        return oci_archive(path, layers, cfg, compression=kind)
    whole = tar_of([f("etc/marker", fmt + "\n")], MINIMAL)
    return tarball(path, whole, {"tar.gz": "gzip", "tar.xz": "xz", "tar.zst": "zstd"}.get(fmt[4:]))


@root_only
@pytest.mark.parametrize("fmt", FORMATS)
def test_import_run_rm_round_trip(fmt, tmp_path, name):
    src = build(fmt, tmp_path, [base_layer(), marker_layer(fmt)], {"Cmd": ["cat", "/etc/marker"]})
    p = imp(name, src)
    tarball_ = fmt.startswith("tar")
    kind = "tarball" if tarball_ else fmt.replace("-25", "").replace("-uncompressed", "").replace("-zstd", "")
    assert "imported %s from %s (%s" % (name, src, kind) in p.stderr
    rec = record(name)
    assert rec["format"] == kind
    assert rec["name"] == name and rec["source"] == src and rec["digest"].startswith("sha256:")
    assert rec["platform"] == (None if tarball_ else "linux/amd64")
    assert rec["layers"] == (1 if tarball_ else 2) and rec["files"] > 250 and rec["size"] > 1 << 20
    # The tree is root's alone on the host; the job's root comes out of it.
    assert stat.S_IMODE(os.stat(tree(name)).st_mode) == 0o700
    if tarball_:
        assert run(name, "cat", "/etc/marker").stdout == fmt + "\n"
    else:
        assert run(name).stdout == fmt + "\n"  # the image's Cmd
    p = jrun("rootfs", "rm", name, check=0)
    assert "image %s removed" % name in p.stderr
    assert _mine(name) == []


@root_only
def test_layers_whiteouts_and_opaque_directories(tmp_path, name):
    lower = tar_of([d("a"), f("a/x", "x"), f("a/y", "old y"), d("a/sub"), f("a/sub/z", "z"), d("d"), f("d/old", "o"),
                    d("d/keep"), f("d/keep/k", "k"), d("d/new"), f("d/new/oldfile", "lower"), d("gone"),
                    f("gone/file", "g"), f("top", "t"), f("same-layer", "lower")], MINIMAL)
    upper = tar_of([f("a/.wh.x"), f("a/y", "new y"), f("a/w", "made here"), f("a/.wh.w"),
                    d("d/new"), d("d/new/sub"), f("d/new/sub/file", "fresh"), f("d/.wh..wh..opq"), f("d/added", "+"),
                    f(".wh.gone"), f("nothing/.wh.here"), f("top/.wh..wh.plnk"), f(".wh.same-layer"),
                    f("same-layer", "upper")])
    third = tar_of([d("gone"), f("gone/again", "back")])
    imp(name, oci_archive(tmp_path / "w.tar", [lower, upper, third]))
    t = tree(name)
    assert sorted(os.listdir(t + "/a")) == ["sub", "w", "y"]  # x hidden; w and its whiteout in one layer: kept
    assert open(t + "/a/y").read() == "new y" and open(t + "/a/sub/z").read() == "z"
    assert sorted(os.listdir(t + "/d")) == ["added", "new"]  # opaque: old, keep and new/oldfile of the lower layer
    assert os.listdir(t + "/d/new") == ["sub"] and open(t + "/d/new/sub/file").read() == "fresh"
    assert os.listdir(t + "/gone") == ["again"]
    assert not os.path.exists(t + "/nothing")
    assert open(t + "/same-layer").read() == "upper" and open(t + "/top").read() == "t"
    out = run(name, "sh", "-c", "ls /a /d | tr '\\n' ' '; cat /gone/again").stdout
    assert out == "/a: sub w y  /d: added new back"


@root_only
def test_modes_owners_links_and_special_files_are_kept(tmp_path, name):
    layer = tar_of([d("srv", 0o750), f("srv/suid", "#!/bin/sh\n", 0o4755, 1000, 1000), f("srv/plain", "p", 0o640, 7, 8),
                    sym("srv/link", "/srv/plain"), hard("srv/hard", "srv/plain"), entry("srv/fifo", tarfile.FIFOTYPE,
                                                                                       mode=0o620),
                    entry("dev/sda", tarfile.CHRTYPE, mode=0o666), entry("dev/evil", tarfile.BLKTYPE, mode=0o666)])
    p = imp(name, oci_archive(tmp_path / "m.tar", [base_layer(), layer]))
    assert "skipped 2 device nodes" in p.stderr
    t = tree(name) + "/srv"
    st = {n: os.lstat(os.path.join(t, n)) for n in os.listdir(t)}
    assert sorted(st) == ["fifo", "hard", "link", "plain", "suid"]
    assert stat.S_IMODE(os.lstat(t).st_mode) == 0o750
    assert (stat.S_IMODE(st["suid"].st_mode), st["suid"].st_uid, st["suid"].st_gid) == (0o4755, 1000, 1000)
    assert (stat.S_IMODE(st["plain"].st_mode), st["plain"].st_uid, st["plain"].st_gid) == (0o640, 7, 8)
    assert st["plain"].st_ino == st["hard"].st_ino and st["plain"].st_nlink == 2
    assert os.readlink(t + "/link") == "/srv/plain" and stat.S_ISFIFO(st["fifo"].st_mode)
    assert st["plain"].st_mtime == 1_600_000_000
    assert not os.path.exists(tree(name) + "/dev/sda") and not os.path.exists(tree(name) + "/dev/evil")
    # setuid is kept in the tree, and gives a job nothing (nosuid, no_new_privs).
    out = run(name, "-u", "1000", "--", "sh", "-c", "awk '$5 == \"/\" {print $6}' /proc/self/mountinfo; "
              "grep NoNewPrivs /proc/self/status").stdout.split()
    assert "nosuid" in out[0].split(",") and out[1:] == ["NoNewPrivs:", "1"]


@root_only
def test_multi_platform_index(tmp_path, name):
    lay = Layout(tmp_path / "multi")
    lay.image([base_layer(), marker_layer("amd64")], arch="amd64", ref="multi:1")
    lay.image([base_layer(), marker_layer("arm64")], arch="arm64", variant="v8", ref="multi:1")
    lay.image([marker_layer("in-toto")], arch="unknown", ref=None)  # an attestation manifest
    src = lay.close()
    imp(name, src)
    host = "arm64" if os.uname().machine == "aarch64" else "amd64"
    assert open(tree(name) + "/etc/marker").read() == host + "\n"
    imp(name, src, "--platform", "linux/arm64/v8", "--force")
    assert open(tree(name) + "/etc/marker").read() == "arm64\n" and record(name)["platform"] == "linux/arm64"
    p = imp(name, src, "--platform", "linux/s390x", "--force", check=125)
    assert "no image for linux/s390x in it (it has: linux/amd64, linux/arm64)" in p.stderr
    # The config says which platform an image is for, when the index does not.
    other = oci_layout(tmp_path / "other", [base_layer()], arch="riscv64", platform=False)
    p = imp(name, other, "--force", check=125)
    assert "no image for linux/%s in it (it has: linux/riscv64)" % host in p.stderr
    assert open(tree(name) + "/etc/marker").read() == "arm64\n"  # a refused import changes nothing


@root_only
def test_the_image_config_is_honoured(tmp_path, name):
    cfg = {"Env": ["FOO=image", "PATH=/usr/local/bin:/bin:/usr/bin"], "WorkingDir": "/srv/app", "User": "user",
           "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $FOO; pwd; id -u; id -g; echo $PATH"]}
    src = docker_archive(tmp_path / "c.tar", [base_layer()], cfg)
    imp(name, src)
    ls = [r for r in json.loads(jrun("rootfs", "ls", "--json", check=0).stdout) if r["name"] == name]
    assert len(ls) == 1 and ls[0]["config"] == cfg and ls[0]["ref"] == "test:1" and ls[0]["source"] == src
    assert ls[0]["created"] == "2026-01-01T00:00:00Z" and ls[0]["imported"].endswith("Z")
    table = [line.split() for line in jrun("rootfs", "ls", check=0).stdout.splitlines()]
    assert table[0] == ["NAME", "PLATFORM", "SIZE", "FILES", "IMPORTED", "FROM", "COMMAND"]
    row = next(r for r in table if r[0] == name)
    assert row[1] == "linux/amd64" and row[6:8] == ["test:1", "(docker-archive)"] and row[8:10] == ["/bin/sh", "-c"]
    assert run(name).stdout.split() == ["image", "/srv/app", "1000", "1000", "/usr/local/bin:/bin:/usr/bin"]
    # COMMAND replaces Cmd (here: the script of the Entrypoint's sh -c).
    assert run(name, "--", "echo cmd-$FOO; id -u").stdout.split() == ["cmd-image", "1000"]
    out = run(name, "-e", "FOO=cli", "-w", "/tmp", "-u", "0", "--", "echo $FOO; pwd; id -u").stdout.split()
    assert out == ["cli", "/tmp", "0"]
    # The same tree, mapped to an unprivileged host uid range.
    out = run(name, "--userns", "--", "id -u; cat /proc/self/uid_map").stdout.split()
    assert out[:2] == ["1000", "0"] and int(out[2]) >= J.USERNS_BASE


def snapshot(top):
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rec = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink)
            if stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    rec += (hashlib.sha256(fh.read()).hexdigest(),)
            out[os.path.relpath(p, top)] = rec
    return out


@root_only
def test_a_job_that_writes_everywhere_leaves_the_stored_tree_unchanged(tmp_path, name):
    imp(name, docker_archive(tmp_path / "w.tar", [base_layer(), marker_layer("kept")]))
    before = snapshot(os.path.join(STORE, name))
    script = ("echo x > /etc/marker; echo y >> /etc/passwd; chmod 777 /etc; chown 5 /etc/group; mkdir -p /new/dir; "
              "ln -sf /x /etc/hosts; mv /etc/profile /etc/moved; touch -d 2001-01-01 /bin; "
              "rm -rf /usr /sbin /home /var /bin; echo done")
    assert run(name, "/bin/busybox", "sh", "-c", script).stdout == "done\n"
    assert snapshot(os.path.join(STORE, name)) == before
    assert run(name, "cat", "/etc/marker").stdout == "kept\n"


@root_only
def test_concurrent_imports_of_one_name_are_serialised(tmp_path, name):
    a = docker_archive(tmp_path / "a.tar", [base_layer(), marker_layer("A")])
    b = oci_archive(tmp_path / "b.tar", [base_layer(), marker_layer("B")])
    os.makedirs(STORE, exist_ok=True)
    # Hold NAME's lock, as an import under way would: both wait for it.
    held = os.open(os.path.join(STORE, ".lock-" + name), os.O_RDWR | os.O_CREAT, 0o600)
    import fcntl

    fcntl.flock(held, fcntl.LOCK_EX)
    procs = [subprocess.Popen(JRUN_FAST + ["rootfs", "import", name, src], stderr=subprocess.PIPE, text=True)
             for src in (a, b)]
    try:
        for p in procs:  # each says so once it waits, and has made nothing yet
            assert p.stderr.readline() == "jrun: waiting for another import or removal of image %s\n" % name
        assert [p.poll() for p in procs] == [None, None]
        assert [e for e in _mine(name) if not e.startswith(".lock-")] == []
    finally:
        os.close(held)
    errs = [p.communicate(timeout=30)[1] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 125], errs
    loser = errs[[p.returncode for p in procs].index(125)]
    assert "image %r exists (--force replaces it" % name in loser
    winner = "A" if procs[0].returncode == 0 else "B"
    assert open(tree(name) + "/etc/marker").read() == winner + "\n"
    # With --force both land, one after the other, each complete.
    procs = [subprocess.Popen(JRUN_FAST + ["rootfs", "import", "--force", name, src], stderr=subprocess.PIPE, text=True)
             for src in (a, b)]
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    assert open(tree(name) + "/etc/marker").read() in ("A\n", "B\n")
    assert sorted(os.listdir(tree(name) + "/bin")) == sorted(os.listdir(MINIMAL + "/bin"))
    with open(tree(name) + "/bin/busybox", "rb") as got, open(MINIMAL + "/bin/busybox", "rb") as want:
        assert got.read() == want.read()
    assert _mine(name) == [name]  # no build, no retired tree, no lock file left


def _start(*args):
    proc = subprocess.Popen(JRUN_FAST + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _finish(proc):
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(timeout=20)
    return out


@root_only
def test_replacing_or_removing_an_image_under_a_running_job(tmp_path, name):
    v1 = docker_archive(tmp_path / "v1.tar", [base_layer(), marker_layer("v1")])
    v2 = docker_archive(tmp_path / "v2.tar", [base_layer(), marker_layer("v2")])
    imp(name, v1)
    script = "echo ready; read x; cat /etc/marker; ls /bin/busybox"
    job = _start("--net", "none", "--rootfs", name, "--", "sh", "-c", script)
    try:
        p = imp(name, v2, "--force")
        assert "the old tree stays until the job running on it ends" in p.stderr
        assert run(name, "cat", "/etc/marker").stdout == "v2\n"
        old = [e for e in _mine(name) if e.startswith(".old-")]
        assert len(old) == 1
        assert name not in jrun("gc", check=0).stderr and old[0] in os.listdir(STORE)  # in use: kept
        assert _finish(job) == "v1\n/bin/busybox\n"  # the job kept its own tree throughout
        job = _start("--net", "none", "--rootfs", name, "--", "sh", "-c", script)
        p = jrun("rootfs", "rm", name, check=0)
        assert "image %s removed" % name in p.stderr and not os.path.exists(os.path.join(STORE, name))
        assert _finish(job) == "v2\n/bin/busybox\n"
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    p = jrun("gc", check=0)
    assert ".old-%s." % name in p.stderr and "(a replaced or removed image no job runs on any more)" in p.stderr
    assert _mine(name) == []


@root_only
def test_gc_leaves_images_alone_and_removes_what_a_killed_import_left(tmp_path, name):
    imp(name, docker_archive(tmp_path / "a.tar", [base_layer()]))
    before = snapshot(os.path.join(STORE, name))
    assert name not in jrun("gc", check=0).stderr
    assert snapshot(os.path.join(STORE, name)) == before and _mine(name) == [name]
    # An import killed mid-way (SIGKILL: no cleanup) leaves its build and lock, until gc.
    many = tar_of([d("many")] + [f("many/%05d" % i, "x") for i in range(5000)], MINIMAL)
    src = tarball(tmp_path / "many.tar", many)
    other = _name("killed")
    proc = subprocess.Popen(JRUN_FAST + ["rootfs", "import", other, src], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not any(e.startswith(".new-%s." % other) for e in os.listdir(STORE)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        proc.kill()
        proc.wait()
        left = _mine(other)
        assert len(left) == 2 and left[0] == ".lock-" + other and left[1].startswith(".new-" + other)
        p = jrun("gc", check=0)
        for e in left:
            assert "gc: removed %s/%s (an unfinished import)" % (STORE, e) in p.stderr
        assert _mine(other) == [] and _mine(name) == [name]
    finally:
        if proc.poll() is None:
            proc.kill()
        for e in _mine(other):
            shutil.rmtree(os.path.join(STORE, e), ignore_errors=True)


# --- hostile archives ---------------------------------------------------------


@pytest.fixture
def canary():
    """Host files next to the store (the same filesystem: a hard link to them
    would succeed if jrun let it), which no import may touch."""
    top = "/var/tmp/jrun-canary-" + uuid.uuid4().hex[:8]
    os.makedirs(top + "/dir")
    with open(top + "/victim", "w") as fh:
        fh.write("host data\n")
    with open(top + "/dir/inner", "w") as fh:
        fh.write("inner\n")
    before = snapshot(top)
    yield top
    try:
        assert snapshot(top) == before, "the host's canary changed"
    finally:
        shutil.rmtree(top)


def _hostile(case, top, tmp):
    """(archive, import options, expected exit, a fragment of the message)."""
    base = tar_of([d("etc"), f("etc/shadow", "root:*:1::::::\n", 0o640), f("etc/passwd", "root:x:0:0::/:/bin/sh\n")])
    canary_rel = top.lstrip("/")

    def oci(*layers, **kw):
        return oci_archive(tmp / (case + ".tar"), [base] + list(layers), **kw)

    if case == "dotdot":
        return oci(tar_of([f("../../../../" + canary_rel + "/victim", "pwned")])), (), 125, "leaves the image"
    if case == "dotdot-inside":
        return oci(tar_of([d("a"), f("a/../../x", "pwned")])), (), 125, "leaves the image"
    if case == "absolute":
        return oci(tar_of([f(top + "/victim", "pwned")])), (), 0, ""
    if case == "symlink-then-file":  # the image has the canary's path too: the file lands there
        return oci(tar_of([d(canary_rel), sym("a", top), f("a/victim", "pwned"), d("a/new"),
                           f("a/new/x", "pwned")])), (), 0, ""
    if case == "symlink-dotdot-then-file":
        return oci(tar_of([d(canary_rel), sym("a", "../../../../../../.." + top), f("a/victim", "pwned")])), (), 0, ""
    if case == "symlink-dangling-then-file":  # the canary's path is not in the image
        return oci(tar_of([sym("a", top), f("a/victim", "pwned")])), (), 125, "/a: a dangling symlink in the image"
    if case == "hardlink-to-shadow":  # the image's own /etc/shadow
        return oci(tar_of([hard("shadow-copy", "/etc/shadow")])), (), 0, ""
    if case == "hardlink-to-canary":
        return oci(tar_of([hard("x", top + "/victim")])), (), 125, "not in the image"
    if case == "hardlink-through-symlink":
        return oci(tar_of([sym("l", top), hard("x", "l/victim")])), (), 125, "not in the image"
    if case == "hardlink-dotdot":
        return oci(tar_of([hard("x", "../../../../.." + top + "/victim")])), (), 125, "leaves the image"
    if case == "hardlink-to-directory":
        return oci(tar_of([hard("x", "etc")])), (), 125, "Operation not permitted"
    if case == "xattrs":  # an overlay redirect and a file capability: never written
        (dti, _), (fti, data) = d("opq"), f("opq/ping", "x", 0o755)
        dti.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y",
                           "SCHILY.xattr.trusted.overlay.redirect": top}
        fti.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
                           "SCHILY.xattr.user.note": "x"}
        return oci(tar_of([(dti, None), (fti, data)])), (), 0, "dropped the extended attributes of 2 entries"
    if case == "device-node":
        return oci(tar_of([entry("dev/sda", tarfile.CHRTYPE, mode=0o666)])), (), 0, "skipped 1 device nodes"
    if case == "whiteout-dotdot":
        return oci(tar_of([f("etc/.wh...")])), (), 125, "names no entry"
    if case == "whiteout-through-symlink":
        return oci(tar_of([sym("l", top)]), tar_of([f("l/.wh.victim"), f("l/.wh.dir")])), (), 0, ""
    if case == "opaque-through-symlink":
        return oci(tar_of([sym("l", top)]), tar_of([f("l/.wh..wh..opq")])), (), 0, ""
    if case == "symlink-loop":
        return oci(tar_of([sym("a", "a"), f("a/x", "x")])), (), 125, "a/x"
    if case in ("layer-digest", "layer-size", "config-digest", "manifest-digest"):
        lay = Layout(tmp / case)
        desc, manifest = lay.image([base, marker_layer("m")], compression=None)
        victim = {"layer-digest": manifest["layers"][1], "layer-size": manifest["layers"][1],
                  "config-digest": manifest["config"], "manifest-digest": desc}[case]
        with open(lay.path(victim["digest"]), "rb") as fh:
            data = fh.read()
        if case == "layer-size":
            data += b"\0" * 512
        elif case == "layer-digest":  # a valid tar still, with other content: seen only by its digest
            data = data.replace(b"m\n", b"n\n")
        else:
            data = data.replace(b'"', b"'", 1)
        with open(lay.path(victim["digest"]), "wb") as fh:
            fh.write(data)
        frag = ("bytes, not %d as the image says" % victim["size"] if case == "layer-size" else
                "not %s as the image says" % victim["digest"])
        return tar_dir(lay.close(), tmp / (case + ".tar")), (), 125, frag
    if case == "diff-id":
        return (docker_archive(tmp / "diff.tar", [base], diff_ids=[sha(b"other")]), (), 125,
                "uncompressed: digest")
    if case == "blob-path":
        lay = Layout(tmp / case)
        lay.image([base])
        lay.manifests[0]["digest"] = "sha256:../../../../../../../etc/passwd"
        return lay.close(), (), 125, "is not a sha256 or sha512 digest"
    if case == "size-bomb":
        zeros = tar_of([f("zeros", b"\0" * (24 << 20))])
        return oci(zeros), ("--max-size", "16M"), 125, "more than 16 MiB of files (raise --max-size)"
    if case == "tarball-bomb":
        bomb = tarball(tmp / "bomb.tar.gz", tar_of([f("zeros", b"\0" * (64 << 20))]), "gzip")
        return bomb, ("--max-size", "8M", "--max-files", "100"), 125, "decompressed, more than --max-size 8 MiB"
    if case == "files-bomb":
        many = tar_of([f("f%d" % i) for i in range(300)])
        return oci(many), ("--max-files", "200"), 125, "layer 2/2: more than 200 entries (raise --max-files)"
    if case == "long-header":
        ti, data = f("x" * (2 << 20), "x")
        return oci(tar_of([(ti, data)])), (), 125, "a tar header (long name or pax) of"
    if case == "truncated":
        lay = Layout(tmp / case)
        layer = compress(base_layer(), "gzip")[: 100000]
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": lay.blob(json.dumps(config_of([base_layer()])).encode(), OCI_CONFIG),
                    "layers": [lay.blob(layer, LAYER_TYPES["gzip"])]}
        lay.manifests.append(lay.blob(json.dumps(manifest).encode(), OCI_MANIFEST))
        return lay.close(), (), 125, "layer 1/1: cannot read it"
    raise AssertionError(case)


HOSTILE = ["dotdot", "dotdot-inside", "absolute", "symlink-then-file", "symlink-dotdot-then-file",
           "symlink-dangling-then-file",
           "hardlink-to-shadow", "hardlink-to-canary", "hardlink-through-symlink", "hardlink-dotdot",
           "hardlink-to-directory", "xattrs", "device-node", "whiteout-dotdot", "whiteout-through-symlink",
           "opaque-through-symlink", "symlink-loop", "layer-digest", "layer-size", "config-digest",
           "manifest-digest", "diff-id", "blob-path", "size-bomb", "tarball-bomb", "files-bomb", "long-header",
           "truncated"]


@root_only
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archive(case, canary, tmp_path, name):
    assert os.stat(canary).st_dev == os.stat(os.path.dirname(STORE)).st_dev
    shadow = os.stat("/etc/shadow")
    src, opts, code, fragment = _hostile(case, canary, tmp_path)
    p = imp(name, src, *opts, check=code)
    assert fragment in p.stderr
    if code == 125:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jrun: rootfs import: %s: " % src), p.stderr
        assert _mine(name) == []  # nothing of the import is left
    else:
        # What the archive meant for the host landed inside the image's tree.
        t = tree(name)
        if case in ("absolute", "symlink-then-file", "symlink-dotdot-then-file"):
            assert open(t + canary + "/victim").read() == "pwned"
        if case in ("whiteout-through-symlink", "opaque-through-symlink"):
            assert os.readlink(t + "/l") == canary
        if case == "xattrs":
            assert os.listxattr(t + "/opq", follow_symlinks=False) == []
            assert os.listxattr(t + "/opq/ping", follow_symlinks=False) == []
        if case == "hardlink-to-shadow":
            assert os.stat(t + "/shadow-copy").st_ino == os.stat(t + "/etc/shadow").st_ino != shadow.st_ino
    assert os.stat("/etc/shadow").st_nlink == shadow.st_nlink and os.stat("/etc/shadow").st_ino == shadow.st_ino
    assert os.stat(canary + "/victim").st_nlink == 1


@root_only
def test_bad_import_commands_are_refused(tmp_path, name):
    good = docker_archive(tmp_path / "g.tar", [base_layer()])
    (tmp_path / "notar").write_bytes(b"hello, this is no tar archive\n" * 40)
    (tmp_path / "plain-dir").mkdir()
    cases = [((name, str(tmp_path / "missing")), "No such file or directory"),
             ((name, str(tmp_path / "notar")), "not a tar archive"),
             ((name, str(tmp_path / "plain-dir")), "a directory must be an OCI image layout")]
    for args, fragment in cases:
        p = jrun("rootfs", "import", *args, check=125)
        assert fragment in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert _mine(name) == []
    imp(name, good)
    p = imp(name, good, check=125)
    assert "image %r exists (--force replaces it; jrun rootfs rm %s removes it)" % (name, name) in p.stderr
    assert "no image 'nope-x'" in jrun("rootfs", "rm", "nope-x", check=125).stderr


@root_only
def test_rootfs_names_and_paths(tmp_path, name, monkeypatch):
    imp(name, docker_archive(tmp_path / "a.tar", [base_layer(), marker_layer("image")]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tree").mkdir()
    p = jrun("--net", "none", "--rootfs", "tree", "--", "true", check=125)
    assert "--rootfs: no image 'tree' (see jrun rootfs ls) (a directory needs a '/': ./tree)" in p.stderr
    p = jrun("--net", "none", "--rootfs", "./nothere", "--", "true", check=125)
    assert "--rootfs" in p.stderr and "nothere" in p.stderr
    # An image's tree as a PATH: the same root.
    assert jrun("--net", "none", "--rootfs", tree(name), "--", "cat", "/etc/marker", check=0).stdout == "image\n"
    # The config file's rootfs may name an image too; its image-dir moves the store.
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('rootfs = "%s"\nimage-dir = "%s"\n' % (name, STORE))
    assert jrun("--config", cfg, "--net", "none", "--", "cat", "/etc/marker", check=0).stdout == "image\n"


@root_only
def test_an_insecure_store_is_refused(tmp_path):
    store = tmp_path / "images"
    store.mkdir(mode=0o777)
    store.chmod(0o777)
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('image-dir = "%s"\n' % store)
    src = docker_archive(tmp_path / "a.tar", [base_layer()])
    p = jrun("--config", cfg, "rootfs", "import", "x", src, check=125)
    assert "must be owned by root and writable by root only" in p.stderr
    assert os.listdir(store) == []
    store.chmod(0o755)
    jrun("--config", cfg, "rootfs", "import", "x", src, check=0)
    assert os.listdir(store) == ["x"]  # a private store: the config file's image-dir


@root_only
def test_progress_on_a_terminal_only(tmp_path, name):
    src = oci_archive(tmp_path / "p.tar", [base_layer(), marker_layer("p")])
    out, code = jrun_in_pty("rootfs", "import", name, src)
    assert code == 0, out
    assert b"\rjrun: Importing %s: " % name.encode() in out and b"imported " + name.encode() in out
    p = imp(name, src, "--force")
    assert "\r" not in p.stderr and "Importing" not in p.stderr and "imported " + name in p.stderr


@root_only
def test_completion_of_image_names(tmp_path, name):
    imp(name, docker_archive(tmp_path / "a.tar", [base_layer()]))
    out = tmp_path / "completions"
    for line in ("jrun --rootfs ", "jrun rootfs rm "):
        env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE=line, COMP_POINT=str(len(line)),
                   _ARGCOMPLETE_STDOUT_FILENAME=str(out))
        subprocess.run(JRUN_FAST, env=env, capture_output=True, timeout=30, check=True)
        got = {c.strip() for c in out.read_text().split("\n")}
        assert name in got, (line, got)


@root_only
def test_an_image_run_imports_no_heavy_module(tmp_path, name):
    imp(name, docker_archive(tmp_path / "a.tar", [base_layer()], {"Env": ["A=1"], "Cmd": ["true"]}))
    p = subprocess.run(JRUN_FAST[:1] + ["-X", "importtime"] + JRUN_FAST[1:] + ["--net", "none", "--rootfs", name],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    mods = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert not mods & {"json", "re", "tarfile", "hashlib", "argparse", "subprocess"}, mods


# --- podman, where it is installed ----------------------------------------------


@root_only
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (apt-get install podman)")
def test_podman_save_cross_check(tmp_path, name):
    """podman's own docker-archive, oci-archive and oci-dir of an image it
    imported from a tarball of the minimal rootfs.  podman runs on a store
    of its own in tmp_path (vfs, no network, no events), so it is left with
    no image or container anywhere."""
    own = tempfile.mkdtemp(prefix="jrt-podman-")  # short: podman puts sockets in it
    pm = ["podman", "--root", own + "/root", "--runroot", own + "/run", "--tmpdir", own + "/tmp",
          "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]
    tarball(tmp_path / "root.tar", tar_of([f("etc/marker", "podman\n")], MINIMAL))
    ref = "localhost/jrun-xcheck:1"
    try:
        for argv in (["import", "--change", 'CMD ["cat", "/etc/marker"]', "--change", "ENV FOO=from-podman",
                      "--change", "WORKDIR /etc", str(tmp_path / "root.tar"), ref],
                     ["save", "--format", "docker-archive", "-o", str(tmp_path / "d.tar"), ref],
                     ["save", "--format", "oci-archive", "-o", str(tmp_path / "o.tar"), ref],
                     ["save", "--format", "oci-dir", "-o", str(tmp_path / "odir"), ref]):
            p = subprocess.run(pm + argv, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (argv, p.stderr)
        for fmt, out in (("docker-archive", "d.tar"), ("oci-archive", "o.tar"), ("oci-layout", "odir")):
            imp(name, str(tmp_path / out), "--force")
            rec = record(name)
            assert (rec["format"], rec["ref"], rec["platform"]) == (fmt, ref, "linux/amd64" if os.uname().machine ==
                                                                    "x86_64" else "linux/arm64")
            assert rec["config"] == {"Env": ["FOO=from-podman"], "WorkingDir": "/etc", "Cmd": ["cat", "/etc/marker"]}
            assert run(name).stdout == "podman\n"
        assert run(name, "sh", "-c", "echo $FOO; pwd").stdout == "from-podman\n/etc\n"
    finally:
        subprocess.run(pm + ["rmi", "--all", "--force"], capture_output=True, timeout=60)
        images = subprocess.run(pm + ["images", "-q"], capture_output=True, text=True, timeout=60).stdout
        shutil.rmtree(own)
    assert images.strip() == ""


@root_only
def test_nothing_of_the_tests_is_left_in_the_store():
    left = [e for e in os.listdir(STORE) if "jrt-" in e] if os.path.isdir(STORE) else []
    assert left == []
    assert not [n for n in state_dirs() if n.startswith("jrt-")]
