package broker

import (
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// A will scheduled with a delay is out of the broker's reach once it is
// scheduled: mochi holds it in a private table and sends it when the delay
// runs out, through no hook but the delivery check. So the topics of an
// identity revoked while such a will may be pending are silenced: no
// delivery, and no retained message. A will delay never exceeds the
// session expiry (see authorize), which bounds how long that is.

// silence records that id was revoked now.
func (b *Broker) silence(id string) {
	// mochi times wills with the wall clock, not cfg.Now.
	now := time.Now()
	b.silMu.Lock()
	defer b.silMu.Unlock()
	for other, at := range b.silenced {
		if now.Sub(at) > b.silenceFor() {
			delete(b.silenced, other)
		}
	}
	b.silenced[id] = now
	b.silencedUntil.Store(now.Add(b.silenceFor()).UnixNano())
}

// silenceFor is how long a revoked identity's topics stay silenced: the
// longest will delay, plus mochi's one-second will loop.
func (b *Broker) silenceFor() time.Duration { return b.cfg.SessionExpiry + 2*time.Second }

// silencedTopic reports whether topic belongs to an identity revoked
// within silenceFor. It runs on every delivery: without a revocation
// since start it is one atomic load, and a clock read while the last one
// is recent.
func (b *Broker) silencedTopic(topic string) bool {
	if until := b.silencedUntil.Load(); until == 0 || time.Now().UnixNano() > until {
		return false
	}
	rest, ok := strings.CutPrefix(topic, topicRoot+"/")
	if !ok {
		return false
	}
	id, _, _ := strings.Cut(rest, "/")
	b.silMu.Lock()
	defer b.silMu.Unlock()
	at, ok := b.silenced[id]
	return ok && time.Since(at) <= b.silenceFor()
}

// OnRetainMessage drops what a revoked identity's delayed will retained:
// mochi retains it on sending, after the revocation had cleared the status.
func (h *hook) OnRetainMessage(_ *mqtt.Client, pk packets.Packet, _ int64) {
	if len(pk.Payload) > 0 && h.b.silencedTopic(pk.TopicName) {
		h.b.srv.Topics.RetainMessage(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
			TopicName:   pk.TopicName,
		})
	}
}
