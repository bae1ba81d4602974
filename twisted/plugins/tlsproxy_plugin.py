from twisted.application.service import ServiceMaker

tlsproxy = ServiceMaker(
    "tlsproxy", "tlsproxy.workers", "TLS-terminating reverse proxy with ACME certificates", "tlsproxy"
)
