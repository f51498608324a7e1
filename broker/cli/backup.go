package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// BackupResult is what `fleetmq backup --json` prints.
type BackupResult struct {
	Dir        string `json:"dir"`
	Bytes      int64  `json:"bytes"`
	Identities int    `json:"identities"`
	// CAIncluded is false when the server uses an operator-provided CA
	// (--ca-cert, --ca-key) kept outside the data folder.
	CAIncluded bool `json:"ca_included"`
}

// caFiles are the generated CA's files in a data folder, with their modes.
var caFiles = []struct {
	name string
	mode os.FileMode
}{{"ca.pem", 0o644}, {"ca.key", 0o600}}

// backupCmd writes a backup of a running server as a data folder: the
// database copied from a consistent snapshot and checked, plus the
// generated CA's files, so `fleetmq serve --data DIR` restores it.
func backupCmd(ctx context.Context, args []string, env Env) (err error) {
	fset := newFlags("backup", env)
	if err := fset.parse(args, 1); err != nil {
		return err
	}
	dir := fset.Arg(0)
	if in, err := inside(dir, *fset.data); err != nil {
		return fmt.Errorf("backup folder: %w", err)
	} else if in {
		return usagef("backup folder %s is inside the data folder %s: a backup must survive losing it", dir, *fset.data)
	}
	created, unlock, err := backupDir(dir)
	if err != nil {
		return err
	}
	var written []string
	defer func() {
		if err != nil {
			for _, p := range written {
				_ = os.Remove(p)
			}
			if created {
				_ = os.Remove(dir)
			}
		}
		unlock()
	}()

	dbPath := filepath.Join(dir, server.DBName)
	partial := dbPath + ".partial"
	written = append(written, partial)
	_, at, err := fetchBackup(ctx, fset, partial)
	if err != nil {
		return err
	}
	ids, err := checkBackup(ctx, partial, at)
	if err != nil {
		return err
	}
	n, err := keep(os.Link, partial, dbPath)
	if err != nil {
		return err
	}
	written = append(written, dbPath)

	res := BackupResult{Dir: dir, Bytes: n, Identities: ids}
	res.CAIncluded, err = servesGeneratedCA(ctx, fset)
	if err != nil {
		return err
	}
	if res.CAIncluded {
		copied, err := copyCA(*fset.data, dir)
		written = append(written, copied...)
		if err != nil {
			return err
		}
	}
	if err := enroll.SyncDir(dir); err != nil {
		return fmt.Errorf("backup: %w", err)
	}

	if *fset.json {
		return printJSON(env.Stdout, res)
	}
	noun := "identities"
	if ids == 1 {
		noun = "identity"
	}
	fmt.Fprintf(env.Stdout, "backup of %d %s (%s) in %s\n", ids, noun, sizeString(n), dir)
	if !res.CAIncluded {
		fmt.Fprintln(env.Stdout, "the CA is not in the data folder (--ca-cert, --ca-key): keep its files with this backup")
	}
	fmt.Fprintf(env.Stdout, "to restore: stop fleetmq, then run it with --data %s and the other serve flags it had (--hostname…)\n", dir)
	return nil
}

