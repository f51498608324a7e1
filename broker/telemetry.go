package broker

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/store"
)

// Writer queue and batch sizes. QoS 1 and 2 messages wait in syncQueue
// (their publishers' reads wait when it is full); QoS 0 messages are
// buffered up to asyncQueue, and beyond it their publishers wait up to
// asyncWait for room before a message is dropped: an overload slows
// publishers down (TCP pushes back) instead of losing telemetry, and only
// a store stuck that long loses it.
const (
	syncQueue     = 4096
	asyncQueue    = 8192
	asyncWait     = time.Second
	maxBatch      = 4096    // messages per AppendTelemetry call
	maxBatchBytes = 8 << 20 // payload bytes per AppendTelemetry call
	followBuffer  = 256     // messages buffered per Follow reader

	// presenceDelay is how long a presence change may wait to be written
	// with the changes that follow it. Each write is a commit (an fsync):
	// at 1,500 connects a second, writing each change at once cost 5% of
	// the broker's CPU and shared the disk with QoS 1 telemetry. The
	// timestamps are taken when the change happens, so only its
	// visibility in the store is delayed.
	presenceDelay = 250 * time.Millisecond
	// presenceRetry is how long pending presence waits after a failed
	// write (a full disk) before the next try.
	presenceRetry = 5 * time.Second
)

var errWriterClosed = errors.New("telemetry writer closed")

// telemetryWriter is the one goroutine that writes telemetry and presence
// to the store. It takes whatever is queued and writes it in one call
// (group commit): concurrent QoS 1 publishers share a commit instead of
// paying one fsync each.
type telemetryWriter struct {
	st     Store
	log    zerolog.Logger
	stats  *counters
	notify func([]store.Message) // called with each committed batch

	sync  chan *syncReq
	async chan store.Message
	kick  chan struct{} // presence pending; buffered 1

	presMu sync.Mutex
	pres   map[string]store.Presence // latest state per identity, not yet written
	// presenceFailing is set while presence writes fail, so that a full
	// disk logs once, not at every retry. Writer goroutine only.
	presenceFailing bool
	presenceRetry   time.Duration // default presenceRetry

	stop chan struct{}
	done chan struct{}
}

// syncReq is a message whose publisher needs to know when it is
// committed: either it waits on done (QoS 2), or the writer completes p on
// its connection c (QoS 1, see ack.go).
type syncReq struct {
	msg  store.Message
	done chan error // buffered 1
	c    *conn
	p    *pendingPub
}

var syncReqPool = sync.Pool{New: func() any { return &syncReq{done: make(chan error, 1)} }}

func newTelemetryWriter(st Store, log zerolog.Logger, stats *counters, notify func([]store.Message)) *telemetryWriter {
	return &telemetryWriter{
		st:            st,
		log:           log,
		stats:         stats,
		notify:        notify,
		sync:          make(chan *syncReq, syncQueue),
		async:         make(chan store.Message, asyncQueue),
		kick:          make(chan struct{}, 1),
		pres:          make(map[string]store.Presence),
		presenceRetry: presenceRetry,
		stop:          make(chan struct{}),
		done:          make(chan struct{}),
	}
}

// store queues m and waits until it is durable (nil) or failed.
func (w *telemetryWriter) store(m store.Message) error {
	r := syncReqPool.Get().(*syncReq)
	r.msg = m
	select {
	case w.sync <- r:
	case <-w.done:
		return errWriterClosed
	}
	select {
	case err := <-r.done:
		r.msg = store.Message{}
		syncReqPool.Put(r)
		return err
	case <-w.done:
		// The writer answers everything it took before it ends.
		select {
		case err := <-r.done:
			return err
		default:
			return errWriterClosed
		}
	}
}

// storeAcked queues m; its commit completes p on connection c.
func (w *telemetryWriter) storeAcked(m store.Message, c *conn, p *pendingPub) {
	select {
	case w.sync <- &syncReq{msg: m, c: c, p: p}:
	case <-w.done:
		c.completeAck(p, packets.ErrUnspecifiedError)
	}
}

// storeAsync queues m, waiting up to asyncWait for room; false means it
// was dropped.
func (w *telemetryWriter) storeAsync(m store.Message) bool {
	select {
	case w.async <- m:
		return true
	default:
	}
	t := time.NewTimer(asyncWait)
	defer t.Stop()
	select {
	case w.async <- m:
		return true
	case <-t.C:
	case <-w.done:
	}
	return false
}

