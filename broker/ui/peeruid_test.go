package ui

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestPeerUID(t *testing.T) {
	dir := t.TempDir()
	tcp := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:C352 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 5 1 0000000000000000 20 4 30 10 -1
`
	tcp6 := `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 3 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:C351 0000000000000000FFFF00000100007F:1F91 01 00000000:00000000 00:00000000 00000000  1002        0 4 1 0000000000000000 20 4 30 10 -1
`
	for name, body := range map[string]string{"tcp": tcp, "tcp6": tcp6} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		client, server string
		uid            uint32
		ok             bool
	}{
		{"127.0.0.1:54321", "127.0.0.1:8080", 1000, true},
		{"[::1]:50000", "[::1]:8080", 1001, true},
		{"127.0.0.1:50001", "127.0.0.1:8081", 1002, true}, // IPv4 on a dual-stack socket
		{"127.0.0.1:54322", "127.0.0.1:8080", 0, false},   // no such socket
		{"192.0.2.1:54321", "127.0.0.1:8080", 0, false},   // not loopback
		{"nonsense", "127.0.0.1:8080", 0, false},
		{"127.0.0.1:50002", "127.0.0.1:8080", 0, false}, // a user the namespace does not map
	} {
		uid, err := peerUID(dir, tc.client, tc.server)
		if ok := err == nil; ok != tc.ok || uid != tc.uid {
			t.Errorf("peerUID(%s → %s) = %d, %v; want %d, ok %v", tc.client, tc.server, uid, err, tc.uid, tc.ok)
		}
		if err != nil && !errors.Is(err, errPeerUnknown) {
			t.Errorf("peerUID(%s): %v is not errPeerUnknown", tc.client, err)
		}
	}

	// The real kernel's answer about a socket of this process.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if uid, err := peerUID("/proc/net", c.LocalAddr().String(), ln.Addr().String()); err != nil || uid != uint32(os.Getuid()) {
		t.Errorf("this process's socket: uid %d, %v; want %d", uid, err, os.Getuid())
	}
}
