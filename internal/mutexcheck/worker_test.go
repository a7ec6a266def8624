package mutexcheck

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// envWorker names the environment variable that turns the test binary into
// a worker process: its value is the worker's config as JSON.
const envWorker = "MUTEXCHECK_WORKER"

// workerConfig is what the parent tells a worker process.
type workerConfig struct {
	DSN         string
	Proc        int
	Goroutines  int
	Keys        int
	KeyBase     int64   // advisory keys are KeyBase+0 .. KeyBase+Keys-1; counter rows are 0 .. Keys-1
	WriterRatio float64 // share of sections that take the key exclusively and write; the rest are shared readers
	Faults      bool    // the parent injects faults: cancel some waits, fence the counter write
	NoLock      bool    // the checker's negative control: sections take no lock, and one lock is leaked on purpose
	Health      time.Duration
	Seed        uint64
	MaxRun      time.Duration // the worker exits by itself after this long
}

// workerStats is what a worker reports on its last stdout line.
type workerStats struct {
	Attempts     int64 // lock attempts
	Sections     int64 // completed writer sections (Acquire or Session): counter written, exit recorded
	ReadSections int64 // completed reader sections
	DoSections   int64 // Do bodies that ran to completion
	DoWrites     int64 // of which wrote the counter (clean mode only)
	Timeouts     int64 // waits ended by their bound (ErrTimeout)
	Cancels      int64 // waits ended by a cancelled context
	Lost         int64 // holders that lost their lock and were told (Done closed, Err ErrLockLost)
	Untold       int64 // holders whose fenced write failed but were not told within toldGuard
	FencedOther  int64 // fenced statements that failed without ErrLockLost (must be 0: a dead session is a lost lock)
	ZombieTried  int64 // fenced writes attempted after being told
	ZombieLanded int64 // ... that succeeded (must be 0)
	ReaderSaw    int64 // readers that saw the counter change during their section (must be 0)
	LostWaiting  int64 // lock calls that failed with ErrLockLost (their session ended during the call)
	Failed       int64 // other errors (connection refused during a restart, ...)
	Samples      []string
	LeakedConns  int64
	LeakedLocks  int64  // advisory locks held by the lock pool's idle connections once every goroutine stopped
	Leaked       string // goleak's report, "" when none
}

// worker is one worker process's state.
type worker struct {
	cfg      workerConfig
	lockPool *pgxpool.Pool // sessions and locks
	dataPool *pgxpool.Pool // the counter's read-modify-write: a different connection
	stats    workerStats
	mu       sync.Mutex // guards stats.Samples
}

// runWorker is the body of a worker process: it runs until its stdin is
// closed (or MaxRun passes), then prints its stats and returns the exit code.
func runWorker(spec string) int {
	var cfg workerConfig
	if err := json.Unmarshal([]byte(spec), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 2
	}
	stop, cancel := context.WithTimeout(context.Background(), cfg.MaxRun)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		cancel()
	}()

	w := &worker{cfg: cfg}
	ctx, cancelSetup := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelSetup()
	var err error
	if w.lockPool, err = newPool(ctx, cfg.DSN, int32(2*cfg.Goroutines+2)); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 2
	}
	if w.dataPool, err = newPool(ctx, cfg.DSN, int32(cfg.Goroutines)); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 2
	}
	var wg sync.WaitGroup
	for g := range cfg.Goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.loop(stop, g)
		}()
	}
	wg.Wait()
	cancelSetup()
	// The end checks get a bound of their own: the setup's ran out long ago
	// in a long run (ADVISORY_LONG), which made every check below fail.
	ctx, cancelEnd := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelEnd()
	w.stats.LeakedConns = awaitReleased(w.lockPool, w.dataPool)
	if cfg.NoLock {
		w.leakOnPurpose(ctx)
	}
	// Look for leaked locks while the pools are open: closing them would
	// end the sessions, and free whatever they leaked, unseen.
	w.stats.LeakedLocks = w.idleLocks(ctx)
	w.lockPool.Close()
	w.dataPool.Close()
	cancelEnd()
	cancel()
	// The stdin reader (in io.Copy) is still blocked on purpose: it ends
	// with the process.
	if err := goleak.Find(goleak.IgnoreAnyFunction("io.Copy")); err != nil {
		w.stats.Leaked = err.Error()
	}
	out, _ := json.Marshal(&w.stats)
	fmt.Println(string(out))
	return 0
}

