"""Capture Open vSwitch upcalls from the dpif_recv:recv_upcall USDT probe into pcapng."""

__version__ = "0.1.0"
