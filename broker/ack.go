package broker

import (
	"sync"

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
	pk   packets.Packet
	code packets.Code // PUBACK reason, once done
	done bool         // guarded by ackQueue.mu
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
		for _, p := range ready {
			c.b.acknowledge(c, p)
			<-q.slots
		}
	}
}

// acknowledge sends p's PUBACK and, if it was accepted, delivers it.
func (b *Broker) acknowledge(c *conn, p *pendingPub) {
	cl := c.cl
	ack := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Puback},
		PacketID:    p.pk.PacketID,
		ReasonCode:  p.code.Code,
	}
	if p.code.Code >= packets.ErrUnspecifiedError.Code {
		// A 3.1.1 PUBACK cannot refuse: the client gets none and resends
		// after reconnecting.
		if cl.Properties.ProtocolVersion == 5 {
			ack.Properties.ReasonString = p.code.Reason
			_ = cl.WritePacket(ack)
		}
		return
	}
	// A failed write means the client is gone; it resends when it comes
	// back, and the stored message stays stored.
	_ = cl.WritePacket(ack)
	pk := p.pk
	pk.Properties.TopicAlias, pk.Properties.TopicAliasFlag = 0, false
	if err := b.srv.InjectPacket(b.inline, pk); err != nil {
		b.log.Debug().Err(err).Str("id", c.id).Msg("broker: delivering acknowledged publish")
	}
}
