package store

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/bbolt"
)

// ErrCAMismatch means the CA a server was started with did not issue the
// identities in the store.
var ErrCAMismatch = errors.New("the CA did not issue this fleet's certificates")

// keyCA records which CA key the fleet's certificates hang off.
var keyCA = []byte("ca_key")

// HasIdentities reports whether any identity (device, service, operator)
// was ever enrolled or issued, revoked ones included.
func (db *DB) HasIdentities(ctx context.Context) (bool, error) {
	var has bool
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		k, _ := tx.Bucket(bucketDevices).Cursor().First()
		has = k != nil
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("has identities: %w", err)
	}
	return has, nil
}

// BoundCA returns the CA key recorded by BindCA, "" if none is. A bound
// store was served, so tokens minted in it may pin its CA even when no
// identity was enrolled yet.
func (db *DB) BoundCA(ctx context.Context) (string, error) {
	var key string
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		key = string(tx.Bucket(bucketMeta).Get(keyCA))
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("bound CA: %w", err)
	}
	return key, nil
}

// BindCA ties the store to the CA key identified by keyID (e.g. a hash of
// its public key): the first call records it, later calls fail with
// ErrCAMismatch for another one. A server started on the right database
// with the wrong CA would issue certificates no one else trusts and refuse
// every device it has; better to refuse to start. A store from before
// binding existed is bound by its first call.
func (db *DB) BindCA(ctx context.Context, keyID string) error {
	return db.update(ctx, func(tx *bbolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		switch was := meta.Get(keyCA); {
		case was == nil:
			return meta.Put(keyCA, []byte(keyID))
		case string(was) != keyID:
			return fmt.Errorf("%w: its certificates were issued by the CA key %s, not %s", ErrCAMismatch, was, keyID)
		}
		return nil
	})
}
