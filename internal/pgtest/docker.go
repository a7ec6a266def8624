package pgtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"
)

// dockerHelper is the program that runs the container: a module of its own
// (internal/pgdocker) that uses dockertest. Running it with "go run" keeps
// dockertest and the Docker client's modules out of the advisory module's
// go.mod, and so out of the module graph of every program that uses the
// library. Inside this repository go.work resolves it; elsewhere (pglock
// installed with go install) it is fetched at the version of the module
// pgtest was built from.
const dockerHelper = "github.com/seed0ad592b7/advisory/internal/pgdocker"

// helperStopTimeout bounds the removal of the container at Stop.
const helperStopTimeout = time.Minute

// dockerServer is a postgres:15 container run by the helper; it removes
// the container when its stdin closes, also when this process dies.
type dockerServer struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Scanner
	stderr *bytes.Buffer
	mu     sync.Mutex // one command at a time
}

// helperReply is one JSON line from the helper.
type helperReply struct {
	DSN   string `json:"dsn"`
	Port  int    `json:"port"`
	Name  string `json:"name"`
	Error string `json:"error"`
}

// dockerPingTimeout bounds the check for a Docker engine, so that a
// machine without one falls back to local binaries quickly.
const dockerPingTimeout = 2 * time.Second

// dockerPing asks the Docker engine for GET /_ping, within dockerPingTimeout:
// at DOCKER_HOST (unix:// or tcp://), else at /var/run/docker.sock. It runs
// before the helper so that a machine whose engine does not answer never
// builds or starts it. An engine it cannot reach this way (TLS, ssh://) is
// left to the helper (nil).
func dockerPing(ctx context.Context) error {
	network, addr := "unix", "/var/run/docker.sock"
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		u, err := url.Parse(h)
		if err != nil {
			return fmt.Errorf("DOCKER_HOST=%q: %w", h, err)
		}
		switch {
		case os.Getenv("DOCKER_TLS_VERIFY") != "" || (u.Scheme != "unix" && u.Scheme != "tcp"):
			return nil
		case u.Scheme == "unix":
			addr = u.Path
		default:
			network, addr = "tcp", u.Host
		}
	}
	ctx, cancel := context.WithTimeout(ctx, dockerPingTimeout)
	defer cancel()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("no Docker engine answered at %s:%s within %v: %w", network, addr, dockerPingTimeout, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("the Docker engine at %s:%s answered GET /_ping with %s", network, addr, resp.Status)
	}
	return nil
}

// startDocker runs a postgres:15 container bound to a free port on
// 127.0.0.1 through the helper and waits until it accepts connections.
// The first start builds the helper (go run), which may take a minute.
func startDocker(ctx context.Context, settings map[string]string) (*Server, error) {
	if err := dockerPing(ctx); err != nil {
		return nil, err
	}
	goCmd, err := goCommand()
	if err != nil {
		return nil, err
	}
	args := append([]string{"run", helperPackage()}, settingArgs(settings)...)
	cmd := exec.Command(goCmd, args...)
	// Its own session: a Ctrl-C aimed at the tests does not reach it, and
	// it removes the container when our end of its stdin closes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	d := &dockerServer{cmd: cmd, stderr: &bytes.Buffer{}}
	cmd.Stderr = d.stderr
	if d.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	d.out = bufio.NewScanner(stdout)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s %s: %w", goCmd, strings.Join(args, " "), err)
	}
	r, err := d.read(ctx)
	if err == nil && r.Error != "" {
		err = errors.New(r.Error)
	}
	if err != nil {
		// The helper removes what it made when its stdin closes.
		d.stdin.Close()
		_ = d.cmd.Wait()
		return nil, err
	}
	return &Server{DSN: r.DSN, Host: "127.0.0.1", Port: r.Port, source: SourceDocker, docker: d}, nil
}

// goCommand returns the go command on PATH (go test puts its own first).
func goCommand() (string, error) {
	p, err := exec.LookPath("go")
	if err != nil {
		return "", errors.New("the Docker helper runs with the go command, which is not on PATH")
	}
	return p, nil
}

// helperPackage is the helper's package for go run: the workspace's copy
// inside this repository, else the version this program was built from.
func helperPackage() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok || bi.Main.Path != rootModule || bi.Main.Version == "" || bi.Main.Version == "(devel)" {
		return dockerHelper
	}
	return dockerHelper + "@" + bi.Main.Version
}

// rootModule is the module pgtest belongs to.
const rootModule = "github.com/seed0ad592b7/advisory"

// read reads the helper's next reply, bounded by ctx; if ctx ends first
// the helper is killed.
func (d *dockerServer) read(ctx context.Context) (helperReply, error) {
	type result struct {
		r   helperReply
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var r helperReply
		if !d.out.Scan() {
			err := d.out.Err()
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			ch <- result{err: fmt.Errorf("the Docker helper ended without an answer (%v): %s", err, d.stderrTail())}
			return
		}
		if err := json.Unmarshal(d.out.Bytes(), &r); err != nil {
			ch <- result{err: fmt.Errorf("the Docker helper answered %q: %w", d.out.Text(), err)}
			return
		}
		ch <- result{r: r}
	}()
	select {
	case res := <-ch:
		return res.r, res.err
	case <-ctx.Done():
		// go run and the helper share a process group of their own.
		_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-ch
		return helperReply{}, fmt.Errorf("the Docker helper did not answer: %w", ctx.Err())
	}
}

// stderrTail returns the last lines the helper (or go run) wrote to stderr.
func (d *dockerServer) stderrTail() string {
	lines := strings.Split(strings.TrimSpace(d.stderr.String()), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}

// restart asks the helper for a fast shutdown and a new start (same port
// and volume) and waits until the server accepts connections.
func (d *dockerServer) restart(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, err := io.WriteString(d.stdin, "restart\n"); err != nil {
		return fmt.Errorf("the Docker helper is gone: %w", err)
	}
	r, err := d.read(ctx)
	if err == nil && r.Error != "" {
		err = errors.New(r.Error)
	}
	return err
}

// stop closes the helper's stdin, upon which it removes the container and
// its volumes and exits, and waits for it.
func (d *dockerServer) stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stdin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), helperStopTimeout)
	defer cancel()
	var errs []error
	if d.cmd.ProcessState == nil {
		if r, err := d.read(ctx); err == nil && r.Error != "" {
			errs = append(errs, errors.New(r.Error))
		}
		if err := d.cmd.Wait(); err != nil {
			errs = append(errs, fmt.Errorf("the Docker helper: %w: %s", err, d.stderrTail()))
		}
	}
	return errors.Join(errs...)
}
