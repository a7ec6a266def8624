package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/ory/dockertest/v3"
	dc "github.com/ory/dockertest/v3/docker"
)

// dockerPingTimeout bounds the check for a Docker engine, so that a machine
// without one falls back to local binaries quickly.
const dockerPingTimeout = 2 * time.Second

// dockerServer is the state of a server run in a postgres:15 container.
type dockerServer struct {
	pool *dockertest.Pool
	res  *dockertest.Resource
	dsn  string
}

// dockerPool returns a pool whose engine answered a ping within
// dockerPingTimeout.
func dockerPool(ctx context.Context) (*dockertest.Pool, error) {
	pool, err := dockertest.NewPool("")
	if err != nil {
		return nil, err
	}
	pingCtx, cancel := context.WithTimeout(ctx, dockerPingTimeout)
	defer cancel()
	err = pool.Client.PingWithContext(pingCtx)
	closeIdle(pool)
	if err != nil {
		return nil, fmt.Errorf("no Docker engine answered at %s within %v: %w",
			pool.Client.Endpoint(), dockerPingTimeout, err)
	}
	return pool, nil
}

// closeIdle closes the Docker client's idle keep-alive connections, whose
// goroutines would otherwise show up as leaks in goleak checks.
func closeIdle(pool *dockertest.Pool) {
	if hc := pool.Client.HTTPClient; hc != nil {
		hc.CloseIdleConnections()
	}
}

// startDocker runs a postgres:15 container bound to a free port on
// 127.0.0.1 and waits until it accepts connections.
func startDocker(ctx context.Context, settings map[string]string) (*Server, error) {
	pool, err := dockerPool(ctx)
	if err != nil {
		return nil, err
	}
	defer closeIdle(pool)
	cmd := append([]string{"postgres", "-c", "fsync=off"}, settingArgs(settings)...)
	var res *dockertest.Resource
	var port int
	// A free port can be taken by someone else before Docker binds it, so
	// retry with a new port.
	for attempt := 1; attempt <= 3 && ctx.Err() == nil; attempt++ {
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
	d := &dockerServer{pool: pool, res: res, dsn: loopbackDSN(port)}
	s := &Server{DSN: d.dsn, Host: "127.0.0.1", Port: port, source: SourceDocker, docker: d}
	if docker, err := exec.LookPath("docker"); err == nil {
		// Best effort: the docker CLI talks to the same engine when it
		// uses the same DOCKER_HOST.
		s.reaper, _ = startReaper(shellJoin([]string{docker, "rm", "-f", "-v", res.Container.ID}) + " >/dev/null 2>&1")
	}
	if err := d.waitReady(ctx); err != nil {
		return nil, errors.Join(err, s.Stop())
	}
	return s, nil
}

// waitReady retries a connection until it succeeds, the container exits,
// ctx ends or two minutes pass.
func (d *dockerServer) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	defer closeIdle(d.pool)
	for {
		err := ping(ctx, d.dsn, 2*time.Second)
		if err == nil {
			return nil
		}
		c, inspectErr := d.pool.Client.InspectContainerWithContext(d.res.Container.ID, ctx)
		if inspectErr == nil && !c.State.Running {
			return fmt.Errorf("container %s exited with code %d; log (tail):\n%s",
				d.res.Container.Name, c.State.ExitCode, d.logTail())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("container %s does not accept connections: %w; log (tail):\n%s",
				d.res.Container.Name, err, d.logTail())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (d *dockerServer) logTail() string {
	var buf bytes.Buffer
	err := d.pool.Client.Logs(dc.LogsOptions{
		Container:    d.res.Container.ID,
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
func (d *dockerServer) restart(ctx context.Context) error {
	defer closeIdle(d.pool)
	id := d.res.Container.ID
	c, err := d.pool.Client.InspectContainerWithContext(id, ctx)
	if err != nil {
		return err
	}
	if c.State.Running {
		if err := d.pool.Client.KillContainer(dc.KillContainerOptions{ID: id, Signal: dc.SIGINT, Context: ctx}); err != nil {
			return err
		}
		if _, err := d.pool.Client.WaitContainerWithContext(id, ctx); err != nil {
			return err
		}
	}
	if err := d.pool.Client.StartContainerWithContext(id, nil, ctx); err != nil {
		return err
	}
	return d.waitReady(ctx)
}

// stop removes the container and its volumes.
func (d *dockerServer) stop() error {
	defer closeIdle(d.pool)
	return d.pool.Purge(d.res)
}

func randomHex() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
