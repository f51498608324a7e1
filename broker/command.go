package broker

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetmq/fleetmq/store"
)

// Errors of Command.
var (
	// ErrBadCommand: the name cannot be a command topic's tail.
	ErrBadCommand = errors.New("broker: not a command name")
	// ErrNotListening: no session subscribes to the command's topic, so
	// nothing would receive it; the device is not connected (the agent
	// keeps no session while away).
	ErrNotListening = errors.New("broker: no session subscribes to the command")
)

// CommandResult is what Command did.
type CommandResult struct {
	Topic string
	// Online: the device has a connection on this node; otherwise the
	// command waits in a session it kept.
	Online bool
	// Reply is the first event the device published after the command,
	// when Command waited for one and one came.
	Reply *store.Message
	// Gone: the device's last connection closed while Command waited,
	// before a reply came; the wait ended there.
	Gone bool
}

// CommandTopic returns the topic of command name to device id:
// devices/{id}/commands/{name}, name one or more topic levels, without
// wildcards, as a service could publish it.
func CommandTopic(id, name string) (string, bool) {
	topic := topicRoot + "/" + id + "/" + levelCommands + "/" + name
	return topic, name != "" && Allowed(store.RoleService, "fleetmq", topic, true)
}

// Command publishes payload to device id's command topic name at QoS 1, as
// a service does; the caller has checked that id is a device that is not
// revoked. With wait > 0 it then waits that long, or until ctx ends, for
// the device's next event (devices/{id}/events/...): the device agent
// answers ping with events/pong and refuses a command with events/error.
// A reply that does not come is no error: Reply stays nil, and Gone is set
// when the wait ended because the device disconnected.
func (b *Broker) Command(ctx context.Context, id, name string, payload []byte, wait time.Duration) (CommandResult, error) {
	res, errs := b.CommandMany(ctx, []string{id}, name, payload, wait)
	return res[0], errs[0]
}

// CommandMany is Command to each of ids (devices the caller checked), in
// one wait: every command is published first, then the replies are
// collected in a single window of wait, which ends early once each device
// sent to has answered or disconnected. res[i] and errs[i] are ids[i]'s;
// errs[i] is ErrNotListening or ErrBadCommand when nothing went to it.
func (b *Broker) CommandMany(ctx context.Context, ids []string, name string, payload []byte, wait time.Duration) ([]CommandResult, []error) {
	res := make([]CommandResult, len(ids))
	errs := make([]error, len(ids))
	var ws []*eventWaiter
	var ready chan *eventWaiter
	if wait > 0 {
		// Before the publishes: a device on loopback answers a ping
		// before the publish returns.
		ready = make(chan *eventWaiter, 3*len(ids)) // see eventWaiter.ready
		ws = b.awaitEvents(ids, ready)
		defer b.events.remove(ws)
	}
	sent := 0
	for i, id := range ids {
		topic, ok := CommandTopic(id, name)
		if !ok {
			errs[i] = ErrBadCommand
			continue
		}
		res[i].Topic = topic
		if ws != nil {
			b.events.forgetGone(ws[i]) // a connection that closed before the command went out
		}
		// Online also with ErrNotListening: a connected device that does
		// not subscribe to this command is told apart from one that is away.
		res[i].Online = b.online(id)
		if !b.hasSubscribers(topic) {
			errs[i] = ErrNotListening
			continue
		}
		pk := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   topic,
			Payload:     payload,
			PacketID:    1, // mochi refuses a QoS 1 publish without one; the inline client's are never acknowledged
		}
		if err := b.srv.InjectPacket(b.inline, pk); err != nil {
			errs[i] = err
			continue
		}
		if ws != nil {
			ws[i].sent = true
			sent++
		}
	}
	if sent == 0 {
		return res, errs
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for sent > 0 {
		select {
		case w := <-ready:
			if b.events.settle(w, &res[w.index]) {
				sent--
			}
		case <-t.C:
			return res, errs
		case <-ctx.Done():
			return res, errs
		}
	}
	return res, errs
}

