//go:build !linux

package advisory

import (
	"net"
	"time"
)

// readiness is Linux's epoll watch of a session's socket
// (readiness_linux.go). Elsewhere there is none: newReadiness returns nil and
// the health watcher relies on its pings alone.
type readiness struct{}

func newReadiness(net.Conn) *readiness { return nil }
func (*readiness) arm()                {}
func (*readiness) disarm()             {}
func (*readiness) unarmed() bool       { return false }
func (*readiness) wait(time.Time) bool { return false }
func (*readiness) close()              {}
