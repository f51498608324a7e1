package enroll

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
)

// WriteFileAtomic replaces path with data so that a reader, or the file
// system after a power cut (normal on an SD card), sees either the old file
// or the complete new one. The temporary file lives in the same directory so
// that the rename cannot cross file systems, and gets perm before any byte of
// data is written so that a secret is never readable with looser permissions.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: create temp file: %w", path, err)
	}
	tmp := f.Name()
	closed := false
	defer func() {
		if err == nil {
			return
		}
		if !closed {
			_ = f.Close()
		}
		_ = os.Remove(tmp)
	}()

	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: chmod temp file: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: sync temp file: %w", path, err)
	}
	closed = true
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: close temp file: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: rename temp file: %w", path, err)
	}
	// Without this the rename itself may be lost on power failure.
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// SyncDir flushes dir's entries to disk, so that a file created or renamed
// in it survives a power failure.
func SyncDir(dir string) error {
	if runtime.GOOS == "windows" {
		// Directories cannot be opened for syncing on Windows; NTFS
		// journals the rename instead.
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir for sync: %w", err)
	}
	serr := d.Sync()
	cerr := d.Close()
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	return nil
}
