"""twisted.web's own ReverseProxyResource behind TLS: the baseline bench/run.py compares against.

    python bench/twisted_reverse_proxy.py PORT BACKEND_PORT CERT_PEM KEY_PEM

Listens with TLS on 127.0.0.1:PORT (certificate chain CERT_PEM, key KEY_PEM) and
proxies every request to http://127.0.0.1:BACKEND_PORT. Prints "reverse proxy: ready"
once listening. Nothing here is tuned: it is the stock resource on the stock reactor
(epoll), as a Twisted user would write it.
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.python import log
from twisted.web import server
from twisted.web.proxy import ReverseProxyResource


def main(argv: list[str]) -> None:
    port, backend_port, cert, key = int(argv[1]), int(argv[2]), argv[3], argv[4]
    site = server.Site(ReverseProxyResource("127.0.0.1", backend_port, b""))
    site.log = lambda request: None  # no access log, like the other two
    desc = f"ssl:{port}:interface=127.0.0.1:backlog=1024:privateKey={key}:certKey={cert}"
    ep = endpoints.serverFromString(reactor, desc)

    def ready(_port: object) -> None:
        print("reverse proxy: ready", flush=True)

    def failed(f: object) -> None:
        log.err(f)
        reactor.stop()

    ep.listen(site).addCallbacks(ready, failed)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
