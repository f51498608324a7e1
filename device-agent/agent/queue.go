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
// which at-least-once delivery allows. At open, corrupt records followed by
// valid ones are overwritten with tombstones (records with an empty topic)
// and the valid ones kept; a torn or corrupt tail is cut off. The records
// lost either way are counted as dropped. Segments are removed once every
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
	memOnly  bool // see newMemoryQueue
	// dropsLoggedAt is when drops were last logged, dropsUnlogged how
	// many came since (see logDrops).
	dropsLoggedAt time.Time
	dropsUnlogged int
}

type ackState struct {
	Next    uint64 `json:"next"`
	Dropped uint64 `json:"dropped"`
}

func (opts QueueOptions) withDefaults() QueueOptions {
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
	return opts
}

// errMemoryOnly is why a memory-only queue holds every record in memory.
var errMemoryOnly = errors.New("queue: the on-disk queue could not be opened at start")

// newMemoryQueue returns a queue that never touches the disk, for a state
// folder on a read-only file system (a card the kernel remounted after I/O
// errors), where openQueue cannot even open the segments: records are held
// in memory within MemoryBytes (see appendMemory), and the records queued
// on disk are left as they are, for the next start that can write. Its
// sequence numbers have nothing to do with theirs, so it must never write
// the delivery pointer either.
func newMemoryQueue(opts QueueOptions) *queue {
	opts = opts.withDefaults()
	return &queue{opts: opts, log: opts.Logger, ready: make(chan struct{}, 1), memOnly: true}
}

