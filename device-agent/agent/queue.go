package agent

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// The offline queue is a directory of append-only segment files plus a small
// pointer file:
//
//	seg-<first seq, 20 digits>.log   records, in sequence order
//	ack.json                         {"next": first undelivered seq, "dropped": total dropped}
//
// A record is [len uint32 LE][crc32c uint32 LE][body], body = [topic len
// uint16 LE][topic][payload]. Sequence numbers are implicit: the segment's
// first seq plus the record's position. Appends are written at once (so a
// crash of the process loses nothing) but fsynced in batches (Sync), and the
// delivery pointer is saved in batches too: after a power loss at most the
// last unsynced batch is lost and a few delivered messages are sent again,
// which at-least-once delivery allows. A torn or corrupt tail is cut off at
// open, its records counted as dropped. Segments are removed once every
// record in them was delivered or dropped.

const (
	recordHeader  = 8
	maxRecordBody = 1 << 20
	segPrefix     = "seg-"
	segSuffix     = ".log"
	ackFile       = "ack.json"
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrQueueClosed is returned by operations on a closed queue.
var ErrQueueClosed = errors.New("queue closed")

// QueueOptions bound a queue. Zero means default.
type QueueOptions struct {
	MaxMessages  int   // default 10000
	MaxBytes     int64 // of pending records, headers included; default 16 MiB
	SegmentBytes int64 // a segment is closed for appends beyond this; default 1 MiB
	SyncEvery    int   // fsync after this many appends even without Sync; default 64
	// MemoryBytes bounds the records held in memory while the folder cannot
	// be written (a full SD card): the device keeps publishing while
	// connected, and keeps the newest of them while offline, but they do not
	// survive a restart. Default 256 KiB, about two hours of 30 s samples.
	MemoryBytes int64
	// PointerInterval is how often Flush saves the delivery pointer. Each
	// save is a small atomic file write; a crash re-sends at most what was
	// delivered since the last one. Default 1m.
	PointerInterval time.Duration
	Logger          zerolog.Logger
	Now             func() time.Time // default time.Now
}

// Record is one queued message.
type Record struct {
	Seq     uint64
	Topic   string // relative to the device's topic root, e.g. "telemetry"
	Payload []byte
}

type segment struct {
	base   uint64 // seq of the first record
	count  int    // records in the file
	size   int64
	f      *os.File
	path   string
	sealed bool // no more appends (found at open, or full)
	dirty  bool // appended since the last fsync
}

type qentry struct {
	seq  uint64
	seg  *segment // nil for a record held in memory
	off  int64
	size int64
	mem  []byte // the whole record, when seg is nil
}

// queue is a durable, bounded FIFO. It is safe for concurrent use.
type queue struct {
	dir  string
	opts QueueOptions
	log  zerolog.Logger

	mu       sync.Mutex
	segs     []*segment
	entries  []qentry // pending records, entries[0] is the oldest
	head     uint64   // first undelivered seq
	next     uint64   // seq of the next append
	bytes    int64    // size of pending records
	memBytes int64    // size of pending records held in memory
	memErr   bool     // the last append could not be written to disk
	dropped  uint64
	unsynced int
	dirDirty bool
	saved    ackState // last persisted pointer
	savedAt  time.Time
	closed   bool
	ready    chan struct{}
}

type ackState struct {
	Next    uint64 `json:"next"`
	Dropped uint64 `json:"dropped"`
}

// openQueue opens or creates the queue in dir, recovering from a crash.
func openQueue(dir string, opts QueueOptions) (*queue, error) {
	if opts.MaxMessages <= 0 {
		opts.MaxMessages = 10000
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = 16 << 20
	}
	if opts.SegmentBytes <= 0 {
		opts.SegmentBytes = 1 << 20
	}
	if opts.SyncEvery <= 0 {
		opts.SyncEvery = 64
	}
	if opts.MemoryBytes <= 0 {
		opts.MemoryBytes = 256 << 10
	}
	if opts.PointerInterval <= 0 {
		opts.PointerInterval = time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create queue dir: %w", err)
	}
	removeTemps(dir)
	q := &queue{dir: dir, opts: opts, log: opts.Logger, ready: make(chan struct{}, 1)}
	if b, err := os.ReadFile(filepath.Join(dir, ackFile)); err == nil {
		if err := json.Unmarshal(b, &q.saved); err != nil {
			// Written atomically, so this is bit rot: redelivering is the
			// safe side of losing the pointer.
			q.log.Warn().Err(err).Msg("queue pointer unreadable; delivering everything kept")
			q.saved = ackState{}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read queue pointer: %w", err)
	}
	q.head, q.dropped = q.saved.Next, q.saved.Dropped
	q.savedAt = opts.Now()

	names, err := segmentNames(dir)
	if err != nil {
		return nil, err
	}
	for i, name := range names {
		// The next segment's name is where this one's records end, which
		// tells exactly how many a cut tail held.
		var nextBase *uint64
		for _, n := range names[i+1:] {
			if b, ok := segmentBase(n); ok {
				nextBase = &b
				break
			}
		}
		if err := q.loadSegment(name, nextBase); err != nil {
			q.closeFiles()
			return nil, err
		}
	}
	q.next = q.head
	if n := len(q.segs); n > 0 {
		if end := q.segs[n-1].base + uint64(q.segs[n-1].count); end > q.next {
			q.next = end
		}
	}
	// Records below the pointer were delivered; a pointer behind the first
	// kept record means those before it were removed with their segment.
	q.entries = slices.DeleteFunc(q.entries, func(e qentry) bool { return e.seq < q.head })
	if len(q.entries) > 0 && q.entries[0].seq > q.head {
		q.head = q.entries[0].seq
	}
	for _, e := range q.entries {
		q.bytes += e.size
	}
	for q.overLimit(0) {
		q.dropOldest()
	}
	if err := q.releaseSegments(); err != nil {
		q.closeFiles()
		return nil, err
	}
	if q.dropped != q.saved.Dropped {
		// Records cut or dropped just now: count them durably at once,
		// the cut itself is already on disk.
		if err := q.syncLocked(true); err != nil {
			q.closeFiles()
			return nil, err
		}
	}
	if len(q.entries) > 0 {
		q.ready <- struct{}{}
	}
	return q, nil
}

// segmentBase parses the first seq out of a segment name.
func segmentBase(name string) (uint64, bool) {
	b, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, segPrefix), segSuffix), 10, 64)
	return b, err == nil
}

