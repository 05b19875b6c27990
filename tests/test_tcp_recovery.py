"""Loss recovery, frame by frame: what was found tracing stalls over a
lossy link.

1. Duplicate ACKs for segments that arrive out of order: one per wire
segment (RFC 5681 4.2), so that the guest's fast retransmit (RFC 5681 3.2,
three duplicates) fires instead of its retransmission timer.

The stall these tests pin down was found in a pcap of 20 concurrent 5 MiB
uploads over a link losing 5% of frames: the guest (Linux, TAP offloads on)
sends 64 KiB GSO frames; when one is lost, the next frame is the only one
behind the hole, and one duplicate ACK for it left the guest waiting for its
RTO, backed off to 3, 10, 30 seconds as retransmissions were lost too. A
real link would have carried that frame as dozens of segments, each
answered by a duplicate ACK.

2. Our pure ACKs carry SND.MAX, not an SND.NXT that a timeout pulled back
(found with two stacks through a lossy link, data both ways: each side's
ACK lay before the other's RCV.NXT, was dropped unread, and both
retransmitted until they gave up).

3. NewReno (RFC 6582): duplicate ACKs at RECOVER itself, when the segment
right after the last recovery is lost too, start fast retransmit (the ACK
heuristic of 4.2) rather than waiting for the timer.
"""

from tests.test_tcp_stack import GISN, ISS, MASK, Script

MSS = 1448  # the guest's segments: MSS 1460 less the timestamp option


def test_a_gso_frame_out_of_order_gets_a_duplicate_ack_per_segment_up_to_the_burst():
    s = Script(mtu=65520)  # the guest's frame may carry many segments (GSO)
    s.handshake()
    s.feed(1.1, "A", GISN + 1, ISS + 1, payload=bytes(MSS), ts=(102, s.ts(1.0)))
    s.sent(1.1)  # (its delayed ACK, if any)
    s.tick(1.2)
    s.sent(1.2)
    # The next 45 segments are lost; the frame after them holds five.
    s.feed(1.3, "PA", GISN + 1 + 46 * MSS, ISS + 1, payload=bytes(5 * MSS), ts=(103, s.ts(1.2)))
    acks = s.sent(1.3)
    assert len(acks) == s.tcp.config.dupack_burst == 4
    assert {(a.seq, a.ack, len(a.payload)) for a in acks} == {(ISS + 1, GISN + 1 + MSS, 0)}
    # One segment out of order: one duplicate, as before.
    s.feed(1.4, "A", GISN + 1 + 60 * MSS, ISS + 1, payload=bytes(MSS), ts=(104, s.ts(1.3)))
    assert len(s.sent(1.4)) == 1
    # The hole filled: one ACK for everything, no duplicates left owed.
    s.feed(1.5, "A", GISN + 1 + MSS, ISS + 1, payload=bytes(45 * MSS), ts=(105, s.ts(1.4)))
    (ack,) = s.sent(1.5)
    assert ack.ack == (GISN + 1 + 51 * MSS) & 0xFFFFFFFF


def test_out_of_order_segments_read_in_one_batch_each_get_their_duplicate_ack():
    s = Script()
    s.handshake()
    # Segment 1 is lost; 2, 3 and 4 are read before the stack flushes.
    for i in (1, 2, 3):
        s.feed(1.1, "A", GISN + 1 + i * MSS, ISS + 1, payload=bytes(MSS), ts=(102, s.ts(1.0)))
    acks = s.sent(1.1)
    assert [(a.ack, len(a.payload)) for a in acks] == [(GISN + 1, 0)] * 3


def test_data_to_send_carries_the_ack_and_owes_no_duplicates_later():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "A", GISN + 1 + MSS, ISS + 1, payload=bytes(MSS), ts=(102, s.ts(1.0)))
    s.tcp.send(conn, b"answer", 1.1)
    (segment,) = s.sent(1.1)
    assert bytes(segment.payload) == b"answer" and segment.ack == GISN + 1
    s.feed(1.2, "A", GISN + 1, ISS + 7, payload=bytes(MSS), ts=(103, s.ts(1.1)))
    (ack,) = s.sent(1.2)
    assert ack.ack == GISN + 1 + 2 * MSS


def test_ack_after_a_timeout_carries_the_highest_sequence_number_sent():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, bytes(3 * MSS), 1.1)
    assert len(s.sent(1.1)) == 3
    s.tick(2.2)  # the timer: go back to SND.UNA, one segment resent
    (resent,) = s.sent(2.2)
    assert resent.seq == ISS + 1 and conn.snd_nxt == (ISS + 1 + MSS) & MASK
    # The guest's data (it acknowledges nothing of ours: it lost it all).
    s.feed(2.3, "PA", GISN + 1, ISS + 1, payload=bytes(MSS), ts=(102, s.ts(1.1)))
    s.feed(2.3, "PA", GISN + 1 + MSS, ISS + 1, payload=bytes(MSS), ts=(102, s.ts(1.1)))
    (ack,) = s.sent(2.3)
    assert ack.ack == GISN + 1 + 2 * MSS and len(ack.payload) == 0
    assert ack.seq == ISS + 1 + 3 * MSS  # SND.MAX: inside the guest's window


def test_duplicates_at_recover_after_a_full_recovery_start_fast_retransmit():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, bytes(40 * MSS), 1.1)
    first = s.sent(1.1)
    n = len(first)
    assert n >= 8
    una = ISS + 1
    ts = [110]

    def ack(now, value):
        ts[0] += 1
        s.feed(now, "A", GISN + 1, value, ts=(ts[0], s.ts(1.1)))

    # The first segment is lost: a duplicate for each of the others.
    for _ in range(n - 1):
        ack(1.2, una)
    out = s.sent(1.2)
    assert out[0].seq == una  # fast retransmit
    assert conn.in_recovery
    recover = conn.recover
    assert recover == (una + n * MSS) & MASK
    sent_in_recovery = [seg.seq for seg in out[1:]]
    assert sent_in_recovery and sent_in_recovery[0] == recover  # new data, window inflated
    # The full ACK of what was out when recovery began: recovery ends.
    ack(1.3, recover)
    s.sent(1.3)
    assert not conn.in_recovery and conn.snd_una == recover
    # The first segment after RECOVER was lost; three duplicates at RECOVER.
    in_flight = (conn.snd_max - recover) & MASK
    assert in_flight >= 4 * MSS
    for _ in range(3):
        ack(1.4, recover)
    out = s.sent(1.4)
    assert out and out[0].seq == recover, "fast retransmit, not the timer"
    assert conn.in_recovery
