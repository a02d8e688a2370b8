"""The Network section: pure logic first (no root), then black-box tests of the
real jrun as root.  Real traffic goes only to loopback and to addresses inside
the bridges and network namespaces these tests create."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import jrun
from conftest import JRUN, ROOT, job_links, jrun as run_jrun, needs_root, network_leftovers, state_dirs

# ---------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bridge", "none", "backend", "ci-1", "a.b_c", "x" * 63])
def test_check_net_accepts(name):
    assert jrun.check_net("--net", name) == name


@pytest.mark.parametrize("name", ["bad name!", "", "-x", ".x", "_x", "a/b", "x" * 64, "ä", "a:b"])
def test_check_net_refuses(name):
    with pytest.raises(jrun.UsageError, match="^--net: .* is not bridge, none or a network name"):
        jrun.check_net("--net", name)


def test_net_host_is_refused_with_a_reason():
    with pytest.raises(jrun.UsageError, match="'host'.*own network namespace"):
        jrun.check_net("--net", "host")


def test_default_net_is_bridge():
    assert jrun.parse_run(["true"]).net == "bridge"


@pytest.mark.parametrize("text,value", [("172.31.254.0/24", (0xAC1FFE00, 24)), ("10.0.0.0/8", (0x0A000000, 8)),
                                        ("192.168.4.16/28", (0xC0A80410, 28))])
def test_parse_subnet(text, value):
    assert jrun.parse_subnet("subnet", text) == value


@pytest.mark.parametrize("text,why", [("172.31.254.1/24", "host bits set .*172.31.254.0/24"),
                                      ("172.31.254.0", "not an IPv4 subnet"), ("172.31.254.0/29", "prefix length"),
                                      ("172.31.254.0/7", "prefix length"), ("300.1.1.0/24", "not an IPv4 subnet"),
                                      ("fd00::/64", "not an IPv4 subnet"), ("a.b.c.d/24", "not an IPv4 subnet")])
def test_parse_subnet_refuses(text, why):
    with pytest.raises(jrun.UsageError, match=why):
        jrun.parse_subnet("subnet", text)


def test_subnets_overlap():
    s = jrun.parse_subnet("s", "172.31.254.0/24")
    assert jrun.subnets_overlap(s, jrun.parse_subnet("s", "172.31.254.128/25"))
    assert jrun.subnets_overlap(s, jrun.parse_subnet("s", "172.31.0.0/16"))
    assert not jrun.subnets_overlap(s, jrun.parse_subnet("s", "172.31.253.0/24"))
    assert not jrun.subnets_overlap(s, jrun.parse_subnet("s", "10.0.0.0/8"))


def test_interface_names_fit_ifnamsiz_and_are_told_apart():
    assert jrun.bridge_name("bridge") == "jrun0"
    names = {jrun.bridge_name("n%d" % i) for i in range(200)}
    assert len(names) == 200 and all(len(n) <= 15 and n.startswith("jrun-") for n in names)
    assert jrun.bridge_name("x" * 63) == jrun.bridge_name("x" * 63)
    veths = {jrun.veth_name("/run/jrun/" + os.urandom(6).hex()) for _ in range(200)}
    assert len(veths) == 200 and all(len(v) == 12 and jrun._is_job_veth(v) for v in veths)
    assert not any(jrun._is_job_veth(n) for n in ("jrun0", "jrun-0123456789", "eth0", "jrabc"))


def test_named_subnet_is_deterministic_and_skips_used_ones():
    pool = jrun.parse_subnet("pool", jrun.DEFAULT_NET_POOL)
    default = jrun.parse_subnet("subnet", jrun.DEFAULT_SUBNET)
    first = jrun.named_subnet("backend", pool, [default])
    assert first == jrun.named_subnet("backend", pool, [default])
    assert first[1] == 24 and jrun.subnets_overlap(first, pool) and first != default
    second = jrun.named_subnet("backend", pool, [default, first])
    assert second != first and jrun.subnets_overlap(second, pool)
    assert jrun.named_subnet("x", jrun.parse_subnet("p", "10.9.0.0/24"), [jrun.parse_subnet("u", "10.9.0.0/24")]) \
        is None


def test_allocation_reserves_network_gateway_broadcast_and_rotates(tmp_path, monkeypatch):
    monkeypatch.setattr(jrun.JobState, "is_live", lambda self: self.id.startswith("live"))
    f = jrun.NetFile("jrun0", "bridge", jrun.parse_subnet("s", "10.9.0.0/28"))
    got = [f.allocate("live%d" % i) for i in range(13)]
    assert [jrun.format_ip(ip) for ip in got] == ["10.9.0.%d" % i for i in range(2, 15)]
    with pytest.raises(jrun.SetupError, match="no free address"):
        f.allocate("live9")
    del f.leases[jrun.parse_ip("10.9.0.3")]
    assert jrun.format_ip(f.allocate("live10")) == "10.9.0.3"
    f.leases[jrun.parse_ip("10.9.0.4")] = "dead1"
    f.prune()
    assert jrun.parse_ip("10.9.0.4") not in f.leases and len(f.leases) == 12
    monkeypatch.setattr(jrun, "NET_DIR", str(tmp_path))
    f.path = str(tmp_path / "jrun0")
    with jrun._NetLock():  # a lease file is written only under the lock, into its directory fd
        f.save()
    g = jrun.NetFile.load("jrun0")
    assert (g.name, g.subnet, g.leases, g.next) == (f.name, f.subnet, f.leases, f.next)


def test_an_idle_network_records_when_its_last_job_left_and_expires_after_network_idle(tmp_path, monkeypatch):
    monkeypatch.setattr(jrun, "NET_DIR", str(tmp_path))
    f = jrun.NetFile("jrun0", "bridge", jrun.parse_subnet("s", "10.9.0.0/28"))
    f.allocate("live1")
    f.idle = 1000.0  # dropped by save(): a network with a lease is not idle
    with jrun._NetLock():
        f.save()
    assert jrun.NetFile.load("jrun0").idle is None and not f.expired(10 ** 10)
    f.leases.clear()
    with jrun._NetLock():
        f.save()
    g = jrun.NetFile.load("jrun0")
    assert g.idle == 1000.0 and "idle 1000.000\n" in (tmp_path / "jrun0").read_text()
    monkeypatch.setattr(jrun, "HOST", jrun.HOST.replace(network_idle=300.0))
    assert not g.expired(1299.0) and g.expired(1300.0)
    g.allocate("live2")  # a job joins: idle no more
    assert g.idle is None and not g.expired(10 ** 10)


@pytest.mark.parametrize("value, seconds", [('"5m"', 300.0), ("90", 90.0), ('"0"', 0.0), ("0", 0.0),
                                            ('"500ms"', 0.5)])
def test_network_idle_config_key(tmp_path, monkeypatch, value, seconds):
    path = tmp_path / "jrun.toml"
    path.write_text("network-idle = %s\n" % value)
    os.chmod(path, 0o644)
    assert jrun.load_config(str(path))[1].network_idle == seconds


@pytest.mark.parametrize("value, why", [('"soon"', "is not a duration"), ("-5", "must be a positive duration"),
                                        ("true", "should be a number or a string"), ('"5x"', "is not a duration")])
def test_network_idle_config_key_refuses(tmp_path, monkeypatch, value, why):
    path = tmp_path / "jrun.toml"
    path.write_text("network-idle = %s\n" % value)
    os.chmod(path, 0o644)
    with pytest.raises(jrun.UsageError, match="^%s: network-idle: .*%s" % (path, why)):
        jrun.load_config(str(path))


def test_nft_ruleset():
    text = jrun.nft_ruleset([("jrun0", "172.31.254.0/24", True), ("jrun-abc", "172.31.200.0/24", False)])
    assert text.startswith("add table inet jrun\nflush table inet jrun\ntable inet jrun {\n  chain prerouting {")
    assert 'ip saddr 172.31.254.0/24 oifname != "jrun0" masquerade comment' in text
    assert 'ip saddr 172.31.200.0/24 oifname != "jrun-abc" masquerade comment' in text
    assert 'iifname { "jrun0", "jrun-abc" } fib daddr type local drop comment' in text  # prerouting: no host address
    assert 'iifname { "jrun0", "jrun-abc" } drop comment' in text  # input: nothing of the host
    assert 'iifname "jrun-abc" oifname "jrun-abc" accept comment' in text  # a named network talks
    assert 'iifname "jrun0" oifname "jrun0" accept' not in text  # the default bridge does not
    inp = text[text.index("chain input"):]
    assert inp.index("ct state established,related accept") < inp.index('iifname { "jrun0", "jrun-abc" } drop')
    assert jrun.nft_ruleset([]) == "add table inet jrun\ndelete table inet jrun\n"


def test_host_resolvers(tmp_path):
    conf, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    conf.write_text("# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    upstream.write_text("nameserver 10.1.2.3\nnameserver 2001:db8::1\nnameserver 127.0.0.1\nsearch corp lan\n")
    out = jrun.host_resolvers(str(conf), str(upstream))
    assert re.findall(r"^nameserver (\S+)", out, re.M) == ["10.1.2.3"]
    assert "search corp lan" in out
    conf.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\n")
    out = jrun.host_resolvers(str(conf), str(tmp_path / "missing"))
    assert re.findall(r"^nameserver (\S+)", out, re.M) == ["192.0.2.53"]


# ---------------------------------------------------------------------------
# Black-box, as root
# ---------------------------------------------------------------------------

root = needs_root


def links():
    return set(os.listdir("/sys/class/net"))


def job_veths():
    return {n for n in links() if jrun._is_job_veth(n)}


def nft_table_exists():
    return subprocess.run(["nft", "list", "table", "inet", "jrun"], capture_output=True).returncode == 0


def assert_no_network_left():
    """Nothing of a job's network: no veth, no lease; networks only idle and
    whole (bridge, file and nft table), as jrun keeps them (network-idle)."""
    assert network_leftovers() == set()


CONNECT = "for i in $(seq 30); do nc -w 2 %s 5000 </dev/null && exit 0; sleep 0.1; done; echo unreachable; exit 1"


def job_address(stdout):
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", stdout)
    assert m, stdout
    return m.group(1)


@root
def test_job_has_eth0_with_address_and_default_route():
    p = run_jrun("--", "sh", "-c", "ip -4 -o addr show; echo ---; ip route; echo ---; ip -o link show", check=0)
    addrs, routes, linkinfo = p.stdout.split("---\n")
    assert re.search(r"eth0\s+inet 172\.31\.254\.(\d+)/24", addrs), addrs
    assert "lo    inet 127.0.0.1/8" in addrs.replace("\t", " ") or "lo    inet 127.0.0.1" in addrs, addrs
    assert "default via 172.31.254.1 dev eth0" in routes
    assert {m for m in re.findall(r"^\d+: (\w+)[:@]", linkinfo, re.M)} == {"lo", "eth0"}
    assert "UP" in [ln for ln in linkinfo.splitlines() if ": eth0@" in ln or ": eth0:" in ln][0]
    assert_no_network_left()


@root
def test_net_none_has_only_loopback_and_it_is_up():
    p = run_jrun("--net", "none", "--", "sh", "-c", "ip -o link show; echo lo-ok | nc -l -p 5000 & "
                 + CONNECT % "127.0.0.1", check=0)
    names = re.findall(r"^\d+: (\w+)[:@]", p.stdout, re.M)
    assert names == ["lo"]
    assert "UP" in p.stdout.splitlines()[0] and "lo-ok" in p.stdout
    assert_no_network_left()


@root
def test_net_none_does_not_import_pyroute2_and_bridge_imports_it_narrowly():
    cmd = [sys.executable, "-X", "importtime", os.path.join(ROOT, "jrun.py")]
    none = subprocess.run(cmd + ["--net", "none", "--", "true"], capture_output=True, text=True)
    assert none.returncode == 0 and "pyroute2" not in none.stderr
    assert not re.search(r"\|\s+(socket|hashlib|subprocess)$", none.stderr, re.M)
    bridge = subprocess.run(cmd + ["--", "true"], capture_output=True, text=True)
    assert bridge.returncode == 0 and "pyroute2.netlink.rtnl.ifinfmsg" in bridge.stderr
    # pyroute2's package __init__ (asyncio, ssl, every protocol) is skipped.
    assert "asyncio" not in bridge.stderr and "pyroute2.iproute" not in bridge.stderr


@root
def test_etc_hosts_and_resolv_conf():
    p = run_jrun("--hostname", "web1", "--", "sh", "-c", "cat /etc/hosts; echo ---; cat /etc/resolv.conf; "
                 "echo ---; ip -4 -o addr show eth0", check=0)
    hosts, resolv, addr = p.stdout.split("---\n")
    assert "%s\tweb1" % job_address(addr) in hosts
    want = re.findall(r"^nameserver (\S+)", jrun.host_resolvers(), re.M)
    assert re.findall(r"^nameserver (\S+)", resolv, re.M) == want
    assert not re.search(r"^nameserver 127\.", resolv, re.M)


@root
def test_debug_audit_trail_has_network_steps_before_release():
    p = run_jrun("--log-level", "debug", "--", "true", check=0)
    lines = p.stderr.splitlines()

    def at(text):
        return next(i for i, ln in enumerate(lines) if text in ln)

    assert at("leased on jrun0") < at("veth jr") < at("eth0 172.31.254.") < at("network: ready") \
        < at("child released") < at("exec ")
    assert "default route via 172.31.254.1" in p.stderr
    assert at("veth jr") > at("namespaces created")  # attached to the child's own namespace
    # The veth is left to the kernel (it goes with the job's namespace); the
    # bridge and its rules stay for the next job.
    assert not re.search(r"veth jr[0-9a-f]{10} deleted", p.stderr)
    assert "network bridge: idle; bridge jrun0 and its rules kept" in p.stderr


class Listener:
    """A job that prints its address, then serves one TCP connection."""

    def __init__(self, *opts):
        self.proc = subprocess.Popen(
            JRUN + ["--stop-timeout", "1"] + list(opts) + ["--", "sh", "-c", "ip -4 -o addr show eth0; echo hello | nc -l -p 5000; echo served"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.address = job_address(self.proc.stdout.readline())

    def stop(self):
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # relayed; SIGKILL after --stop-timeout
        self.proc.wait(timeout=30)
        return self.proc.stdout.read()




@root
def test_two_jobs_on_a_named_network_talk_over_tcp():
    net = "t-" + uuid.uuid4().hex[:8]
    srv = Listener("--net", net)
    try:
        p = run_jrun("--net", net, "--", "sh", "-c", CONNECT % srv.address, timeout=60)
        assert p.returncode == 0 and "hello" in p.stdout, (p.stdout, p.stderr)
    finally:
        out = srv.stop()
    assert "served" in out
    assert_no_network_left()


@root
def test_jobs_on_the_default_bridge_or_other_networks_cannot_reach_each_other():
    srv = Listener()
    other = Listener("--net", "t-" + uuid.uuid4().hex[:8])
    try:
        # Straight over the bridge (port isolation), and routed through the
        # host's gateway address (nftables forward rules).
        probe = ("nc -w 2 {a} 5000 </dev/null && echo REACHED; "
                 "ip route add {a}/32 via 172.31.254.1 && nc -w 2 {a} 5000 </dev/null && echo REACHED; "
                 "nc -w 2 {o} 5000 </dev/null && echo REACHED; echo probed")
        # NET_ADMIN: the job may change its own routes, as it could in docker with --cap-add.
        p = run_jrun("--cap-add", "NET_ADMIN", "--", "sh", "-c", probe.format(a=srv.address, o=other.address),
                     timeout=60)
        assert "probed" in p.stdout and "REACHED" not in p.stdout and "hello" not in p.stdout, p.stdout
        # Port isolation holds on its own on hosts without br_netfilter,
        # where bridged frames never meet nftables.
        ports = subprocess.run(["bridge", "-d", "link", "show"], capture_output=True, text=True).stdout
        port_of = {m.group(1): m.group(2) for m in re.finditer(r"^\d+: (jr[0-9a-f]{10})@.*?\n(.*?)(?=^\d+: |\Z)",
                                                               ports, re.M | re.S)}
        assert len(port_of) >= 2
        assert sum("isolated on" in v for v in port_of.values()) == 1, ports  # srv; other's net is named
        # The listeners were there: the host itself may connect to a job.
        for job in (srv, other):
            with socket.create_connection((job.address, 5000), timeout=5) as s:
                assert s.recv(16) == b"hello\n"
    finally:
        srv.stop()
        other.stop()
    assert_no_network_left()


@root
def test_job_cannot_reach_the_hosts_own_services():
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", 0))  # every host address, IPv4 and IPv6
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[1])
            except OSError:
                pass

    t = threading.Thread(target=accept)
    t.start()
    holder = Listener()  # keeps jrun0 up, to learn its IPv6 link-local address
    try:
        host_addrs = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/",
                                subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout)
        link_local = re.search(r"inet6 (fe80::[0-9a-f:]+)/", subprocess.run(
            ["ip", "-6", "-o", "addr", "show", "dev", "jrun0"], capture_output=True, text=True).stdout).group(1)
        targets = ["172.31.254.1"] + [a for a in host_addrs if not a.startswith("127.")]
        script = "; ".join("nc -w 2 %s %d </dev/null && echo REACHED %s" % (a, port, a) for a in targets)
        # IPv6: the gateway's link-local address, once eth0's own is past DAD.
        script += ("; sleep 2.5; nc -w 2 %s%%eth0 %d </dev/null && echo REACHED6; "
                   "ip -6 addr show dev eth0 | grep -q tentative || echo probed") % (link_local, port)
        p = run_jrun("--", "sh", "-c", script, timeout=60)
        assert "probed" in p.stdout and "REACHED" not in p.stdout, (p.stdout, p.stderr)
        # The server itself works: the host reaches it, and reaches the job.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        time.sleep(0.5)
        assert [a[0] for a in accepted] in (["::ffff:127.0.0.1"], ["127.0.0.1"]), accepted
        with socket.create_connection((holder.address, 5000), timeout=5) as s:
            assert s.recv(16) == b"hello\n"
    finally:
        holder.stop()
        stop.set()
        t.join()
        server.close()
    assert_no_network_left()


@pytest.fixture
def upstream():
    """A stand-in for the outside world: a network namespace reached from the
    host through a veth with TEST-NET-3 addresses, and no route back to any
    jrun subnet (so only NAT'd traffic can be answered)."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = "jrtest-up-" + tag, "tup" + tag, "tupn" + tag
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns],
                    ["ip", "addr", "add", "203.0.113.1/24", "dev", host_if],
                    ["ip", "link", "set", host_if, "up"],
                    ["ip", "-n", ns, "addr", "add", "203.0.113.2/24", "dev", ns_if],
                    ["ip", "-n", ns, "link", "set", ns_if, "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=True)


UPSTREAM_SERVER = """
import socket, sys
s = socket.socket(); s.bind(("203.0.113.2", 8080)); s.listen(1); s.settimeout(30)
print("ready", flush=True)
c, peer = s.accept(); c.sendall(b"pong\\n"); print(peer[0], flush=True)
"""


@root
def test_egress_is_masqueraded_to_the_hosts_address(upstream):
    srv = subprocess.Popen(["ip", "netns", "exec", upstream, sys.executable, "-c", UPSTREAM_SERVER],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline() == "ready\n"
        p = run_jrun("--", "sh", "-c", "nc -w 5 203.0.113.2 8080 </dev/null", timeout=60)
        assert p.returncode == 0 and p.stdout == "pong\n", (p.stdout, p.stderr)
        # The upstream saw the host's address, not the job's 172.31.254.x.
        assert srv.stdout.readline().strip() == "203.0.113.1"
    finally:
        srv.kill()
        srv.wait()
    assert_no_network_left()


def run_together(n, *opts):
    """n jobs started at once that each print their address and then wait
    on stdin, so all n hold their lease at the same time; returns the
    addresses once every job has printed one, then lets them all end."""
    procs = [subprocess.Popen(JRUN + list(opts) + ["--", "sh", "-c", "ip -4 -o addr show eth0; read x; true"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        with ThreadPoolExecutor(n) as pool:
            lines = list(pool.map(lambda p: p.stdout.readline(), procs))
        assert all(lines), [p.stderr.read() for p, line in zip(procs, lines) if not line]
        return [job_address(line) for line in lines]
    finally:
        for p in procs:
            p.stdin.close()
        assert [p.wait(timeout=60) for p in procs] == [0] * n


@root
def test_30_concurrent_jobs_get_distinct_addresses():
    addrs = run_together(30)
    assert len(set(addrs)) == 30 and all(a.startswith("172.31.254.") for a in addrs), addrs
    assert not any(a in ("172.31.254.0", "172.31.254.1", "172.31.254.255") for a in addrs)
    assert_no_network_left()


@root
def test_kill_9_of_jrun_then_gc_leaves_nothing():
    name = "kill9-" + uuid.uuid4().hex[:6]
    proc = subprocess.Popen(JRUN + ["--name", name, "--", "sleep", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    veth = jrun.veth_name(os.path.join("/run/jrun", name))
    deadline = time.monotonic() + 20
    while veth not in links() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert veth in links()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What the dead jrun left: its lease, the bridge, the nft table.
    assert os.path.exists(os.path.join(jrun.NET_DIR, "jrun0")) and "jrun0" in links() and nft_table_exists()
    p = run_jrun("gc", check=0)
    assert name not in state_dirs()
    assert_no_network_left()
    assert "removed leftovers of job %s" % name in p.stderr


def _idle_config(tmp_path, idle):
    path = tmp_path / "jrun.toml"
    path.write_text('network-idle = "%s"\n' % idle)
    os.chmod(path, 0o644)
    return str(path)


@root
def test_the_last_job_leaves_its_network_idle_for_the_next_and_gc_removes_it_after_network_idle(tmp_path):
    net = "t-" + uuid.uuid4().hex[:8]
    bridge = jrun.bridge_name(net)
    path = os.path.join(jrun.NET_DIR, bridge)
    p = run_jrun("--log-level", "debug", "--net", net, "--", "true", check=0)
    assert "bridge %s created" % bridge in p.stderr
    assert "network %s: idle; bridge %s and its rules kept" % (net, bridge) in p.stderr
    text = open(path).read()
    assert "lease " not in text and re.search(r"^idle \d+\.\d{3}$", text, re.M), text
    assert bridge in links() and nft_table_exists() and network_leftovers() == set()
    # The next job finds bridge and rules in place: nothing is made or deleted.
    p = run_jrun("--log-level", "debug", "--net", net, "--", "true", check=0)
    assert "bridge %s created" % bridge not in p.stderr and "nft: table inet jrun in place" in p.stderr
    assert " deleted" not in p.stderr, p.stderr
    # gc keeps a network idle for less than network-idle (default 5 min)...
    p = run_jrun("gc", check=0)
    assert net not in p.stderr and bridge in links() and os.path.exists(path)
    # ...and removes one idle for longer: bridge, file and its rules.
    p = run_jrun("--config", _idle_config(tmp_path, "1ms"), "gc", check=0)
    assert "gc: removed orphan network %s: idle for" % net in p.stderr
    assert bridge not in links() and not os.path.exists(path)
    rules = subprocess.run(["nft", "list", "table", "inet", "jrun"], capture_output=True, text=True).stdout
    assert bridge not in rules
    assert network_leftovers() == set()


@root
def test_gc_removes_a_jrun_bridge_that_lost_its_network_file_and_never_another_bridge():
    orphan = "jrun-" + uuid.uuid4().hex[:10]  # a named network's bridge whose file is gone
    foreign = "jrunx" + uuid.uuid4().hex[:6]  # not a name jrun gives
    for name in (orphan, foreign):
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        p = run_jrun("gc", check=0)
        assert "gc: removed orphan bridge %s: no network file" % orphan in p.stderr, p.stderr
        assert orphan not in links() and foreign in links() and foreign not in p.stderr
    finally:
        for name in (orphan, foreign):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


@root
def test_gc_removes_the_table_when_no_network_is_left(tmp_path):
    run_jrun("--config", _idle_config(tmp_path, "1ms"), "gc", check=0)  # idle networks of earlier tests go
    files = os.listdir(jrun.NET_DIR) if os.path.isdir(jrun.NET_DIR) else []
    assert not [n for n in files if not n.startswith(".")] and not nft_table_exists()
    subprocess.run(["nft", "-f", "-"], input="table inet jrun {\n chain input {\n"
                   "  type filter hook input priority 0; policy accept;\n }\n}\n", text=True, check=True)
    try:
        p = run_jrun("gc", check=0)
        assert "gc: removed orphan nft table inet jrun: no network left" in p.stderr, p.stderr
        assert not nft_table_exists()
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "jrun"], capture_output=True)


@root
def test_network_idle_0_removes_a_network_with_its_last_job(tmp_path):
    net = "t-" + uuid.uuid4().hex[:8]
    bridge = jrun.bridge_name(net)
    p = run_jrun("--config", _idle_config(tmp_path, "0"), "--log-level", "debug", "--net", net, "--", "true",
                 check=0)
    assert "bridge %s deleted (no job left on it)" % bridge in p.stderr
    assert bridge not in links() and not os.path.exists(os.path.join(jrun.NET_DIR, bridge))
    assert network_leftovers() == set()


@root
def test_the_kernel_deletes_the_jobs_veth_with_its_namespace_and_the_name_runs_again_at_once():
    name = "veth-" + uuid.uuid4().hex[:6]
    veth = jrun.veth_name(os.path.join("/run/jrun", name))
    for _ in range(3):  # back to back: a run may find the last one's veth not reaped yet
        p = run_jrun("--name", name, "--log-level", "debug", "--", "true", check=0)
        assert "veth %s on jrun0" % veth in p.stderr and "veth %s deleted" % veth not in p.stderr
    assert veth not in job_links()


class PinnedJob:
    """A job whose network namespace the test holds open (an fd): it
    outlives the job, and so does the job's veth, after its lease went."""

    def __init__(self, name):
        self.veth = jrun.veth_name(os.path.join("/run/jrun", name))
        proc = subprocess.Popen(JRUN + ["--name", name, "--", "sh", "-c", "echo up; read x"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "up\n"
        with open("/run/jrun/%s/job.json" % name) as f:
            self.fd = os.open("/proc/%d/ns/net" % json.load(f)["pid"], os.O_RDONLY)
        proc.communicate("\n", timeout=30)
        assert proc.returncode == 0
        time.sleep(0.3)
        assert self.veth in links()  # its namespace lives on

    def close(self):
        os.close(self.fd)


@root
def test_gc_deletes_a_veth_whose_namespace_outlives_its_job():
    pinned = PinnedJob("pin-" + uuid.uuid4().hex[:6])
    try:
        p = run_jrun("gc", check=0)
        assert "gc: removed orphan veth %s" % pinned.veth in p.stderr
        assert pinned.veth not in links()
    finally:
        pinned.close()


@root
def test_a_job_of_the_same_name_replaces_a_veth_not_reaped_yet():
    name = "pin-" + uuid.uuid4().hex[:6]
    pinned = PinnedJob(name)
    try:
        p = run_jrun("--name", name, "--", "sh", "-c", "ip -4 -o addr show eth0", check=0)
        assert job_address(p.stdout).startswith("172.31.254.")
    finally:
        pinned.close()


@root
def test_dead_jobs_lease_is_reclaimed_by_the_next_job():
    name = "kill9-" + uuid.uuid4().hex[:6]
    proc = subprocess.Popen(JRUN + ["--name", name, "--", "sh", "-c", "ip -4 -o addr show eth0; sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = job_address(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        lines = open(os.path.join(jrun.NET_DIR, "jrun0")).read()
        assert "lease %s /run/jrun/%s" % (first, name) in lines
        p = run_jrun("--", "sh", "-c", "ip -4 -o addr show eth0", check=0)
        # The dead job's lease is gone with the job that reclaimed it.
        assert job_address(p.stdout) != first
        assert_no_network_left()
    finally:
        run_jrun("gc")


@root
def test_bad_net_name_is_refused_and_nothing_created():
    name = "badnet-" + uuid.uuid4().hex[:6]
    p = run_jrun("--name", name, "--net", "bad name!", "--", "true")
    assert p.returncode == 125
    assert p.stderr.startswith("jrun: --net: 'bad name!' is not") and p.stderr.count("\n") == 1
    assert name not in state_dirs()
    assert_no_network_left()


@root
def test_subnet_overlapping_a_host_route_is_refused_and_nothing_created():
    dummy = "tovl" + uuid.uuid4().hex[:6]  # a veth pair: no dummy driver on every kernel
    subprocess.run(["ip", "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "172.31.254.129/25", "dev", dummy], check=True)
        subprocess.run(["ip", "link", "set", dummy, "up"], check=True)
        name = "overlap-" + uuid.uuid4().hex[:6]
        p = run_jrun("--name", name, "--", "true")
        assert p.returncode == 125, p.stderr
        assert "--net bridge: the jrun subnet 172.31.254.0/24 overlaps the host's route to 172.31.254.128/25 (use" \
            in p.stderr and p.stderr.count("\n") == 1
        assert name not in state_dirs()
        assert_no_network_left()
        # A named network picks a /24 around such a route instead.
        p = run_jrun("--net", "t-" + uuid.uuid4().hex[:8], "--", "ip", "-4", "-o", "addr", "show", "eth0", check=0)
        assert not job_address(p.stdout).startswith("172.31.254.")
    finally:
        subprocess.run(["ip", "link", "del", dummy], check=True)
    assert_no_network_left()


@root
def test_concurrent_first_jobs_of_a_named_network_share_one_bridge_and_subnet():
    addrs = run_together(8, "--net", "t-" + uuid.uuid4().hex[:8])
    assert len(set(addrs)) == 8 and len({a.rsplit(".", 1)[0] for a in addrs}) == 1, addrs
    assert_no_network_left()


@root
def test_gc_leaves_running_jobs_alone():
    srv = Listener("--net", "t-" + uuid.uuid4().hex[:8])
    try:
        veths = job_veths()
        run_jrun("gc", check=0)
        assert job_veths() >= veths and len(veths) == 1
        with socket.create_connection((srv.address, 5000), timeout=5) as s:
            assert s.recv(16) == b"hello\n"
    finally:
        srv.stop()
    assert_no_network_left()


@root
def test_timeout_leaves_no_network_behind():
    p = run_jrun("--timeout", "1", "--stop-timeout", "1", "--", "sleep", "30", timeout=60)
    assert p.returncode == 124
    assert_no_network_left()