func segmentNames(dir string) ([]string, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list queue: %w", err)
	}
	var names []string
	for _, de := range des {
		n := de.Name()
		if strings.HasPrefix(n, segPrefix) && strings.HasSuffix(n, segSuffix) {
			names = append(names, n)
		}
	}
	slices.Sort(names) // fixed-width numbers sort like the numbers
	return names, nil
}

// loadSegment indexes one segment file. Every segment found at open is
// sealed: appending after a possibly torn region, or with seqs a moved
// pointer may already cover, is never worth the risk; a new one is cheap.
// nextBase is the first seq of the following segment, nil for the last.
func (q *queue) loadSegment(name string, nextBase *uint64) error {
	base, ok := segmentBase(name)
	if !ok {
		q.log.Warn().Str("file", name).Msg("queue: ignoring file with a bad name")
		return nil
	}
	path := filepath.Join(q.dir, name)
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("open queue segment: %w", err)
	}
	s := &segment{base: base, f: f, path: path, sealed: true}
	var off int64
	hdr := make([]byte, recordHeader)
	var body []byte
	for {
		if _, err := f.ReadAt(hdr, off); err != nil {
			if !errors.Is(err, io.EOF) {
				f.Close()
				return fmt.Errorf("read queue segment: %w", err)
			}
			break // clean end, or a torn header
		}
		n := binary.LittleEndian.Uint32(hdr[0:4])
		if n < 2 || n > maxRecordBody {
			break
		}
		body = slices.Grow(body[:0], int(n))[:n]
		if _, err := f.ReadAt(body, off+recordHeader); err != nil {
			if !errors.Is(err, io.EOF) {
				f.Close()
				return fmt.Errorf("read queue segment: %w", err)
			}
			break
		}
		if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(hdr[4:8]) {
			break
		}
		size := int64(recordHeader) + int64(n)
		q.entries = append(q.entries, qentry{seq: base + uint64(s.count), seg: s, off: off, size: size})
		s.count++
		off += size
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat queue segment: %w", err)
	}
	if st.Size() > off {
		// A crash mid-append (or bit rot) left a tail that is not a whole
		// valid record. Cutting it keeps later scans simple; the records
		// it held are lost, and counted as dropped like those the bounds
		// drop, so `status` shows the loss.
		cut, exact := countCut(f, off, st.Size())
		if firstCut := base + uint64(s.count); nextBase != nil && *nextBase > firstCut {
			cut, exact = *nextBase-firstCut, true
		}
		lost := cut
		if firstCut := base + uint64(s.count); q.head > firstCut {
			lost -= min(q.head-firstCut, cut) // delivered before: not lost
		}
		q.dropped += lost
		q.log.Warn().Str("segment", name).Int64("kept_bytes", off).Int64("cut_bytes", st.Size()-off).
			Uint64("cut_records", cut).Bool("count_exact", exact).Uint64("dropped", lost).Bool("last", nextBase == nil).
			Msg("queue: cutting a torn or corrupt segment tail")
		if err := f.Truncate(off); err != nil {
			f.Close()
			return fmt.Errorf("truncate queue segment: %w", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("sync queue segment: %w", err)
		}
	}
	if s.count == 0 {
		// Created just before a crash, or wholly corrupt: nothing to keep,
		// and its name would collide with the next segment.
		_ = f.Close()
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove empty queue segment: %w", err)
		}
		q.dirDirty = true
		return nil
	}
	s.size = off
	q.segs = append(q.segs, s)
	return nil
}

