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
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// defaultGrace is how long CMD has between SIGTERM and SIGKILL after the
// lock is lost.
const defaultGrace = 10 * time.Second

// A wait for the lock is a sequence of server-side waits of at most
// waitSlice, each of which must be answered within answerBound after it
// ends; a connection that does not answer in time has stalled, and pglock
// closes it and fails. This is the bound a hold gets from the library's
// health check (its default interval, plus as long again for the answer).
const (
	waitSlice   = advisory.DefaultHealthInterval
	answerBound = time.Second
)

// forwarded are the signals pglock passes on to CMD (and that end a wait
// for the lock).
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	c := newCommand("run",
		"pglock run (--key NAME | --id N | --pair A,B) [options] -- CMD [ARG...]",
		`Runs CMD while holding the advisory lock, and exits with CMD's status.
stdin, stdout and stderr are CMD's.

CMD runs in a process group of its own: SIGINT, SIGTERM, SIGHUP and SIGQUIT
sent to pglock (a Ctrl-C at a terminal reaches pglock only) are passed on,
once, to the whole group. When CMD exits, processes it left in its group
are stopped (SIGTERM, then SIGKILL after --grace) before the lock is
released. If pglock itself dies, even by SIGKILL, the kernel kills CMD and
a watchdog kills the rest of its group. With --foreground, CMD stays in
pglock's process group instead, so that it can read the terminal and use
job control: the terminal's signals reach it directly (pglock does not pass
on SIGINT and SIGQUIT), and only CMD itself, not the processes it starts,
is stopped when the lock is lost (as "timeout --foreground" does).

The lock is held by a session whose application_name is "pglock run: " and
CMD's program name (never its arguments), or --app-name; "pglock status"
shows it.

When the lock is not acquired (busy with --no-wait, or --timeout passed,
connecting included), CMD does not run and pglock exits 75
(--conflict-exit-code). The wait is a series of server-side waits of 1s,
each answered, so a stalled connection is noticed within about 2s: pglock
then exits 1. When the lock is lost while CMD runs (the session ended:
backend terminated or server stopped, noticed at once; network cut,
noticed within about two seconds) or --ttl passes, the job gets SIGTERM,
then SIGKILL after --grace, and once none of its processes is left pglock
exits 76 with the reason on stderr. A signal while waiting for the lock
ends the wait; pglock then exits 128+N. DUR is a number of seconds (1.5)
or a Go duration (300ms, 2m).

With --slots N, pglock holds one of the N slots of a counting semaphore on
the key instead, so that at most N runs (or other holders of its slots) go
at once; "pglock key --slots N NAME" prints the slot keys.

Connecting is bounded: a server that accepts and never answers is an error
(exit 1) after 10s, unless the connection string sets connect_timeout.

A signal ignored when pglock starts stays ignored, for pglock and for CMD,
as with nohup. A non-interactive shell starts a background job ("pglock run
... &" in a script) with SIGINT and SIGQUIT ignored, so that a Ctrl-C meant
for the foreground job spares it: such a pglock runs CMD and is not stopped
by SIGINT (kill -INT, Ctrl-C). Stop it with SIGTERM (kill PID), which it
passes on to CMD's process group. pglock does not restore the signals: it
would undo what the shell asked.
`)
	kf := addKeyFlags(c.fs, "lock")
	dsn := addDSNFlag(c.fs, "connection string `DSN` (default: DATABASE_URL, else the PG* environment)")
	shared := c.fs.Bool("shared", false, "take a shared lock: shared holders run together, exclusive ones wait")
	noWait := c.fs.Bool("no-wait", false, "do not wait: exit 75 at once if the lock is held")
	foreground := c.fs.Bool("foreground", false, "keep CMD in pglock's process group, for a CMD that reads the terminal (see above)")
	appName := c.fs.String("app-name", "", "the session's application_name `NAME` (default: \"pglock run: \" and CMD's program name)")
	var timeout, ttl durationFlag
	grace := durationFlag{d: defaultGrace}
	c.fs.Var(&timeout, "timeout", "wait at most `DUR` for the lock, connecting included, then exit 75 (0: as --no-wait)")
	c.fs.Var(&ttl, "ttl", "hold the lock at most `DUR`: then stop CMD and exit 76")
	c.fs.Var(&grace, "grace", "after the lock is lost, wait `DUR` between SIGTERM and SIGKILL (default 10s)")
	conflict := exitCodeFlag(exitConflict)
	c.fs.Var(&conflict, "conflict-exit-code", "exit status `N` when the lock is not acquired (default 75)")
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
	if ttl.set && ttl.d == 0 {
		return c.usageError(stderr, "--ttl must be positive")
	}
	if slots > 0 && *shared {
		return c.usageError(stderr, "give --slots or --shared, not both: a semaphore's slots are held exclusively")
	}
	if *noWait && timeout.set {
		return c.usageError(stderr, "give --no-wait or --timeout, not both (--timeout 0 is --no-wait)")
	}
	app := *appName
	if app == "" {
		app = "pglock run: " + filepath.Base(argv[0])
	}
	r := &runner{
		key: kf.key, what: kf.describe(), argv: argv, shared: *shared,
		noWait: *noWait || timeout.set && timeout.d == 0, foreground: *foreground, app: app,
		conn: connFrom(*dsn), grace: grace.d, conflict: int(conflict),
		timeout: timeout, ttl: ttl, stderr: stderr, slots: slots,
	}
	return r.run()
}

