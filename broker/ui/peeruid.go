package ui

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// Cookies are not bound to a port: a browser sends the loopback
// dashboard's login cookie to any server on 127.0.0.1, another local
// user's included, who could then replay it. So a login is bound to the
// Unix user whose process opened the connection — the browser's, or sshd's
// for a tunnel — which Linux tells about every local TCP socket in
// /proc/net/tcp{,6}; a replay from another account's process is refused.

// overflowUID is the Linux kernel's default /proc/sys/kernel/overflowuid,
// "nobody": the uid shown for users a user namespace does not map.
const overflowUID = 65534

// errPeerUnknown means the owner of a loopback connection could not be
// told: the connection is refused.
var errPeerUnknown = errors.New("cannot tell which user opened this connection")

// peerUID returns the Unix user owning the local TCP socket at client
// connected to server (both loopback, as the server sees them).
func peerUID(procNet, client, server string) (uint32, error) {
	c, err := netip.ParseAddrPort(client)
	if err != nil {
		return 0, fmt.Errorf("%w: client address %q", errPeerUnknown, client)
	}
	s, err := netip.ParseAddrPort(server)
	if err != nil {
		return 0, fmt.Errorf("%w: server address %q", errPeerUnknown, server)
	}
	c = netip.AddrPortFrom(c.Addr().Unmap(), c.Port())
	s = netip.AddrPortFrom(s.Addr().Unmap(), s.Port())
	if !c.Addr().IsLoopback() || !s.Addr().IsLoopback() {
		return 0, fmt.Errorf("%w: not a loopback connection", errPeerUnknown)
	}
	// An IPv4 client of a dual-stack socket shows in tcp6, mapped.
	for _, name := range []string{"tcp", "tcp6"} {
		uid, found, err := scanProcNet(procNet+"/"+name, c, s)
		if err != nil {
			return 0, err
		}
		if found && uid == overflowUID {
			// In a user namespace (systemd's PrivateUsers=) every user
			// not mapped into it shows as this one: they cannot be told
			// apart.
			return 0, fmt.Errorf("%w: its owner is not visible from this process's user namespace", errPeerUnknown)
		}
		if found {
			return uid, nil
		}
	}
	return 0, fmt.Errorf("%w: no socket %s → %s", errPeerUnknown, c, s)
}

// scanProcNet looks for the socket local→remote in one /proc/net file:
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
//
// The addresses are compared as the kernel prints them: with thousands of
// MQTT connections listed, a line is looked at only when it holds the
// client's address.
func scanProcNet(path string, local, remote netip.AddrPort) (uid uint32, found bool, err error) {
	v6 := strings.HasSuffix(path, "6")
	if !v6 && !(local.Addr().Is4() && remote.Addr().Is4()) {
		return 0, false, nil // IPv6 sockets are in tcp6 only
	}
	wantLocal, wantRemote := procAddr(local, v6), procAddr(remote, v6)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("%w: %w", errPeerUnknown, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, wantLocal) {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 8 || fields[1] != wantLocal || fields[2] != wantRemote {
			continue
		}
		u, err := strconv.ParseUint(fields[7], 10, 32)
		if err != nil {
			return 0, false, fmt.Errorf("%w: uid %q", errPeerUnknown, fields[7])
		}
		return uint32(u), true, nil
	}
	if err := sc.Err(); err != nil {
		return 0, false, fmt.Errorf("%w: %w", errPeerUnknown, err)
	}
	return 0, false, nil
}

// procAddr prints a as /proc/net/tcp{,6} does, "0100007F:1F90": the
// address as 32-bit words, each as the host reads it from memory, in upper
// case hex, then the port. In tcp6 an IPv4 address is mapped.
func procAddr(a netip.AddrPort, v6 bool) string {
	ip := a.Addr()
	var raw []byte
	if v6 {
		b := ip.As16()
		raw = b[:]
	} else {
		b := ip.As4()
		raw = b[:]
	}
	var sb strings.Builder
	for i := 0; i < len(raw); i += 4 {
		fmt.Fprintf(&sb, "%08X", binary.NativeEndian.Uint32(raw[i:]))
	}
	fmt.Fprintf(&sb, ":%04X", a.Port())
	return sb.String()
}