// countCut counts the records in the bytes of f from off to size, the
// first of which did not verify. It steps over that one if its length is
// plausible, then counts records while they verify. exact is false when the
// walk lost the record boundaries (a corrupt length, or a second bad
// record): the count is then a lower bound, at least one.
func countCut(f *os.File, off, size int64) (n uint64, exact bool) {
	hdr := make([]byte, recordHeader)
	var body []byte
	for first := true; off < size; first = false {
		n++
		if size-off < recordHeader {
			return n, true // a torn header: the end of an interrupted append
		}
		if _, err := f.ReadAt(hdr, off); err != nil {
			return n, false
		}
		l := binary.LittleEndian.Uint32(hdr[0:4])
		if l < 2 || l > maxRecordBody {
			return n, false
		}
		end := off + recordHeader + int64(l)
		if end > size {
			return n, true // a torn body: the end of an interrupted append
		}
		if !first {
			body = slices.Grow(body[:0], int(l))[:l]
			if _, err := f.ReadAt(body, off+recordHeader); err != nil ||
				crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(hdr[4:8]) {
				return n, false
			}
		}
		off = end
	}
	return n, true
}

// overLimit reports whether adding a record of size would break a bound.
func (q *queue) overLimit(size int64) bool {
	extra := 0
	if size > 0 {
		extra = 1
	}
	return len(q.entries) > 0 && (len(q.entries)+extra > q.opts.MaxMessages || q.bytes+size > q.opts.MaxBytes)
}

func (q *queue) dropOldest() {
	e := q.entries[0]
	q.entries = q.entries[1:]
	q.bytes -= e.size
	if e.seg == nil {
		q.memBytes -= e.size
	}
	q.head = e.seq + 1
	q.dropped++
}