// inside reports whether path is dir or below it, as the kernel resolves
// them: through a symlink, a backup "elsewhere" may be in the data folder.
func inside(path, dir string) (bool, error) {
	p, err := realPath(path)
	if err != nil {
		return false, err
	}
	d, err := realPath(dir)
	if err != nil {
		return false, err
	}
	rel, err := filepath.Rel(d, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../"), nil
}

// realPath is the absolute path with every symlink resolved, also when its
// last components do not exist yet (a backup folder to create): the
// nearest existing ancestor is resolved and the rest appended. It splits
// off components without cleaning, since "link/.." is the parent of the
// link's target, not the folder holding the link.
func realPath(path string) (string, error) {
	p := path
	var rest []string
	for {
		r, err := filepath.EvalSymlinks(p)
		if err == nil {
			slices.Reverse(rest)
			return filepath.Abs(filepath.Join(append([]string{r}, rest...)...))
		}
		if !errors.Is(err, fs.ErrNotExist) || p == "." || p == "/" {
			return "", fmt.Errorf("resolve %s: %w", path, err)
		}
		switch i := strings.LastIndexByte(p, '/'); {
		case i < 0:
			p, rest = ".", append(rest, p)
		case i == 0:
			p, rest = "/", append(rest, p[1:])
		default:
			p, rest = p[:i], append(rest, p[i+1:])
		}
	}
}

// copyCA copies the generated CA's files from the data folder into dir and
// returns the paths it wrote, also on failure.
func copyCA(data, dir string) ([]string, error) {
	var written []string
	for _, f := range caFiles {
		b, err := os.ReadFile(filepath.Join(data, f.name))
		if err != nil {
			return written, fmt.Errorf("backup the CA: %w", err)
		}
		dst := filepath.Join(dir, f.name)
		if err := enroll.WriteFileAtomic(dst, b, f.mode); err != nil {
			return written, fmt.Errorf("backup the CA: %w", err)
		}
		written = append(written, dst)
	}
	return written, nil
}

// servesGeneratedCA reports whether the server's CA is the one generated in
// its data folder. With --ca-cert the folder may still hold a CA generated
// before; copying that one would restore the wrong CA.
func servesGeneratedCA(ctx context.Context, fset flagSet) (bool, error) {
	b, err := os.ReadFile(filepath.Join(*fset.data, caFiles[0].name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("backup the CA: %w", err)
	}
	info, err := fset.client().CA(ctx)
	if err != nil {
		return false, err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return false, nil
	}
	sum := sha256.Sum256(block.Bytes)
	return hex.EncodeToString(sum[:]) == info.Fingerprint, nil
}

// backupDir makes sure dir exists and is empty, creating it (0700) if
// missing: a backup never overwrites anything. It locks dir until unlock
// is called, so that another backup into it fails at once instead of
// taking this one's fleetmq.db.partial for a leftover.
func backupDir(dir string) (created bool, unlock func(), err error) {
	if err := os.Mkdir(dir, 0o700); err == nil {
		created = true
	} else if !errors.Is(err, fs.ErrExist) {
		return false, nil, fmt.Errorf("backup folder: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return false, nil, fmt.Errorf("backup folder: %w", err)
	}
	if fi, err := d.Stat(); err != nil || !fi.IsDir() {
		d.Close()
		if err != nil {
			return false, nil, fmt.Errorf("backup folder: %w", err)
		}
		return false, nil, usagef("backup folder %s is a file, not a folder: give a new or empty folder", dir)
	}
	// flock, not a lock file: the kernel drops it when a backup is killed,
	// so a killed backup never blocks the next one.
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		d.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			// Not ours to remove, even if we created it: the other
			// backup is writing into it.
			return false, nil, usagef("backup folder %s: another fleetmq backup is writing into it; wait for it, or choose another folder", dir)
		}
		return false, nil, fmt.Errorf("backup folder %s: lock: %w", dir, err)
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	entries, err := d.ReadDir(-1)
	if err != nil {
		return false, nil, fmt.Errorf("backup folder: %w", err)
	}
	if len(entries) == 1 && entries[0].Name() == server.DBName+".partial" && entries[0].Type().IsRegular() {
		// What a backup killed mid-copy (SIGKILL, power loss) leaves:
		// its own unfinished file, never a usable backup. The lock says
		// no running backup is writing it.
		if err := os.Remove(filepath.Join(dir, entries[0].Name())); err != nil {
			return false, nil, fmt.Errorf("backup folder: remove an unfinished backup: %w", err)
		}
		return created, func() { d.Close() }, nil
	}
	if len(entries) > 0 {
		return false, nil, usagef("backup folder %s is not empty; a backup never overwrites files", dir)
	}
	return created, func() { d.Close() }, nil
}

// keep gives the checked copy at partial its final name dst and returns
// its size. A link, not a rename: a rename would replace a file at dst
// that something else put there, and a backup never overwrites. Where the
// file system has no hard links (FAT and exFAT, the usual USB stick), link
// fails with EPERM and the copy is copied instead, as exclusively. link is
// os.Link but in tests.
func keep(link func(oldname, newname string) error, partial, dst string) (int64, error) {
	err := link(partial, dst)
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
		err = copyExclusive(partial, dst)
	}
	if err != nil {
		return 0, fmt.Errorf("backup: keep the checked copy: %w", err)
	}
	// The copy's size, not the stream's: marking it as a snapshot may
	// have grown it.
	fi, err := os.Stat(dst)
	if err == nil {
		err = os.Remove(partial)
	}
	if err != nil {
		_ = os.Remove(dst) // ours: the link above made it
		return 0, fmt.Errorf("backup: %w", err)
	}
	return fi.Size(), nil
}

// copyExclusive copies src to a new file dst, flushed to disk; a file at
// dst is an error (fs.ErrExist) and is left as it was.
func copyExclusive(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.Remove(dst) // ours: O_EXCL made it
		}
	}()
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// fetchBackup streams the server's snapshot into a new file at path and
// flushes it to disk; it returns the size and the time of the snapshot.
func fetchBackup(ctx context.Context, fset flagSet, path string) (int64, time.Time, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("backup: %w", err)
	}
	n, at, err := fset.client().Backup(ctx, f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, time.Time{}, fmt.Errorf("backup: %w", olderServer(err))
	}
	return n, at, nil
}

// olderServer explains what a server from before this command's backup
// answers: no backup endpoint, or a copy without the time of its snapshot,
// which a restore needs to take back devices that renewed after it. Right
// after an upgrade of the binary the server running is still the old one.
func olderServer(err error) error {
	var apiErr *admin.APIError
	var timeErr *time.ParseError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound || errors.As(err, &timeErr) {
		return fmt.Errorf("the fleetmq server running is older than this fleetmq and cannot make this backup (%w): "+
			"restart it with this version (systemctl restart fleetmq), then back up again", err)
	}
	return err
}

// checkBackup opens the copy as the server would and runs bbolt's
// consistency check on it: a backup nobody can restore is worse than none.
// It marks the copy as the fleet at snapshot time at, so that a server
// restored from it takes back devices that renewed after it (see
// store.MarkSnapshot).
func checkBackup(ctx context.Context, path string, at time.Time) (int, error) {
	db, err := store.Open(path, store.Options{MustExist: true})
	if err != nil {
		return 0, fmt.Errorf("backup does not open: %w", err)
	}
	defer db.Close()
	if err := db.Check(); err != nil {
		return 0, fmt.Errorf("backup is damaged: %w", err)
	}
	devs, err := db.Devices(ctx)
	if err != nil {
		return 0, fmt.Errorf("backup is damaged: %w", err)
	}
	if err := db.MarkSnapshot(ctx, at); err != nil {
		return 0, fmt.Errorf("backup: %w", err)
	}
	return len(devs), nil
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d KiB", (n+1023)/1024)
	}
}
