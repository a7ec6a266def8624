package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// defaultGrace is how long CMD has between SIGTERM and SIGKILL after the
// lock is lost.
const defaultGrace = 10 * time.Second

// forwarded are the signals pglock passes on to CMD.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	c := newCommand("run",
		"pglock run (--key NAME | --id N | --pair A,B) [options] -- CMD [ARG...]",
		`Runs CMD while holding the advisory lock, and exits with CMD's status.
stdin, stdout and stderr are CMD's; SIGINT, SIGTERM and SIGHUP sent to pglock
are passed on to CMD (a Ctrl-C at a terminal reaches both, as they share the
process group). The lock is held by a session whose application_name is
"pglock run: CMD", so "pglock status" shows it.

When the lock is not acquired (busy with --no-wait, or --timeout passed),
CMD does not run and pglock exits 75 (--conflict-exit-code). When the lock
is lost while CMD runs (the session ended: backend terminated or server
stopped, noticed at once; network cut, noticed within about two seconds)
or --ttl passes, CMD gets
SIGTERM, then SIGKILL after --grace, and pglock exits 76 with the reason on
stderr. A signal while waiting for the lock ends the wait; pglock then
exits 128+N. DUR is a number of seconds (1.5) or a Go duration (300ms, 2m).

With --slots N, pglock holds one of the N slots of a counting semaphore on
the key instead, so that at most N runs (or other holders of its slots) go
at once; "pglock key --slots N NAME" prints the slot keys.
`)
	kf := addKeyFlags(c.fs)
	dsn := c.fs.String("dsn", "", "connection string `DSN` (default: DATABASE_URL, else the PG* environment)")
	shared := c.fs.Bool("shared", false, "take a shared lock: shared holders run together, exclusive ones wait")
	noWait := c.fs.Bool("no-wait", false, "do not wait: exit 75 at once if the lock is held")
	var timeout, ttl durationFlag
	grace := durationFlag{d: defaultGrace}
	c.fs.Var(&timeout, "timeout", "wait at most `DUR` for the lock, then exit 75 (0: as --no-wait)")
	c.fs.Var(&ttl, "ttl", "hold the lock at most `DUR`: then stop CMD and exit 76")
	c.fs.Var(&grace, "grace", "after the lock is lost, wait `DUR` between SIGTERM and SIGKILL (default 10s)")
	conflict := c.fs.Int("conflict-exit-code", exitConflict, "exit status `N` when the lock is not acquired")
	var slots slotsFlag
	c.fs.Var(&slots, "slots", "hold one of `N` slots of a semaphore on the key: at most N run at once")
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	if msg := kf.check(true); msg != "" {
		return c.usageError(stderr, msg)
	}
	argv := c.fs.Args()
	if len(argv) == 0 {
		return c.usageError(stderr, "missing CMD to run")
	}
	if *conflict < 0 || *conflict > 255 {
		return c.usageError(stderr, fmt.Sprintf("--conflict-exit-code %d: want 0 to 255", *conflict))
	}
	if ttl.set && ttl.d == 0 {
		return c.usageError(stderr, "--ttl must be positive")
	}
	if slots > 0 && *shared {
		return c.usageError(stderr, "give --slots or --shared, not both: a semaphore's slots are held exclusively")
	}
	opts := []advisory.Option{}
	if *shared {
		opts = append(opts, advisory.Shared())
	}
	if *noWait {
		opts = append(opts, advisory.NoWait())
	}
	if timeout.set {
		opts = append(opts, advisory.WaitTimeout(timeout.d))
	}
	if ttl.set {
		opts = append(opts, advisory.TTL(ttl.d))
	}
	r := &runner{
		key: kf.key, what: kf.describe(), argv: argv, opts: opts,
		conn: connFrom(*dsn), grace: grace.d, conflict: *conflict,
		timeout: timeout, ttl: ttl, stderr: stderr, slots: slots,
	}
	return r.run()
}

// runner is one "pglock run".
type runner struct {
	key      advisory.Key
	what     string // the key for messages
	argv     []string
	opts     []advisory.Option
	conn     *conn
	grace    time.Duration
	conflict int
	timeout  durationFlag
	ttl      durationFlag
	stderr   io.Writer
	slots    slotsFlag // --slots N: hold one of N slots; 0: the lock itself
}

// failf prints a one-line message, without secrets, to stderr.
func (r *runner) failf(format string, args ...any) {
	fmt.Fprintln(r.stderr, "pglock: "+oneLine(r.conn.redact(fmt.Sprintf(format, args...))))
}

