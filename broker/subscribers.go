package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/store"
)

// Delivering a publish costs mochi a walk of its topic index and four maps
// per message, as much as the rest of the publish, and usually finds no
// one: a device may subscribe only to its own commands and config, which
// no device publishes, so only the subscriptions of other clients
// (services, or mochi's inline client) can receive what devices publish.
// The broker counts those subscriptions, and while there are none, device
// publishes skip delivery (see unwatched).
//
// The count never falls short of the subscriptions in mochi's index: a
// subscription is counted in OnSubscribed, after mochi has indexed it but
// before its SUBACK is sent, so that any publish after the SUBACK sees it;
// and it is uncounted in OnUnsubscribed, after mochi has removed it (also
// when mochi drops a session's subscriptions).

// watcherKey identifies one subscription.
func watcherKey(clientID, filter string) string { return clientID + "\x00" + filter }

// unwatched reports whether what the holder of g publishes has no possible
// receiver.
func (b *Broker) unwatched(g *grant) bool {
	return g != nil && g.role == store.RoleDevice && b.nwatchers.Load() == 0
}

// isDevice reports whether cl is an authorized device connection.
func isDevice(cl *mqtt.Client) bool {
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return false
	}
	g := c.grant.Load()
	return g != nil && g.role == store.RoleDevice
}

// OnSubscribed counts the granted subscriptions of clients other than
// devices, and keeps the retained deliveries of those granted.
func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if c, ok := cl.Net.Conn.(*conn); ok {
		c.overLimit = overLimit(cl, c.overLimit, reasonCodes)
	}
	if isDevice(cl) {
		return
	}
	if c, ok := takesRetained(cl); ok {
		c.grantRetained(reasonCodes)
	}
	b := h.b
	b.smu.Lock()
	defer b.smu.Unlock()
	for i, f := range pk.Filters {
		if i >= len(reasonCodes) || reasonCodes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		k := watcherKey(cl.ID, f.Filter)
		if _, ok := b.watchers[k]; !ok {
			b.watchers[k] = struct{}{}
			b.nwatchers.Add(1)
		}
	}
}

// OnUnsubscribed uncounts removed subscriptions.
func (h *hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	b.smu.Lock()
	defer b.smu.Unlock()
	for _, f := range pk.Filters {
		k := watcherKey(cl.ID, f.Filter)
		if _, ok := b.watchers[k]; ok {
			delete(b.watchers, k)
			b.nwatchers.Add(-1)
		}
	}
}

// OnClientExpired drops an expired session's subscriptions. mochi forgets
// the client but leaves them in its topic index: memory that grew with
// every expired session, and subscriptions delivered to the next client
// taking the id.
func (h *hook) OnClientExpired(cl *mqtt.Client) {
	h.b.srv.UnsubscribeClient(cl)
}

// overLimit gives the filters OnSubscribe refused for the subscription
// limit, at indexes idx, the MQTT 5 reason "quota exceeded" instead of the
// "topic filter invalid" mochi gives the empty filter they were turned
// into: a backend subscribing per device would look for a fault in a valid
// filter. mochi writes the SUBACK with reasonCodes after this hook. MQTT
// 3.1.1 has only 0x80. It returns idx emptied, for reuse.
func overLimit(cl *mqtt.Client, idx []int, reasonCodes []byte) []int {
	if cl.Properties.ProtocolVersion == 5 {
		for _, i := range idx {
			if i < len(reasonCodes) && reasonCodes[i] == packets.ErrTopicFilterInvalid.Code {
				reasonCodes[i] = packets.ErrQuotaExceeded.Code
			}
		}
	}
	return idx[:0]
}
