package enroll

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func dirNames(tb testing.TB, dir string) []string {
	tb.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatalf("read dir: %v", err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestAtomicWrite(t *testing.T) {
	tests := []struct {
		name     string
		existing []byte // written first with 0o666 when non-nil
		data     []byte
		perm     os.FileMode
	}{
		{name: "secret", data: []byte("private key"), perm: 0o600},
		{name: "public", data: []byte("certificate"), perm: 0o644},
		{name: "group", data: []byte("x"), perm: 0o640},
		{name: "empty", data: []byte{}, perm: 0o600},
		{name: "replace looser", existing: []byte("old content that is longer"), data: []byte("new"), perm: 0o600},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "file")
			if tt.existing != nil {
				if err := os.WriteFile(path, tt.existing, 0o666); err != nil {
					t.Fatal(err)
				}
				// WriteFile honours the umask; force a loose mode so that
				// the test sees WriteFileAtomic tighten it.
				if err := os.Chmod(path, 0o666); err != nil {
					t.Fatal(err)
				}
			}
			if err := WriteFileAtomic(path, tt.data, tt.perm); err != nil {
				t.Fatalf("WriteFileAtomic: %v", err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.data) {
				t.Errorf("content = %q, want %q", got, tt.data)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != tt.perm {
				t.Errorf("mode = %04o, want %04o", fi.Mode().Perm(), tt.perm)
			}
			if names := dirNames(t, dir); !slices.Equal(names, []string{"file"}) {
				t.Errorf("dir holds %q, want only the file (temp file left behind?)", names)
			}
		})
	}
}

func TestAtomicWriteFailureLeavesNothing(t *testing.T) {
	tests := []struct {
		name  string
		setup func(tb testing.TB, dir string) string // returns the target path
		want  []string                               // entries of dir afterwards
	}{
		{
			name: "dir missing",
			setup: func(tb testing.TB, dir string) string {
				return filepath.Join(dir, "missing", "file")
			},
			want: nil,
		},
		{
			name: "target is a non-empty directory",
			setup: func(tb testing.TB, dir string) string {
				tb.Helper()
				target := filepath.Join(dir, "target")
				if err := os.Mkdir(target, 0o700); err != nil {
					tb.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(target, "inside"), nil, 0o600); err != nil {
					tb.Fatal(err)
				}
				return target
			},
			want: []string{"target"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := tt.setup(t, dir)
			if err := WriteFileAtomic(path, []byte("data"), 0o600); err == nil {
				t.Fatal("WriteFileAtomic succeeded, want an error")
			}
			if names := dirNames(t, dir); !slices.Equal(names, tt.want) {
				t.Errorf("dir holds %q after failure, want %q", names, tt.want)
			}
		})
	}
}
