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
	topic, ok := CommandTopic(id, name)
	if !ok {
		return CommandResult{}, ErrBadCommand
	}
	res := CommandResult{Topic: topic}
	var w *eventWaiter
	if wait > 0 {
		// Before the publish: a device on loopback answers a ping
		// before the publish returns.
		var done func()
		w, done = b.awaitEvent(id)
		defer done()
		select {
		case <-w.gone: // a connection that closed before the command went out
		default:
		}
	}
	// Online also with ErrNotListening: a connected device that does not
	// subscribe to this command is told apart from one that is away.
	res.Online = b.online(id)
	if !b.hasSubscribers(topic) {
		return res, ErrNotListening
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   topic,
		Payload:     payload,
		PacketID:    1, // mochi refuses a QoS 1 publish without one; the inline client's are never acknowledged
	}
	if err := b.srv.InjectPacket(b.inline, pk); err != nil {
		return res, err
	}
	if wait <= 0 {
		return res, nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case m := <-w.reply:
		res.Reply = &m
	case <-w.gone:
		// Its reply may have come just before it left.
		select {
		case m := <-w.reply:
			res.Reply = &m
		default:
			res.Gone = true
		}
	case <-t.C:
	case <-ctx.Done():
	}
	return res, nil
}

// online reports whether identity id has an authorized connection here.
func (b *Broker) online(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	ident := b.idents[id]
	return ident != nil && ident.authorized()
}

// eventWaiters are the Command calls waiting for a device's reply.
type eventWaiters struct {
	n  atomic.Int64 // len of all sets in m: the publish path's only cost while 0
	mu sync.Mutex
	m  map[string]map[*eventWaiter]struct{} // by device id
}

// eventWaiter is one Command call waiting for a device's reply.
type eventWaiter struct {
	reply chan store.Message // the first event; holds one
	gone  chan struct{}      // the device's last connection closed; holds one
}

// awaitEvent registers for the next event device id publishes, and for
// its going offline; done unregisters.
func (b *Broker) awaitEvent(id string) (*eventWaiter, func()) {
	ws := &b.events
	w := &eventWaiter{reply: make(chan store.Message, 1), gone: make(chan struct{}, 1)}
	ws.mu.Lock()
	if ws.m == nil {
		ws.m = make(map[string]map[*eventWaiter]struct{})
	}
	set := ws.m[id]
	if set == nil {
		set = make(map[*eventWaiter]struct{})
		ws.m[id] = set
	}
	set[w] = struct{}{}
	ws.n.Add(1)
	ws.mu.Unlock()
	return w, func() {
		ws.mu.Lock()
		defer ws.mu.Unlock()
		delete(set, w)
		if len(set) == 0 {
			delete(ws.m, id)
		}
		ws.n.Add(-1)
	}
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
		select {
		case w.gone <- struct{}{}:
		default:
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
		select {
		case w.reply <- m:
		default: // it has its reply already
		}
	}
}
