package ui

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// BenchmarkPeerUID is one loopback dashboard request's lookup of its
// connection's owner while 10,000 MQTT connections are open.
func BenchmarkPeerUID(b *testing.B) {
	dir := b.TempDir()
	var sb strings.Builder
	sb.WriteString("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
	for i := range 10_000 {
		fmt.Fprintf(&sb, "%4d: 0A00000A:22B3 0A0000%02X:%04X 01 00000000:00000000 00:00000000 00000000   999        0 %d 1 0000000000000000 20 4 30 10 -1\n", i, i%200, 1024+i, i)
	}
	fmt.Fprintf(&sb, "10000: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1\n")
	if err := os.WriteFile(filepath.Join(dir, "tcp"), []byte(sb.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if uid, err := peerUID(dir, "127.0.0.1:54321", "127.0.0.1:8080"); err != nil || uid != 1000 {
			b.Fatal(uid, err)
		}
	}
}
