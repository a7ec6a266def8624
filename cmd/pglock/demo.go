package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Demo sizes and bounds.
const (
	demoWorkers    = 4
	demoRounds     = 3
	demoHold       = 20 * time.Millisecond // the critical section's work
	demoCandidates = 3
	demoHealth     = 250 * time.Millisecond // the leaders' health interval
	demoTimeout    = 50 * time.Second
)

func cmdDemo(args []string, stdout, stderr io.Writer) int {
	c := newCommand("demo", "pglock demo [--dsn DSN]",
		`Shows the library at work: workers contending for one lock (mutual
exclusion checked), a leader elected among candidates, its backend
terminated (pg_terminate_backend) and the measured fail-over time.

With no --dsn, DATABASE_URL, PGHOST, PGPORT, PGDATABASE, PGUSER or PGSERVICE
it starts a throw-away PostgreSQL (ADVISORY_TEST_DSN is ignored; Docker if
an engine answers, else local initdb/pg_ctl in a temporary directory), and
stops it and removes its files at the end. With a database configured it
runs there, on keys of its own, and leaves no lock behind. It needs the
right to terminate its own sessions. Exits 0 when every check passed.
`)
	dsn := addDSNFlag(c.fs, "connection string `DSN` (default: DATABASE_URL, else the PG* environment, else a throw-away server)")
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	if c.fs.NArg() > 0 {
		return c.usageError(stderr, fmt.Sprintf("unexpected argument %q", c.fs.Arg(0)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), demoTimeout)
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	got := onSignal(sigs, cancel)
	d := &demo{out: stdout, start: time.Now()}
	cn := connFrom(*dsn)
	err := d.run(ctx, cn, *dsn == "" && !configured())
	if s := got(); s != nil {
		fmt.Fprintf(stderr, "pglock demo: interrupted by %v; stopped, nothing left behind\n", s)
		return exitSignal + signalNumber(s)
	}
	if err != nil {
		fmt.Fprintln(stderr, "pglock demo: FAILED: "+oneLine(cn.redact(err.Error())))
		return exitFailure
	}
	d.printf("all checks passed in %v\n", time.Since(d.start).Round(time.Millisecond))
	return exitOK
}

// demo is one run of "pglock demo".
type demo struct {
	out   io.Writer
	mu    sync.Mutex
	start time.Time
}

func (d *demo) printf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fmt.Fprintf(d.out, format, args...)
}

// run runs the demo on a throw-away server (own) or on the configured one.
func (d *demo) run(ctx context.Context, cn *conn, own bool) (err error) {
	var cfg *pgxpool.Config
	if own {
		t0 := time.Now()
		srv, err := pgtest.Start(ctx, pgtest.Options{Private: true})
		if err != nil {
			return err
		}
		defer func() {
			stopErr := srv.Stop()
			if stopErr == nil {
				d.printf("stopped the throw-away server and removed its files\n")
			}
			err = errors.Join(err, stopErr)
		}()
		d.printf("started a throw-away PostgreSQL (%s) at %s:%d in %v\n",
			srv.Source(), srv.Host, srv.Port, time.Since(t0).Round(time.Millisecond))
		if cfg, err = pgxpool.ParseConfig(srv.DSN); err != nil {
			return err
		}
		cfg.ConnConfig.RuntimeParams["application_name"] = "pglock demo"
		cn.from = "the throw-away server"
	} else {
		if cfg, err = cn.poolConfig("pglock demo"); err != nil {
			return err
		}
		cfg.ConnConfig.RuntimeParams["application_name"] = "pglock demo"
		d.printf("using the configured database at %s (settings from %s)\n", hostPort(cfg.ConnConfig), cn.from)
	}
	cfg.MaxConns = demoWorkers + demoCandidates + 2
	cfg.MinConns = 0
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := cn.ping(ctx, pool); err != nil {
		return err
	}

	// On a database of its own the demo's keys need no tag; on a configured
	// one the tag keeps demos running at once apart.
	suffix := ""
	if !own {
		suffix = "-" + randomTag()
	}
	workers, leader := newDemoKey("demo-job"+suffix), newDemoKey("demo-leader"+suffix)
	if err := d.contention(ctx, pool, workers); err != nil {
		return err
	}
	if err := d.failover(ctx, pool, leader); err != nil {
		return err
	}
	return d.noLocksLeft(ctx, pool, workers, leader)
}

