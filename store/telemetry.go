package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"time"

	"go.etcd.io/bbolt"
)

// Telemetry value layout, after the 16-byte key (Received UnixNano, sequence):
//
//	version (1) | qos (1) | uvarint len(topic) | topic | payload
const telemetryV1 = 1

// pruneChunk is the most deletes, and pruneDevices the most devices,
// PruneTelemetry puts in one transaction, so that telemetry writers queued
// behind it wait for milliseconds, not seconds. Each device costs a look
// at its first page, a disk read when the cache is cold (after a reboot):
// 22,000 devices in one transaction held every write for 3 s.
const (
	pruneChunk   = 2_000
	pruneDevices = 500
)

var (
	minTime = time.Unix(0, 0)
	maxTime = time.Unix(0, math.MaxInt64)
)

// nanoKey is t as an 8-byte big-endian key prefix that sorts like time, with
// times before 1970 clamped to 0 and after 2262 to the largest key.
func nanoKey(t time.Time) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 16), nanoUint(t))
}

// nanoUint is the number nanoKey encodes.
func nanoUint(t time.Time) uint64 {
	switch {
	case t.Before(minTime):
		return 0
	case t.After(maxTime):
		return math.MaxInt64
	}
	return uint64(t.UnixNano())
}

// encodedLen bounds the length of m's encoded value.
func encodedLen(m Message) int {
	return 2 + binary.MaxVarintLen64 + len(m.Topic) + len(m.Payload)
}

func appendMessage(v []byte, m Message) []byte {
	v = append(v, telemetryV1, m.QoS)
	v = binary.AppendUvarint(v, uint64(len(m.Topic)))
	v = append(v, m.Topic...)
	return append(v, m.Payload...)
}

// decodeMessage copies everything out of k and v, which belong to the
// transaction.
func decodeMessage(deviceID string, k, v []byte) (Message, error) {
	if len(k) != 16 || len(v) < 3 || v[0] != telemetryV1 {
		return Message{}, fmt.Errorf("decode telemetry of %s: bad record", deviceID)
	}
	n, w := binary.Uvarint(v[2:])
	if w <= 0 || n > uint64(len(v)-2-w) {
		return Message{}, fmt.Errorf("decode telemetry of %s: bad topic length", deviceID)
	}
	off := 2 + w
	return Message{
		DeviceID: deviceID,
		Topic:    string(v[off : off+int(n)]),
		Received: time.Unix(0, int64(binary.BigEndian.Uint64(k[:8]))).UTC(),
		QoS:      v[1],
		Payload:  bytes.Clone(v[off+int(n):]),
	}, nil
}

