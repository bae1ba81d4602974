from twisted.application.service import ServiceMaker

tlsproxy = ServiceMaker("tlsproxy", "tlsproxy.tap", "TLS-terminating reverse proxy with ACME certificates", "tlsproxy")
