"""`tlsproxy passwd`: bcrypt lines written atomically, with a safe mode, readable by basic_auth and htpasswd."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import bcrypt
import pytest

from tlsproxy import cli
from tlsproxy.passwd import PasswdError, set_password, updated
from tlsproxy.proxy.access import load_htpasswd


def test_new_file_is_0600_and_verifies(tmp_path: Path) -> None:
    """A new file is created 0600 with one bcrypt line our access control reads."""
    path = tmp_path / "htpasswd"
    assert set_password(str(path), "ann", b"s3cret", cost=4) is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bcrypt.checkpw(b"s3cret", load_htpasswd(str(path))["ann"])


def test_change_keeps_other_lines_and_mode(tmp_path: Path) -> None:
    """Changing one user replaces its line only; an existing 0640 file stays 0640."""
    path = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-cbB", "-C", "4", str(path), "bob", "b0b"], check=True, capture_output=True)
    path.chmod(0o640)
    set_password(str(path), "ann", b"one", cost=4)
    assert set_password(str(path), "ann", b"two", cost=4) is True
    users = load_htpasswd(str(path))
    assert set(users) == {"ann", "bob"}
    assert bcrypt.checkpw(b"two", users["ann"]) and bcrypt.checkpw(b"b0b", users["bob"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["htpasswd"]  # no temporary file left behind
    check = subprocess.run(["htpasswd", "-vb", str(path), "ann", "two"], capture_output=True)
    assert check.returncode == 0  # Apache's tool reads our line too


def test_updated_is_pure() -> None:
    """The line of that user is replaced in place; comments that mention it are kept."""
    text, found = updated("# ann: admin\nann:x\nbob:y\nann:z\n", "ann", "ann:new")
    assert (text, found) == ("# ann: admin\nann:new\nbob:y\n", True)


@pytest.mark.parametrize(("user", "password"), [("a:b", b"x"), ("", b"x"), ("ann", b""), ("ann", b"x" * 73)])
def test_bad_user_or_password_refused(tmp_path: Path, user: str, password: bytes) -> None:
    """A ':' in the name, an empty name or password, or one past bcrypt's 72 bytes, is refused; no file made."""
    with pytest.raises(PasswdError):
        set_password(str(tmp_path / "h"), user, password, cost=4)
    assert not (tmp_path / "h").exists()


def test_cli_reads_stdin(tmp_path: Path) -> None:
    """`tlsproxy passwd FILE USER --stdin` takes the first line of stdin and says what to do next."""
    path = tmp_path / "htpasswd"
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["passwd", str(path), "ann", "--stdin", "--cost", "4", "--group-readable"])
    assert cli.cmd_passwd(args, out, err, stdin=io.StringIO("pa ss\nignored\n")) == 0
    assert bcrypt.checkpw(b"pa ss", load_htpasswd(str(path))["ann"])
    assert "SIGHUP" in out.getvalue()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_cli_prompt_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the prompt the password is asked twice; two different answers change nothing."""
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["passwd", str(tmp_path / "h"), "ann"])
    assert cli.cmd_passwd(args, out, err) == 2
    assert "differ" in err.getvalue() and not (tmp_path / "h").exists()


def test_check_describes_the_gate(tmp_path: Path) -> None:
    """`tlsproxy check` lists each access rule, error page and the maintenance file; a bad htpasswd fails it."""
    htpasswd = tmp_path / "htpasswd"
    set_password(str(htpasswd), "ann", b"pw", cost=4)
    page = tmp_path / "502.html"
    page.write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(
        '[[site]]\nhosts = ["a.test"]\nupstream = "http://127.0.0.1:1"\ntls = "local"\n'
        f'allow = ["192.0.2.0/24"]\nmaintenance_file = "{tmp_path}/m.on"\n'
        f'error_pages = {{ 502 = "{page}" }}\n'
        f'[[site.access]]\nprefix = "/admin/"\nbasic_auth = {{ realm = "adm", htpasswd = "{htpasswd}" }}\n'
    )
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check", "--config", str(config)], out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert "access /: allow 192.0.2.0/24" in text
    assert f"access /admin/: allow 192.0.2.0/24; basic auth 'adm' ({htpasswd})" in text
    assert f"error page 502 = {page}" in text and "maintenance while" in text
    htpasswd.write_text("ann:plain\n")
    assert cli.main(["check", "--config", str(config)], io.StringIO(), err) == 2
    assert "bcrypt" in err.getvalue()
