package main

import (
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// A loss that only Release reports is a loss: pglock's connection goes
// through a proxy that is cut silently just before CMD exits (status 0),
// so the health check has not noticed yet and the unlock is what finds the
// session gone. pglock must exit 76 and say so, not pass CMD's 0 on.
func TestRunLossOnlyReleaseSees(t *testing.T) {
	e := newEnv(t)
	proxy, err := pgtest.NewProxy(net.JoinHostPort(server.Host, strconv.Itoa(server.Port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	u, err := url.Parse(e.dsn)
	if err != nil || u.Host == "" {
		t.Fatalf("the test server's DSN is not a URL this test can point at the proxy: %v", err)
	}
	u.Host = net.JoinHostPort("127.0.0.1", strconv.Itoa(int(proxy.Port())))
	dsn := u.String()
	key := advisory.StringKey("release-loss")
	marks := filepath.Join(e.dir, "marks")
	p := e.start(nil, "", "run", "--dsn="+dsn, "--key", "release-loss", "--",
		"sh", "-c", `echo start >> marks; while [ ! -e go ]; do sleep 0.01; done`)
	e.awaitFile(marks, "start")
	e.awaitHolders(key, 1, 0)
	proxy.Cut()
	cut := time.Now()
	touch(t, filepath.Join(e.dir, "go"))
	e.wait(p)
	t.Logf("pglock exited %d %v after the cut; stderr: %s", p.code, time.Since(cut), p.stderr.String())
	e.want(p, exitLost)
	if !strings.Contains(p.stderr.String(), `lost the lock on "release-loss"`) {
		t.Errorf("stderr = %q; want it to say the lock was lost", p.stderr.String())
	}
	proxy.Close() // the network comes back: the server sees the close and frees the lock
}
