"""Sans-IO protocol layer: bytes and ``now`` in, bytes and events out.

Nothing here may touch sockets, clocks, threads or randomness; the NAT side
(`pyslirp.nat`) injects all of those.
"""
