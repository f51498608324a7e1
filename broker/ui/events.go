package ui

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// presenceEvent is one identity connecting or disconnecting.
type presenceEvent struct {
	ID     string `json:"id"`
	Online bool   `json:"online"`
}

// hub turns the broker's list of connected identities into presence
// events for the pages that listen. It compares the list every interval,
// and only while someone listens: the broker has no presence callback, and
// reading the list is a map walk under its lock.
type hub struct {
	ctx      context.Context
	online   func() []string
	interval time.Duration

	mu      sync.Mutex
	subs    map[chan presenceEvent]struct{}
	running bool
	// last is the online set the events broadcast so far lead to. A new
	// subscriber starts from it: every change after it is an event, so
	// the subscriber's view is exact, whatever its page was rendered from.
	last map[string]bool
}

// subscriberBuffer is how many events a slow page may lag before its
// stream is closed; the browser reconnects, and the new stream starts
// with the current online set (serveEvents).
const subscriberBuffer = 256

func newHub(ctx context.Context, online func() []string, interval time.Duration) *hub {
	return &hub{ctx: ctx, online: online, interval: interval, subs: make(map[chan presenceEvent]struct{})}
}

// subscribe returns the identities online as the events to come start
// from, a channel of presence events, closed when the subscriber falls
// behind, and a cancel func.
func (h *hub) subscribe() ([]string, <-chan presenceEvent, func()) {
	ch := make(chan presenceEvent, subscriberBuffer)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	if !h.running {
		h.running = true
		h.last = set(h.online())
		go h.run()
	}
	online := make([]string, 0, len(h.last))
	for id := range h.last {
		online = append(online, id)
	}
	h.mu.Unlock()
	slices.Sort(online)
	return online, ch, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if _, ok := h.subs[ch]; ok {
			delete(h.subs, ch)
			close(ch)
		}
	}
}

func (h *hub) run() {
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		select {
		case <-h.ctx.Done():
			h.mu.Lock()
			h.running = false
			h.mu.Unlock()
			return
		case <-t.C:
		}
		// Read outside the lock: it is the broker's lock that it takes.
		now := set(h.online())
		h.mu.Lock()
		if len(h.subs) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		var evs []presenceEvent
		for id := range now {
			if !h.last[id] {
				evs = append(evs, presenceEvent{ID: id, Online: true})
			}
		}
		for id := range h.last {
			if !now[id] {
				evs = append(evs, presenceEvent{ID: id, Online: false})
			}
		}
		// The new set and its events go out together, under the lock,
		// so that a subscriber gets either the old set and the events,
		// or the new set alone.
		h.last = now
		h.broadcast(evs)
		h.mu.Unlock()
	}
}

// broadcast sends evs to every subscriber; h.mu is held.
func (h *hub) broadcast(evs []presenceEvent) {
	for ch := range h.subs {
		for _, ev := range evs {
			select {
			case ch <- ev:
				continue
			default:
			}
			delete(h.subs, ch)
			close(ch)
			break
		}
	}
}

func set(ids []string) map[string]bool {
	m := make(map[string]bool, len(ids))
	for _, id := range ids {
		m[id] = true
	}
	return m
}

// telemetryEvent is one stored message's numeric fields.
type telemetryEvent struct {
	T      int64              `json:"t"` // received, Unix milliseconds
	Values map[string]float64 `json:"values"`
}

// heartbeat keeps idle streams (and the proxies between) open.
const heartbeat = 20 * time.Second

// serveEvents streams server-sent events: first "online", the identities
// connected now, then "presence" for every identity that connects or
// disconnects, and with ?device=ID "telemetry" for each message that
// device stores. The first event is what makes a page exact: it was
// rendered before the stream opened, and a stream that fell behind (a
// network outage flips thousands of devices at once) ends and reconnects,
// so changes in between would otherwise be lost.
func (s *Server) serveEvents(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	// The server's deadlines are for requests, not for streams.
	if err := rc.SetWriteDeadline(time.Time{}); err != nil {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	_ = rc.SetReadDeadline(time.Time{})

	// A stream ends when the certificate or the login it was opened with
	// expires, an operator's when the operator is revoked, and a local
	// user's at logout.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	v := viewerOf(ctx)
	switch {
	case v.Name != "":
		defer s.trackStream(v.Name, cancel)()
	case v.Login != "":
		defer s.trackStream(loginStream(v.Login), cancel)()
	}
	if !v.Until.IsZero() {
		expiry := time.AfterFunc(v.Until.Sub(s.cfg.Now()), cancel)
		defer expiry.Stop()
	}

	// Subscribe before answering: the stream starts with the online set
	// the subscription's events follow on from.
	online, pres, cancelPres := s.hub.subscribe()
	defer cancelPres()
	var tel <-chan store.Message
	if id := r.URL.Query().Get("device"); id != "" && s.cfg.Follow != nil {
		ch, cancel := s.cfg.Follow(id)
		defer cancel()
		tel = ch
	}

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	// The browser fires "open" on this first line.
	if _, err := fmt.Fprint(w, "retry: 2000\n: fleetmq\n\n"); err != nil {
		return
	}
	b, err := json.Marshal(online)
	if err != nil {
		return
	}
	if _, err := fmt.Fprintf(w, "event: online\ndata: %s\n\n", b); err != nil || rc.Flush() != nil {
		return
	}
	t := time.NewTicker(heartbeat)
	defer t.Stop()
	for {
		var name string
		var data any
		select {
		case <-ctx.Done():
			return
		case <-s.ctx.Done():
			return
		case <-t.C:
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil || rc.Flush() != nil {
				return
			}
			continue
		case ev, ok := <-pres:
			if !ok {
				return // fell behind; the browser reconnects
			}
			name, data = "presence", ev
		case m, ok := <-tel:
			if !ok {
				return // the broker is closing
			}
			vals := numericFields(m.Payload)
			if len(vals) == 0 {
				continue
			}
			name, data = "telemetry", telemetryEvent{T: m.Received.UnixMilli(), Values: vals}
		}
		b, err := json.Marshal(data)
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", name, b); err != nil || rc.Flush() != nil {
			return
		}
	}
}