// AppendTelemetry stores msgs; when it returns nil they are on disk. Every
// message needs a DeviceID and a Received time after 1970.
func (db *DB) AppendTelemetry(ctx context.Context, msgs []Message) error {
	if len(msgs) == 0 {
		return nil
	}
	for _, m := range msgs {
		if m.DeviceID == "" || m.Received.Before(minTime) || m.Received.After(maxTime) {
			return fmt.Errorf("append telemetry: message without device id or with received %s: %w", m.Received, ErrInvalid)
		}
	}
	// bbolt keeps the key and value slices until the commit: every
	// message's key and value are cut from one allocation.
	size := 0
	for _, m := range msgs {
		size += 16 + encodedLen(m)
	}
	err := db.update(ctx, func(tx *bbolt.Tx) error {
		arena := make([]byte, 0, size)
		tb := tx.Bucket(bucketTelemetry)
		var b *bbolt.Bucket
		var last string
		for _, m := range msgs {
			if b == nil || m.DeviceID != last {
				var err error
				if b, err = tb.CreateBucketIfNotExists([]byte(m.DeviceID)); err != nil {
					return fmt.Errorf("telemetry bucket of %s: %w", m.DeviceID, err)
				}
				b.FillPercent = 0.9 // keys mostly grow with time
				last = m.DeviceID
			}
			seq, err := b.NextSequence()
			if err != nil {
				return fmt.Errorf("telemetry sequence: %w", err)
			}
			start := len(arena)
			arena = binary.BigEndian.AppendUint64(arena, nanoUint(m.Received))
			arena = binary.BigEndian.AppendUint64(arena, seq)
			arena = appendMessage(arena, m)
			k, v := arena[start:start+16:start+16], arena[start+16:len(arena):len(arena)]
			if err := b.Put(k, v); err != nil {
				return fmt.Errorf("put telemetry of %s: %w", m.DeviceID, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("append telemetry: %w", err)
	}
	return nil
}

// Telemetry returns the newest limit (0 means 1000) messages of deviceID
// received at or after since, oldest first.
func (db *DB) Telemetry(ctx context.Context, deviceID string, since time.Time, limit int) ([]Message, error) {
	if limit <= 0 {
		limit = 1000
	}
	from := nanoKey(since)
	var out []Message
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketTelemetry).Bucket([]byte(deviceID))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.Last(); k != nil && len(out) < limit; k, v = c.Prev() {
			if len(k) != 16 {
				return fmt.Errorf("telemetry of %s: bad key %x", deviceID, k)
			}
			if bytes.Compare(k[:8], from) < 0 {
				break
			}
			m, err := decodeMessage(deviceID, k, v)
			if err != nil {
				return err
			}
			out = append(out, m)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read telemetry of %s: %w", deviceID, err)
	}
	slices.Reverse(out)
	return out, nil
}

// TelemetryAfter returns at most limit (0 means 1000) messages of deviceID
// received strictly after after, oldest first: the next page for a follower.
func (db *DB) TelemetryAfter(ctx context.Context, deviceID string, after time.Time, limit int) ([]Message, error) {
	if limit <= 0 {
		limit = 1000
	}
	if !after.Before(maxTime) {
		return nil, nil
	}
	from := nanoKey(after)
	if !after.Before(minTime) {
		from = nanoKey(after.Add(time.Nanosecond))
	}
	var out []Message
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketTelemetry).Bucket([]byte(deviceID))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.Seek(from); k != nil && len(out) < limit; k, v = c.Next() {
			m, err := decodeMessage(deviceID, k, v)
			if err != nil {
				return err
			}
			out = append(out, m)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read telemetry of %s: %w", deviceID, err)
	}
	return out, nil
}

// PruneTelemetry deletes every message received before before, and every
// message beyond the newest maxPerDevice of its device (0: no count cap). It
// works in transactions of at most pruneChunk deletes so that writers are
// never stalled for long, and returns how many messages it deleted. A device
// left without messages loses its bucket.
//
// The work in the write transactions is one step per device plus one per
// delete, not one per stored message: each device's message count is
// known from a count taken once per process in read transactions (which
// do not hold up the writer) and the bucket's sequence since, as every
// message appended takes one sequence number and only this deletes.
func (db *DB) PruneTelemetry(ctx context.Context, before time.Time, maxPerDevice int) (int, error) {
	cut := nanoKey(before)
	if maxPerDevice < 0 {
		maxPerDevice = 0
	}
	if maxPerDevice > 0 {
		if err := db.countTelemetry(ctx); err != nil {
			return 0, fmt.Errorf("prune telemetry: %w", err)
		}
	}
	db.countsMu.Lock()
	defer db.countsMu.Unlock()
	total := 0
	var resume []byte // device to continue with; nil: from the first
	for {
		var res pruneResult
		err := db.update(ctx, func(tx *bbolt.Tx) error {
			// Outputs are assigned at the end of each run: this may run twice.
			r, err := pruneChunkTx(tx, resume, cut, maxPerDevice, db.counts)
			res = r
			return err
		})
		if err != nil {
			return total, fmt.Errorf("prune telemetry: %w", err)
		}
		for name, m := range res.counts {
			db.counts[name] = m
		}
		for _, name := range res.gone {
			delete(db.counts, name)
		}
		total += res.deleted
		if res.done {
			return total, nil
		}
		resume = res.next
	}
}

// countMark is a device's number of stored messages when its bucket's
// sequence was seq: it holds n + (Sequence() - seq) messages now.
type countMark struct{ seq, n uint64 }

// countTelemetry counts the messages of each device not yet counted by
// this process, one read transaction per device.
func (db *DB) countTelemetry(ctx context.Context) error {
	db.countsMu.Lock()
	defer db.countsMu.Unlock()
	var todo [][]byte
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketTelemetry).ForEachBucket(func(name []byte) error {
			if _, ok := db.counts[string(name)]; !ok {
				todo = append(todo, bytes.Clone(name))
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("list telemetry buckets: %w", err)
	}
	for _, name := range todo {
		err := db.view(ctx, func(tx *bbolt.Tx) error {
			if b := tx.Bucket(bucketTelemetry).Bucket(name); b != nil {
				// Stats counts a page at a time, not a key at a time.
				db.counts[string(name)] = countMark{seq: b.Sequence(), n: uint64(b.Stats().KeyN)}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("count telemetry of %s: %w", name, err)
		}
	}
	return nil
}

type pruneResult struct {
	deleted int
	next    []byte // device to resume with
	done    bool   // every device has been pruned
	counts  map[string]countMark
	gone    []string // devices whose bucket was deleted
}

// pruneChunkTx deletes up to pruneChunk messages, device by device from
// resume. counts is read, never written: the caller applies the result's
// counts once the transaction has committed.
func pruneChunkTx(tx *bbolt.Tx, resume, cut []byte, maxPerDevice int, counts map[string]countMark) (pruneResult, error) {
	tb := tx.Bucket(bucketTelemetry)
	res := pruneResult{counts: make(map[string]countMark)}
	var empty [][]byte
	dc := tb.Cursor()
	name, v := dc.First()
	if resume != nil {
		name, v = dc.Seek(resume)
	}
	devices := 0
	for ; name != nil; name, v = dc.Next() {
		if v != nil {
			continue // not a bucket
		}
		if devices == pruneDevices {
			res.next = bytes.Clone(name)
			return res, deleteBuckets(tb, empty)
		}
		devices++
		b := tb.Bucket(name)
		// excess is how many messages are over the count cap.
		var excess, count uint64
		if maxPerDevice > 0 {
			m, ok := counts[string(name)]
			if !ok {
				// Created since the count: small, counted here.
				m = countMark{seq: b.Sequence(), n: uint64(b.Stats().KeyN)}
			}
			count = m.n + (b.Sequence() - m.seq)
			excess = max(count, uint64(maxPerDevice)) - uint64(maxPerDevice)
		}
		var doomed [][]byte
		c := b.Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if len(k) != 16 {
				return pruneResult{}, fmt.Errorf("telemetry of %s: bad key %x", name, k)
			}
			if bytes.Compare(k[:8], cut) >= 0 && uint64(len(doomed)) >= excess {
				break
			}
			if res.deleted+len(doomed) == pruneChunk {
				break
			}
			doomed = append(doomed, bytes.Clone(k))
		}
		for _, k := range doomed {
			if err := b.Delete(k); err != nil {
				return pruneResult{}, fmt.Errorf("delete telemetry of %s: %w", name, err)
			}
		}
		res.deleted += len(doomed)
		if k, _ := b.Cursor().First(); k == nil {
			empty = append(empty, bytes.Clone(name))
			res.gone = append(res.gone, string(name))
		} else if maxPerDevice > 0 {
			res.counts[string(name)] = countMark{seq: b.Sequence(), n: count - uint64(len(doomed))}
		}
		if res.deleted == pruneChunk {
			res.next = bytes.Clone(name)
			return res, deleteBuckets(tb, empty)
		}
	}
	res.done = true
	return res, deleteBuckets(tb, empty)
}

func deleteBuckets(tb *bbolt.Bucket, names [][]byte) error {
	for _, name := range names {
		if err := tb.DeleteBucket(name); err != nil {
			return fmt.Errorf("delete empty telemetry bucket %s: %w", name, err)
		}
	}
	return nil
}

// SetPresence stores the connection state of each device in ps.
func (db *DB) SetPresence(ctx context.Context, ps ...Presence) error {
	if len(ps) == 0 {
		return nil
	}
	for _, p := range ps {
		if p.DeviceID == "" {
			return fmt.Errorf("set presence: empty device id: %w", ErrInvalid)
		}
	}
	err := db.update(ctx, func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketPresence)
		for _, p := range ps {
			if err := putJSON(b, []byte(p.DeviceID), p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("set presence: %w", err)
	}
	return nil
}

// Presences returns the last known state of every device, by device id.
func (db *DB) Presences(ctx context.Context) (map[string]Presence, error) {
	out := make(map[string]Presence)
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketPresence).ForEach(func(k, v []byte) error {
			var p Presence
			if err := json.Unmarshal(v, &p); err != nil {
				return fmt.Errorf("decode presence of %s: %w", k, err)
			}
			out[string(k)] = p
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read presences: %w", err)
	}
	return out, nil
}
