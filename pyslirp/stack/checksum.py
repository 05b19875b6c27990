"""The Internet checksum (RFC 1071), with partial sums (RFC 1071 section 2)
and incremental update (RFC 1624).

A partial sum here is ``int.from_bytes(data, "big") % 0xFFFF``: since
2**16 == 1 (mod 0xFFFF), that equals the one's-complement sum of the 16-bit
words, reduced into 0..0xFFFE. Partial sums of even-length pieces add.
"""

from __future__ import annotations

_FOLD_MASKS: dict[int, int] = {}


def partial_sum(data) -> int:
    """One's-complement sum of ``data`` (bytes-like), reduced modulo 0xFFFF.

    Read little-endian, the bytes sum to the byte-swapped sum (RFC 1071
    2(B)), and swapping is multiplying by 256 modulo 0xFFFF; little-endian
    conversion is the faster one in CPython, and it also pads an odd last
    byte the right way. Large values are first folded at multiples of 240
    bits (2**240 = 1 mod 0xFFFF, and 240 is a whole number of CPython's int
    digits), which is cheaper than one long division: a 64 KiB payload sums
    in about half the time of ``int.from_bytes(data, "big") % 0xFFFF``.
    """
    value = int.from_bytes(data, "little")
    bits = value.bit_length()
    while bits > 4800:
        shift = (bits // 480) * 240
        mask = _FOLD_MASKS.get(shift)
        if mask is None:
            mask = _FOLD_MASKS[shift] = (1 << shift) - 1
        value = (value >> shift) + (value & mask)
        bits = value.bit_length()
    return (value % 0xFFFF) * 256 % 0xFFFF


def finish(total: int) -> int:
    """Turn a sum of partial sums into the checksum field value."""
    total %= 0xFFFF
    # total == 0 means the true one's-complement sum is 0xFFFF (for any
    # non-empty input that is not all zeros), whose complement is 0.
    return (~total) & 0xFFFF if total else 0


def checksum(data) -> int:
    """Checksum field value for ``data`` (with its checksum field zeroed)."""
    total = partial_sum(data)
    if total == 0 and not any(data):
        return 0xFFFF
    return finish(total)


def is_valid(data) -> bool:
    """True if ``data`` (checksum field included) sums to all ones.

    A partial sum of 0 is either all ones (valid) or, for all-zero data, a
    true zero: an all-zero message never carries a valid checksum.
    """
    return partial_sum(data) == 0 and any(data)


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Partial sum of the IPv4 (4-byte addresses) or IPv6 (16-byte) pseudo-header."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length) % 0xFFFF


def update(old_checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')."""
    total = ((~old_checksum) & 0xFFFF) + ((~old_word) & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF
