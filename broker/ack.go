package broker

import (
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// maxPendingAcks bounds the QoS 1 publishes of one connection waiting for
// their PUBACK; beyond it the connection's reads wait (backpressure).
const maxPendingAcks = 256

// QoS 1 telemetry is acknowledged after its commit, but not by the
// connection's goroutine: mochi handles a connection's packets one at a
// time, so waiting there would allow one message per device per commit,
// and a commit costs about one page write per device in it. Instead
// OnPublish queues the publish on its connection and tells mochi to drop
// it; when the commit returns, an acker goroutine, running only while
// acknowledgements are due, sends the PUBACKs in publish order and hands
// the messages to mochi for delivery. A QoS 1 publish that needs no commit
// still goes through the queue when telemetry is queued ahead of it, so
// that PUBACKs keep the order of the PUBLISHes (MQTT-4.6.0-2).

// pendingPub is a QoS 1 publish waiting for its PUBACK.
type pendingPub struct {
	id   uint16
	code packets.Code // PUBACK reason, once done
	done bool         // guarded by ackQueue.mu
	// pk is the publish to deliver once acknowledged, or nil when nothing
	// could receive it (see unwatched): a packet is 800 bytes, and copying
	// every one to the heap was a tenth of the work of a QoS 1 message.
	pk *packets.Packet
}

// ackQueue is a connection's QoS 1 publishes in arrival order.
type ackQueue struct {
	mu       sync.Mutex
	queue    []*pendingPub
	draining bool          // an acker goroutine is running
	slots    chan struct{} // one per queued publish; made by the first enqueue
}

// acksIdle reports whether nothing waits for a PUBACK. Only the
// connection's own goroutine enqueues, so for that goroutine the answer
// holds until it enqueues.
func (c *conn) acksIdle() bool {
	c.acks.mu.Lock()
	defer c.acks.mu.Unlock()
	return len(c.acks.queue) == 0
}

// enqueueAck appends p, waiting for a slot; false if the connection closed
// meanwhile. Only the connection's goroutine calls it.
func (c *conn) enqueueAck(p *pendingPub) bool {
	if c.acks.slots == nil {
		c.acks.slots = make(chan struct{}, maxPendingAcks)
	}
	select {
	case c.acks.slots <- struct{}{}:
	case <-c.closed:
		return false
	}
	c.acks.mu.Lock()
	c.acks.queue = append(c.acks.queue, p)
	start := c.startAckerLocked()
	c.acks.mu.Unlock()
	if start {
		go c.runAcker()
	}
	return true
}

// completeAck records the outcome of p's commit.
func (c *conn) completeAck(p *pendingPub, code packets.Code) {
	c.acks.mu.Lock()
	p.code, p.done = code, true
	start := c.startAckerLocked()
	c.acks.mu.Unlock()
	if start {
		go c.runAcker()
	}
}

func (c *conn) startAckerLocked() bool {
	q := &c.acks
	if q.draining || len(q.queue) == 0 || !q.queue[0].done {
		return false
	}
	q.draining = true
	c.b.ackers.Add(1)
	return true
}

// runAcker acknowledges the done publishes at the head of the queue until
// the head is not done.
func (c *conn) runAcker() {
	defer c.b.ackers.Done()
	var buf []byte
	for {
		q := &c.acks
		q.mu.Lock()
		n := 0
		for n < len(q.queue) && q.queue[n].done {
			n++
		}
		if n == 0 {
			q.draining = false
			q.mu.Unlock()
			return
		}
		ready := make([]*pendingPub, n)
		copy(ready, q.queue)
		rest := copy(q.queue, q.queue[n:])
		clear(q.queue[rest:])
		q.queue = q.queue[:rest]
		q.mu.Unlock()
		buf = c.b.acknowledge(c, ready, buf)
		for range ready {
			<-q.slots
		}
	}
}

// acknowledge sends the PUBACKs of ready, in order, then delivers the
// accepted messages. A commit completes many publishes of a connection at
// once, and one write (one TLS record, one syscall) per PUBACK was a fifth
// of the broker's time under QoS 1 load: the PUBACKs go out in one write,
// plus one per MQTT 5 refusal. buf is scratch space, returned for reuse.
func (b *Broker) acknowledge(c *conn, ready []*pendingPub, buf []byte) []byte {
	cl := c.cl
	v5 := cl.Properties.ProtocolVersion == 5
	buf = buf[:0]
	refused := -1 // a 3.1.1 refusal: nothing after it is acknowledged
	for i, p := range ready {
		id := p.id
		switch {
		case p.code.Code < packets.ErrUnspecifiedError.Code && (!v5 || p.code.Code == 0):
			// Success: a 3.1.1 PUBACK, or an MQTT 5 one that may leave
			// out a zero reason code and its properties.
			buf = append(buf, packets.Puback<<4, 2, byte(id>>8), byte(id))
		case p.code.Code < packets.ErrUnspecifiedError.Code:
			buf = append(buf, packets.Puback<<4, 3, byte(id>>8), byte(id), p.code.Code)
		case v5:
			// A refusal carries its reason string: mochi encodes it.
			writeRaw(cl, buf)
			buf = buf[:0]
			refuseAck(cl, id, p.code)
		default:
			refused = i
		}
		if refused >= 0 {
			break
		}
	}
	// A failed write means the client is gone; it resends when it comes
	// back, and the stored messages stay stored.
	writeRaw(cl, buf)
	accepted := ready
	if refused >= 0 {
		accepted = ready[:refused]
	}
	for _, p := range accepted {
		if p.code.Code < packets.ErrUnspecifiedError.Code {
			b.deliver(c, p)
		}
	}
	if refused >= 0 {
		// Those after it were stored but are not acknowledged: PUBACKs
		// go in publish order. They come again, at least once.
		b.refuse311(cl, ready[refused].code)
	}
	return buf
}

// writeRaw writes encoded packets to the client's connection under the
// client's lock, as mochi's WritePacket does.
func writeRaw(cl *mqtt.Client, buf []byte) {
	if len(buf) == 0 || cl.Closed() {
		return
	}
	cl.Lock()
	defer cl.Unlock()
	_, _ = cl.Net.Conn.Write(buf)
}

// refuseAck sends an MQTT 5 PUBACK refusing packet id with code.
func refuseAck(cl *mqtt.Client, id uint16, code packets.Code) {
	ack := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Puback},
		PacketID:    id,
		ReasonCode:  code.Code,
	}
	ack.Properties.ReasonString = code.Reason
	_ = cl.WritePacket(ack)
}

// deliver hands an acknowledged publish to mochi for delivery. Most
// telemetry has no subscriber on this node, and mochi's delivery path
// costs as much as the rest of the publish: it is skipped when no
// subscription can match (see subscribers.go), unless the message is
// retained (mochi keeps it for later subscribers).
func (b *Broker) deliver(c *conn, p *pendingPub) {
	if p.pk == nil || (!p.pk.FixedHeader.Retain && !b.hasSubscribers(p.pk.TopicName)) {
		return
	}
	pk := *p.pk
	pk.Properties.TopicAlias, pk.Properties.TopicAliasFlag = 0, false
	if err := b.srv.InjectPacket(b.inline, pk); err != nil {
		b.log.Debug().Err(err).Str("id", c.id).Msg("broker: delivering acknowledged publish")
	}
}

// hasSubscribers reports whether any subscription matches topic.
func (b *Broker) hasSubscribers(topic string) bool {
	s := b.srv.Topics.Subscribers(topic)
	return len(s.Subscriptions) > 0 || len(s.Shared) > 0 || len(s.InlineSubscriptions) > 0
}
