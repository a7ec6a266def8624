//go:build !linux

package advisory

import (
	"net"
	"time"
)

// clientKeepalive is Linux's tightening of a session socket's TCP
// keep-alive (keepalive_client_linux.go). Elsewhere the socket keeps its
// dialer's settings.
type clientKeepalive struct{}

func tightenClientKeepalive(net.Conn, time.Duration) *clientKeepalive { return nil }
func (*clientKeepalive) userTimeout(bool)                             {}
func (*clientKeepalive) restore()                                     {}
