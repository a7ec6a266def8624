package advisory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Tests of SPEC §9: counting semaphores.

// The slot keys are the documented formula, pinned by vectors computed
// with xxhsum (printf 'int64:3609083425553560728#0' | xxhsum -H1, where
// 3609083425553560728 is StringKey("exports")).
func TestSemaphoreKeys(t *testing.T) {
	key := StringKey("exports")
	if v, _ := key.Int64(); v != 3609083425553560728 {
		t.Fatalf("StringKey(exports) = %d", v)
	}
	want := []Key{Int64Key(0x380214df2c78648c), Int64Key(0x1c85fa21c2e970aa), Int64Key(-0x392ee05b123b2dc9)}
	if got := SemaphoreKeys(key, 3); !slices.Equal(got, want) {
		t.Errorf("SemaphoreKeys(exports, 3) = %v; want %v", got, want)
	}
	for i, k := range SemaphoreKeys(PairKey(1, -2), 5) {
		if want := StringKey("pair:1,-2#" + strconv.Itoa(i)); k != want {
			t.Errorf("slot %d of pair:1,-2 = %v; want %v", i, k, want)
		}
	}
	if got := SemaphoreKeys(key, 1); !slices.Equal(got, want[:1]) {
		t.Errorf("SemaphoreKeys(exports, 1) = %v; want the first slot of any size", got)
	}
	for _, c := range []struct {
		key Key
		n   int
	}{{key, 0}, {key, -1}, {Key{}, 3}} {
		if got := SemaphoreKeys(c.key, c.n); got != nil {
			t.Errorf("SemaphoreKeys(%v, %d) = %v; want nil", c.key, c.n, got)
		}
	}
}

// slotCountSQL counts, among the slot keys given as int8[], the granted
// rows, the waiting rows, and the most slots one backend holds.
const slotCountSQL = `SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted),
	COALESCE(max(n), 0) FROM (
	SELECT granted, count(*) FILTER (WHERE granted) OVER (PARTITION BY pid) AS n FROM pg_locks
	WHERE locktype = 'advisory' AND objsubid = 1
	AND ((classid::int8 << 32) | objid::int8) = ANY ($1::int8[])) AS l`

// slotInts returns the int8 values of slot keys.
func slotInts(slots []Key) []int64 { return manyArgs(slots)[0].([]int64) }

// Under 20 workers that take and release the semaphore again and again,
// never more than n hold a slot: neither by an in-process count nor by
// pg_locks, sampled all along on a connection of its own; no backend holds
// two slots; every worker is served every time; and n hold at once.
func TestSemaphoreAtMostN(t *testing.T) {
	for _, n := range []int{1, 3} {
		t.Run(fmt.Sprint("n=", n), func(t *testing.T) {
			e := newEnv(t)
			const workers, rounds = 20, 5
			pool := e.pool(deadlockTimeout("100ms", workers+2)) // slices of 50 ms
			key := StringKey("sem-at-most-n")
			slots := SemaphoreKeys(key, n)

			stop := make(chan struct{})
			sampled := make(chan [4]int64, 1) // most granted, most waiting, most per backend, samples
			go func() {
				var most [4]int64
				defer func() { sampled <- most }()
				c, err := pgx.Connect(e.ctx, e.dsn)
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close(context.Background())
				for {
					var granted, waiting, perBackend int64
					if err := c.QueryRow(e.ctx, slotCountSQL, slotInts(slots)).Scan(&granted, &waiting, &perBackend); err != nil {
						t.Error(err)
						return
					}
					most = [4]int64{max(most[0], granted), max(most[1], waiting), max(most[2], perBackend), most[3] + 1}
					select {
					case <-stop:
						return
					default:
					}
				}
			}()

			var holding, most atomic.Int32
			var served [workers]int
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range rounds {
						lock, err := AcquireSemaphore(e.ctx, pool, key, n)
						if err != nil {
							t.Errorf("worker %d: %v", w, err)
							return
						}
						if !slices.Contains(slots, lock.Key()) {
							t.Errorf("worker %d holds %v, not a slot", w, lock.Key())
						}
						h := holding.Add(1)
						for m := most.Load(); h > m && !most.CompareAndSwap(m, h); m = most.Load() {
						}
						_, err = lock.Exec(e.ctx, "SELECT pg_sleep(0.005)") // a little work, on the slot's session
						holding.Add(-1)
						if err := errors.Join(err, lock.Release(e.ctx)); err != nil {
							t.Errorf("worker %d: %v", w, err)
							return
						}
						served[w]++
					}
				}()
			}
			wg.Wait()
			close(stop)
			s := <-sampled

			if m := most.Load(); m != int32(n) {
				t.Errorf("at most %d workers held a slot at once; want exactly n = %d", m, n)
			}
			if s[0] > int64(n) {
				t.Errorf("pg_locks showed %d slots granted at once; want at most %d", s[0], n)
			}
			if s[2] > 1 {
				t.Errorf("pg_locks showed a backend holding %d slots", s[2])
			}
			for w, got := range served {
				if got != rounds {
					t.Errorf("worker %d was served %d times; want %d", w, got, rounds)
				}
			}
			t.Logf("n = %d: %d pg_locks samples, at most %d granted and %d waiting", n, s[3], s[0], s[1])
		})
	}
}