// awaitReleased returns the number of connections still acquired from the
// pools, waiting up to 10 s for each to reach zero: pgxpool destroys a
// closed connection in the background, and counts it as acquired until
// then.
func awaitReleased(pools ...*pgxpool.Pool) int64 {
	var n int64
	for _, p := range pools {
		n += int64(pgtest.AwaitReleased(p, 10*time.Second))
	}
	return n
}

// idleLocks counts the advisory locks held by the lock pool's idle
// connections, asking each connection about its own session. A failure to
// ask is counted as an unexpected error, with a sample.
func (w *worker) idleLocks(ctx context.Context) int64 {
	var n int64
	for _, c := range w.lockPool.AcquireAllIdle(ctx) {
		var held int64
		err := c.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(&held)
		c.Release()
		if err != nil {
			atomic.AddInt64(&w.stats.Failed, 1)
			w.sample("looking for locks left on an idle connection: %v", err)
			continue
		}
		n += held
	}
	return n
}

// leakOnPurpose leaves a session lock on an idle connection of the lock
// pool, for the negative control: the report must find it.
func (w *worker) leakOnPurpose(ctx context.Context) {
	c, err := w.lockPool.Acquire(ctx)
	if err != nil {
		w.failed("leak on purpose", err)
		return
	}
	defer c.Release()
	if _, err := c.Exec(ctx, `SELECT pg_advisory_lock($1)`, w.cfg.KeyBase+999); err != nil {
		w.failed("leak on purpose", err)
	}
}

func newPool(ctx context.Context, dsn string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = maxConns
	return pgxpool.NewWithConfig(ctx, cfg)
}

func (w *worker) sample(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.stats.Samples) < 10 {
		w.stats.Samples = append(w.stats.Samples, fmt.Sprintf(format, args...))
	}
}

// holder is what a section needs from a held lock: a Lock or a Session.
type holder interface {
	WithConn(context.Context, func(*pgx.Conn) error) error
	Done() <-chan struct{}
	Err() error
}

// loop runs sections until stop ends, with one of three APIs at random:
// Acquire/Release, a long-lived Session's Lock/Unlock, or Do.
func (w *worker) loop(stop context.Context, g int) {
	rng := rand.New(rand.NewPCG(w.cfg.Seed, uint64(w.cfg.Proc*1000+g)))
	var sess *advisory.Session
	defer func() {
		if sess != nil {
			closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = sess.Close(closeCtx) // an error here is a loss already counted
			cancel()
		}
	}()
	for stop.Err() == nil {
		// A moment between sections, so that the checker does not take
		// the whole CPU from the tests run in parallel with it.
		time.Sleep(time.Duration(rng.IntN(1000)) * time.Microsecond) // jitter, not synchronisation
		key := rng.IntN(w.cfg.Keys)
		writer := rng.Float64() < w.cfg.WriterRatio
		opts := []advisory.Option{advisory.HealthInterval(w.cfg.Health)}
		if !writer {
			opts = append(opts, advisory.Shared())
		}
		atomic.AddInt64(&w.stats.Attempts, 1)
		if w.cfg.NoLock {
			w.withoutLock(rng, g, key, writer)
			continue
		}
		switch api := rng.IntN(3); api {
		case 0:
			w.viaAcquire(rng, g, key, writer, opts)
		case 1:
			if sess == nil {
				s, err := advisory.NewSession(stop, w.lockPool, advisory.HealthInterval(w.cfg.Health))
				if err != nil {
					w.failed("new session", err)
					continue
				}
				sess = s
			}
			// The session has its health interval: Lock takes only the mode.
			if !w.viaSession(rng, g, sess, key, writer, opts[1:]) {
				closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_ = sess.Close(closeCtx)
				cancel()
				sess = nil
			}
		case 2:
			w.viaDo(rng, key, writer, opts)
		}
	}
}

