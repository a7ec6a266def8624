package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// PgBouncer is a PgBouncer process in front of a Server, listening on a free
// loopback port, for tests of what works through a connection pooler.
//
// PgBouncer 1.18 (Debian's) does not keep prepared statements across
// server connections in transaction mode, and consecutive statements of one
// client outside a transaction may run on different server sessions. pgx's
// default query exec mode (cache_statement) prepares named statements and so
// fails there; use default_query_exec_mode=simple_protocol or exec (both
// send each statement in one message sequence, with no named statement) or
// cache_describe. DSN sets none of these: append one, as
// DSN + "&default_query_exec_mode=exec".
type PgBouncer struct {
	// DSN connects to the server through PgBouncer, as the server's
	// superuser, to database postgres.
	DSN  string
	Host string
	Port int
	// Mode is the pool_mode: "session", "transaction" or "statement".
	Mode string

	dir    string
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	reaper *reaper

	mu      sync.Mutex
	stopped bool
}

// PgBouncerOptions configure StartPgBouncerWith.
type PgBouncerOptions struct {
	// Mode is the pool_mode: "session", "transaction" (the default) or
	// "statement".
	Mode string
	// PoolSize is default_pool_size: how many server connections PgBouncer
	// opens per (database, user). Default 20.
	PoolSize int
}

// PgBouncerPath returns the pgbouncer binary: the one on PATH, else
// Debian's /usr/sbin/pgbouncer. The error says how to install it.
func PgBouncerPath() (string, error) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	const debian = "/usr/sbin/pgbouncer"
	if fi, err := os.Stat(debian); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
		return debian, nil
	}
	return "", errors.New("pgtest: pgbouncer not found on PATH or at /usr/sbin/pgbouncer; " +
		"install it with `apt-get install -y pgbouncer` (./test.sh does when run as root)")
}

// StartPgBouncer runs pgbouncer in pool mode mode ("transaction",
// "session" or "statement") in front of srv, with a pool of 20 server
// connections. See StartPgBouncerWith.
func StartPgBouncer(ctx context.Context, srv *Server, mode string) (*PgBouncer, error) {
	return StartPgBouncerWith(ctx, srv, PgBouncerOptions{Mode: mode})
}

// StartPgBouncerWith runs pgbouncer in front of srv on a free loopback port,
// with no authentication (auth_type trust, user postgres), and waits until
// it accepts connections. As root it runs pgbouncer as user postgres, which
// refuses to run as root. The process is stopped by Stop, or by a watchdog
// if the calling process dies first.
func StartPgBouncerWith(ctx context.Context, srv *Server, opts PgBouncerOptions) (*PgBouncer, error) {
	if opts.Mode == "" {
		opts.Mode = "transaction"
	}
	switch opts.Mode {
	case "session", "transaction", "statement":
	default:
		return nil, fmt.Errorf("pgtest: pgbouncer pool mode %q: want session, transaction or statement", opts.Mode)
	}
	if opts.PoolSize <= 0 {
		opts.PoolSize = 20
	}
	bin, err := PgBouncerPath()
	if err != nil {
		return nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		uid, gid, err := lookupIDs("postgres")
		if err != nil {
			return nil, fmt.Errorf("pgtest: running as root needs a user named postgres to run pgbouncer: %w", err)
		}
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	dir, err := os.MkdirTemp("", "pgbouncer-")
	if err != nil {
		return nil, err
	}
	b := &PgBouncer{Host: "127.0.0.1", Mode: opts.Mode, dir: dir, exited: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			_ = b.Stop()
		}
	}()
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, err
		}
	}
	if b.Port, err = freePort(); err != nil {
		return nil, err
	}
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
default_pool_size = %d
max_client_conn = 500
ignore_startup_parameters = extra_float_digits,search_path
logfile = %s
pidfile = %s
`, srv.Host, srv.Port, b.Port, filepath.Join(dir, "userlist.txt"), opts.Mode, opts.PoolSize,
		filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
	files := map[string]string{"pgbouncer.ini": ini, "userlist.txt": `"postgres" ""` + "\n"}
	for name, content := range files {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return nil, err
		}
	}
	b.cmd = exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	b.cmd.Dir = dir
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := b.cmd.Start(); err != nil {
		return nil, fmt.Errorf("pgtest: start pgbouncer: %w", err)
	}
	go func() {
		_ = b.cmd.Wait()
		close(b.exited)
	}()
	script := "kill -KILL " + strconv.Itoa(b.cmd.Process.Pid) + " 2>/dev/null; rm -rf " + shellQuote(dir)
	if b.reaper, err = startReaper(script); err != nil {
		return nil, err
	}
	b.DSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", b.Port)
	if err := b.awaitReady(ctx); err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

// awaitReady waits until a simple query goes through pgbouncer.
func (b *PgBouncer) awaitReady(ctx context.Context) error {
	dsn := b.DSN + "&default_query_exec_mode=simple_protocol"
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := pgx.Connect(cctx, dsn)
		if err == nil {
			_, err = c.Exec(cctx, "SELECT 1")
			_ = c.Close(cctx)
		}
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-b.exited:
			return fmt.Errorf("pgtest: pgbouncer exited: %v\nlog (tail):\n%s", b.cmd.ProcessState, tailFile(filepath.Join(b.dir, "pgbouncer.log"), 20))
		case <-ctx.Done():
			return fmt.Errorf("pgtest: pgbouncer did not accept connections: %w (last: %v)\nlog (tail):\n%s",
				ctx.Err(), err, tailFile(filepath.Join(b.dir, "pgbouncer.log"), 20))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Log returns the tail of pgbouncer's log, for test failure messages.
func (b *PgBouncer) Log(lines int) string {
	return strings.TrimSpace(tailFile(filepath.Join(b.dir, "pgbouncer.log"), lines))
}

// Stop stops pgbouncer (SIGINT: close at once, dropping client and server
// connections), waits for it to exit and removes its directory. It is
// idempotent.
func (b *PgBouncer) Stop() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return nil
	}
	b.stopped = true
	var errs []error
	if b.reaper != nil {
		errs = append(errs, b.reaper.cancel())
	}
	if b.cmd != nil && b.cmd.Process != nil {
		_ = b.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-b.exited:
		case <-time.After(10 * time.Second):
			_ = b.cmd.Process.Kill()
			<-b.exited
		}
	}
	errs = append(errs, os.RemoveAll(b.dir))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgtest: stop pgbouncer: %w", err)
	}
	return nil
}
