// Package peeraddr names the remote party that per-address limits count
// against, so that the enrollment listener, its failure limiter and the
// MQTT listener agree on who "one address" is.
package peeraddr

import (
	"net"
	"net/netip"
)

// Of returns the key of a remote address string (an IP, as in the host
// part of an HTTP request's RemoteAddr): the address itself, or for IPv6
// its /64, the block one host or site gets and picks addresses from at
// will. A string that is not an IP is its own key.
func Of(remote string) string {
	ip, err := netip.ParseAddr(remote)
	if err != nil || !ip.Is6() || ip.Is4In6() {
		return remote
	}
	p, err := ip.WithZone("").Prefix(64)
	if err != nil {
		return remote
	}
	return p.String()
}

// Key returns the key of a connection's remote address (see Of). An
// IPv4-mapped IPv6 address counts as the IPv4 address it maps: a
// dual-stack listener sees IPv4 peers that way. A nil address (net.Conn
// does not promise one) is the key "": the callers run in accept loops,
// where a panic would end the process.
func Key(a net.Addr) string {
	switch t := a.(type) {
	case nil:
		return ""
	case *net.TCPAddr:
		if t == nil {
			return ""
		}
		return Of(t.AddrPort().Addr().Unmap().String())
	}
	return a.String()
}