// Append adds a record at the tail, dropping the oldest records if the
// queue is full. The record is written at once and fsynced with the batch.
func (q *queue) Append(topic string, payload []byte) error {
	bodyLen := 2 + len(topic) + len(payload)
	if len(topic) > 0xffff || bodyLen > maxRecordBody {
		return fmt.Errorf("queue: record of %d bytes too large", bodyLen)
	}
	size := int64(recordHeader + bodyLen)
	buf := make([]byte, size)
	binary.LittleEndian.PutUint32(buf[0:4], uint32(bodyLen))
	binary.LittleEndian.PutUint16(buf[8:10], uint16(len(topic)))
	copy(buf[10:], topic)
	copy(buf[10+len(topic):], payload)
	binary.LittleEndian.PutUint32(buf[4:8], crc32.Checksum(buf[recordHeader:], crcTable))

	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrQueueClosed
	}
	if size > q.opts.MaxBytes {
		return fmt.Errorf("queue: record of %d bytes exceeds the queue size", size)
	}
	dropped := 0
	for q.overLimit(size) {
		q.dropOldest()
		dropped++
	}
	if dropped > 0 {
		q.log.Warn().Int("dropped", dropped).Uint64("dropped_total", q.dropped).Msg("queue full: dropped oldest messages")
	}
	s, err := q.tail()
	if err == nil {
		if _, werr := s.f.WriteAt(buf, s.size); werr != nil {
			err = fmt.Errorf("queue: write: %w", werr)
			q.abandonTail(s)
		}
	}
	if err != nil {
		return q.appendMemory(buf, err)
	}
	if q.memErr {
		q.memErr = false
		q.log.Info().Msg("queue: writing to disk again")
	}
	q.entries = append(q.entries, qentry{seq: q.next, seg: s, off: s.size, size: size})
	s.size += size
	s.count++
	s.dirty = true
	q.next++
	q.bytes += size
	q.unsynced++
	if err := q.releaseSegments(); err != nil {
		return err
	}
	if q.unsynced >= q.opts.SyncEvery {
		if err := q.syncLocked(false); err != nil {
			return err
		}
	}
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return nil
}

// abandonTail gives up on s after a failed write. A segment's records are
// numbered from its name, so the record about to be held in memory takes a
// seq s can no longer hold: s is sealed (cut back to its last whole record),
// or removed when it has none.
func (q *queue) abandonTail(s *segment) {
	if s.count > 0 {
		_ = s.f.Truncate(s.size)
		s.sealed = true
		return
	}
	_ = s.f.Close()
	_ = os.Remove(s.path)
	q.segs = q.segs[:len(q.segs)-1]
	q.dirDirty = true
}

// appendMemory keeps a record that could not be written to disk in memory,
// within MemoryBytes, dropping the oldest record held in memory to make
// room: a full card must not silence a connected device. cause is returned
// when even that is impossible, and logged once when memory takes over.
func (q *queue) appendMemory(buf []byte, cause error) error {
	size := int64(len(buf))
	if size > q.opts.MemoryBytes {
		return cause
	}
	dropped := 0
	for q.memBytes+size > q.opts.MemoryBytes {
		i := slices.IndexFunc(q.entries, func(e qentry) bool { return e.seg == nil })
		if i == 0 {
			q.dropOldest()
		} else {
			e := q.entries[i]
			q.entries = slices.Delete(q.entries, i, i+1)
			q.bytes -= e.size
			q.memBytes -= e.size
			q.dropped++
		}
		dropped++
	}
	if !q.memErr {
		q.memErr = true
		q.log.Error().Err(cause).Int64("memory_bytes", q.opts.MemoryBytes).
			Msg("queue: cannot write to the state folder; holding telemetry in memory, lost if the agent stops")
	}
	if dropped > 0 {
		q.log.Warn().Int("dropped", dropped).Uint64("dropped_total", q.dropped).Msg("queue memory full: dropped oldest messages")
	}
	q.entries = append(q.entries, qentry{seq: q.next, size: size, mem: buf})
	q.next++
	q.bytes += size
	q.memBytes += size
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return nil
}

// tail returns the segment to append to, starting a new one when needed.
func (q *queue) tail() (*segment, error) {
	if n := len(q.segs); n > 0 {
		s := q.segs[n-1]
		if !s.sealed && s.size < q.opts.SegmentBytes {
			return s, nil
		}
		s.sealed = true
	}
	name := fmt.Sprintf("%s%020d%s", segPrefix, q.next, segSuffix)
	path := filepath.Join(q.dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: create segment: %w", err)
	}
	s := &segment{base: q.next, f: f, path: path}
	q.segs = append(q.segs, s)
	q.dirDirty = true
	return s, nil
}

