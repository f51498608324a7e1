package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// certPruneExamined is the most certificate records one transaction of
// PruneCerts looks at: every record is decoded, and the writer waits
// meanwhile. A variable for tests only.
var certPruneExamined = 2_000

// PruneCerts deletes the records of certificates that expired before
// before — with their index entries and their place on the CRL — except
// each identity's current certificate, which says why a device that comes
// back after years is refused. Every renewal adds a record; without this a
// fleet's database grows by about 1 KB per renewal for good. It works in
// transactions of at most certPruneExamined records and returns how many
// it deleted.
func (db *DB) PruneCerts(ctx context.Context, before time.Time) (int, error) {
	n, err := db.pruneInSteps(ctx, func(tx *bbolt.Tx, resume []byte) (int, []byte, error) {
		return pruneCertsTx(tx, resume, before)
	})
	if err != nil {
		return n, fmt.Errorf("prune certificates: %w", err)
	}
	return n, nil
}

// pruneInSteps runs step in one write transaction after another, each
// from the key the last one stopped at (nil: the first), until one
// returns no key to go on from; it returns how many records they deleted.
// Short transactions keep the writer free for telemetry between steps.
func (db *DB) pruneInSteps(ctx context.Context, step func(tx *bbolt.Tx, resume []byte) (int, []byte, error)) (int, error) {
	total := 0
	var resume []byte
	for {
		var deleted int
		var next []byte
		err := db.update(ctx, func(tx *bbolt.Tx) error {
			// Outputs are assigned at the end of each run: this may run twice.
			n, k, err := step(tx, resume)
			deleted, next = n, k
			return err
		})
		if err != nil {
			return total, err
		}
		total += deleted
		if next == nil {
			return total, nil
		}
		resume = next
	}
}

// pruneCertsTx prunes from the index key resume on, and returns how many
// records it deleted and the key to go on from (nil: done).
func pruneCertsTx(tx *bbolt.Tx, resume []byte, before time.Time) (int, []byte, error) {
	idx := tx.Bucket(bucketDeviceCerts)
	c := idx.Cursor()
	k, _ := c.First()
	if resume != nil {
		k, _ = c.Seek(resume)
	}
	var (
		doomed   [][]byte // index keys, deleted after the walk
		examined int
		lastID   string
		current  string // lastID's current serial
	)
	for ; k != nil; k, _ = c.Next() {
		if examined == certPruneExamined {
			next := bytes.Clone(k)
			return len(doomed), next, deleteCerts(tx, doomed)
		}
		examined++
		id, serial, ok := splitDeviceCertKey(k)
		if !ok {
			return 0, nil, fmt.Errorf("malformed certificate index key %x", k)
		}
		if id != lastID {
			d, err := getDevice(tx, id)
			if err != nil {
				return 0, nil, fmt.Errorf("identity %s of certificate %s: %w", id, serial, err)
			}
			lastID, current = id, d.Serial
		}
		if serial == current {
			continue
		}
		cert, err := getCert(tx, serial)
		if err != nil {
			return 0, nil, fmt.Errorf("indexed serial %s: %w", serial, err)
		}
		if cert.NotAfter.Before(before) {
			doomed = append(doomed, bytes.Clone(k))
		}
	}
	return len(doomed), nil, deleteCerts(tx, doomed)
}

// deleteCerts deletes the certificates of the given index keys: record,
// index entry and CRL entry.
func deleteCerts(tx *bbolt.Tx, keys [][]byte) error {
	certs, idx, rev := tx.Bucket(bucketCerts), tx.Bucket(bucketDeviceCerts), tx.Bucket(bucketRevoked)
	for _, k := range keys {
		_, serial, _ := splitDeviceCertKey(k)
		err := certs.Delete([]byte(serial))
		if err == nil {
			err = rev.Delete([]byte(serial))
		}
		if err == nil {
			err = idx.Delete(k)
		}
		if err != nil {
			return fmt.Errorf("delete certificate %s: %w", serial, err)
		}
	}
	return nil
}

// splitDeviceCertKey undoes deviceCertKey.
func splitDeviceCertKey(k []byte) (id, serial string, ok bool) {
	if len(k) < 4 {
		return "", "", false
	}
	n := binary.BigEndian.Uint32(k)
	if uint64(len(k)-4) < uint64(n) {
		return "", "", false
	}
	return string(k[4 : 4+n]), string(k[4+n:]), true
}
