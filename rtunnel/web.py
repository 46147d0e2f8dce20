"""twisted.web pieces shared by the metrics endpoint and the admin page."""

from __future__ import annotations

from twisted.web.http import Request
from twisted.web.server import Site


class QuietSite(Site):
    """A Site without an access-log line per request (Prometheus scrapes and
    the status page polls every second) nor start/stop lines."""

    noisy = False

    def log(self, request: Request) -> None:
        pass
