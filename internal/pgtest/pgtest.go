// Package pgtest provides a real PostgreSQL server for tests and demos.
//
// Start looks for a server in this order:
//
//  1. the ADVISORY_TEST_DSN environment variable (an external server that
//     cannot be restarted or configured), unless Options.Private is set or
//     Options.Settings is non-empty;
//  2. a Docker engine that answers a ping within two seconds (image
//     postgres:15, bound to 127.0.0.1), through dockertest in a helper
//     program of its own module (internal/pgdocker, run with "go run", which
//     keeps the Docker client's modules out of the advisory module's
//     go.mod), built and run only once the engine has answered pgtest's
//     own GET /_ping;
//  3. local PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or under
//     /usr/lib/postgresql/*/bin, run in a fresh temporary directory.
//
// If none of them works, Start returns an error that explains how to get
// PostgreSQL. Callers are expected to fail, not skip, on that error.
// Options.Local asks for local binaries only; such a server can be halted
// in any shutdown mode (Halt) and given a streaming standby (StartStandby)
// to promote (Promote), for fail-over tests (FailoverDSN).
//
// A local server is also removed by a small watchdog process (a shell in its
// own session) if the calling process dies without calling Stop: a panic,
// os.Exit, a test timeout, SIGINT, SIGTERM or SIGKILL. A docker container
// is removed by its helper, in its own session, when the calling process
// closes the helper's stdin or dies.
//
// PostgreSQL refuses to run as root, so when the process runs as root the
// local server runs as user postgres through runuser; the temporary
// directory, created under $TMPDIR, must then be reachable by that user.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvDSN is the environment variable that names an external server.
const EnvDSN = "ADVISORY_TEST_DSN"

// Sources reported by Server.Source.
const (
	SourceDSN    = "dsn"
	SourceDocker = "docker"
	SourceLocal  = "local"
)

// Options select and configure the server returned by Start.
type Options struct {
	// Settings are server settings passed as "-c key=value", for example
	// {"max_locks_per_transaction": "10", "max_connections": "20"}.
	// A non-empty Settings makes Start ignore ADVISORY_TEST_DSN. Keys must
	// look like PostgreSQL parameter names; "port", "listen_addresses" and
	// "unix_socket_directories" are managed by pgtest and rejected.
	Settings map[string]string
	// Private requires a server this process controls (Restart works), so
	// ADVISORY_TEST_DSN is ignored.
	Private bool
	// Local requires a server run from local binaries, skipping both
	// ADVISORY_TEST_DSN and Docker: Halt, StartStandby and Promote work
	// only on such a server. Start fails if the binaries cannot be found.
	Local bool
}

// Server is a running PostgreSQL server. Its methods are safe for
// concurrent use.
type Server struct {
	// DSN connects as a superuser, for example
	// "postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable". It never
	// contains a password for docker or local servers.
	DSN string
	// Host is the host name or address the server listens on.
	Host string
	// Port is the TCP port the server listens on.
	Port int

	source string

	mu      sync.Mutex
	stopped bool
	reaper  *reaper // nil for a dsn server

	local  *localServer
	docker *dockerServer
}

// Start returns a running server that accepts connections, chosen as
// described in the package documentation. It fails if Settings has an
// invalid or reserved key, if ADVISORY_TEST_DSN is used but does not accept
// a connection, or if neither Docker nor local binaries produce a server; the
// last error lists why each source failed and how to get PostgreSQL. On
// failure nothing is left running and no temporary directory remains. ctx
// bounds the whole start (an image pull by Docker is not interruptible).
func Start(ctx context.Context, opts Options) (*Server, error) {
	if err := validateSettings(opts.Settings); err != nil {
		return nil, err
	}
	if opts.Local {
		s, err := startLocal(ctx, opts.Settings)
		if err != nil {
			return nil, noServerError([]string{"local (Options.Local is set): " + err.Error()})
		}
		return s, nil
	}
	var reasons []string
	dsn := os.Getenv(EnvDSN)
	switch {
	case dsn == "":
		reasons = append(reasons, EnvDSN+": not set")
	case opts.Private:
		reasons = append(reasons, EnvDSN+": ignored because Options.Private is set")
	case len(opts.Settings) > 0:
		reasons = append(reasons, EnvDSN+": ignored because Options.Settings is not empty")
	default:
		return startDSN(ctx, dsn)
	}

	s, err := startDocker(ctx, opts.Settings)
	if err == nil {
		return s, nil
	}
	reasons = append(reasons, "docker: "+err.Error())
	if ctx.Err() != nil {
		return nil, noServerError(reasons)
	}

	s, err = startLocal(ctx, opts.Settings)
	if err == nil {
		return s, nil
	}
	reasons = append(reasons, "local: "+err.Error())
	return nil, noServerError(reasons)
}

