// Command pgdocker runs PostgreSQL 15 in a Docker container through
// dockertest for package pgtest, which runs it with "go run" so that
// dockertest and the ~30 modules of the Docker client stay out of the
// advisory module's go.mod, and so out of its users' module graph. It is a
// module of its own; nothing imports it.
//
// Usage (arguments after the flags are passed to postgres):
//
//	pgdocker [-c name=value]...
//
// It pings the engine (DOCKER_HOST, else the default socket) for at most two
// seconds, runs a postgres:15 container bound to a free port on 127.0.0.1
// and waits until it accepts connections. It then writes one JSON line to
// stdout, {"dsn":…,"port":…,"name":…}, or {"error":…} and exits 1. After
// that it reads commands from stdin, one a line, and answers each with a
// JSON line, {} or {"error":…}:
//
//	restart   fast shutdown (SIGINT), start again, wait until ready
//
// At the end of stdin (the caller stopped it, or died) it removes the
// container and its volumes, answers a last line, and exits. SIGINT, SIGTERM
// and SIGHUP are ignored so that a Ctrl-C aimed at the caller's process
// group does not leave the container behind.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/ory/dockertest/v3"
	dc "github.com/ory/dockertest/v3/docker"
)

// pingTimeout bounds the check for a Docker engine, so that a machine
// without one falls back to local binaries quickly.
const pingTimeout = 2 * time.Second

// readyTimeout bounds the wait for the server to accept connections.
const readyTimeout = 2 * time.Minute

// reply is the JSON line written after the start and after each command.
type reply struct {
	DSN   string `json:"dsn,omitempty"`
	Port  int    `json:"port,omitempty"`
	Name  string `json:"name,omitempty"`
	Error string `json:"error,omitempty"`
}

type settingsFlag []string

func (s *settingsFlag) String() string     { return strings.Join(*s, " ") }
func (s *settingsFlag) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	var settings settingsFlag
	flag.Var(&settings, "c", "a server setting `name=value` (repeatable)")
	flag.Parse()
	out := json.NewEncoder(os.Stdout)

	ctx := context.Background()
	d, err := start(ctx, settings)
	if err != nil {
		_ = out.Encode(reply{Error: err.Error()})
		os.Exit(1)
	}
	_ = out.Encode(reply{DSN: d.dsn, Port: d.port, Name: d.res.Container.Name})

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var r reply
		switch cmd := strings.TrimSpace(in.Text()); cmd {
		case "restart":
			if err := d.restart(ctx); err != nil {
				r.Error = err.Error()
			}
		default:
			r.Error = fmt.Sprintf("unknown command %q", cmd)
		}
		_ = out.Encode(r)
	}
	var r reply
	if err := d.pool.Purge(d.res); err != nil {
		r.Error = "remove container " + d.res.Container.Name + ": " + err.Error()
	}
	_ = out.Encode(r)
}

// server is a running container.
type server struct {
	pool *dockertest.Pool
	res  *dockertest.Resource
	port int
	dsn  string
}

// start runs a postgres:15 container bound to a free port on 127.0.0.1
// and waits until it accepts connections.
func start(ctx context.Context, settings []string) (*server, error) {
	pool, err := dockertest.NewPool("")
	if err != nil {
		return nil, err
	}
	pingCtx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	if err := pool.Client.PingWithContext(pingCtx); err != nil {
		return nil, fmt.Errorf("no Docker engine answered at %s within %v: %w",
			pool.Client.Endpoint(), pingTimeout, err)
	}
	cmd := []string{"postgres", "-c", "fsync=off"}
	for _, s := range settings {
		cmd = append(cmd, "-c", s)
	}
	var res *dockertest.Resource
	var port int
	// A free port can be taken by someone else before Docker binds it, so
	// retry with a new port.
	for attempt := 1; attempt <= 3; attempt++ {
		if port, err = freePort(); err != nil {
			return nil, err
		}
		name := "pgtest-" + randomHex()
		res, err = pool.RunWithOptions(&dockertest.RunOptions{
			Name:         name,
			Repository:   "postgres",
			Tag:          "15",
			Env:          []string{"POSTGRES_HOST_AUTH_METHOD=trust"},
			Cmd:          cmd,
			ExposedPorts: []string{"5432/tcp"},
			PortBindings: map[dc.Port][]dc.PortBinding{
				"5432/tcp": {{HostIP: "127.0.0.1", HostPort: strconv.Itoa(port)}},
			},
			Labels: map[string]string{"pgtest": "1"},
		}, func(hc *dc.HostConfig) {
			hc.PublishAllPorts = false
			hc.RestartPolicy = dc.RestartPolicy{Name: "no"}
		})
		if err == nil {
			break
		}
		// RunWithOptions leaves a created but unstarted container behind.
		_ = pool.RemoveContainerByName(name)
	}
	if err != nil {
		return nil, fmt.Errorf("run postgres:15 container: %w", err)
	}
	s := &server{pool: pool, res: res, port: port,
		dsn: fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)}
	if err := s.waitReady(ctx); err != nil {
		return nil, errors.Join(err, pool.Purge(res))
	}
	return s, nil
}

// waitReady retries a connection until it succeeds, the container exits
// or readyTimeout passes.
func (s *server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	for {
		err := ping(ctx, s.dsn)
		if err == nil {
			return nil
		}
		c, inspectErr := s.pool.Client.InspectContainerWithContext(s.res.Container.ID, ctx)
		if inspectErr == nil && !c.State.Running {
			return fmt.Errorf("container %s exited with code %d; log (tail):\n%s",
				s.res.Container.Name, c.State.ExitCode, s.logTail())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("container %s does not accept connections: %w; log (tail):\n%s",
				s.res.Container.Name, err, s.logTail())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func ping(ctx context.Context, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

func (s *server) logTail() string {
	var buf bytes.Buffer
	err := s.pool.Client.Logs(dc.LogsOptions{
		Container:    s.res.Container.ID,
		OutputStream: &buf,
		ErrorStream:  &buf,
		Stdout:       true,
		Stderr:       true,
		Tail:         "20",
	})
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return strings.TrimSpace(buf.String())
}

// restart sends SIGINT (fast shutdown), waits for the container to exit,
// starts it again (same port binding and volume) and waits until it
// accepts connections. dockertest sets the stop signal to SIGWINCH, which
// PostgreSQL ignores, so "docker stop" is not used.
func (s *server) restart(ctx context.Context) error {
	id := s.res.Container.ID
	c, err := s.pool.Client.InspectContainerWithContext(id, ctx)
	if err != nil {
		return err
	}
	if c.State.Running {
		if err := s.pool.Client.KillContainer(dc.KillContainerOptions{ID: id, Signal: dc.SIGINT, Context: ctx}); err != nil {
			return err
		}
		if _, err := s.pool.Client.WaitContainerWithContext(id, ctx); err != nil {
			return err
		}
	}
	if err := s.pool.Client.StartContainerWithContext(id, nil, ctx); err != nil {
		return err
	}
	return s.waitReady(ctx)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
