package broker

import (
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/store"
)

// A new subscription's retained messages. mochi sends them in one burst
// through the client's write queue (WriteQueue packets) and, at QoS 1, its
// in-flight table (maxInflight), and drops the rest: a service subscribing
// to devices/+/status in a fleet of thousands got the statuses of a few
// hundred devices. Only services receive retained messages (nothing a
// device may subscribe to keeps one), so for services the broker sends
// them itself: mochi is told to send none (Retain Handling 2), and after
// the SUBACK one goroutine per connection writes them, waiting for
// acknowledgements while the in-flight window is full and for the socket
// while it is slow (up to WriteTimeout, as every write).

// retainedPoll bounds a wait for an in-flight slot: mochi also frees slots
// without an acknowledgement (expiry, a dropped delivery), which no hook
// reports.
const retainedPoll = time.Second

// retainedSub is one granted subscription whose retained messages are due.
type retainedSub struct {
	sub  packets.Subscription // as the client asked, Retain Handling included
	skip bool                 // Retain Handling says none are due
}

// retainedQueue is a session's retained deliveries: those of the
// SUBSCRIBE being handled, then those whose SUBACK was sent. A kept
// session's queue passes to the connection resuming it, which goes on
// with what the one before did not send (see resumeRetained).
type retainedQueue struct {
	mu       sync.Mutex
	packetID uint16        // of the SUBSCRIBE in pending
	pending  []retainedSub // aligned with its filters
	ready    []retainedJob
	running  bool
	c        *conn         // the connection deliveries go to
	cl       *mqtt.Client  // its client
	freed    chan struct{} // an acknowledgement freed an in-flight slot
}

// retainedJob is one subscription whose retained messages are due.
type retainedJob struct {
	sub packets.Subscription
	// Topics still to send, once a connection ended partway; nil: all
	// those the filter matches.
	topics []string
}

// takesRetained reports whether the broker, not mochi, sends cl its
// retained messages: an authorized connection of a service.
func takesRetained(cl *mqtt.Client) (*conn, bool) {
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return nil, false
	}
	g := c.grant.Load()
	return c, g != nil && g.role != store.RoleDevice
}

// holdRetained records, for the SUBSCRIBE pk mochi is about to handle,
// which retained messages are due, and tells mochi to send none. It runs
// in OnSubscribe, before mochi replaces subscriptions, which is when
// Retain Handling 1 ("only for a new subscription") can be decided.
func (c *conn) holdRetained(cl *mqtt.Client, pk *packets.Packet) {
	due := make([]retainedSub, len(pk.Filters))
	for i, f := range pk.Filters {
		_, existed := cl.State.Subscriptions.Get(f.Filter)
		due[i] = retainedSub{
			sub:  f,
			skip: f.Filter == "" || mqtt.IsSharedFilter(f.Filter) || f.RetainHandling == 2 || f.RetainHandling == 1 && existed,
		}
		pk.Filters[i].RetainHandling = 2
	}
	q := c.retained.Load()
	if q == nil {
		q = &retainedQueue{freed: make(chan struct{}, 1), c: c, cl: cl}
		c.retained.Store(q)
	}
	q.mu.Lock()
	q.packetID = pk.PacketID
	q.pending = due
	q.mu.Unlock()
}

// grantRetained keeps, of the pending deliveries, those of the filters
// mochi granted. It runs in OnSubscribed, before the SUBACK is written.
func (c *conn) grantRetained(reasonCodes []byte) {
	q := c.retained.Load()
	if q == nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := range q.pending {
		if i >= len(reasonCodes) || reasonCodes[i] >= packets.ErrUnspecifiedError.Code {
			q.pending[i].skip = true
		}
	}
}

// sendRetained starts the pending deliveries once the SUBACK of their
// SUBSCRIBE was written: MQTT orders the retained messages after it.
func (b *Broker) sendRetained(c *conn, packetID uint16) {
	q := c.retained.Load()
	if q == nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.pending == nil || q.packetID != packetID {
		return
	}
	for _, d := range q.pending {
		if !d.skip {
			q.ready = append(q.ready, retainedJob{sub: d.sub})
		}
	}
	q.pending = nil
	b.startRetained(q)
}

// startRetained starts q's deliveries if some are due and none run.
// Called with q.mu held.
func (b *Broker) startRetained(q *retainedQueue) {
	if len(q.ready) > 0 && !q.running {
		q.running = true
		b.retainers.Add(1)
		go b.retainedLoop(q)
	}
}

// takeOverRetained gives cl, whose connection c is about to take over the
// session of the client now holding cl's id, that session's retained
// deliveries. It runs in OnSessionEstablish, while the other client may
// still be delivering; resumeRetained later keeps them or not.
func takeOverRetained(srv *mqtt.Server, cl *mqtt.Client, c *conn) {
	old, ok := srv.Clients.Get(cl.ID)
	if !ok {
		return
	}
	if oc, ok := old.Net.Conn.(*conn); ok && oc != c {
		c.retained.Store(oc.retained.Load())
	}
}

