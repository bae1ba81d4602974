"""The command line's wait for a running proxy: listener addresses, and StoreResponder.ready()."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tlsproxy.acme.issuer import StoreResponder
from tlsproxy.acme.selfcheck import Answer, local_address
from tlsproxy.certs.store import CertificateStore


@pytest.mark.parametrize(
    ("description", "address"),
    [
        ("tcp:80", ("127.0.0.1", 80)),
        ("tcp:8080:interface=0.0.0.0", ("127.0.0.1", 8080)),
        ("tcp:443:interface=\\:\\:", ("::1", 443)),  # Twisted's escaped colons
        ("tcp:443:interface=10.1.2.3", ("10.1.2.3", 443)),
        ("tcp:port=443:interface=127.0.0.2", ("127.0.0.2", 443)),
        ("tcp:443:192.0.2.1", ("192.0.2.1", 443)),  # positional: port, interface
        ("tcp:443:interface=\\:\\:1", ("::1", 443)),
        ("unix:/run/tlsproxy/http.sock", "/run/tlsproxy/http.sock"),
        ("unix:address=/run/x.sock:mode=660", "/run/x.sock"),
        ("systemd:domain=INET6:index=0", None),
        ("tcp:notaport", None),
    ],
)
def test_local_address(description: str, address: object) -> None:
    assert local_address(description) == address


class Clock:
    """time.monotonic and time.sleep, with no waiting: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def responder(
    tmp_path: Path, check: Callable[[Answer], bool | None] | None, clock: Clock, said: list[str]
) -> StoreResponder:
    store = CertificateStore(tmp_path / "state")
    store.ensure()
    return StoreResponder(
        store, settle=3.0, sleep=clock.sleep, check=check, patience=5.0, interval=0.25, clock=clock, say=said.append
    )


HTTP = Answer("http-01", "example.com", "tok_1", "tok_1.thumb")
ALPN = Answer("tls-alpn-01", "www.example.com", "tok_2", "tok_2.thumb")


def publish(r: StoreResponder, *answers: Answer) -> None:
    for a in answers:
        r.publish(a.kind, a.host, a.token, a.key_authorization)


def test_ready_returns_once_every_answer_is_served(tmp_path: Path) -> None:
    clock, said, asked = Clock(), [], []
    served_after = {HTTP: 3, ALPN: 1}  # HTTP is seen on the third look, ALPN on the first

    def check(answer: Answer) -> bool:
        asked.append(answer)
        return asked.count(answer) >= served_after[answer]

    r = responder(tmp_path, check, clock, said)
    publish(r, HTTP, ALPN)
    assert r.store.challenges("http-01") == {"tok_1": "tok_1.thumb"}
    assert r.store.challenges("tls-alpn-01") == {"www.example.com": "tok_2.thumb"}
    r.ready()
    assert clock.sleeps == [0.25, 0.25]  # no fixed settle time
    assert asked == [HTTP, ALPN, HTTP, HTTP]  # a served answer is not asked again
    assert said == []


def test_ready_gives_up_after_patience_and_says_why(tmp_path: Path) -> None:
    clock, said = Clock(), []

    class NotYet:
        last_error = ""

        def __call__(self, answer: Answer) -> bool:
            self.last_error = "" if answer == ALPN else "127.0.0.1:80 does not serve it yet"
            return answer == ALPN

    r = responder(tmp_path, NotYet(), clock, said)
    publish(r, HTTP, ALPN)
    start = clock.now
    r.ready()
    assert 5.0 <= clock.now - start <= 5.25
    assert said == [
        "the running proxy does not serve the answer for example.com (http-01: 127.0.0.1:80 does not serve "
        "it yet) after 5s; asking the CA anyway"
    ]


def test_ready_waits_settle_when_nothing_can_be_asked(tmp_path: Path) -> None:
    clock, said = Clock(), []

    class Nobody:
        last_error = "127.0.0.1:80: Connection refused"

        def __call__(self, answer: Answer) -> None:
            return None

    r = responder(tmp_path, Nobody(), clock, said)
    publish(r, HTTP)
    r.ready()
    assert clock.sleeps == [3.0]
    assert said == [
        "cannot ask the running proxy about example.com (http-01: 127.0.0.1:80: Connection refused); "
        "waiting 3s for it instead"
    ]


def test_ready_asks_what_it_can_and_waits_settle_for_the_rest(tmp_path: Path) -> None:
    """HTTP cannot be asked (no http listener); ALPN is seen on the second look; settle counts from the start."""
    clock, said, asked = Clock(), [], []

    class Half:
        last_error = ""

        def __call__(self, answer: Answer) -> bool | None:
            asked.append(answer)
            if answer == HTTP:
                self.last_error = "no http listener address to ask"
                return None
            return asked.count(ALPN) >= 2

    r = responder(tmp_path, Half(), clock, said)
    publish(r, HTTP, ALPN)
    r.ready()
    assert asked == [HTTP, ALPN, ALPN]  # the one that cannot be asked is not asked again
    assert clock.sleeps == [0.25, 2.75]  # one poll interval, then what is left of the 3 s
    assert said == [
        "cannot ask the running proxy about example.com (http-01: no http listener address to ask); "
        "waiting 3s for it instead"
    ]


def test_nobody_there_later_counts_as_not_served(tmp_path: Path) -> None:
    """Refused after a first answer (the proxy restarting): keep asking, not a fall back to settle."""
    clock, said = Clock(), []
    results = iter([False, None, None, True])

    def check(answer: Answer) -> bool | None:
        return next(results)

    r = responder(tmp_path, check, clock, said)
    publish(r, HTTP)
    r.ready()
    assert clock.sleeps == [0.25, 0.25, 0.25] and said == []


def test_slow_probes_stop_at_patience(tmp_path: Path) -> None:
    """Each look takes 2 s (a wedged proxy): the wait ends near ``patience``, not after every name is asked."""
    clock, said = Clock(), []
    answers = [Answer("http-01", f"n{i}.example", f"tok_{i}", f"tok_{i}.thumb") for i in range(10)]

    def check(answer: Answer) -> bool:
        clock.now += 2.0
        return False

    r = responder(tmp_path, check, clock, said)
    publish(r, *answers)
    start = clock.now
    r.ready()
    # three looks (6 s) spend the patience (5 s); the seven names not yet asked are left to the CA
    assert clock.now - start == 6.0
    assert len(said) == 1 and "n0.example (http-01" in said[0] and "n9.example (http-01)" in said[0], said


def test_without_a_check_ready_waits_settle(tmp_path: Path) -> None:
    clock, said = Clock(), []
    r = responder(tmp_path, None, clock, said)
    publish(r, HTTP)
    r.ready()
    assert clock.sleeps == [3.0] and said == []


def test_withdrawn_answers_are_neither_stored_nor_asked(tmp_path: Path) -> None:
    clock, said, asked = Clock(), [], []

    def check(answer: Answer) -> bool:
        asked.append(answer)
        return True

    r = responder(tmp_path, check, clock, said)
    publish(r, HTTP, ALPN)
    r.withdraw(HTTP.kind, HTTP.host, HTTP.token)
    assert r.store.challenges("http-01") == {}
    r.ready()
    assert asked == [ALPN] and clock.sleeps == []