// contention runs demoWorkers workers that each take key demoRounds times
// and checks that no two ever hold it at once.
func (d *demo) contention(ctx context.Context, pool *pgxpool.Pool, key demoKey) error {
	d.printf("\n1. contention: %d workers each take the lock %d times and hold it %v; key %s\n",
		demoWorkers, demoRounds, demoHold, key)
	var (
		inside, overlaps, turns atomic.Int32
		wg                      sync.WaitGroup
		errs                    = make([]error, demoWorkers)
	)
	t0 := time.Now()
	for w := range demoWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range demoRounds {
				asked := time.Now()
				_, err := advisory.Do(ctx, pool, key.key, func(ctx context.Context) error {
					if inside.Add(1) > 1 {
						overlaps.Add(1)
					}
					defer inside.Add(-1)
					waited := time.Since(asked)
					hs, err := advisory.Holders(ctx, pool, key.key)
					if err != nil {
						return err
					}
					held, waiting := 0, 0
					for _, h := range hs {
						if h.Granted {
							held++
						} else {
							waiting++
						}
					}
					turns.Add(1)
					d.printf("   worker %d holds it (waited %v; the server shows %d holder, %d waiting)\n",
						w+1, waited.Round(time.Millisecond), held, waiting)
					if held != 1 {
						return fmt.Errorf("worker %d: the server shows %d holders of %s, want 1", w+1, held, key)
					}
					time.Sleep(demoHold) // the work done under the lock
					return nil
				})
				if err != nil {
					errs[w] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if n := overlaps.Load(); n != 0 {
		return fmt.Errorf("mutual exclusion broken: %d turns began while another worker held %s", n, key)
	}
	d.printf("   %d turns in %v, never two at once: mutual exclusion held\n",
		turns.Load(), time.Since(t0).Round(time.Millisecond))
	return nil
}

// leadership is what a candidate reports.
type leadership struct {
	candidate int
	elected   bool // false: stepped down
	at        time.Time
}

// failover elects a leader among demoCandidates, terminates its backend
// from another connection and measures how long until another candidate
// leads, and until the old leader notices.
func (d *demo) failover(ctx context.Context, pool *pgxpool.Pool, key demoKey) error {
	d.printf("\n2. leadership: %d candidates campaign (health interval %v); key %s\n",
		demoCandidates, demoHealth, key)
	events := make(chan leadership, 4*demoCandidates)
	leadCtx, stopLead := context.WithCancel(ctx)
	var wg sync.WaitGroup
	errs := make([]error, demoCandidates)
	defer func() {
		stopLead()
		wg.Wait()
	}()
	for i := range demoCandidates {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := advisory.Lead(leadCtx, pool, key.key, func(ctx context.Context) error {
				events <- leadership{candidate: i + 1, elected: true, at: time.Now()}
				<-ctx.Done()
				events <- leadership{candidate: i + 1, elected: false, at: time.Now()}
				return nil
			}, advisory.HealthInterval(demoHealth))
			if !errors.Is(err, context.Canceled) {
				errs[i] = err
			}
		}()
	}
	next := func() (leadership, error) {
		select {
		case e := <-events:
			return e, nil
		case <-ctx.Done():
			return leadership{}, fmt.Errorf("waiting for the leadership to change: %w", ctx.Err())
		}
	}
	first, err := next()
	if err != nil {
		return err
	}
	// The others may still be connecting: await them on the server.
	var hs []advisory.Holder
	err = awaitHolders(ctx, pool, key.key, func(got []advisory.Holder) bool {
		hs = got
		return len(got) == demoCandidates && got[0].Granted && !got[1].Granted
	})
	if err != nil {
		return fmt.Errorf("want 1 leader and %d candidates waiting on the server: %w", demoCandidates-1, err)
	}
	pid := hs[0].PID
	d.printf("   candidate %d leads (backend pid %d; %d candidates wait on the server)\n",
		first.candidate, pid, len(hs)-1)
	d.printf("   terminating the leader's backend: pg_terminate_backend(%d) from another connection\n", pid)
	killed := time.Now()
	var ok bool
	if err := pool.QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
		return fmt.Errorf("pg_terminate_backend(%d) = %v, %v", pid, ok, err)
	}
	var newLeader, steppedDown *leadership
	for newLeader == nil || steppedDown == nil {
		e, err := next()
		if err != nil {
			return err
		}
		switch {
		case e.elected && newLeader == nil:
			newLeader = &e
		case !e.elected && e.candidate == first.candidate:
			steppedDown = &e
		default:
			return fmt.Errorf("unexpected change: candidate %d elected=%v", e.candidate, e.elected)
		}
	}
	if newLeader.candidate == first.candidate {
		return fmt.Errorf("candidate %d led again before it noticed it had lost", first.candidate)
	}
	d.printf("   candidate %d leads: fail-over %v (from the terminate to the new leader running)\n",
		newLeader.candidate, newLeader.at.Sub(killed).Round(100*time.Microsecond))
	d.printf("   candidate %d learned it had lost %v after the terminate (a terminated backend is seen\n"+
		"   at once, a silent network cut within about two health intervals of %v); until then it\n"+
		"   still believed it led: fence its writes through Lock.WithConn\n",
		first.candidate, steppedDown.at.Sub(killed).Round(100*time.Microsecond), demoHealth)
	stopLead()
	wg.Wait()
	return errors.Join(errs...)
}

// noLocksLeft waits until the server shows no lock on the demo's keys:
// a terminated or closed session's locks go a moment after it ends.
func (d *demo) noLocksLeft(ctx context.Context, pool *pgxpool.Pool, keys ...demoKey) error {
	for _, k := range keys {
		err := awaitHolders(ctx, pool, k.key, func(hs []advisory.Holder) bool { return len(hs) == 0 })
		if err != nil {
			return fmt.Errorf("locks of the demo left on %s: %w", k, err)
		}
	}
	d.printf("\n3. clean-up: no advisory lock left on the demo's keys\n")
	return nil
}

// awaitHolders reads key's holders until ok accepts them, for at most 10 s.
func awaitHolders(ctx context.Context, pool *pgxpool.Pool, key advisory.Key, ok func([]advisory.Holder) bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		hs, err := advisory.Holders(ctx, pool, key)
		if err != nil {
			return err
		}
		if ok(hs) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w; the server shows %d sessions", ctx.Err(), len(hs))
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// demoKey is a lock key with the name it was made from, printed as a person
// reads it: "demo-job" → int64:-4935921351791337521 (as pglock key prints it).
type demoKey struct {
	name string
	key  advisory.Key
}

func newDemoKey(name string) demoKey { return demoKey{name: name, key: advisory.StringKey(name)} }

func (k demoKey) String() string { return fmt.Sprintf("%q → %s", k.name, k.key) }

// randomTag makes the demo's keys its own, so that demos running at once
// on one database do not meet.
func randomTag() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