func (r *runner) run() int {
	// A signal ignored when pglock started (as for a background job of a
	// non-interactive shell) stays ignored, for pglock and for CMD.
	sigs := make(chan os.Signal, 4)
	for _, s := range forwarded {
		if !signal.Ignored(s) {
			signal.Notify(sigs, s)
		}
	}
	defer signal.Stop(sigs)

	cfg, err := r.conn.poolConfig("pglock run: " + strings.Join(r.argv, " "))
	if err != nil {
		r.failf("%v", err)
		return exitFailure
	}
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		r.failf("%v", r.conn.connectError(cfg.ConnConfig, err))
		return exitFailure
	}
	defer pool.Close()

	// Until CMD starts, a signal ends the wait.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		got  os.Signal
		wg   sync.WaitGroup
		stop = make(chan struct{})
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case got = <-sigs:
			cancel()
		case <-stop:
		}
	}()
	lock, code := r.acquire(ctx, pool)
	close(stop)
	wg.Wait()
	if got != nil {
		if lock != nil {
			_ = lock.Release(context.Background())
		}
		r.failf("got %v while waiting for the lock on %s; CMD not run", got, r.what)
		return exitSignal + signalNumber(got)
	}
	if code >= 0 {
		return code
	}
	if !lock.Acquired() {
		r.failf("%s; CMD not run", r.heldElsewhere(true))
		return r.conflict
	}
	return r.runCmd(lock, sigs)
}

// acquire takes the lock. It returns the Lock (acquired or not) and -1,
// or nil and the exit status after printing why: r.conflict when --timeout
// passed, exitFailure on an error (nothing printed when ctx was cancelled
// by a signal: the caller says so).
func (r *runner) acquire(ctx context.Context, pool *pgxpool.Pool) (*advisory.Lock, int) {
	if err := r.conn.ping(ctx, pool); err != nil {
		if ctx.Err() == nil {
			r.failf("%v", err)
		}
		return nil, exitFailure
	}
	lock, err := r.lock(ctx, pool, r.opts...)
	switch {
	case err == nil:
		return lock, -1
	case errors.Is(err, advisory.ErrTimeout):
		r.failf("%s for the whole --timeout %v; CMD not run", r.heldElsewhere(false), r.timeout.d)
		return nil, r.conflict
	case ctx.Err() == nil:
		r.failf("cannot take the lock on %s: %v", r.what, err)
	}
	return nil, exitFailure
}

// runCmd runs CMD under the held lock and returns pglock's exit status.
func (r *runner) runCmd(lock *advisory.Lock, sigs <-chan os.Signal) int {
	cmd := exec.Command(r.argv[0], r.argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		relErr := lock.Release(context.Background())
		r.failf("cannot run %s: %v", r.argv[0], errors.Join(err, relErr))
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
			return exitNotFound
		}
		return exitNoExec
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	var (
		lost   = lock.Done()
		killAt <-chan time.Time
		reason error
	)
	for {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
			continue
		case <-lost:
			lost = nil
			reason = lock.Err()
			if reason == nil { // released under us: cannot happen, but never run unprotected
				reason = advisory.ErrLockLost
			}
			r.failf("%s; sent SIGTERM to CMD (SIGKILL after %v): %v", r.lostWhat(reason), r.grace, reason)
			_ = cmd.Process.Signal(syscall.SIGTERM)
			killAt = time.After(r.grace)
			continue
		case <-killAt:
			killAt = nil
			_ = cmd.Process.Kill()
			continue
		case <-waited:
		}
		break
	}
	relErr := lock.Release(context.Background())
	if reason != nil {
		return exitLost
	}
	if relErr != nil {
		r.failf("%s before CMD ended: %v", r.lostWhat(relErr), relErr)
		return exitLost
	}
	return exitStatus(cmd.ProcessState)
}

// lostWhat says how the lock ended: lost, or its TTL passed.
func (r *runner) lostWhat(err error) string {
	if errors.Is(err, advisory.ErrTTLExceeded) {
		return fmt.Sprintf("the --ttl %v of the lock on %s passed", r.ttl.d, r.what)
	}
	return fmt.Sprintf("lost the lock on %s", r.what)
}

// exitStatus is CMD's exit status, 128+N when signal N killed it.
func exitStatus(ps *os.ProcessState) int {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitSignal + int(ws.Signal())
	}
	return ps.ExitCode()
}

// signalNumber is the number of a syscall.Signal, 0 for others.
func signalNumber(s os.Signal) int {
	if n, ok := s.(syscall.Signal); ok {
		return int(n)
	}
	return 0
}
