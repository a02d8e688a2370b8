"""The doc-test: every example of README.md and man/jrun.1 runs as printed.

Examples are the blocks the documents mark as such, and nothing else:

- README.md: a fenced block's language says what it is.  ```sh (shell lines),
  ```make (a Makefile fragment), ```crontab (an /etc/cron.d file) and ```toml
  (a jrun.toml) are examples; ```text and ```json are output and are not run.
  A fence without a language, or with another one, fails the test.
- man/jrun.1: a roff comment `.\\" block: KIND` right above each .EX says the
  same; an .EX without it fails the test.
- `(illustrative: REASON)` in a line's trailing comment marks that line,
  `<!-- illustrative: REASON -->` right above a fence (man page: `.\\"
  illustrative: REASON` right above .EX) marks the whole block: it is not run.
  A marker without a reason fails the test.
- The expected exit status is 0, unless the line's trailing comment says
  `exit N` (the first such N).

Every example is run exactly as printed, with bash, in a fresh copy of
tests/sample-project, stdin /dev/null, root's usual PATH and a timeout.  The
only substitutions:

- `sudo ` is dropped (the tests run as root);
- `jrun` is this checkout's jrun.py: a shim that stands for /usr/local/bin/jrun
  (it goes in front of /usr/local/bin in PATH, so a PATH without
  /usr/local/bin still finds no jrun, as in a real crontab);
- PLACEHOLDERS: host paths that stand for the reader's files (/srv/etl) are the
  sample project's;
- the job id of a `jrun kill` line is that of a job the test starts for it
  (the id `jrun ps` shows);
- scenarios: a line ending in `&` runs in the background, and the lines after
  it run once it has printed its first line; an IPv4 address in those lines
  stands for the one it printed ("say 172.31.199.2").

Two commands are CI's own and special (see the README's Development section):
`bash .ci/setup && ...` runs only what follows `&&` (CI runs .ci/setup on a
fresh machine; here it would reinstall the /opt/jrun and /usr/local/bin/jrun
everyone shares), and the suite's own command is not run by the suite; a test
checks that .ci/run runs both.
"""
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import IS_ROOT, JRUN, ROOT, network_leftovers, state_dirs

DOCS = ("README.md", "man/jrun.1")
SAMPLE = os.path.join(ROOT, "tests", "sample-project")
EXAMPLE_KINDS = ("sh", "make", "crontab", "toml")
OUTPUT_KINDS = ("text", "json")
# Host paths in examples that stand for the reader's own files -> the sample
# project's ("{project}" is the example's copy of it).
PLACEHOLDERS = {"/srv/etl": "{project}/etl"}
CI_SETUP = "bash .ci/setup && "
CI_SUITE = "/opt/jrun/bin/python3 -m pytest -q tests"
# root's PATH on Debian (login shell, sudo's secure_path)
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRON_PATH = "/usr/bin:/bin"  # cron's default (cron(8))
TIMEOUT = 45        # seconds, per example
WORKERS = 4         # examples run in parallel (2 CPUs: most of a job's time is waiting)
LINGER = 10         # seconds a background step may outlive its scenario before it is stopped


# --- extraction (pure) --------------------------------------------------------


@dataclasses.dataclass
class Example:
    doc: str
    line: int
    kind: str                    # sh, make, crontab, toml
    steps: tuple                 # sh: logical lines (a scenario has several); else the text to run
    illustrative: str = None     # the reason, if marked
    expect: int = 0
    env: tuple = ()              # crontab: the NAME=VALUE lines above the entry

    @property
    def id(self):
        return "%s:%d" % (self.doc, self.line)


@dataclasses.dataclass
class Block:
    doc: str
    line: int                    # of the first line inside the block
    kind: str
    lines: list
    illustrative: str = None


_FENCE = re.compile(r"^\s*(```+)\s*(\S*)\s*$")
_MARK = re.compile(r"\(illustrative:([^)]*)\)")
_BLOCK_MARK = re.compile(r"^<!--\s*illustrative:(.*?)-->\s*$")
_ROFF_ESCAPES = {"-": "-", "e": "\\", "\\": "\\", "&": "", " ": " ", "(aq": "'", "(dq": '"', "(ga": "`",
                 "(ti": "~", "(ha": "^", "fB": "", "fI": "", "fR": "", "fP": ""}
_ROFF_ESCAPE = re.compile(r"\\(\(..|f.|.)")


