"""The tlsproxy command in process: exit statuses (0 ok, 1 failed, 2 bad usage or config) and streams."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tlsproxy import cli


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TLSPROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TLSPROXY_CAROOT", str(tmp_path / "ca"))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def acme_config(tmp_path: Path) -> str:
    config = tmp_path / "acme.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n[acme]\nagree_tos = true\n'
        '[[site]]\nhosts = ["example.com"]\nupstream = "http://127.0.0.1:8000"\n'
    )
    return str(config)


def test_bad_config_is_2_on_stderr_for_every_command(tmp_path: Path) -> None:
    """check, certs, renew, revoke and account all exit 2 on a bad config, the reason on stderr only."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[site]]\nhosts = ["a.test"]\nupstream = "http://127.0.0.1:8000"\ntls = "local"\nwat = 1\n')
    for argv in (["check"], ["certs"], ["renew", "a.test"], ["revoke", "a.test"], ["account", "rollover"]):
        status, out, err = run(*argv, "-c", str(bad))
        assert (status, out) == (2, ""), argv
        assert "site[0].wat: unknown key" in err, argv


def test_renew_unknown_site_is_2_on_stderr(tmp_path: Path) -> None:
    """renew with a name no site has: exit 2, the error on stderr, nothing on stdout."""
    status, out, err = run("renew", "nope.example", "-c", acme_config(tmp_path))
    assert (status, out) == (2, "")
    assert err.startswith("error: no site has the name 'nope.example' (names: example.com)")


def test_account_rollover_without_account_is_1_on_stderr(tmp_path: Path) -> None:
    """An operation that cannot be done (no ACME account yet) exits 1 with the error on stderr."""
    status, out, err = run("account", "rollover", "-c", acme_config(tmp_path))
    assert (status, out) == (1, "")
    assert err.startswith("error: no ACME account in")


def test_certs_in_dev_mode_lists_the_local_site() -> None:
    """`tlsproxy certs` with no configuration shows the dev proxy's local site and where its leaves come from."""
    status, out, err = run("certs")
    assert (status, err) == (0, "")
    assert out.startswith("localhost\n")
    assert "source:       local" in out and "issuer:       none yet" in out


def test_usage_error_is_2() -> None:
    """A command line argparse refuses exits 2, like a bad configuration."""
    with pytest.raises(SystemExit) as info:
        run("renew")
    assert info.value.code == 2


def test_check_refuses_bad_worker_counts_and_shows_good_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tlsproxy check` exits 2 for workers = 0, -1 or a word other than auto, and shows the count it runs."""
    config = acme_config(tmp_path)
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("TLSPROXY_SERVER_WORKERS", bad)
        status, out, err = run("check", "-c", config)
        assert (status, out) == (2, ""), bad
        assert "server.workers" in err and '"auto"' in err, err
    monkeypatch.setenv("TLSPROXY_SERVER_WORKERS", "3")
    status, out, _ = run("check", "-c", config)
    assert status == 0
    assert "workers = 3 (a supervisor and its workers)" in out


def _store_config(tmp_path: Path, url: str) -> str:
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n[store]\nurl = "{url}"\n'
        '[[site]]\nhosts = ["localhost"]\ntls = "local"\nupstream = "http://127.0.0.1:8000"\n'
    )
    return str(config)


def test_check_refuses_a_store_password_redis_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check asks the fleet's Redis: refused credentials are exit 2 naming the file and store.url."""
    import redis

    class Refusing:
        def ping(self) -> None:
            raise redis.exceptions.AuthenticationError("invalid username-password pair")

    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(lambda *a, **kw: Refusing()))
    status, out, err = run("check", "--config", _store_config(tmp_path, "redis://:wrong@127.0.0.1:6379/0"))
    assert status == 2 and "configuration OK" not in out
    assert f"{tmp_path / 'fleet.toml'}: store.url: redis://:***@127.0.0.1:6379/0 refuses our credentials" in err
    assert "wrong" not in err


def test_check_warns_about_an_unreachable_store(tmp_path: Path) -> None:
    """A Redis nobody listens for is a warning from check (exit 0): a fleet runs without it."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, out, err = run("check", "--config", _store_config(tmp_path, f"redis://127.0.0.1:{port}/0"))
    assert status == 0 and "configuration OK" in out
    assert f"warning: {tmp_path / 'fleet.toml'}: store.url: redis://127.0.0.1:{port}/0 is unreachable from here" in err


def test_check_warns_about_an_app_that_is_not_running(tmp_path: Path) -> None:
    """check (exit 0) says which upstream refuses connections, before a request gets a 502."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "app.toml"
    config.write_text(f'[[site]]\nhosts = ["localhost"]\ntls = "local"\nupstream = "http://127.0.0.1:{port}"\n')
    status, out, err = run("check", "--config", str(config))
    assert status == 0 and "configuration OK" in out
    assert f"warning: {config}: site[0].upstream: http://127.0.0.1:{port} takes no connection now (" in err


def test_check_warns_about_an_htpasswd_file_without_users(tmp_path: Path) -> None:
    """An empty htpasswd file passes check (exit 0) with a warning that every guarded request gets 401."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("# nobody yet\n")
    config = tmp_path / "auth.toml"
    config.write_text(
        '[[site]]\nhosts = ["localhost"]\ntls = "local"\nupstream = "unix:/nonexistent/app.sock"\n'
        f'basic_auth = {{ realm = "staff", htpasswd = "{htpasswd}" }}\n'
    )
    status, out, err = run("check", "--config", str(config))
    assert status == 0 and "configuration OK" in out
    assert f"warning: {config}: basic_auth: {htpasswd} has no users, so every request it guards gets 401" in err
    assert f"tlsproxy passwd {htpasswd} USER" in err


def test_check_names_the_config_key_of_a_non_bcrypt_htpasswd_file(tmp_path: Path) -> None:
    """An MD5 htpasswd line is refused naming the config file and the keys that name the htpasswd file."""
    md5, sha = tmp_path / "md5.htp", tmp_path / "sha.htp"
    md5.write_text("bob:$apr1$Q1dXLZ2b$hVh7s3jmGfuR4Vtf4l1Ml/\n")
    sha.write_text("# staff\nann:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    config = tmp_path / "auth.toml"
    config.write_text(
        '[[site]]\nhosts = ["localhost"]\ntls = "local"\nupstream = "unix:/nonexistent/app.sock"\n'
        f'basic_auth = {{ realm = "staff", htpasswd = "{md5}" }}\n'
        '[[site.access]]\nprefix = "/open/"\nallow = ["127.0.0.1"]\n'
        f'[[site.access]]\nprefix = "/admin/"\nbasic_auth = {{ realm = "admin", htpasswd = "{sha}" }}\n'
    )
    status, out, err = run("check", "--config", str(config))
    assert status == 2 and out == ""
    assert (
        f"tlsproxy: {config}: site[0].basic_auth.htpasswd: {md5}: line 1: bob: only bcrypt hashes are accepted"
    ) in err
    assert (
        f'tlsproxy: {config}: site[0].access (prefix "/admin/").basic_auth.htpasswd: {sha}: line 2: ann: only bcrypt'
    ) in err
    assert "Traceback" not in err