// n < 1, an invalid key, Shared() and an invalid option are errors before
// any connection is taken or statement sent, from AcquireSemaphore and
// DoSemaphore alike.
func TestSemaphoreBadInput(t *testing.T) {
	e := newEnv(t)
	var counter queryCounter
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	key := StringKey("sem-bad")
	for _, c := range []struct {
		name string
		key  Key
		n    int
		opts []Option
		want error // a sentinel, or nil: an *Error naming key
	}{
		{"n=0", key, 0, nil, nil},
		{"n=-1", key, -1, nil, nil},
		{"Shared", key, 2, []Option{Shared()}, nil},
		{"zero key", Key{}, 2, nil, ErrInvalidKey},
		{"negative WaitTimeout", key, 2, []Option{WaitTimeout(-time.Second)}, nil},
	} {
		l, err := AcquireSemaphore(e.ctx, pool, c.key, c.n, c.opts...)
		ran := false
		acquired, doErr := DoSemaphore(e.ctx, pool, c.key, c.n, func(context.Context) error { ran = true; return nil }, c.opts...)
		for _, err := range []error{err, doErr} {
			var ae *Error
			switch {
			case err == nil:
				t.Errorf("%s: no error", c.name)
			case c.want != nil && !errors.Is(err, c.want):
				t.Errorf("%s: %v; want %v", c.name, err, c.want)
			case c.want == nil && c.name != "negative WaitTimeout" && c.name != "Shared" && (!errors.As(err, &ae) || ae.Key != key):
				t.Errorf("%s: %v; want an *Error naming %v", c.name, err, key)
			}
		}
		if l != nil || acquired || ran {
			t.Errorf("%s: got a lock %v, acquired %v, ran %v", c.name, l, acquired, ran)
		}
		t.Logf("%s: %v", c.name, err)
	}
	if n, conns := counter.n.Load(), pool.Stat().TotalConns(); n != 0 || conns != 0 {
		t.Errorf("%d statements sent, %d connections opened; want none", n, conns)
	}
}