def readme_blocks(doc, text, problems):
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, kind = m.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            problems.append("%s:%d: a fence that is never closed" % (doc, i + 1))
            return
        above = lines[i - 1].strip() if i else ""
        reason = None
        if "illustrative" in above:
            m = _BLOCK_MARK.match(above)
            reason = m.group(1).strip() if m else ""
        yield Block(doc, i + 2, kind, lines[i + 1:end], reason)
        i = end + 1


def roff_text(line):
    """A line of an .EX block as man prints it (the escapes examples use)."""
    def one(m):
        if m.group(1) not in _ROFF_ESCAPES:
            raise ValueError("the roff escape \\%s" % m.group(1))
        return _ROFF_ESCAPES[m.group(1)]
    return _ROFF_ESCAPE.sub(one, line)


def man_blocks(doc, text, problems):
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip() != ".EX":
            continue
        kind, reason = "", None
        j = i - 1
        while j >= 0 and lines[j].startswith('.\\"'):
            comment = lines[j][3:].strip()
            if comment.startswith("block:"):
                kind = comment[6:].strip()
            elif "illustrative" in comment:
                reason = comment.partition("illustrative:")[2].strip()
            j -= 1
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == ".EE"), None)
        if end is None:
            problems.append("%s:%d: an .EX without .EE" % (doc, i + 1))
            return
        body = []
        for k in range(i + 1, end):
            if lines[k].startswith((".", "'")):
                problems.append("%s:%d: a roff request inside .EX" % (doc, k + 1))
                continue
            try:
                body.append(roff_text(lines[k]))
            except ValueError as e:
                problems.append("%s:%d: %s (add it to _ROFF_ESCAPES in tests/test_docs.py)" % (doc, k + 1, e))
        yield Block(doc, i + 2, kind, body, reason)


def split_comment(line):
    """'cmd args  # comment' -> ('cmd args', 'comment'): a '#' that starts a
    word outside quotes, as the shell reads it."""
    quote, prev, i = None, " ", 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                i += 1
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and prev in " \t":
            return line[:i].rstrip(), line[i + 1:].strip()
        prev = c
        i += 1
    return line, ""


def line_marker(doc, lineno, comment, problems):
    """The reason of an `(illustrative: REASON)` marker in COMMENT, or None."""
    if "illustrative" not in comment:
        return None
    m = _MARK.search(comment)
    if not m or not m.group(1).strip():
        problems.append("%s:%d: an illustrative marker must read '(illustrative: REASON)'" % (doc, lineno))
        return ""
    return m.group(1).strip()


def expected_status(comment):
    m = re.search(r"\bexit (\d+)\b", comment)
    return int(m.group(1)) if m else 0


def logical_lines(lines, first):
    """(line number, text) of each command of a shell block: backslash
    continuations joined (newlines kept), comment and blank lines dropped."""
    out, start, parts = [], None, []
    for n, line in enumerate(lines, first):
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not parts:
            start = n
        parts.append(line)
        if not line.endswith("\\"):
            out.append((start, "\n".join(parts)))
            parts = []
    if parts:
        out.append((start, "\n".join(parts)))
    return out


def sh_examples(block, problems):
    pending = []  # the background steps of a scenario so far
    for n, text in logical_lines(block.lines, block.line):
        *head, last = text.split("\n")
        cmd, comment = split_comment(last)
        reason = line_marker(block.doc, n, comment, problems)
        step = ("\n".join(head + [cmd]), n, reason)
        if re.search(r"(^|[^&])&$", cmd.rstrip()):
            pending.append(step)
            continue
        steps = pending + [step]
        pending = []
        reasons = [r for _, _, r in steps if r is not None]
        yield Example(block.doc, steps[0][1], "sh", tuple(s for s, _, _ in steps),
                      illustrative=block.illustrative if block.illustrative is not None
                      else (reasons[0] if reasons else None),
                      expect=expected_status(comment))
    if pending:
        problems.append("%s:%d: a background line ('&') must be followed by the line that uses it"
                        % (block.doc, pending[0][1]))


_CRON_FIELD = re.compile(r"^[0-9*/,-]+$|^@\w+$")