// runner is one "pglock run".
type runner struct {
	key        advisory.Key
	what       string // the key for messages
	argv       []string
	shared     bool
	noWait     bool
	foreground bool
	app        string // application_name
	conn       *conn
	socks      sockets
	grace      time.Duration
	conflict   int
	timeout    durationFlag
	ttl        durationFlag
	stderr     io.Writer
	slots      slotsFlag // --slots N: hold one of N slots; 0: the lock itself
}

// failf prints a one-line message, without secrets, to stderr.
func (r *runner) failf(format string, args ...any) {
	fmt.Fprintln(r.stderr, "pglock: "+oneLine(r.conn.redact(fmt.Sprintf(format, args...))))
}

func (r *runner) run() int {
	// A signal ignored when pglock started (as for a background job of a
	// non-interactive shell) stays ignored, for pglock and for CMD.
	sigs := make(chan os.Signal, 8)
	for _, s := range forwarded {
		if !signal.Ignored(s) {
			signal.Notify(sigs, s)
		}
	}
	defer signal.Stop(sigs)

	cfg, err := r.conn.poolConfig(r.app)
	if err != nil {
		r.failf("%v", err)
		return exitFailure
	}
	cfg.MaxConns = 2
	r.socks.track(&cfg.ConnConfig.Config)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		r.failf("%v", r.conn.connectError(cfg.ConnConfig, err))
		return exitFailure
	}
	defer r.socks.closePool(pool)

	// Until CMD starts, a signal ends the wait (a stalled connection must
	// not delay the exit: its socket is closed).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	signalled := onSignal(sigs, func() {
		cancel()
		r.socks.closeAll()
	})
	lock, code := r.acquire(ctx, pool)
	if got := signalled(); got != nil {
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

// acquire connects and takes the lock. It returns the Lock (acquired or
// not) and -1, or nil and the exit status after printing why: r.conflict
// when --timeout passed, exitFailure on an error or a stalled connection
// (nothing printed when ctx was cancelled by a signal: the caller says so).
func (r *runner) acquire(ctx context.Context, pool *pgxpool.Pool) (*advisory.Lock, int) {
	var deadline time.Time
	connectCtx := ctx
	if r.timeout.set && r.timeout.d > 0 { // --timeout 0 is --no-wait
		deadline = time.Now().Add(r.timeout.d)
		var cancel context.CancelFunc
		connectCtx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	// A server that accepts and then never answers: connect_timeout bounds
	// the connection, and the first query on it must be answered within
	// answerBound, as every wait is.
	var stalled atomic.Bool
	c, err := pool.Acquire(connectCtx)
	if err == nil {
		guard := time.AfterFunc(answerBound, func() {
			stalled.Store(true)
			r.socks.closeAll()
		})
		err = c.Ping(connectCtx)
		guard.Stop()
		c.Release()
	}
	if err != nil {
		err = r.conn.connectError(pool.Config().ConnConfig, err)
	}
	if err != nil {
		switch {
		case ctx.Err() != nil:
		case stalled.Load() && connectCtx.Err() == nil:
			r.failf("the connection to %s stalled: no answer %v after connecting; CMD not run",
				hostPort(pool.Config().ConnConfig), answerBound)
		case connectCtx.Err() != nil:
			r.failf("could not connect to %s within the --timeout %v; CMD not run", hostPort(pool.Config().ConnConfig), r.timeout.d)
			return nil, r.conflict
		default:
			r.failf("%v", err)
		}
		return nil, exitFailure
	}
	opts := []advisory.Option{}
	if r.shared {
		opts = append(opts, advisory.Shared())
	}
	if r.ttl.set {
		opts = append(opts, advisory.TTL(r.ttl.d))
	}
	// One wait, in calls of a slice each: pglock status shows it waiting
	// since its first.
	opts = append(opts, advisory.WaitingSince(time.Now()))
	for {
		slice := waitSlice
		if r.noWait {
			slice = 0
		} else if !deadline.IsZero() {
			slice = min(slice, time.Until(deadline))
			if slice <= 0 {
				r.failf("%s for the whole --timeout %v; CMD not run", r.heldElsewhere(false), r.timeout.d)
				return nil, r.conflict
			}
		}
		lock, err, stalled := r.tryOnce(ctx, pool, append(opts, advisory.WaitTimeout(slice)), slice)
		switch {
		case stalled:
			if lock != nil {
				_ = lock.Release(context.Background())
			}
			if ctx.Err() == nil {
				r.failf("the connection to %s stalled: no answer %v after a wait for the lock on %s ended; CMD not run",
					hostPort(pool.Config().ConnConfig), answerBound, r.what)
			}
			return nil, exitFailure
		case err == nil:
			return lock, -1
		case errors.Is(err, advisory.ErrTimeout):
			continue // the slice ended: wait again
		case ctx.Err() == nil:
			// A waiter never held the lock: the library's "lock lost" text
			// would say mutual exclusion was lost.
			r.failf("failed while waiting for the lock on %s (it was never held); CMD not run: %s",
				r.what, strings.ReplaceAll(err.Error(), advisory.ErrLockLost.Error(), "the session ended"))
		}
		return nil, exitFailure
	}
}

// tryOnce is one wait of at most slice for the lock. If no answer comes
// within answerBound after the slice, it closes the pool's connections and
// reports stalled.
func (r *runner) tryOnce(ctx context.Context, pool *pgxpool.Pool, opts []advisory.Option, slice time.Duration) (lock *advisory.Lock, err error, stalled bool) {
	var fired atomic.Bool
	guard := time.AfterFunc(slice+answerBound, func() {
		fired.Store(true)
		r.socks.closeAll()
	})
	lock, err = r.lock(ctx, pool, opts...)
	guard.Stop()
	return lock, err, fired.Load()
}

// runCmd runs the job under the held lock and returns pglock's exit status.
// It returns only once every process of the job has ended.
func (r *runner) runCmd(lock *advisory.Lock, sigs <-chan os.Signal) int {
	j, err := startJob(r.argv, r.foreground)
	if err != nil {
		relErr := lock.Release(context.Background())
		r.failf("cannot run %s: %v", r.argv[0], errors.Join(err, relErr))
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
			return exitNotFound
		}
		return exitNoExec
	}
	defer j.close()

	var (
		lost     = lock.Done()
		cmdDone  = j.done
		stopping bool
		killAt   <-chan time.Time
		poll     *time.Ticker // while processes outlive CMD
		left     bool         // CMD exited and left processes in its group
		reason   error
		termAt   time.Time // when the job got SIGTERM
		killed   bool      // the job got SIGKILL after the grace
	)
	stop := func() {
		if !stopping {
			stopping = true
			j.signal(syscall.SIGTERM)
			termAt = time.Now()
			killAt = time.After(r.grace)
		}
	}
	for !j.ended() {
		var tick <-chan time.Time
		if poll != nil {
			tick = poll.C
		}
		select {
		case s := <-sigs:
			j.forward(s)
		case <-lost:
			lost = nil
			reason = lock.Err()
			if reason == nil { // released under us: cannot happen, but never run unprotected
				reason = advisory.ErrLockLost
			}
			stop()
		case <-cmdDone:
			cmdDone = nil
			if j.ended() {
				continue
			}
			left = true
			// Processes left in the group are checked for every 10 ms: the
			// kernel says nothing when a process group empties.
			poll = time.NewTicker(10 * time.Millisecond)
			defer poll.Stop()
			stop()
		case <-killAt:
			killAt = nil
			killed = true
			j.signal(syscall.SIGKILL)
		case <-tick:
		}
	}
	if reason != nil {
		_ = lock.Release(context.Background()) // the session has ended: this only returns its connection
		r.failf("%s; stopped CMD's processes (%s): %v", r.lostWhat(reason), r.howStopped(termAt, killed), reason)
		return exitLost
	}
	if left {
		r.failf("CMD exited but left processes in its process group; stopped them (%s) before releasing the lock", r.howStopped(termAt, killed))
	}
	if relErr := lock.Release(context.Background()); relErr != nil {
		r.failf("%s before CMD ended: %v", r.lostWhat(relErr), relErr)
		return exitLost
	}
	return j.status()
}

// howStopped says how the job's processes were stopped: by the SIGTERM
// sent at termAt, or by the SIGKILL after the grace.
func (r *runner) howStopped(termAt time.Time, killed bool) string {
	if killed {
		return fmt.Sprintf("SIGTERM, then SIGKILL after the --grace %v", r.grace)
	}
	return fmt.Sprintf("SIGTERM sufficed: they ended %v after it", time.Since(termAt).Round(time.Millisecond))
}

// lostWhat says how the lock ended: lost, or its TTL passed.
func (r *runner) lostWhat(err error) string {
	if errors.Is(err, advisory.ErrTTLExceeded) {
		return fmt.Sprintf("the --ttl %v of the lock on %s passed", r.ttl.d, r.what)
	}
	return fmt.Sprintf("lost the lock on %s", r.what)
}

// onSignal calls stop when a signal arrives on sigs, until the function it
// returns is called; that function says which signal came (nil if none).
func onSignal(sigs <-chan os.Signal, stop func()) func() os.Signal {
	var (
		got  os.Signal
		done = make(chan struct{})
		quit = make(chan struct{})
	)
	go func() {
		defer close(done)
		select {
		case got = <-sigs:
			stop()
		case <-quit:
		}
	}()
	return func() os.Signal {
		close(quit)
		<-done
		return got
	}
}

// signalNumber is the number of a syscall.Signal, 0 for others.
func signalNumber(s os.Signal) int {
	if n, ok := s.(syscall.Signal); ok {
		return int(n)
	}
	return 0
}