func noServerError(reasons []string) error {
	for i, r := range reasons {
		reasons[i] = strings.ReplaceAll(r, "\n", "\n    ")
	}
	return fmt.Errorf("pgtest: no PostgreSQL server available:\n  %s\n"+
		"To get one: set %s to a server's URL (postgres://user@host:port/db?sslmode=disable), "+
		"or start a Docker engine (image postgres:15 is used), "+
		"or install PostgreSQL locally with `apt-get install -y postgresql` "+
		"(initdb, pg_ctl and postgres are looked up on PATH and under /usr/lib/postgresql/*/bin)",
		strings.Join(reasons, "\n  "), EnvDSN)
}

var settingKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

func validateSettings(settings map[string]string) error {
	for k := range settings {
		if !settingKey.MatchString(k) {
			return fmt.Errorf("pgtest: invalid setting name %q", k)
		}
		switch strings.ToLower(k) {
		case "port", "listen_addresses", "unix_socket_directories":
			return fmt.Errorf("pgtest: setting %q is managed by pgtest and cannot be set", k)
		}
	}
	return nil
}

// settingArgs returns "-c", "k=v" pairs sorted by key.
func settingArgs(settings map[string]string) []string {
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	args := make([]string, 0, 2*len(keys))
	for _, k := range keys {
		args = append(args, "-c", k+"="+settings[k])
	}
	return args
}

func loopbackDSN(port int) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
}

// startDSN checks that the external server answers and wraps it.
func startDSN(ctx context.Context, dsn string) (*Server, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("pgtest: %s is not a valid connection string: %w", EnvDSN, err)
	}
	if err := ping(ctx, dsn, 10*time.Second); err != nil {
		return nil, fmt.Errorf("pgtest: %s is set but the server does not accept connections: %w", EnvDSN, err)
	}
	return &Server{DSN: dsn, Host: cfg.Host, Port: int(cfg.Port), source: SourceDSN}, nil
}

// ping opens and closes one connection, bounded by timeout.
func ping(ctx context.Context, dsn string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// Stop stops the server and removes what Start created: for a local server
// it runs "pg_ctl stop -m immediate" and removes the temporary directory; for
// a docker server it removes the container and its volumes. For an
// ADVISORY_TEST_DSN server it does nothing. Stop is idempotent: every call
// after the first returns nil. An error means the server may not have
// stopped cleanly; the temporary directory is removed anyway.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	var errs []error
	if s.reaper != nil {
		// Stop the watchdog first so that it does not race with us.
		errs = append(errs, s.reaper.cancel())
	}
	switch {
	case s.local != nil:
		errs = append(errs, s.local.stop())
	case s.docker != nil:
		errs = append(errs, s.docker.stop())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgtest: stop %s server: %w", s.source, err)
	}
	return nil
}

// Restart stops the server (fast shutdown, which ends open sessions) and
// starts it again on the same port with the same data, waiting until it
// accepts connections. It returns an error for an ADVISORY_TEST_DSN server,
// after Stop, or if the server fails to stop or start; a local start failure
// includes the tail of the server log. After a failed Restart the server may
// be down; Stop still cleans up.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.source == SourceDSN {
		return errors.New("pgtest: cannot restart a server given by " + EnvDSN)
	}
	if s.stopped {
		return errors.New("pgtest: cannot restart a stopped server")
	}
	var err error
	switch {
	case s.local != nil:
		err = s.local.restart(ctx)
	case s.docker != nil:
		err = s.docker.restart(ctx)
	}
	if err != nil {
		return fmt.Errorf("pgtest: restart %s server: %w", s.source, err)
	}
	return nil
}

