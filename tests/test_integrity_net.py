"""The network side of host integrity: jrun's firewall holds whatever happens to
the host's ruleset, and a job reaches no host address and no cloud metadata.

Pure logic first (no root).  Then, as root, a whole stand-in host: jrun runs
inside a private network and mount namespace (a fresh tmpfs on /run/jrun,
loopback up; cgroups stay the host's), whose ruleset these tests flush and
cut up at will.  Nothing destructive ever runs in the host's own network
namespace, and the host's ruleset is compared before and after.  Inside the
stand-in:

    job --- jrun0 (172.31.254.1) [stand-in host] sup 203.0.113.1 --- eth0 [upstream]
            a "host service" on 0.0.0.0:7000              203.0.113.2:8080  a service
            nat: 203.0.113.1:8080 -> 203.0.113.2:8080     169.254.169.254:80  fake metadata
            route 169.254.169.254 via 203.0.113.2         default route via 203.0.113.1

The upstream routes back to the stand-in host (as a docker container does),
so only jrun's rules stand between a job and the DNAT'd service or the
metadata server.  Real traffic only inside these namespaces.
"""
import os
import re
import subprocess
import sys
import uuid

import pytest

import jrun
from conftest import JRUN, needs_root

# ---------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------

NETS = [("jrun0", "172.31.254.0/24", True), ("jrun-abc", "172.31.200.0/24", False)]


def _chain(chains, name):
    return next(rules for c, _, rules in chains if c == name)


def test_prerouting_drops_host_addresses_and_link_local_before_dnat():
    chains = jrun.nft_chains(NETS)
    assert [c for c, _, _ in chains] == ["prerouting", "input", "forward", "postrouting"]
    hook = dict((c, h) for c, h, _ in chains)["prerouting"]
    assert "hook prerouting priority dstnat - 10;" in hook  # -110: before any DNAT at dstnat (-100)
    pre = _chain(chains, "prerouting")
    bridges = '{ "jrun0", "jrun-abc" }'
    assert pre == ["iifname %s ip daddr 169.254.0.0/16 drop" % bridges,
                   "iifname %s ct state established,related accept" % bridges,
                   "iifname %s fib daddr type local drop" % bridges]
    # The input chain stays, as the second wall.
    assert _chain(chains, "input") == ["iifname %s ct state established,related accept" % bridges,
                                       "iifname %s drop" % bridges]


def test_allow_link_local_lifts_only_the_link_local_rule():
    allowed = jrun.nft_chains(NETS, allow_link_local=True)
    assert not any("169.254" in r for _, _, rules in allowed for r in rules)
    assert any("fib daddr type local drop" in r for r in _chain(allowed, "prerouting"))
    assert [c for c in allowed if c[0] != "prerouting"] == [c for c in jrun.nft_chains(NETS) if c[0] != "prerouting"]


def test_every_rule_carries_a_tag_of_the_whole_table():
    text = jrun.nft_ruleset(NETS)
    tag = jrun.nft_tag(jrun.nft_chains(NETS))
    assert re.fullmatch(r"jrun [0-9a-f]{16}", tag)
    rules = sum(len(r) for _, _, r in jrun.nft_chains(NETS))
    assert text.count('comment "%s"\n' % tag) == rules
    # Any change of the table changes the tag: a network more or less, the setting.
    others = {jrun.nft_tag(jrun.nft_chains(NETS[:1])), jrun.nft_tag(jrun.nft_chains(NETS, True)),
              jrun.nft_tag(jrun.nft_chains([NETS[0], ("jrun-abc", "172.31.201.0/24", False)]))}
    assert tag not in others and len(others) == 3
    assert jrun.nft_tag(jrun.nft_chains(NETS)) == tag  # and nothing else does


def _config(tmp_path, text):
    path = tmp_path / "jrun.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return str(path)


def test_allow_link_local_config_key(tmp_path):
    assert jrun.HOST.allow_link_local is False
    assert jrun.load_config(_config(tmp_path, "allow-link-local = true\n"))[1].allow_link_local is True
    assert jrun.load_config(_config(tmp_path, "allow-link-local = false\n"))[1].allow_link_local is False


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"'])
def test_allow_link_local_must_be_true_or_false(tmp_path, value):
    cfg = _config(tmp_path, "allow-link-local = %s\n" % value)
    with pytest.raises(jrun.UsageError, match=r"^%s: allow-link-local: .* should be true or false$" % cfg):
        jrun.load_config(cfg)


# ---------------------------------------------------------------------------
# The stand-in host, as root
# ---------------------------------------------------------------------------

UPSTREAM, HOST_OTHER, METADATA = "203.0.113.2", "203.0.113.1", "169.254.169.254"
GATEWAY = "172.31.254.1"
HOST_SVC_GW, HOST_SVC_OTHER = GATEWAY + ":7000", HOST_OTHER + ":7000"
DNAT, META, UP = HOST_OTHER + ":8080", METADATA + ":80", UPSTREAM + ":8080"