// resumeRetained runs once c's CONNACK was written. A resumed session goes
// on with the retained deliveries its previous connection left (it has
// the subscriptions and will not subscribe again): mochi resent only those
// in flight, and the service never got the others. A new session has
// none.
func (b *Broker) resumeRetained(cl *mqtt.Client, c *conn, present bool) {
	q := c.retained.Load()
	if q == nil {
		return
	}
	if !present {
		c.retained.Store(nil)
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.c, q.cl = c, cl
	q.pending = nil // a SUBSCRIBE of the connection before, never answered
	b.startRetained(q)
}

// retainedLoop sends the retained messages of the ready subscriptions, one
// subscription after another, until none is left or the connection ends
// and no other has resumed the session meanwhile.
func (b *Broker) retainedLoop(q *retainedQueue) {
	defer b.retainers.Done()
	for {
		q.mu.Lock()
		if len(q.ready) == 0 {
			q.running = false
			q.mu.Unlock()
			return
		}
		job := q.ready[0]
		q.ready = q.ready[1:]
		c, cl := q.c, q.cl
		q.mu.Unlock()
		rest := b.retainedFor(cl, c, q, job)
		if rest == nil {
			continue
		}
		q.mu.Lock()
		job.topics = rest
		q.ready = slices.Insert(q.ready, 0, job)
		if q.c == c {
			q.running = false // the next connection of the session goes on
			q.mu.Unlock()
			return
		}
		q.mu.Unlock() // a connection resumed the session meanwhile: go on there
	}
}

// retainedFor sends cl the retained messages matching sub. Each is sent as
// it is when its turn comes: one changed since the walk began was also
// delivered live, and an older status must not follow the newer one. It
// returns nil once all are sent, or, when the connection ended, the topics
// not sent yet, the one it ended on included: it may have been put in
// flight, which mochi resends too, or not.
func (b *Broker) retainedFor(cl *mqtt.Client, c *conn, q *retainedQueue, job retainedJob) []string {
	sub := job.sub
	topics := job.topics
	if topics == nil {
		for _, pk := range b.srv.Topics.Messages(sub.Filter) {
			topics = append(topics, pk.TopicName)
		}
	}
	maxQos := min(sub.Qos, b.srv.Options.Capabilities.MaximumQos)
	for i, topic := range topics {
		// The slot is awaited before the message is read, not after: the
		// wait lasts as long as the client takes to acknowledge, and a
		// message read before it went out as it was then. A status that
		// changed meanwhile (a revocation's removal) reached the client
		// live first and was then overwritten by the older value.
		if maxQos > 0 && !c.awaitInflightSlot(cl, q) {
			return topics[i:]
		}
		pk, ok := b.srv.Topics.Retained.Get(topic)
		if !ok || len(pk.Payload) == 0 || pk.Expiry > 0 && pk.Expiry < time.Now().Unix() {
			continue
		}
		if !c.allowed(pk.TopicName, false) || b.silencedTopic(pk.TopicName) {
			continue
		}
		out := pk.Copy(false)
		out.FixedHeader.Retain = true // [MQTT-3.3.1-8]
		out.FixedHeader.Qos = min(out.FixedHeader.Qos, maxQos)
		if sub.Identifier > 0 {
			out.Properties.SubscriptionIdentifier = []int{sub.Identifier}
		}
		if out.FixedHeader.Qos > 0 {
			id, err := cl.NextPacketID()
			if err != nil {
				atomic.AddInt64(&b.srv.Info.InflightDropped, 1)
				continue
			}
			out.PacketID = uint16(id)
			if cl.State.Inflight.Set(out) {
				atomic.AddInt64(&b.srv.Info.Inflight, 1)
			}
		}
		if err := cl.WritePacket(out); err != nil {
			if !errors.Is(err, packets.ErrPacketTooLarge) {
				return topics[i:]
			}
			// Larger than the client accepts, which mochi's live
			// deliveries skip without a count too.
			if out.FixedHeader.Qos > 0 && cl.State.Inflight.Delete(out.PacketID) {
				atomic.AddInt64(&b.srv.Info.Inflight, -1)
			}
		}
	}
	return nil
}

// awaitInflightSlot waits until cl's in-flight table has room for one more
// retained message, leaving half of it, or of the client's Receive
// Maximum, to live deliveries. It reports false once the connection ended.
func (c *conn) awaitInflightSlot(cl *mqtt.Client, q *retainedQueue) bool {
	window := maxInflight / 2
	if rm := int(c.receiveMax); rm > 0 {
		window = max(1, min(window, rm/2))
	}
	var poll *time.Timer
	for cl.State.Inflight.Len() >= window {
		if poll == nil {
			poll = time.NewTimer(retainedPoll)
			defer poll.Stop()
		} else {
			poll.Reset(retainedPoll)
		}
		select {
		case <-q.freed:
		case <-poll.C:
		case <-c.closed:
			return false
		}
	}
	select {
	case <-c.closed:
		return false
	default:
		return true
	}
}

// inflightFreed wakes c's retained deliveries waiting for a slot. Only
// mochi's read goroutine calls it.
func (c *conn) inflightFreed() {
	q := c.retained.Load()
	if q == nil {
		return
	}
	select {
	case q.freed <- struct{}{}:
	default:
	}
}
