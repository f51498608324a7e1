package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// Revocation is what a CRL lists of one revoked certificate, read from a
// compact index rather than from the certificate's record: the CRL is
// rebuilt after every revocation, and decoding every revoked record (about
// 1 KB of JSON each) made each revocation slower than the one before.
type Revocation struct {
	Serial    string    // lowercase hex, no leading zeros
	RevokedAt time.Time // UTC
	NotAfter  time.Time // UTC; the zero time if unknown
}

// revocationLen is the size of an entry of bucketRevoked: RevokedAt, then
// NotAfter, each as Unix seconds (8 bytes) and nanoseconds (4 bytes). An
// entry written before the index existed is empty (see indexRevocations).
const revocationLen = 24

func revocationValue(revokedAt, notAfter time.Time) []byte {
	v := make([]byte, 0, revocationLen)
	for _, t := range []time.Time{revokedAt, notAfter} {
		v = binary.BigEndian.AppendUint64(v, uint64(t.Unix()))
		v = binary.BigEndian.AppendUint32(v, uint32(t.Nanosecond()))
	}
	return v
}

func parseRevocation(serial, v []byte) (Revocation, error) {
	switch {
	case len(v) == 0:
		// Left empty by indexRevocations: the record is gone, which only
		// damage does (the record and its entry are deleted together).
		return Revocation{}, fmt.Errorf("revoked serial %s: %w", serial, ErrCertUnknown)
	case len(v) != revocationLen:
		return Revocation{}, fmt.Errorf("revoked serial %s: index entry of %d bytes, want %d", serial, len(v), revocationLen)
	}
	at := func(b []byte) time.Time {
		t := time.Unix(int64(binary.BigEndian.Uint64(b)), int64(binary.BigEndian.Uint32(b[8:]))).UTC()
		if t.Equal(time.Time{}) {
			return time.Time{}
		}
		return t
	}
	return Revocation{Serial: string(serial), RevokedAt: at(v[:12]), NotAfter: at(v[12:])}, nil
}

// putRevocation records c, just revoked, in the CRL index; it must run in
// the transaction that stores c's revoked record.
func putRevocation(tx *bbolt.Tx, c Cert) error {
	if err := tx.Bucket(bucketRevoked).Put([]byte(c.Serial), revocationValue(c.RevokedAt, c.NotAfter)); err != nil {
		return fmt.Errorf("index revoked %s: %w", c.Serial, err)
	}
	return nil
}

// Revocations returns every revoked certificate for the CRL, sorted by
// serial. It reads the revocation index, not the certificate records.
func (db *DB) Revocations(ctx context.Context) ([]Revocation, error) {
	var out []Revocation
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketRevoked).ForEach(func(k, v []byte) error {
			r, err := parseRevocation(k, v)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list revocations: %w", err)
	}
	return out, nil
}

// indexRevocations fills in the index entries of a store written before
// the index existed (or by such a fleetmq since), which are empty, from the
// certificate records. It runs once per Open; on an indexed store it reads
// the index only.
func indexRevocations(tx *bbolt.Tx) error {
	b := tx.Bucket(bucketRevoked)
	var missing []string
	// bbolt forbids writing to a bucket while iterating over it.
	err := b.ForEach(func(k, v []byte) error {
		if len(v) == 0 {
			missing = append(missing, string(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, serial := range missing {
		c, err := getCert(tx, serial)
		if errors.Is(err, ErrCertUnknown) {
			// Damage; Revocations reports it, as reading the records
			// did, rather than keep the server from starting.
			continue
		}
		if err != nil {
			return fmt.Errorf("index revoked certificate %s: %w", serial, err)
		}
		if err := putRevocation(tx, c); err != nil {
			return err
		}
	}
	return nil
}