def crontab_examples(block, problems):
    env = []
    for n, line in enumerate(block.lines, block.line):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            problems.append("%s:%d: cron has no line continuation: one entry, one line" % (block.doc, n))
            continue
        if re.match(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=", line):
            env.append(tuple(s.strip() for s in line.split("=", 1)))
            continue
        fields = line.split(None, 6)
        if len(fields) < 7 or not all(_CRON_FIELD.match(f) for f in fields[:5]):
            problems.append("%s:%d: not an /etc/cron.d entry (5 time fields, user, command)" % (block.doc, n))
            continue
        if "%" in fields[6]:
            problems.append("%s:%d: '%%' is a newline to cron: escape it" % (block.doc, n))
        cmd, comment = split_comment(fields[6])
        yield Example(block.doc, n, "crontab", (cmd,), expect=expected_status(comment), env=tuple(env),
                      illustrative=block.illustrative if block.illustrative is not None
                      else line_marker(block.doc, n, comment, problems))


def examples_of(block, problems):
    if block.kind in OUTPUT_KINDS:
        return
    if block.kind not in EXAMPLE_KINDS:
        problems.append("%s:%d: a block of kind %r: say what it is (%s are run, %s are output)"
                        % (block.doc, block.line - 1, block.kind or "(none)", ", ".join(EXAMPLE_KINDS),
                           ", ".join(OUTPUT_KINDS)))
        return
    if block.illustrative == "":
        problems.append("%s:%d: an illustrative block needs a reason" % (block.doc, block.line - 1))
    if block.kind == "sh":
        yield from sh_examples(block, problems)
    elif block.kind == "crontab":
        yield from crontab_examples(block, problems)
    else:
        yield Example(block.doc, block.line, block.kind, ("\n".join(block.lines) + "\n",),
                      illustrative=block.illustrative)


_URL = re.compile(r"\b[a-z]+://(?!(localhost|127\.[0-9.]+|\[::1\])[:/])")


def extract(doc, text, problems):
    blocks = man_blocks if doc.endswith(".1") else readme_blocks
    examples = [ex for b in blocks(doc, text, problems) for ex in examples_of(b, problems)]
    for ex in examples:
        if ex.illustrative is None and any(_URL.search(s) for s in ex.steps):
            problems.append("%s: would reach the internet: mark it (illustrative: needs the internet)" % ex.id)
            ex.illustrative = "not run: it would reach the internet, and is not marked"
    return examples


def all_examples():
    problems, examples = [], []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            examples += extract(doc, f.read(), problems)
    return examples, problems


EXAMPLES, PROBLEMS = all_examples()
BY_ID = {ex.id: ex for ex in EXAMPLES}


# --- running ------------------------------------------------------------------


def substitute(text, project):
    text = re.sub(r"(?<![\w./-])sudo\s+", "", text)
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value.format(project=project))
    return text


def shim_path(path, shim):
    """PATH with the shim (this checkout's jrun) in front of /usr/local/bin,
    where .ci/setup links the installed jrun; a PATH without it finds none."""
    return ":".join((shim + ":" + d) if d == "/usr/local/bin" else d for d in path.split(":"))


