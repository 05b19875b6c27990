"""The host side: sockets, the flow table, DHCP and DNS services, the loop.

This package is the one place that reads the clock (``time.monotonic``) and
owns file descriptors; it drives the sans-IO ``pyslirp.stack``.
"""
