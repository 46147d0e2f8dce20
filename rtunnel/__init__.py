"""rtunnel: a reverse TCP tunnel over one multiplexed, resumable TLS link."""

__version__ = "0.1.0"
PROTOCOL_VERSIONS = (1,)
DEFAULT_CONTROL_PORT = 19050