class Runner:
    def __init__(self, top):
        self.top = top
        self.shim = os.path.join(top, "bin")
        os.mkdir(self.shim)
        with open(os.path.join(self.shim, "jrun"), "w") as f:
            f.write("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(shlex.quote(a) for a in JRUN))
        os.chmod(os.path.join(self.shim, "jrun"), 0o755)

    def env(self, home, path=ROOT_PATH, **extra):
        return dict(PATH=shim_path(path, self.shim), HOME=home, USER="root", LOGNAME="root",
                    LANG="C.UTF-8", SHELL="/bin/bash", **extra)

    def run(self, ex):
        """-> dict(ran, status, stdout, stderr, note): status is None when the
        example could not run to its end (note says why)."""
        d = tempfile.mkdtemp(prefix="ex-", dir=self.top)
        try:
            project = os.path.join(d, "project")
            shutil.copytree(SAMPLE, project, symlinks=True)
            home = os.path.join(d, "home")
            os.mkdir(home)
            return getattr(self, "run_" + ex.kind)(ex, d, project, home)
        except NotRun as e:
            return dict(ran=e.args[0], status=None, stdout="", stderr="", note=e.args[1])
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def run_make(self, ex, d, project, home):
        mk = os.path.join(d, "example.mk")
        with open(mk, "w") as f:
            f.write(substitute(ex.steps[0], project))
        return self.foreground(["make", "-f", mk], project, self.env(home), "make -f example.mk")

    def run_toml(self, ex, d, project, home):
        cfg = os.path.join(d, "jrun.toml")
        with open(cfg, "w") as f:
            f.write(substitute(ex.steps[0], project))
        os.chmod(cfg, 0o644)
        return self.foreground(["jrun", "--config", cfg, "--", "/bin/true"], project, self.env(home),
                               "jrun --config jrun.toml -- /bin/true")

    def run_crontab(self, ex, d, project, home):
        env = dict(ex.env)
        path = env.pop("PATH", CRON_PATH)
        # cron: /bin/sh -c COMMAND in the user's home, with a minimal environment
        e = dict(self.env(home, path, **env), SHELL="/bin/sh")
        cmd = substitute(ex.steps[0], project)
        return self.foreground(["/bin/sh", "-c", cmd], home, e, cmd)

    def run_sh(self, ex, d, project, home):
        env, background, address = self.env(home), [], None
        try:
            for step in ex.steps[:-1]:  # a scenario's lines that end in '&'
                cmd = self.prepare(step, project, env, background, address)
                p, first = self.start(["bash", "-c", cmd.rstrip()[:-1]], project, env)
                background.append((p, cmd))
                m = re.search(r"\binet (\d+\.\d+\.\d+\.\d+)", first)
                address = m.group(1) if m else address
            cmd = self.prepare(ex.steps[-1], project, env, background, address)
            res = self.foreground(["bash", "-c", cmd], project, env, cmd)
        finally:
            lingering = self.stop(background)
        if lingering:
            res["note"] = ((res["note"] or "") + lingering).strip()
        return res

    def prepare(self, step, project, env, background, address):
        """A shell line with its substitutions made (see the module doc)."""
        cmd = substitute(step, project)
        if cmd.startswith(CI_SETUP):
            cmd = cmd[len(CI_SETUP):]
        if re.search(r"\bjrun kill\b", cmd):
            cmd = re.sub(r"\b[0-9a-f]{12}\b", self.start_victim(env, background), cmd)
        if background and re.search(_IPV4, cmd):
            if not address:
                raise NotRun(cmd, "the background line printed no address for this line's placeholder")
            cmd = re.sub(_IPV4, address, cmd)
        return cmd

    def foreground(self, argv, cwd, env, shown):
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        note = None
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            note = "still running after %ds" % TIMEOUT
            terminate(p)
            stdout, stderr = p.communicate()
        # what the line left in the background (`a & b`) must end too
        if not wait_group(p.pid, LINGER):
            note = (note or "") + " left processes running; stopped them"
            terminate(p)
        return dict(ran=shown, status=p.returncode if note is None else None, stdout=stdout, stderr=stderr,
                    note=note)

    def start(self, argv, cwd, env):
        """A background step: started, and given until its first output line
        (what a reader waits for before typing the next line) or its end."""
        out = tempfile.TemporaryFile(mode="w+", dir=self.top)
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p.out = out
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and p.poll() is None:
            out.seek(0)
            first = out.readline()
            if first.endswith("\n"):
                time.sleep(1)  # and the moment it takes to act on it (e.g. listen)
                return p, first
            time.sleep(0.05)
        out.seek(0)
        return p, out.readline()

    def start_victim(self, env, background):
        """The job a `jrun kill` example signals; its id is the one `jrun ps`
        shows (found by the job's hostname)."""
        tag = "doctest-" + uuid.uuid4().hex[:8]
        p = subprocess.Popen(["jrun", "--net", "none", "--init", "--hostname", tag, "--", "sleep", "60"],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        background.append((p, VICTIM))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and p.poll() is None:
            ps = subprocess.run(["jrun", "ps", "--json"], env=env, capture_output=True, text=True)
            job = next((j for j in json.loads(ps.stdout or "[]") if j.get("hostname") == tag), None)
            if job:
                return job["id"]
            time.sleep(0.1)
        return "(the job for jrun kill did not start)"

    def stop(self, background):
        """Background steps that ended on their own must have succeeded (the
        job a `jrun kill` example signalled must have ended); one still
        running after LINGER seconds is stopped (a server, say)."""
        notes = ""
        for p, cmd in background:
            try:
                p.wait(LINGER)
            except subprocess.TimeoutExpired:
                terminate(p)
                p.wait()
                if cmd == VICTIM:
                    notes += " the job it signalled was still running %ds later" % LINGER
                continue
            finally:
                if getattr(p, "out", None):
                    p.out.close()
            if p.returncode != 0 and cmd != VICTIM:
                notes += " background %r exited %d" % (cmd, p.returncode)
        return notes


VICTIM = "the job for jrun kill"
_IPV4 = r"\b\d+\.\d+\.\d+\.\d+\b"


class NotRun(Exception):
    """(what would have run, why it did not)"""


def wait_group(pgid, seconds, leader=None):
    """Until no process of the group is left (LEADER, our child, is reaped
    meanwhile: a zombie still counts as a member)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if leader:
            leader.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def terminate(p):
    """SIGTERM to the process group of P, an example's shell (each jrun
    relays it to its job and cleans up), SIGKILL after 15 s.  Only groups
    this test started."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        if wait_group(p.pid, grace, p):
            return


def host_objects():
    """What examples could leave on the host: jobs' state, networks (their
    files and leases, bridges and job veths: 'jr...'), jrun's nft table;
    without the networks that are whole and idle (jrun keeps them for
    network-idle, see conftest.idle_networks)."""
    # (/run/jrun/.net is the networks' directory: judged with them.)
    return sorted(network_leftovers() | {"state " + n for n in state_dirs() if n != ".net"})


def exclusive(ex):
    # verify measures CPU shares and reachability: alone, not next to other jobs
    return any(re.search(r"\bjrun verify\b", s) for s in ex.steps)


@pytest.fixture(scope="module")
def ran(request):
    """Runs the selected examples once (in parallel, verify alone at the end)
    and records what the host looked like before and after."""
    wanted = [BY_ID[i.callspec.params["example"]] for i in request.session.items
              if i.originalname == "test_example" and i.callspec.params["example"] in BY_ID]
    wanted = [ex for ex in wanted if ex.illustrative is None and not is_ci_suite(ex)]
    parallel = [ex for ex in wanted if not exclusive(ex)]
    top = tempfile.mkdtemp(prefix="jrun-doctest-")
    try:
        os.chmod(top, 0o755)
        runner = Runner(top)
        before = host_objects()
        started = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            results = dict(zip([ex.id for ex in parallel], pool.map(runner.run, parallel)))
        results.update((ex.id, runner.run(ex)) for ex in wanted if exclusive(ex))
        took = time.monotonic() - started
    finally:
        shutil.rmtree(top)
    return dict(results=results, before=before, after=host_objects(), took=took, count=len(wanted))


def is_ci_suite(ex):
    return ex.kind == "sh" and ex.steps == (CI_SUITE,)


def _params():
    out = []
    for ex in EXAMPLES:
        marks = []
        if ex.illustrative is not None:
            marks.append(pytest.mark.skip(reason="illustrative: %s" % ex.illustrative))
        elif is_ci_suite(ex):
            marks.append(pytest.mark.skip(reason="the suite itself: .ci/run runs it"))
        elif not IS_ROOT:
            marks.append(pytest.mark.skip(reason="needs root and a real kernel"))
        out.append(pytest.param(ex.id, marks=marks, id=ex.id))
    return out


# --- the documents' examples --------------------------------------------------


@pytest.mark.parametrize("example", _params())
def test_example(example, ran):
    ex = BY_ID[example]
    r = ran["results"][ex.id]
    shown = "%s (%s) ran:\n%s\nexit %s, expected %d%s\nstdout:\n%s\nstderr:\n%s" % (
        ex.id, ex.kind, r["ran"], r["status"], ex.expect, " (%s)" % r["note"] if r["note"] else "",
        r["stdout"][-3000:], r["stderr"][-3000:])
    assert r["status"] == ex.expect and not r["note"], shown
    # a shell's "not found" does not always reach the exit status (`eval "$(x)"`, `a; b`)
    if ex.expect == 0:
        assert not re.search(r": (command )?not found", r["stderr"]), shown


@pytest.mark.skipif(not IS_ROOT, reason="needs root and a real kernel")
def test_examples_leave_nothing_behind_and_are_quick(ran):
    """Jobs, named networks (--net lab), veths and state of the examples are
    gone (jrun's own cleanup); the run stays well under a minute."""
    assert ran["after"] == ran["before"]
    if ran["count"] > 10:
        assert ran["took"] < 50, ran["took"]


# --- the extraction itself (no root) ------------------------------------------


def test_every_block_says_what_it_is_and_every_marker_has_a_reason():
    assert not PROBLEMS, "\n" + "\n".join(PROBLEMS)


def test_both_documents_have_examples_of_every_kind():
    for doc in DOCS:
        kinds = {ex.kind for ex in EXAMPLES if ex.doc == doc and ex.illustrative is None}
        assert kinds == set(EXAMPLE_KINDS), (doc, kinds)
    assert len([ex for ex in EXAMPLES if ex.doc == "README.md" and ex.kind == "sh"]) >= 20


def test_illustrative_examples_are_few_and_say_why():
    marked = [(ex.id, ex.illustrative) for ex in EXAMPLES if ex.illustrative is not None]
    assert all(reason for _, reason in marked), marked
    assert len(marked) <= len(EXAMPLES) // 3, marked


def test_ci_runs_the_readme_commands_the_doc_test_does_not():
    """The README's first command starts with .ci/setup and its second is the
    suite: .ci/run runs both, as printed."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().split("\n")
    first = [ex for ex in EXAMPLES if ex.doc == "README.md"][:2]
    assert first[0].steps[0].startswith(CI_SETUP) and "bash .ci/setup" in ci
    assert is_ci_suite(first[1]) and CI_SUITE in ci


def test_sample_project_has_what_the_examples_use():
    for path in ("Makefile", "src/Makefile", "script.py", "data.csv", "job.env", "app.conf", "cache",
                 "etl/run.sh"):
        assert os.path.exists(os.path.join(SAMPLE, path)), path
    assert os.access(os.path.join(SAMPLE, "etl/run.sh"), os.X_OK)


SNIPPET = """intro
```sh
# a comment line
sudo jrun --net none -- true             # fine
sudo jrun -- false                       # exit 1 when it fails
sudo jrun --memory 1G \\
    -- sh -c 'echo "# not a comment"'    # exit 3 (illustrative: needs a GPU)
sudo jrun --net lab -- sh -c 'ip addr; nc -l -p 1' &   # prints, say 10.0.0.2
sudo jrun --net lab -- nc 10.0.0.2 1
```
<!-- illustrative: needs Slurm -->
```make
t:
\tsrun jrun -- true
```
```crontab
PATH=/usr/local/bin:/usr/bin:/bin
*/10 * * * * root  jrun gc
```
```
untagged
```
```console
$ jrun
```
```sh
sudo jrun -- x  # (illustrative:)
sudo jrun -- wget https://example.org/
sudo jrun -- wget http://localhost:8080/
sudo jrun -- y &
```
"""


def assert_problems(problems, prefixes):
    assert len(problems) == len(prefixes) and all(map(str.startswith, problems, prefixes)), problems


def test_extraction_of_a_readme_snippet():
    problems = []
    exs = extract("R.md", SNIPPET, problems)
    assert [(e.line, e.kind, e.expect, e.illustrative) for e in exs] == [
        (4, "sh", 0, None), (5, "sh", 1, None), (6, "sh", 3, "needs a GPU"), (8, "sh", 0, None),
        (13, "make", 0, "needs Slurm"), (18, "crontab", 0, None), (27, "sh", 0, ""),
        (28, "sh", 0, "not run: it would reach the internet, and is not marked"), (29, "sh", 0, None)]
    assert exs[2].steps == ("sudo jrun --memory 1G \\\n    -- sh -c 'echo \"# not a comment\"'",)
    assert exs[3].steps == ("sudo jrun --net lab -- sh -c 'ip addr; nc -l -p 1' &",
                            "sudo jrun --net lab -- nc 10.0.0.2 1")
    assert exs[5].env == (("PATH", "/usr/local/bin:/usr/bin:/bin"),) and exs[5].steps == ("jrun gc",)
    assert_problems(problems, ["R.md:20: a block of kind '(none)'", "R.md:23: a block of kind 'console'",
                               "R.md:27: an illustrative marker must read", "R.md:30: a background line",
                               "R.md:28: would reach the internet"])


def test_extraction_of_a_man_page_snippet():
    page = ('.SH EXAMPLES\n.PP\n.\\" block: sh\n.EX\nsudo jrun \\-\\-net none \\-\\- sh \\-c \\(aqps\\(aq \\e\n'
            '    \\-\\-x\n.EE\n.PP\n.EX\nno kind\n.EE\n.\\" block: crontab\n.\\" illustrative: needs cron\n'
            '.EX\n0 3 * * * root jrun \\e\n  gc\n\\fBbold\\fR \\*(Tx\n.EE\n')
    problems = []
    exs = extract("m.1", page, problems)
    assert [(e.line, e.kind, e.steps) for e in exs] == [(5, "sh", ("sudo jrun --net none -- sh -c 'ps' \\\n    --x",))]
    assert_problems(problems, ["m.1:9: a block of kind '(none)'", "m.1:17: the roff escape \\*",
                               "m.1:15: cron has no line continuation", "m.1:16: not an /etc/cron.d entry"])


def test_substitutions_are_sudo_and_the_placeholders_only():
    assert substitute("sudo jrun -- x | sudo jrun -- y; pseudo sudo", "/p") == "jrun -- x | jrun -- y; pseudo sudo"
    assert substitute("\tsudo jrun --upload /srv/etl:etl", "/p") == "\tjrun --upload /p/etl:etl"
    assert shim_path("/usr/bin:/usr/local/bin", "/s") == "/usr/bin:/s:/usr/local/bin"
    assert shim_path(CRON_PATH, "/s") == CRON_PATH
    assert split_comment("a 'b # c' \"d # e\" f#g # h # i") == ("a 'b # c' \"d # e\" f#g", "h # i")


def test_runner_scenario_address_background_status_and_timeout(tmp_path, monkeypatch):
    """The runner itself, with plain shell lines: a scenario's address is the
    one its background line printed, a failed background line fails the
    example, and a line that outlives the timeout is stopped and fails."""
    runner = Runner(str(tmp_path))
    ex = Example("R.md", 1, "sh", ("echo inet 10.1.2.3/24; exit 3 &", "echo sudo reaches 10.9.9.9"))
    r = runner.run(ex)
    assert r["stdout"] == "reaches 10.1.2.3\n" and r["status"] == 0
    assert "exited 3" in r["note"]
    monkeypatch.setattr(__import__(__name__), "TIMEOUT", 1)
    r = runner.run(Example("R.md", 1, "sh", ("sleep 30; echo late",)))
    assert r["status"] is None and "still running" in r["note"] and r["stdout"] == ""


# --- jrun.py reads top to bottom ---------------------------------------------

# The order README's Development section gives, one definition per part: a
# move that breaks it (a resource's check back among the parser, the staging
# helpers away from the root they build) fails here.
FILE_ORDER = ["parse_run", "HostSettings", "load_config", "validate", "run_job", "supervise", "wait_for_job",
              "JobState", "Resource", "Cgroup", "JobUserNamespace", "Network", "host_resources", "JobStdio",
              "child_main", "CHILD_STEPS", "build_root", "stage_files", "Uploader", "build_dev", "pivot_into",
              "harden_proc_and_sys", "job_environment", "seccomp_program", "drop_privileges", "with_image",
              "cmd_ps", "main"]


def _top_level_lines():
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "jrun.py"), encoding="utf-8").read())
    lines = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for n in names:
            lines.setdefault(n, node.lineno)
    return lines, ast.get_docstring(tree)


def test_jrun_py_is_in_the_order_a_run_happens():
    lines, _ = _top_level_lines()
    where = [(n, lines[n]) for n in FILE_ORDER]
    assert [n for n, _ in sorted(where, key=lambda w: w[1])] == FILE_ORDER


# Words of the run order that name no jrun code: a file, a prctl, a syscall.
NOT_CODE = {"jrun.toml", "no_new_privs", "pivot_root"}


def test_the_module_docstring_names_functions_that_exist():
    """The docstring's run order is the file's map: every name of code in it
    (snake_case, CamelCase, Class.verb) is defined in jrun.py."""
    import re

    import jrun

    _, doc = _top_level_lines()
    run_order = doc.split("The order of a run:", 1)[1].split("Exit status:", 1)[0]
    words = set(re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[a-z_]+)?\b", run_order)) - NOT_CODE
    code = {w for w in words if "_" in w or "." in w or (w[0].isupper() and not w.isupper())}
    assert len(code) >= 30, sorted(code)
    missing = [w for w in sorted(code) if not hasattr(jrun, w.split(".")[0])
               or ("." in w and not hasattr(getattr(jrun, w.split(".")[0]), w.split(".")[1]))]
    assert missing == []
