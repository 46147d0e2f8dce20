from twisted.application.service import ServiceMaker

rtunnel_server = ServiceMaker(
    "rtunnel server", "rtunnel.tap.server", "Reverse TCP tunnel server", "rtunnel-server"
)
rtunnel_client = ServiceMaker(
    "rtunnel client", "rtunnel.tap.client", "Reverse TCP tunnel client", "rtunnel-client"
)