// online reports whether identity id has an authorized connection here.
func (b *Broker) online(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	ident := b.idents[id]
	return ident != nil && ident.authorized()
}

// eventWaiters are the Command calls waiting for devices' replies.
type eventWaiters struct {
	n  atomic.Int64 // len of all sets in m: the publish path's only cost while 0
	mu sync.Mutex
	// By device id: a publish looks at its own device's waiters only,
	// however many devices one command waits for.
	m map[string]map[*eventWaiter]struct{}
}

// eventWaiter is one device a Command call waits for. reply and gone are
// guarded by eventWaiters.mu; index, sent and settled belong to the call.
type eventWaiter struct {
	id    string
	index int
	reply *store.Message // the first event
	gone  bool           // the device's last connection closed
	// ready is told of each change to reply or gone, so that the call
	// waits on one channel for all its devices. reply is set once and
	// gone at most twice (forgetGone clears it once), so 3 sends per
	// waiter fit its buffer and a send never blocks the publish path.
	ready   chan<- *eventWaiter
	sent    bool
	settled bool
}

// awaitEvents registers for the next event each of ids publishes, and
// for its going offline, each change told on ready.
func (b *Broker) awaitEvents(ids []string, ready chan<- *eventWaiter) []*eventWaiter {
	ws := &b.events
	out := make([]*eventWaiter, len(ids))
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.m == nil {
		ws.m = make(map[string]map[*eventWaiter]struct{})
	}
	for i, id := range ids {
		w := &eventWaiter{id: id, index: i, ready: ready}
		set := ws.m[id]
		if set == nil {
			set = make(map[*eventWaiter]struct{})
			ws.m[id] = set
		}
		set[w] = struct{}{}
		out[i] = w
	}
	ws.n.Add(int64(len(ids)))
	return out
}

// remove unregisters what awaitEvents registered.
func (ws *eventWaiters) remove(list []*eventWaiter) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for _, w := range list {
		set := ws.m[w.id]
		delete(set, w)
		if len(set) == 0 {
			delete(ws.m, w.id)
		}
	}
	ws.n.Add(-int64(len(list)))
}

// forgetGone clears a disconnect seen before the command went out.
func (ws *eventWaiters) forgetGone(w *eventWaiter) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	w.gone = false
}

// settle records in res what ended w's wait, if anything did: its reply,
// or else its going offline. It reports whether w is now settled, the
// first time only.
func (ws *eventWaiters) settle(w *eventWaiter, res *CommandResult) bool {
	if !w.sent || w.settled {
		return false
	}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	switch {
	case w.reply != nil: // also when it came just before the device left
		res.Reply = w.reply
	case w.gone:
		res.Gone = true
	default:
		return false
	}
	w.settled = true
	return true
}

// noteGone tells the Command calls waiting for device id's reply that its
// last connection closed: a reply will not come over it, and an operator
// should not wait out the rest of --wait to learn that.
func (b *Broker) noteGone(id string) {
	ws := &b.events
	if ws.n.Load() == 0 {
		return
	}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for w := range ws.m[id] {
		if !w.gone && w.reply == nil {
			w.gone = true
			w.ready <- w
		}
	}
}

// noteEvent hands a device's accepted publish to the Command calls
// waiting for its reply, if it is an event.
func (b *Broker) noteEvent(id string, pk *packets.Packet) {
	if b.events.n.Load() == 0 {
		return
	}
	rest, ok := strings.CutPrefix(pk.TopicName, topicRoot+"/"+id+"/"+levelEvents+"/")
	if !ok || rest == "" {
		return
	}
	m := store.Message{
		DeviceID: id,
		Topic:    pk.TopicName,
		Received: b.cfg.Now(),
		QoS:      min(pk.FixedHeader.Qos, 2),
		// mochi may hand the packet on after this hook: a copy of
		// our own.
		Payload: append([]byte(nil), pk.Payload...),
	}
	ws := &b.events
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for w := range ws.m[id] {
		if w.reply == nil { // else it has its reply already
			w.reply = &m
			w.ready <- w
		}
	}
}