// openQueue opens or creates the queue in dir, recovering from a crash.
func openQueue(dir string, opts QueueOptions) (*queue, error) {
	opts = opts.withDefaults()
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
	off, err := q.indexRecords(s, 0)
	if err != nil {
		f.Close()
		return err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat queue segment: %w", err)
	}
	if st.Size() > off {
		if off, err = q.repairSegment(s, name, off, st.Size(), nextBase); err != nil {
			f.Close()
			return err
		}
	}
	if st.Size() > off {
		// A crash mid-append (or bit rot with no whole record after it)
		// left a tail that is not a whole valid record. Cutting it keeps
		// later scans simple; the records it held are lost, and counted as
		// dropped like those the bounds drop, so `status` shows the loss.
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

// indexRecords adds the whole valid records of s from offset off on to the
// queue, and returns the offset where they stop: the end of the file, or
// the first record that is torn or fails its checksum. Tombstones take
// their seq but are not queued.
func (q *queue) indexRecords(s *segment, off int64) (int64, error) {
	hdr := make([]byte, recordHeader)
	var body []byte
	for {
		if _, err := s.f.ReadAt(hdr, off); err != nil {
			if !errors.Is(err, io.EOF) {
				return off, fmt.Errorf("read queue segment: %w", err)
			}
			return off, nil // clean end, or a torn header
		}
		n := binary.LittleEndian.Uint32(hdr[0:4])
		if n < 2 || n > maxRecordBody {
			return off, nil
		}
		body = slices.Grow(body[:0], int(n))[:n]
		if _, err := s.f.ReadAt(body, off+recordHeader); err != nil {
			if !errors.Is(err, io.EOF) {
				return off, fmt.Errorf("read queue segment: %w", err)
			}
			return off, nil
		}
		if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(hdr[4:8]) {
			return off, nil
		}
		size := int64(recordHeader) + int64(n)
		if binary.LittleEndian.Uint16(body[0:2]) != 0 {
			q.entries = append(q.entries, qentry{seq: s.base + uint64(s.count), seg: s, off: off, size: size})
		}
		s.count++
		off += size
	}
}

// A tombstone is a valid record with an empty topic, which Append never
// writes: it stands in for records lost to corruption in the middle of a
// segment, so that the records after them keep their seqs (a segment's
// records are numbered by position) and a later open finds nothing to
// repair, nor to count as dropped again.
const minTombstone = recordHeader + 2

// tombstones returns n tombstones filling exactly size bytes, or false
// when they cannot.
func tombstones(size int64, n uint64) ([]byte, bool) {
	if n == 0 || size < int64(n)*minTombstone || size > int64(n)*(recordHeader+maxRecordBody) {
		return nil, false
	}
	b := make([]byte, size)
	each, rest := size/int64(n), size%int64(n)
	var off int64
	for i := range int64(n) {
		rs := each
		if i < rest {
			rs++
		}
		rec := b[off : off+rs]
		binary.LittleEndian.PutUint32(rec[0:4], uint32(rs-recordHeader))
		binary.LittleEndian.PutUint32(rec[4:8], crc32.Checksum(rec[recordHeader:], crcTable))
		off += rs
	}
	return b, true
}

// recordAt returns the size of the whole valid record at b[i:], or 0.
func recordAt(b []byte, i int) int {
	if len(b)-i < recordHeader {
		return 0
	}
	n := int(binary.LittleEndian.Uint32(b[i : i+4]))
	if n < 2 || n > maxRecordBody || n > len(b)-i-recordHeader {
		return 0
	}
	body := b[i+recordHeader : i+recordHeader+n]
	if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(b[i+4:i+8]) {
		return 0
	}
	return recordHeader + n
}

// damage is a stretch of a segment that holds no valid record, followed by
// after valid records.
type damage struct {
	off, end int  // within the bytes scanned
	exact    bool // the bad record's own length ends where the next valid one starts: one record
	after    int
}

// scanDamage walks b, the bytes of a segment from a record that failed
// its checks to the end, and finds where valid records start again. It
// returns the damaged stretches in order and where a tail with no valid
// record left starts (len(b) if there is none). A false start needs a
// plausible length and a matching CRC-32C at a random offset: about one
// chance in 2^32 per candidate.
func scanDamage(b []byte) (ds []damage, tail int) {
	p := 0 // a bad record starts here
	for p < len(b) {
		next := -1
		for i := p + 1; i <= len(b)-minTombstone; i++ {
			if recordAt(b, i) > 0 {
				next = i
				break
			}
		}
		if next < 0 {
			return ds, p
		}
		d := damage{off: p, end: next}
		if len(b)-p >= recordHeader {
			d.exact = p+recordHeader+int(binary.LittleEndian.Uint32(b[p:p+4])) == next
		}
		p = next
		for {
			n := recordAt(b, p)
			if n == 0 {
				break
			}
			d.after++
			p += n
		}
		ds = append(ds, d)
	}
	return ds, len(b)
}

// repairSegment deals with a segment whose record at off (of size bytes)
// is torn or corrupt: bit rot, or a sector lost to a power cut, must not
// cost the records after it. Each damaged stretch followed by valid records
// is overwritten with tombstones, as many as the records it held (exact
// when the bad record's length is intact, or when the next segment's name
// tells; else one, or enough to deliver again rather than lose what the
// delivery pointer may not cover), and counted as dropped; the records
// after it are kept. It returns the offset of the tail left to cut: off
// itself when it repairs nothing.
func (q *queue) repairSegment(s *segment, name string, off, size int64, nextBase *uint64) (int64, error) {
	if size-off > q.opts.SegmentBytes+recordHeader+maxRecordBody {
		return off, nil // larger than any segment Append writes: not worth reading in
	}
	b := make([]byte, size-off)
	if _, err := s.f.ReadAt(b, off); err != nil {
		return off, fmt.Errorf("read queue segment: %w", err)
	}
	ds, tail := scanDamage(b)
	if len(ds) == 0 {
		return off, nil
	}
	first := s.base + uint64(s.count) // seq of the first damaged record
	counts := make([]uint64, len(ds))
	exact := make([]bool, len(ds))
	if nextBase != nil {
		// The next segment's name says how many records this one held.
		slots, kept := uint64(len(ds)), uint64(0)
		if tail < len(b) {
			slots++ // the tail: counted when cut
		}
		for _, d := range ds {
			kept += uint64(d.after)
		}
		if *nextBase < first || *nextBase-first < slots+kept {
			return off, nil // the names disagree with what is there: cut all
		}
		extra := *nextBase - first - kept - slots
		for i, d := range ds {
			counts[i], exact[i] = 1, d.exact
		}
		if tail == len(b) {
			last := len(ds) - 1
			counts[last] += extra
			exact[last] = true
		}
	} else {
		seq := first
		for i, d := range ds {
			counts[i], exact[i] = 1, d.exact
			if !d.exact && q.head > seq+1 {
				// How many records the stretch held is unknown, and the
				// pointer is past it: numbering the records after it too
				// low would count undelivered ones as delivered. Deliver
				// them again instead.
				counts[i] = min(q.head-seq, uint64((d.end-d.off)/minTombstone))
			}
			seq += counts[i] + uint64(d.after)
		}
	}
	// Checked for every stretch before any is written: a repair given up
	// halfway would leave tombstones in the tail that is then cut.
	tombs := make([][]byte, len(ds))
	for i, d := range ds {
		var ok bool
		if tombs[i], ok = tombstones(int64(d.end-d.off), counts[i]); !ok {
			return off, nil
		}
	}
	seq := first
	for i, d := range ds {
		if _, err := s.f.WriteAt(tombs[i], off+int64(d.off)); err != nil {
			return off, fmt.Errorf("repair queue segment: %w", err)
		}
		lost := counts[i]
		if q.head > seq {
			lost -= min(q.head-seq, counts[i]) // delivered before: not lost
		}
		q.dropped += lost
		q.log.Warn().Str("segment", name).Int64("offset", off+int64(d.off)).Int("bytes", d.end-d.off).
			Uint64("records", counts[i]).Bool("count_exact", exact[i]).Uint64("dropped", lost).Int("kept_after", d.after).
			Msg("queue: skipping corrupt records; the records after them are kept")
		seq += counts[i] + uint64(d.after)
	}
	if err := s.f.Sync(); err != nil {
		return off, fmt.Errorf("sync queue segment: %w", err)
	}
	return q.indexRecords(s, off)
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
	if topic == "" {
		return errors.New("queue: empty topic") // the mark of a tombstone
	}
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
		q.logDrops("queue full: dropped oldest messages", dropped)
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
		q.logDrops("queue memory full: dropped oldest messages", dropped)
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

// dropLogInterval bounds how often dropping is logged: a full queue drops
// a message at every sample for as long as the device stays offline, and
// the journal may be on the SD card. status counts every drop.
const dropLogInterval = time.Hour

// logDrops logs n messages dropped, at once if it has not for
// dropLogInterval, else later, summed up with the drops that follow.
func (q *queue) logDrops(msg string, n int) {
	q.dropsUnlogged += n
	now := q.opts.Now()
	if !q.dropsLoggedAt.IsZero() && now.Sub(q.dropsLoggedAt) < dropLogInterval {
		return
	}
	q.log.Warn().Int("dropped", q.dropsUnlogged).Uint64("dropped_total", q.dropped).
		Msg(msg + " (logged at most once an hour)")
	q.dropsLoggedAt, q.dropsUnlogged = now, 0
}

// tail returns the segment to append to, starting a new one when needed.
func (q *queue) tail() (*segment, error) {
	if q.memOnly {
		return nil, errMemoryOnly
	}
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
	if q.memOnly {
		return nil
	}
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