// releaseSegments removes sealed segments with no pending record left.
func (q *queue) releaseSegments() error {
	keep := q.segs[:0]
	var firstErr error
	for _, s := range q.segs {
		done := s.base+uint64(s.count) <= q.head
		if !done || !s.sealed {
			keep = append(keep, s)
			continue
		}
		_ = s.f.Close()
		if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) && firstErr == nil {
			firstErr = fmt.Errorf("queue: remove segment: %w", err)
		}
		q.dirDirty = true
	}
	clear(q.segs[len(keep):])
	q.segs = keep
	return firstErr
}

// Peek returns up to n of the oldest pending records without removing them.
func (q *queue) Peek(n int) ([]Record, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, ErrQueueClosed
	}
	n = min(n, len(q.entries))
	out := make([]Record, 0, n)
	for _, e := range q.entries[:n] {
		buf := e.mem
		if e.seg != nil {
			buf = make([]byte, e.size)
			if _, err := e.seg.f.ReadAt(buf, e.off); err != nil {
				return out, fmt.Errorf("queue: read: %w", err)
			}
		}
		tl := int(binary.LittleEndian.Uint16(buf[8:10]))
		out = append(out, Record{
			Seq:     e.seq,
			Topic:   string(buf[10 : 10+tl]),
			Payload: buf[10+tl:],
		})
	}
	return out, nil
}

// Ack marks every record up to and including seq as delivered. Records
// dropped meanwhile are simply no longer there.
func (q *queue) Ack(seq uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrQueueClosed
	}
	if seq < q.head {
		return nil
	}
	if seq >= q.next {
		// Never move the pointer past what was appended: later appends
		// would count as delivered.
		seq = q.next - 1
	}
	i := 0
	for i < len(q.entries) && q.entries[i].seq <= seq {
		q.bytes -= q.entries[i].size
		if q.entries[i].seg == nil {
			q.memBytes -= q.entries[i].size
		}
		i++
	}
	q.entries = q.entries[i:]
	q.head = seq + 1
	if len(q.entries) == 0 && q.head < q.next {
		q.head = q.next
	}
	return q.releaseSegments()
}

// Sync makes appended records and the delivery pointer durable.
func (q *queue) Sync() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrQueueClosed
	}
	return q.syncLocked(true)
}

// Flush makes appended records durable, and the delivery pointer when it
// was last saved PointerInterval ago: the periodic, SD-card-friendly Sync.
func (q *queue) Flush() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrQueueClosed
	}
	return q.syncLocked(q.opts.Now().Sub(q.savedAt) >= q.opts.PointerInterval)
}

func (q *queue) syncLocked(pointer bool) error {
	for _, s := range q.segs {
		// Records already delivered need no durability: skip the fsync
		// (the common case when online, and the one that wears SD cards).
		if !s.dirty || s.base+uint64(s.count) <= q.head {
			continue
		}
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("queue: sync segment: %w", err)
		}
		s.dirty = false
	}
	if q.dirDirty {
		if err := syncDir(q.dir); err != nil {
			return err
		}
		q.dirDirty = false
	}
	q.unsynced = 0
	if !pointer {
		return nil
	}
	cur := ackState{Next: q.head, Dropped: q.dropped}
	q.savedAt = q.opts.Now()
	if cur != q.saved {
		b, err := json.Marshal(cur)
		if err != nil {
			return fmt.Errorf("queue: encode pointer: %w", err)
		}
		if err := writeFileAtomic(filepath.Join(q.dir, ackFile), b, 0o600); err != nil {
			return fmt.Errorf("queue: save pointer: %w", err)
		}
		q.saved = cur
	}
	return nil
}

// Ready is signalled after an append; a sender waits on it when the queue is empty.
func (q *queue) Ready() <-chan struct{} { return q.ready }

// Stats returns the pending count and size and the total dropped.
func (q *queue) Stats() (pending int, bytes int64, dropped uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.entries), q.bytes, q.dropped
}

// Close syncs and closes the queue. It is idempotent.
func (q *queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	for _, e := range q.entries {
		if e.seg == nil {
			q.dropped++ // held in memory: gone with the process
		}
	}
	err := q.syncLocked(true)
	q.closeFiles()
	q.closed = true
	return err
}

func (q *queue) closeFiles() {
	for _, s := range q.segs {
		_ = s.f.Close()
	}
}
