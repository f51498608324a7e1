package broker

import (
	"cmp"
	"slices"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// A kept session's unacknowledged messages are resent when its client comes
// back, right after the CONNACK. mochi orders them by the low 16 bits of
// the second each was published in, with an unstable sort: messages of one
// second came out in any order, and MQTT requires those of a topic in the
// order they were published (MQTT-4.6.0-6). A backend resuming its session
// got a device's "online" and "offline" the wrong way round, or telemetry
// shuffled. mochi's sort key, Created, is read for nothing else here (the
// broker sets no maximum message expiry, which would read it), so for the
// resend it is replaced by each message's rank in publish order, and put
// back once the resend is done, before the client's first packet is read.

// resendOrder is what orderResend changed: the packet ids of the entries,
// with their real Created and the rank written in its place.
type resendOrder map[uint16][2]int64

// orderResend ranks the in-flight entries of cl, whose session was just
// resumed, in the order they were sent: by the second they were published
// in, then, within it, by packet id. mochi numbers a connection's messages
// from one counter, upwards, wrapping after 65535; a window of in-flight
// ids spanning the wrap has its low ids after its high ones.
func orderResend(cl *mqtt.Client) resendOrder {
	all := cl.State.Inflight.GetAll(false)
	if len(all) < 2 {
		return nil
	}
	lo, hi := all[0].PacketID, all[0].PacketID
	for _, pk := range all {
		lo, hi = min(lo, pk.PacketID), max(hi, pk.PacketID)
	}
	wrapped := hi-lo > 1<<15
	seq := func(id uint16) int {
		if wrapped && id < 1<<15 {
			return int(id) + 1<<16
		}
		return int(id)
	}
	slices.SortFunc(all, func(a, b packets.Packet) int {
		return cmp.Or(cmp.Compare(a.Created, b.Created), cmp.Compare(seq(a.PacketID), seq(b.PacketID)))
	})
	order := make(resendOrder, len(all))
	for rank, pk := range all {
		// Only mochi's own goroutine for this client, which runs the
		// resend, takes entries out before it; deliveries meanwhile add
		// entries under new ids only.
		cur, ok := cl.State.Inflight.Get(pk.PacketID)
		if !ok {
			continue
		}
		order[pk.PacketID] = [2]int64{cur.Created, int64(rank)}
		cur.Created = int64(rank)
		cl.State.Inflight.Set(cur)
	}
	return order
}

// restore puts back the Created of the entries orderResend ranked and the
// resend left in flight.
func (o resendOrder) restore(cl *mqtt.Client) {
	for id, v := range o {
		if cur, ok := cl.State.Inflight.Get(id); ok && cur.Created == v[1] {
			cur.Created = v[0]
			cl.State.Inflight.Set(cur)
		}
	}
}