// waitCtx is the context a lock wait runs under: in fault mode, now and
// then one that is cancelled or times out after a few milliseconds.
func (w *worker) waitCtx(rng *rand.Rand) (context.Context, context.CancelFunc) {
	base, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	if !w.cfg.Faults {
		return base, cancel
	}
	d := time.Duration(rng.IntN(20_000)) * time.Microsecond
	switch rng.IntN(5) {
	case 0:
		ctx, c2 := context.WithTimeout(base, d)
		return ctx, func() { c2(); cancel() }
	case 1:
		ctx, c2 := context.WithCancel(base)
		t := time.AfterFunc(d, c2)
		return ctx, func() { t.Stop(); c2(); cancel() }
	}
	return base, cancel
}

// waitFailed classifies an error from a lock wait.
func (w *worker) waitFailed(what string, err error) {
	switch {
	case errors.Is(err, advisory.ErrLockLost), strings.Contains(err.Error(), "lost while waiting"):
		// First: the error of a call on a session that ended also wraps
		// the session's end reason, which may be a context error (a
		// health check that timed out). A waiter whose connection was
		// lost never held the lock: its error is not ErrLockLost, and
		// says so (no sentinel: the pgx or network error is its cause).
		atomic.AddInt64(&w.stats.LostWaiting, 1)
		if !w.cfg.Faults {
			w.sample("%s: %v", what, err)
		}
	case errors.Is(err, advisory.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		atomic.AddInt64(&w.stats.Timeouts, 1)
		if !w.cfg.Faults {
			w.sample("%s: %v", what, err)
		}
	case errors.Is(err, context.Canceled):
		atomic.AddInt64(&w.stats.Cancels, 1)
		if !w.cfg.Faults {
			w.sample("%s: %v", what, err)
		}
	default:
		w.failed(what, err)
	}
}

// failed counts an unexpected error, and backs off a little: during a
// server restart every call fails at once.
func (w *worker) failed(what string, err error) {
	atomic.AddInt64(&w.stats.Failed, 1)
	w.sample("%s: %v", what, err)
	time.Sleep(time.Duration(5+rand.IntN(20)) * time.Millisecond) // a back-off, not synchronisation
}

// sectionCtx bounds the statements of one critical section.
func sectionCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

func (w *worker) viaAcquire(rng *rand.Rand, g, key int, writer bool, opts []advisory.Option) {
	wctx, cancel := w.waitCtx(rng)
	lock, err := advisory.Acquire(wctx, w.lockPool, advisory.Int64Key(w.cfg.KeyBase+int64(key)), opts...)
	cancel()
	if err != nil {
		w.waitFailed("acquire", err)
		return
	}
	ctx, cancel := sectionCtx()
	defer cancel()
	lost := w.section(ctx, rng, lock, g, key, writer)
	if err := lock.Release(ctx); err != nil && !lost {
		if errors.Is(err, advisory.ErrLockLost) {
			// Lost between the exit record and the release: told here.
			atomic.AddInt64(&w.stats.Lost, 1)
			return
		}
		w.failed("release", err)
	}
}

// viaSession runs a section on the goroutine's long-lived session; it
// returns false when the session has ended and must be replaced.
func (w *worker) viaSession(rng *rand.Rand, g int, sess *advisory.Session, key int, writer bool, opts []advisory.Option) bool {
	k := advisory.Int64Key(w.cfg.KeyBase + int64(key))
	wctx, cancel := w.waitCtx(rng)
	ok, err := sess.Lock(wctx, k, opts...)
	cancel()
	if err != nil {
		w.waitFailed("session lock", err)
		return sess.Err() == nil
	}
	if !ok {
		w.failed("session lock", errors.New("not acquired without NoWait"))
		return true
	}
	ctx, cancel := sectionCtx()
	defer cancel()
	lost := w.section(ctx, rng, sess, g, key, writer)
	var unlockOpts []advisory.Option
	if !writer {
		unlockOpts = append(unlockOpts, advisory.Shared())
	}
	if err := sess.Unlock(ctx, k, unlockOpts...); err != nil && !lost {
		if errors.Is(err, advisory.ErrLockLost) {
			atomic.AddInt64(&w.stats.Lost, 1)
		} else {
			w.failed("session unlock", err)
		}
	}
	return sess.Err() == nil && !lost
}

// withoutLock runs a section holding no lock (the negative control): its
// interval records go through a connection of the lock pool, as a lock's
// would.
func (w *worker) withoutLock(rng *rand.Rand, g, key int, writer bool) {
	ctx, cancel := sectionCtx()
	defer cancel()
	c, err := w.lockPool.Acquire(ctx)
	if err != nil {
		w.failed("acquire a connection", err)
		return
	}
	defer c.Release()
	w.section(ctx, rng, noLock{c.Conn()}, g, key, writer)
}

// noLock is a holder that holds nothing: WithConn runs fn on a plain
// connection, and it is never told of a loss.
type noLock struct{ c *pgx.Conn }

func (n noLock) WithConn(_ context.Context, fn func(*pgx.Conn) error) error { return fn(n.c) }
func (noLock) Done() <-chan struct{}                                        { return nil }
func (noLock) Err() error                                                   { return nil }

// viaDo runs a body under Do. Do hands out no connection to fence with, so
// in fault mode the body only waits (and must be told of a loss through
// its context); in clean mode it does the counter's read-modify-write.
func (w *worker) viaDo(rng *rand.Rand, key int, writer bool, opts []advisory.Option) {
	ctx, cancel := sectionCtx()
	defer cancel()
	if w.cfg.Faults {
		// Bound the wait with an option instead of ctx, which fn inherits.
		switch rng.IntN(4) {
		case 0:
			opts = append(opts, advisory.WaitTimeout(time.Duration(1+rng.IntN(20))*time.Millisecond))
		case 1:
			opts = append(opts, advisory.NoWait())
		}
	}
	var wrote bool
	acquired, err := advisory.Do(ctx, w.lockPool, advisory.Int64Key(w.cfg.KeyBase+int64(key)), func(ctx context.Context) error {
		if w.cfg.Faults {
			select {
			case <-time.After(time.Duration(rng.IntN(5000)) * time.Microsecond):
				return nil
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		var n int64
		if err := w.dataPool.QueryRow(ctx, `SELECT n FROM counters WHERE k = $1`, key).Scan(&n); err != nil {
			return err
		}
		jitter(rng, nil)
		if !writer {
			return nil
		}
		if _, err := w.dataPool.Exec(ctx, `UPDATE counters SET n = $2 WHERE k = $1`, key, n+1); err != nil {
			return err
		}
		wrote = true
		return nil
	}, opts...)
	switch {
	case err == nil && acquired:
		atomic.AddInt64(&w.stats.DoSections, 1)
		if wrote {
			atomic.AddInt64(&w.stats.DoWrites, 1)
		}
	case err == nil: // NoWait found the key busy
	case acquired && errors.Is(err, advisory.ErrLockLost):
		atomic.AddInt64(&w.stats.Lost, 1)
		if wrote {
			// The write went through another connection before the loss
			// was noticed: it is not fenced, so it is not counted as a
			// section. Only clean mode writes in Do, and it has no loss.
			w.failed("do", fmt.Errorf("lock lost after an unfenced write: %w", err))
		}
	case acquired:
		w.failed("do", err)
	default:
		w.waitFailed("do", err)
	}
}

// jitter sleeps up to 2 ms, or until done closes.
func jitter(rng *rand.Rand, done <-chan struct{}) {
	t := time.NewTimer(time.Duration(rng.IntN(2000)) * time.Microsecond)
	defer t.Stop()
	select {
	case <-t.C:
	case <-done:
	}
}

// section is one critical section under h: it records its entry time on
// the lock's own session, reads the counter through the data pool, and
// either writes it back (writer) or reads it again (reader), and records its
// exit time on the lock's session. In clean mode the writer's UPDATE goes
// through the data pool (separate SELECT and UPDATE: without the lock,
// updates get lost); in fault mode it is part of the fenced exit statement,
// so it lands only if the lock was held from entry to exit. It returns true
// when the lock was found lost (and checks the holder was told).
func (w *worker) section(ctx context.Context, rng *rand.Rand, h holder, g, key int, writer bool) (lost bool) {
	role := "r"
	if writer {
		role = "w"
	}
	var id int64
	err := h.WithConn(ctx, func(c *pgx.Conn) error {
		return c.QueryRow(ctx, `INSERT INTO intervals (proc, g, k, role, pid, t_enter)
			VALUES ($1, $2, $3, $4, pg_backend_pid(), clock_timestamp()) RETURNING id`,
			w.cfg.Proc, g, key, role).Scan(&id)
	})
	if err != nil {
		return w.lostAfter(ctx, h, "enter", err)
	}
	var n int64
	if err := w.dataPool.QueryRow(ctx, `SELECT n FROM counters WHERE k = $1`, key).Scan(&n); err != nil {
		w.failed("read", err)
		return false
	}
	jitter(rng, h.Done())
	var exit func(*pgx.Conn) error
	switch {
	case !writer:
		var n2 int64
		if err := w.dataPool.QueryRow(ctx, `SELECT n FROM counters WHERE k = $1`, key).Scan(&n2); err != nil {
			w.failed("read", err)
			return false
		}
		exit = func(c *pgx.Conn) error {
			_, err := c.Exec(ctx, `UPDATE intervals SET t_exit = clock_timestamp(), seen = $2, seen2 = $3 WHERE id = $1`, id, n, n2)
			return err
		}
		defer func() {
			if err == nil && n2 != n {
				atomic.AddInt64(&w.stats.ReaderSaw, 1)
				w.sample("reader of key %d saw %d then %d", key, n, n2)
			}
		}()
	case !w.cfg.Faults:
		if _, err := w.dataPool.Exec(ctx, `UPDATE counters SET n = $2 WHERE k = $1`, key, n+1); err != nil {
			w.failed("write", err)
			return false
		}
		exit = func(c *pgx.Conn) error {
			_, err := c.Exec(ctx, `UPDATE intervals SET t_exit = clock_timestamp(), seen = $2 WHERE id = $1`, id, n)
			return err
		}
	default:
		exit = func(c *pgx.Conn) error {
			tag, err := c.Exec(ctx, `WITH c AS (UPDATE counters SET n = $3 WHERE k = $2 RETURNING 1)
				UPDATE intervals SET t_exit = clock_timestamp(), seen = $4 WHERE id = $1 AND EXISTS (SELECT FROM c)`,
				id, key, n+1, n)
			if err == nil && tag.RowsAffected() != 1 {
				err = fmt.Errorf("exit of section %d updated %d rows", id, tag.RowsAffected())
			}
			return err
		}
	}
	if err = h.WithConn(ctx, exit); err != nil {
		return w.lostAfter(ctx, h, "exit", err)
	}
	if writer {
		atomic.AddInt64(&w.stats.Sections, 1)
	} else {
		atomic.AddInt64(&w.stats.ReadSections, 1)
	}
	return false
}

// toldGuard is how long a holder whose fenced statement failed may take to
// be told before it counts as untold: a hang guard (the watcher tells
// within one health interval, 50 ms in fault mode), not a timing claim.
const toldGuard = 30 * time.Second

// lostAfter handles a fenced statement that failed: the lock must have been
// lost, the failure must say so (ErrLockLost; anything else is counted as
// FencedOther, which fails the run), and the holder must be told (Done
// closed, Err matching ErrLockLost) within toldGuard. A further fenced
// write must fail too.
func (w *worker) lostAfter(ctx context.Context, h holder, what string, err error) bool {
	if !errors.Is(err, advisory.ErrLockLost) {
		// A fenced statement fails only when the session is gone (or
		// its context ended, 30 s into a section): either way the holder
		// must be told its lock is lost, not handed a bare error.
		atomic.AddInt64(&w.stats.FencedOther, 1)
		w.sample("%s: the fenced statement failed without ErrLockLost: %v", what, err)
		return false
	}
	select {
	case <-h.Done():
	case <-time.After(toldGuard):
	}
	select {
	case <-h.Done():
		if errors.Is(h.Err(), advisory.ErrLockLost) {
			atomic.AddInt64(&w.stats.Lost, 1)
		} else {
			atomic.AddInt64(&w.stats.Untold, 1)
			w.sample("%s: lock lost (%v) but Err() = %v", what, err, h.Err())
		}
	default:
		atomic.AddInt64(&w.stats.Untold, 1)
		w.sample("%s: lock lost (%v) but Done() still open after %v", what, err, toldGuard)
	}
	atomic.AddInt64(&w.stats.ZombieTried, 1)
	zerr := h.WithConn(ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(ctx, `INSERT INTO zombie (proc, note) VALUES ($1, $2)`, w.cfg.Proc, what)
		return err
	})
	if zerr == nil {
		atomic.AddInt64(&w.stats.ZombieLanded, 1)
		w.sample("%s: a fenced write landed after the lock was lost", what)
	}
	return true
}