# A TCP server on each ADDR:PORT given: answers "pong ADDR:PORT" and logs
# "PEER -> ADDR:PORT" for each connection, until killed.
SERVER = r"""
import select, socket, sys
socks = {}
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(16); socks[s] = spec
print("ready", flush=True)
while True:
    for s in select.select(list(socks), [], [])[0]:
        c, peer = s.accept()
        c.sendall(b"pong " + socks[s].encode() + b"\n"); c.close()
        print(peer[0], "->", socks[s], flush=True)
"""

# busybox sh in a job: probe every HOST:PORT at once (a dropped SYN costs
# the whole -w 1), one line "HOST:PORT pong ..." per one that answered.
# nc's 2 s: a connection that succeeds takes milliseconds, but the host may be
# loaded (the UML lanes boot while these tests run).
PROBE = "for t in %s; do (nc -w 2 ${t%%:*} ${t##*:} </dev/null | sed \"s|^|$t |\") & done; wait; echo probed"
# A job that keeps running and probes whatever each line of its stdin names.
PROBER = ("ip -4 -o addr show eth0; while read targets; do "
          + PROBE.replace("%s", "$targets") + "; done")


def reached(out):
    assert "probed" in out, out
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["pong"]}


class StandIn:
    """A private network + mount namespace that jrun takes for the host:
    commands enter it with nsenter.  Its /run/jrun is a fresh tmpfs, so its
    state, leases and lock are its own."""

    def __init__(self, config):
        self.config = config
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-ec",
             "mkdir -p /run/jrun; mount -t tmpfs -o mode=0755 standin /run/jrun; ip link set lo up; "
             "echo ready; exec sleep 3600"], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline() == "ready\n"
        self.procs = []

    def argv(self, *cmd):
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--"] + [str(c) for c in cmd]

    def sh(self, script, check=True):
        p = subprocess.run(self.argv("sh", "-ec", script), capture_output=True, text=True, timeout=30)
        assert not check or p.returncode == 0, (script, p.stdout, p.stderr)
        return p

    def jrun(self, *args, config=None, timeout=60):
        return subprocess.run(self.argv(*JRUN, "--config", config or self.config, *args),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *cmd, **kw):
        p = subprocess.Popen(self.argv(*cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def server(self, *specs, netns=None):
        cmd = [sys.executable, "-c", SERVER] + list(specs)
        p = self.start(*(["nsenter", "-t", str(netns), "-n", "--"] + cmd if netns else cmd))
        assert p.stdout.readline() == "ready\n", p.stderr.read()
        return p

    def nft_rules(self):
        """jrun's table in the stand-in: {chain: number of rules}, and the
        set of comments they carry."""
        text = self.sh("nft list table inet jrun 2>/dev/null || true").stdout
        chains, chain = {}, None
        for line in text.splitlines():
            m = re.match(r"\s*chain (\S+) \{", line)
            if m:
                chain = m.group(1)
                chains[chain] = 0
            elif chain and " comment " in line:
                chains[chain] += 1
        return chains, set(re.findall(r'comment "([^"]*)"', text))

    def close(self):
        """Ends what the tests left running: SIGTERM first, which a jrun
        relays to its job before it cleans up (its cgroups are the host's)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.holder.kill()
        self.holder.wait()


def host_ruleset():
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root and a real kernel")
    before = host_ruleset()
    cfg = _config(tmp_path_factory.mktemp("standin"), 'audit-log = ""\n')  # the host's audit log stays clean
    s = StandIn(cfg)
    try:
        up = s.start("unshare", "--net", "--", "sh", "-c", "echo $$; exec sleep 3600")
        s.up = int(up.stdout.readline())
        s.sh("ip link add sup type veth peer name eth0 netns %d; ip addr add %s/24 dev sup; ip link set sup up; "
             "ip route add %s/32 via %s" % (s.up, HOST_OTHER, METADATA, UPSTREAM))
        s.sh("nsenter -t %d -n sh -ec 'ip addr add %s/24 dev eth0; ip addr add %s/32 dev eth0; ip link set eth0 up; "
             "ip link set lo up; ip route add default via %s'" % (s.up, UPSTREAM, METADATA, HOST_OTHER))
        s.server(UP, META, netns=s.up)  # a service upstream, and the fake metadata server
        s.server("0.0.0.0:7000")  # the host's service, on every address of the stand-in host
        yield s
    finally:
        s.close()
    # Whatever the tests did to the stand-in, the host's own ruleset is untouched.
    assert host_ruleset() == before


# docker -p in the stand-in host: HOST_OTHER:8080 is DNAT'd to the upstream's
# service, in the table and at the priority docker's iptables-nft rules use.
ADD_DNAT = ("nft add table ip standin-nat; nft flush table ip standin-nat; "
            "nft add chain ip standin-nat prerouting '{ type nat hook prerouting priority dstnat; }'; "
            "nft add rule ip standin-nat prerouting ip daddr %s tcp dport 8080 dnat to %s" % (HOST_OTHER, UP))


class Prober:
    """A job on the default bridge that keeps running: it probes when asked."""

    def __init__(self, standin, *opts):
        self.proc = standin.start(*JRUN, "--config", standin.config, "--stop-timeout", "1", *opts, "--",
                                  "sh", "-c", PROBER, stdin=subprocess.PIPE)
        m = re.search(r"inet (\S+)/", self.proc.stdout.readline())
        assert m, self.proc.stderr.read()
        self.address = m.group(1)

    def probe(self, *targets):
        self.proc.stdin.write(" ".join(targets) + "\n")
        self.proc.stdin.flush()
        out = []
        for line in self.proc.stdout:
            out.append(line)
            if line == "probed\n":
                return reached("".join(out))
        raise AssertionError("the prober ended: %s" % self.proc.stderr.read())

    def stop(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()
        return self.proc.stderr.read()


@pytest.fixture(scope="module")
def prober(standin):
    """The long job that keeps jrun0 in use while the firewall is damaged."""
    p = Prober(standin)
    yield p
    p.stop()


def probe_job(standin, *targets, opts=(), config=None):
    p = standin.jrun(*opts, "--", "sh", "-c", PROBE % " ".join(targets), config=config)
    assert p.returncode == 0, p.stderr
    return reached(p.stdout), p.stderr


def assert_table_is_jruns(standin, nets=(("jrun0", "172.31.254.0/24", True),), allow_link_local=False):
    chains = jrun.nft_chains(list(nets), allow_link_local)
    have, tags = standin.nft_rules()
    assert have == {c: len(r) for c, _, r in chains} and tags == {jrun.nft_tag(chains)}, (have, tags)


EVERYTHING = (HOST_SVC_GW, HOST_SVC_OTHER, DNAT, META)


@needs_root
@pytest.mark.parametrize("damage,holes,what", [
    # what a firewall reload does, and what a hand may do
    ("nft flush ruleset", EVERYTHING, "missing"),
    ("nft delete table inet jrun", EVERYTHING, "missing"),
    ("nft delete chain inet jrun prerouting", (DNAT, META), "incomplete (chain prerouting has 0 of 3 rules)"),
    ("nft flush chain inet jrun prerouting", (DNAT, META), "incomplete (chain prerouting has 0 of 3 rules)"),
])
def test_damaged_firewall_is_restored_before_the_next_job_starts(standin, prober, damage, holes, what):
    standin.sh(ADD_DNAT)
    assert prober.probe(*EVERYTHING) == set()  # the rules hold
    standin.sh(damage)
    standin.sh(ADD_DNAT)  # a reload puts docker's rules back at once
    # The hole is real: the running job now reaches what the rules kept from it.
    assert prober.probe(*EVERYTHING) == set(holes)
    got, err = probe_job(standin, *EVERYTHING)
    assert got == set(), err
    assert "jrun: nft table inet jrun was %s (a firewall reload?): restored\n" % what in err
    assert_table_is_jruns(standin)
    # The running job is protected again too.
    assert prober.probe(*EVERYTHING) == set()


@needs_root
def test_teardown_of_another_job_and_gc_restore_the_table(standin, prober):
    other = Prober(standin)
    standin.sh("nft delete table inet jrun")
    err = other.stop()  # its teardown finds the table gone while the prober still runs
    assert "nft table inet jrun was missing (a firewall reload?): restored" in err
    assert_table_is_jruns(standin)
    standin.sh("nft delete chain inet jrun input")
    p = standin.jrun("gc")
    assert p.returncode == 0 and "gc: removed orphan nft table inet jrun, incomplete (chain input has 0 of 2 " \
        "rules): restored" in p.stderr, p.stderr
    assert_table_is_jruns(standin)
    assert standin.jrun("gc").stderr == ""  # nothing more to do
    assert prober.probe(HOST_SVC_GW, HOST_SVC_OTHER) == set()


FAILING_NFT = "#!/bin/sh\necho 'nft: simulated failure' >&2\nexit 1\n"


@needs_root
def test_a_job_is_refused_when_the_table_cannot_be_restored(standin, prober, tmp_path):
    fake = tmp_path / "nft"
    fake.write_text(FAILING_NFT)
    os.chmod(fake, 0o755)
    name = "fwfail-" + uuid.uuid4().hex[:6]
    links = "ip -o link | cut -d' ' -f2"  # the stand-in's own (its /sys is the host's sysfs)
    veths = standin.sh(links).stdout.split()
    standin.sh("nft delete table inet jrun")
    standin.sh("mount --bind %s /usr/sbin/nft" % fake)  # in the stand-in's mount namespace only
    try:
        p = standin.jrun("--name", name, "--", "true")
    finally:
        standin.sh("umount /usr/sbin/nft")
    assert p.returncode == 125
    assert p.stderr == ("jrun: jrun's firewall, nft table inet jrun, is missing and could not be restored "
                        "(nft: nft: simulated failure); no networked job starts without it\n")
    # Nothing of the refused job is left: no state, no veth, no lease.
    assert name not in standin.sh("ls -a /run/jrun").stdout
    assert standin.sh(links).stdout.split() == veths
    assert "/run/jrun/%s" % name not in standin.sh("cat /run/jrun/.net/jrun0").stdout
    # The next job puts it back.
    got, err = probe_job(standin, HOST_SVC_GW)
    assert got == set() and "restored" in err
    assert_table_is_jruns(standin)


@needs_root
def test_a_hosts_dnat_does_not_lead_a_job_to_the_service_behind_it(standin, prober):
    standin.sh(ADD_DNAT)
    # The same service, straight (NAT out) and through the host's DNAT.
    got, err = probe_job(standin, UP, DNAT)
    assert got == {UP}, err
    assert prober.probe(UP, DNAT) == {UP}


@needs_root
def test_cloud_metadata_is_unreachable_unless_the_host_allows_it(standin, prober, tmp_path):
    got, err = probe_job(standin, META, UP)
    assert got == {UP}, err
    allow = _config(tmp_path, 'audit-log = ""\nallow-link-local = true\n')
    got, err = probe_job(standin, META, UP, config=allow)
    assert got == {META, UP}, err
    assert_table_is_jruns(standin, allow_link_local=True)
    assert "restored" not in err  # a change of setting, not a repair
    # The next job under the default setting takes it back.
    got, err = probe_job(standin, META)
    assert got == set(), err
    assert_table_is_jruns(standin)


@needs_root
def test_nat_named_networks_and_isolation_still_work(standin, prober):
    # NAT out: the upstream sees the stand-in host's address, not the job's.
    seen = standin.server(UPSTREAM + ":8081", netns=standin.up)
    got, err = probe_job(standin, UPSTREAM + ":8081")
    assert got == {UPSTREAM + ":8081"}, err
    assert seen.stdout.readline() == "%s -> %s:8081\n" % (HOST_OTHER, UPSTREAM)
    net = "t-" + uuid.uuid4().hex[:6]
    named, plain = Prober(standin, "--net", net), Prober(standin)
    try:
        on_net, on_bridge = Listener(standin, "--net", net), Listener(standin)
        # Neither a default-bridge job nor one of another network opens a
        # connection to a job; a job of the same named network does.
        assert plain.probe(on_net.target, on_bridge.target) == set()
        assert prober.probe(on_bridge.target) == set()
        assert named.probe(on_bridge.target) == set()
        assert named.probe(on_net.target) == {on_net.target}
        # The stand-in host itself connects to a job: its replies pass the
        # prerouting chain as established.
        assert standin.sh("busybox nc -w 2 %s 9000 </dev/null" % on_bridge.address).stdout == "pong\n"
        assert on_net.proc.wait(timeout=30) == 0 and on_bridge.proc.wait(timeout=30) == 0
    finally:
        named.stop()
        plain.stop()


class Listener:
    """A job that serves "pong" to one TCP connection on port 9000."""

    def __init__(self, standin, *opts):
        self.proc = standin.start(*JRUN, "--config", standin.config, "--stop-timeout", "1", *opts, "--",
                                  "sh", "-c", "ip -4 -o addr show eth0; echo pong | nc -l -p 9000")
        self.address = re.search(r"inet (\S+)/", self.proc.stdout.readline()).group(1)
        self.target = self.address + ":9000"


# ---------------------------------------------------------------------------
# jrun verify's Firewall check, on the real host (it damages nothing there)
# ---------------------------------------------------------------------------


@needs_root
def test_verify_firewall_check_passes_and_skips_without_a_network(monkeypatch):
    monkeypatch.setattr(jrun, "VERIFY_CHECKS", [("Firewall", jrun.verify_firewall)])
    before = host_ruleset()
    (r,) = jrun.run_verification([])
    assert r["status"] == "pass", r
    assert r["evidence"] == ("inet jrun current while a job ran: prerouting input forward postrouting; prerouting "
                             "at -110, before DNAT; a copy missing a chain: restored"), r
    assert host_ruleset() == before  # the job's network came and went; nothing else changed
    (r,) = jrun.run_verification(["--net", "none"])
    assert r["status"] == "skip" and "--net none" in r["why"]