// NoWait is one statement whatever the slots' state: it takes the first
// free slot in order and nothing more, sets the keep-alives while it holds
// it (reset on Release), and finds every slot busy in one statement too.
// An uncontended waiting acquire is one statement as well.
func TestSemaphoreNoWaitOneRoundTrip(t *testing.T) {
	e := newEnv(t)
	var counter queryCounter
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.Tracer = &counter
		c.MaxConns = 1
	})
	key := StringKey("sem-nowait")
	const n = 3
	slots := SemaphoreKeys(key, n)
	blocker := e.conn()
	blockerPID := blocker.PgConn().PID()
	block := func(k Key) {
		_, err := blocker.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][k.space-1], k.args()...)
		must(t, err)
	}
	lent := showKeepalives(t, e.ctx, pool)
	var held keepalives
	for i, v := range keepaliveArgs(DefaultHealthInterval) {
		held[i] = v.(string)
	}

	acquire := func(what string, want Key, opts ...Option) {
		t.Helper()
		counter.n.Store(0)
		l, err := AcquireSemaphore(e.ctx, pool, key, n, opts...)
		must(t, err)
		if got := counter.n.Load(); got != 1 {
			t.Errorf("%s: %d statements; want 1", what, got)
		}
		if granted, _ := e.grantedExcept(blockerPID); (want.Valid() && !slices.Equal(granted, []Key{want})) || (!want.Valid() && len(granted) != 0) {
			t.Errorf("%s: the acquiring session holds %v; want %v only", what, granted, want)
		}
		if !want.Valid() {
			if l.Acquired() || l.Key() != key || l.Release(e.ctx) != nil {
				t.Errorf("%s: acquired %v, Key %v; want not acquired, the semaphore's key", what, l.Acquired(), l.Key())
			}
			return
		}
		if l.Key() != want {
			t.Errorf("%s: took %v; want %v", what, l.Key(), want)
		}
		var got keepalives
		must(t, l.WithConn(e.ctx, func(c *pgx.Conn) error {
			got = showKeepalives(t, e.ctx, c)
			return nil
		}))
		if got != held {
			t.Errorf("%s: keep-alives while held = %v; want %v", what, got, held)
		}
		must(t, l.Release(e.ctx))
		if got := showKeepalives(t, e.ctx, pool); got != lent {
			t.Errorf("%s: keep-alives after Release = %v; the pool lent %v", what, got, lent)
		}
	}
	acquire("NoWait, all free", slots[0], NoWait())
	acquire("waiting, all free", slots[0])
	block(slots[0])
	block(slots[1])
	acquire("NoWait, slots 0 and 1 busy", slots[2], NoWait())
	acquire("waiting, slots 0 and 1 busy", slots[2])
	block(slots[2])
	acquire("NoWait, all busy", Key{}, NoWait())
	acquire("WaitTimeout(0), all busy", Key{}, WaitTimeout(0))
	_, err := blocker.Exec(e.ctx, unlockAllSQL)
	must(t, err)
}

// A semaphore Lock is a Lock: DoSemaphore cancels fn's context at the TTL
// and frees the slot; with every slot busy and NoWait, fn does not run.
func TestSemaphoreDoTTL(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 4 })
	// Both connections open before the TTL starts: a connect inside fn
	// could outlast it on a loaded machine, and the NoWait call would then
	// find the slot free.
	c1, err := pool.Acquire(e.ctx)
	must(t, err)
	c2, err := pool.Acquire(e.ctx)
	must(t, err)
	c1.Release()
	c2.Release()
	key := StringKey("sem-ttl")
	const n = 1
	acquired, err := DoSemaphore(e.ctx, pool, key, n, func(ctx context.Context) error {
		ran, err := DoSemaphore(e.ctx, pool, key, n, func(context.Context) error { return nil }, NoWait())
		if ran || err != nil {
			t.Errorf("DoSemaphore(NoWait) with the slot held: ran %v, %v", ran, err)
		}
		<-ctx.Done()
		return context.Cause(ctx)
	}, TTL(time.Second))
	if !acquired || !errors.Is(err, ErrTTLExceeded) {
		t.Errorf("DoSemaphore with TTL: acquired %v, %v; want true, ErrTTLExceeded", acquired, err)
	}
	l, err := AcquireSemaphore(e.ctx, pool, key, n, NoWait())
	must(t, err)
	if !l.Acquired() {
		t.Error("the slot is still held after the TTL")
	}
	must(t, l.Release(e.ctx))
}