// setPresence records p to be written; a later state of the same identity
// replaces an unwritten earlier one, so the store sees each identity's
// states in order.
func (w *telemetryWriter) setPresence(p store.Presence) {
	w.presMu.Lock()
	w.pres[p.DeviceID] = p
	w.presMu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// close stops the writer after it has written everything queued.
func (w *telemetryWriter) close() {
	close(w.stop)
	<-w.done
}

// batch is what the writer takes from its queues for one AppendTelemetry.
type batch struct {
	reqs  []*syncReq
	msgs  []store.Message
	bytes int
}

func (b *batch) add(m store.Message) {
	b.msgs = append(b.msgs, m)
	b.bytes += len(m.Payload)
}

func (b *batch) addReq(r *syncReq) {
	b.reqs = append(b.reqs, r)
	b.add(r.msg)
}

func (b *batch) full() bool { return len(b.msgs) >= maxBatch || b.bytes >= maxBatchBytes }

func (w *telemetryWriter) run() {
	defer close(w.done)
	b := &batch{}
	var presence <-chan time.Time // pending presence is due; nil if none
	for {
		select {
		case r := <-w.sync:
			b.addReq(r)
		case m := <-w.async:
			b.add(m)
		case <-w.kick:
			if presence == nil {
				presence = time.After(presenceDelay)
			}
			continue
		case <-presence:
			presence = nil
			if !w.flushPresence() {
				presence = time.After(w.presenceRetry)
			}
			continue
		case <-w.stop:
			// Hooks have stopped: write what is left, then end.
			for w.gather(b) {
				w.write(b)
			}
			if !w.flushPresence() {
				w.log.Error().Int("identities", len(w.unwrittenPresence())).Msg("broker: presence changes not stored at shutdown")
			}
			return
		}
		w.gather(b)
		w.write(b)
	}
}

// gather adds whatever is queued to b, up to a full batch, without waiting,
// and reports whether b holds anything.
func (w *telemetryWriter) gather(b *batch) bool {
	for !b.full() {
		select {
		case r := <-w.sync:
			b.addReq(r)
		case m := <-w.async:
			b.add(m)
		default:
			return len(b.msgs) > 0
		}
	}
	return true
}

// write commits b, answers its waiting publishers and empties it.
func (w *telemetryWriter) write(b *batch) {
	if len(b.msgs) == 0 {
		return
	}
	// The queues are taken in no fixed order; grouping by device in
	// receive order gives followers each device's messages in order, and
	// the store fewer bucket switches.
	slices.SortStableFunc(b.msgs, func(x, y store.Message) int {
		if c := strings.Compare(x.DeviceID, y.DeviceID); c != 0 {
			return c
		}
		return x.Received.Compare(y.Received)
	})
	err := w.st.AppendTelemetry(context.Background(), b.msgs)
	code := packets.CodeSuccess
	// Counted before anyone is answered: a publisher that has its answer
	// finds the outcome in the metrics.
	if err != nil {
		code = packets.ErrUnspecifiedError
		w.stats.failed.Add(uint64(len(b.msgs)))
	} else {
		w.stats.stored.Add(uint64(len(b.msgs)))
		w.stats.commits.Add(1)
	}
	for _, r := range b.reqs {
		if r.done != nil {
			r.done <- err
		} else {
			r.c.completeAck(r.p, code)
		}
	}
	if err != nil {
		w.log.Error().Err(err).Int("messages", len(b.msgs)).Msg("broker: storing telemetry failed")
	} else {
		w.notify(b.msgs)
	}
	clear(b.msgs)
	clear(b.reqs)
	b.msgs, b.reqs, b.bytes = b.msgs[:0], b.reqs[:0], 0
}

// flushPresence stores the pending presence changes and reports whether
// it could. They stay pending until committed, so unwrittenPresence never
// misses one and a failed flush (a full disk) is tried again; a change
// made meanwhile replaces its entry and is written by the next flush.
func (w *telemetryWriter) flushPresence() bool {
	w.presMu.Lock()
	ps := make([]store.Presence, 0, len(w.pres))
	for _, p := range w.pres {
		ps = append(ps, p)
	}
	w.presMu.Unlock()
	if len(ps) == 0 {
		return true
	}
	if err := w.st.SetPresence(context.Background(), ps...); err != nil {
		w.stats.presenceFailed.Add(uint64(len(ps)))
		if !w.presenceFailing {
			w.log.Error().Err(err).Int("identities", len(ps)).Msg("broker: storing presence failed; retrying")
		}
		w.presenceFailing = true
		return false
	}
	if w.presenceFailing {
		w.log.Info().Int("identities", len(ps)).Msg("broker: presence stored again")
		w.presenceFailing = false
	}
	w.presMu.Lock()
	for _, p := range ps {
		if w.pres[p.DeviceID] == p {
			delete(w.pres, p.DeviceID)
		}
	}
	w.presMu.Unlock()
	return true
}

// unwrittenPresence copies the presence changes not yet committed.
func (w *telemetryWriter) unwrittenPresence() map[string]store.Presence {
	w.presMu.Lock()
	defer w.presMu.Unlock()
	return maps.Clone(w.pres)
}