// ShutdownMode is how Halt stops a server: pg_ctl's -m.
type ShutdownMode string

// The shutdown modes of pg_ctl stop.
const (
	// ShutdownSmart waits for every client to disconnect.
	ShutdownSmart ShutdownMode = "smart"
	// ShutdownFast terminates every session (clients see FATAL 57P01),
	// rejects new connections meanwhile ("the database system is shutting
	// down"), writes a checkpoint and, on a primary, waits until its
	// streaming standbys have received all of its WAL.
	ShutdownFast ShutdownMode = "fast"
	// ShutdownImmediate kills the server at once, as a crash would:
	// sessions end without a message and the next start runs crash
	// recovery.
	ShutdownImmediate ShutdownMode = "immediate"
)

// Halt stops a local server in the given mode and waits until it has
// exited, keeping its data directory: Restart starts it again, and Stop
// removes it. Halting a server that is not running does nothing. It returns
// an error for a server not started with local binaries (see
// Options.Local), for an unknown mode, after Stop, or if pg_ctl fails.
func (s *Server) Halt(ctx context.Context, mode ShutdownMode) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.needLocal("halt"); err != nil {
		return err
	}
	switch mode {
	case ShutdownSmart, ShutdownFast, ShutdownImmediate:
	default:
		return fmt.Errorf("pgtest: halt: unknown shutdown mode %q; want smart, fast or immediate", mode)
	}
	if !fileExists(s.local.pidFile()) {
		return nil
	}
	if err := s.local.pgCtlStop(ctx, string(mode)); err != nil {
		return fmt.Errorf("pgtest: halt (%s): %w", mode, err)
	}
	return nil
}

// needLocal returns an error unless s is a running local server, for op.
// The caller holds s.mu.
func (s *Server) needLocal(op string) error {
	switch {
	case s.local == nil:
		return fmt.Errorf("pgtest: %s needs a server run from local binaries (Options.Local); this one is %s", op, s.source)
	case s.stopped:
		return fmt.Errorf("pgtest: %s: the server was stopped", op)
	}
	return nil
}

// Controllable reports whether this process controls the server, so that
// Restart can work. It is false for an ADVISORY_TEST_DSN server.
func (s *Server) Controllable() bool {
	return s.source != SourceDSN
}

// Source returns where the server comes from, for log messages: "dsn",
// "docker" or "local".
func (s *Server) Source() string {
	return s.source
}

// RunMain is for TestMain: it starts a server with opts, calls ready(srv)
// (ready may be nil), runs m.Run, stops the server and returns the exit code
// to pass to os.Exit. If Start fails it prints the error to stderr and
// returns 1 without running tests. If Stop fails it prints the error and
// turns a 0 exit code into 1. If the process dies inside m.Run (a panicking
// test, a test timeout, SIGINT or SIGTERM), the deferred Stop does not run but
// the watchdog described in the package documentation removes the server.
func RunMain(m *testing.M, opts Options, ready func(*Server)) (code int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	srv, err := Start(ctx, opts)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "pgtest: using %s PostgreSQL server at %s:%d\n", srv.Source(), srv.Host, srv.Port)
	defer func() {
		if err := srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			if code == 0 {
				code = 1
			}
		}
	}()
	if ready != nil {
		ready(srv)
	}
	return m.Run()
}

// Log returns what the server has written to its log so far: the whole log
// file of a local server. It returns an error for docker and
// ADVISORY_TEST_DSN servers, whose logs this process cannot read.
func (s *Server) Log() (string, error) {
	if s.local == nil {
		return "", fmt.Errorf("pgtest: the log of a %s server cannot be read; use local binaries (unset %s)", s.source, EnvDSN)
	}
	b, err := os.ReadFile(s.local.logFile())
	return string(b), err
}
