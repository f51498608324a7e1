package ui

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
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
}

// subscriberBuffer is how many events a slow page may lag before its
// stream is closed; the browser reconnects and the page catches up.
const subscriberBuffer = 256

func newHub(ctx context.Context, online func() []string, interval time.Duration) *hub {
	return &hub{ctx: ctx, online: online, interval: interval, subs: make(map[chan presenceEvent]struct{})}
}

// subscribe returns a channel of presence events, closed when the
// subscriber falls behind, and a cancel func.
func (h *hub) subscribe() (<-chan presenceEvent, func()) {
	ch := make(chan presenceEvent, subscriberBuffer)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	if !h.running {
		h.running = true
		// The state the subscriber's page was rendered from, or newer:
		// every change after it is an event.
		go h.run(set(h.online()))
	}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if _, ok := h.subs[ch]; ok {
			delete(h.subs, ch)
			close(ch)
		}
	}
}

func (h *hub) run(last map[string]bool) {
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
		h.mu.Lock()
		if len(h.subs) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		h.mu.Unlock()
		now := set(h.online())
		var evs []presenceEvent
		for id := range now {
			if !last[id] {
				evs = append(evs, presenceEvent{ID: id, Online: true})
			}
		}
		for id := range last {
			if !now[id] {
				evs = append(evs, presenceEvent{ID: id, Online: false})
			}
		}
		last = now
		if len(evs) > 0 {
			h.broadcast(evs)
		}
	}
}

func (h *hub) broadcast(evs []presenceEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
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

// serveEvents streams server-sent events: "presence" for every identity
// that connects or disconnects, and with ?device=ID "telemetry" for each
// message that device stores.
func (s *Server) serveEvents(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	// The server's deadlines are for requests, not for streams.
	if err := rc.SetWriteDeadline(time.Time{}); err != nil {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	_ = rc.SetReadDeadline(time.Time{})

	// A stream ends when the certificate or the login it was opened with
	// expires, and an operator's when the operator is revoked.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	v := viewerOf(ctx)
	if v.Name != "" {
		defer s.trackStream(v.Name, cancel)()
	}
	if !v.Until.IsZero() {
		expiry := time.AfterFunc(v.Until.Sub(s.cfg.Now()), cancel)
		defer expiry.Stop()
	}

	// Subscribe before answering, so that nothing falls between the page
	// the browser has and the stream.
	pres, cancelPres := s.hub.subscribe()
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
	if rc.Flush() != nil {
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
