"""Pure logic: argv parsing, sizes, durations, names, environment.  Fast, no root."""
import pytest

import jrun


def spec(*argv):
    return jrun.parse_run(list(argv))


@pytest.mark.parametrize("text,value", [
    ("64M", 64 << 20), ("1G", 1 << 30), ("512K", 512 << 10), ("100", 100 << 20),
    ("1.5G", int(1.5 * (1 << 30))), ("64m", 64 << 20), ("64MB", 64 << 20), ("4096B", 4096),
])
def test_parse_size(text, value):
    assert jrun.parse_size("--memory", text) == value


@pytest.mark.parametrize("text", ["12Q", "", "M", "-5M", "0", "abc", "nan", "inf", "1e400G"])
def test_parse_size_refuses(text):
    with pytest.raises(jrun.UsageError) as e:
        jrun.parse_size("--memory", text)
    assert "--memory" in str(e.value)


@pytest.mark.parametrize("text,value", [("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600),
                                        ("500ms", 0.5), ("1.5s", 1.5)])
def test_parse_duration(text, value):
    assert jrun.parse_duration("--timeout", text) == value


@pytest.mark.parametrize("text", ["", "s", "-1", "0", "5x", "1hh", "inf"])
def test_parse_duration_refuses(text):
    with pytest.raises(jrun.UsageError, match="--timeout"):
        jrun.parse_duration("--timeout", text)


def test_command_after_first_word_belongs_to_command():
    s = spec("--net", "none", "ls", "--net", "-la")
    assert s.command == ("ls", "--net", "-la")
    assert s.net == "none"


def test_double_dash_lets_command_start_with_dash():
    assert spec("--", "--version").command == ("--version",)


def test_equals_form_and_short_joined():
    s = spec("--name=web", "-eFOO=bar", "-w", "/srv", "true")
    assert (s.id, dict(s.env)["FOO"], s.workdir) == ("web", "bar", "/srv")


def test_defaults():
    s = spec("true")
    assert len(s.id) == 12 and set(s.id) <= set("0123456789abcdef") and spec("true").id != s.id
    assert s.hostname == s.id and s.net == "bridge" and s.workdir == "/work"
    assert s.timeout is None and s.stop_timeout == 10 and not s.init
    assert s.rootfs == "minimal" and s.seccomp == "default"


def test_spec_is_frozen():
    s = spec("true")
    with pytest.raises(AttributeError):
        s.id = "x"


def test_two_specs_get_distinct_ids():
    assert spec("true").id != spec("true").id


@pytest.mark.parametrize("argv,fragment", [
    (["--bogus", "true"], "unknown option '--bogus'"),
    (["--name"], "--name needs a value"),
    (["--name", "bad name!", "true"], "--name"),
    (["--name", "-x", "true"], "--name"),
    (["--hostname", "a_b", "true"], "--hostname"),
    (["--timeout", "soon", "true"], "--timeout"),
    (["--init=yes", "true"], "--init takes no value"),
    (["--log-level", "loud", "true"], "--log-level"),
    (["--seccomp", "off", "true"], "--seccomp"),
    (["-w", "relative", "true"], "--workdir"),
    (["-e", "1BAD=x", "true"], "--env"),
    ([], "no COMMAND"),
    (["--net", "none"], "no COMMAND"),
])
def test_bad_input_names_the_option(argv, fragment):
    with pytest.raises(jrun.UsageError) as e:
        jrun.parse_run(argv)
    assert fragment in str(e.value)
    assert e.value.exit_code == 125


def test_env_pass_through_and_file(tmp_path, monkeypatch):
    f = tmp_path / "env"
    f.write_text("# comment\nA=1\nexport B=two words\n\nC=\n")
    monkeypatch.setenv("FROM_CALLER", "yes")
    monkeypatch.delenv("NOT_SET", raising=False)
    s = spec("--env-file", str(f), "-e", "A=override", "-e", "FROM_CALLER", "-e", "NOT_SET", "true")
    assert dict(s.env) == {"A": "override", "B": "two words", "C": "", "FROM_CALLER": "yes"}


def test_env_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "env"
    f.write_text("A=1\nnot a pair\n")
    with pytest.raises(jrun.UsageError, match=r"--env-file: .*env:2"):
        spec("--env-file", str(f), "true")
    with pytest.raises(jrun.UsageError, match="--env-file: cannot read"):
        spec("--env-file", str(tmp_path / "missing"), "true")


def test_help_lists_every_option():
    text = jrun.run_help()
    for o in jrun.RUN_OPTIONS:
        assert o.long in text


def test_help_and_version_exit_zero(capsys):
    assert jrun.main(["--help"]) == 0
    assert "usage: jrun" in capsys.readouterr().out
    assert jrun.main(["--version"]) == 0
    assert jrun.__version__ in capsys.readouterr().out


def test_dumps_json_round_trips():
    import json

    rec = {"a": "x\"y\\z\n\x01é", "b": [1, 2.5, None, True], "c": {"d": False}}
    assert json.loads(jrun.dumps_json(rec)) == rec
