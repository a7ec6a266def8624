package advisory_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// The examples connect to DATABASE_URL, as a program would; go test points
// it at the test server (harness_test.go). The package example is the
// README's quick start (readme_test.go keeps the two the same).

// A job that must not run twice at once, on any machine: whoever finds it
// running skips this turn.
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	ran, err := advisory.Do(ctx, pool, advisory.StringKey("nightly-report"), func(ctx context.Context) error {
		fmt.Println("making the nightly report")
		return nil // ctx is cancelled if the lock is lost
	}, advisory.NoWait())
	if err != nil {
		log.Fatal(err)
	}
	if !ran {
		fmt.Println("another instance is making it")
	}
	// Output:
	// making the nightly report
}

// A lock held for as long as the caller likes, on a connection of its own:
// another instance trying the key meanwhile finds it taken.
func ExampleAcquire() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	key := advisory.StringKey("reindex")
	lock, err := advisory.Acquire(ctx, pool, key, advisory.WaitTimeout(10*time.Second))
	if err != nil {
		log.Fatal(err) // errors.Is(err, advisory.ErrTimeout): held elsewhere all along
	}

	other, err := advisory.Acquire(ctx, pool, key, advisory.NoWait())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("another instance acquired it too:", other.Acquired())

	// The long job runs here. Its writes that must never overlap go through
	// the lock's own connection (lock.Exec, lock.WithConn), which fails once
	// the lock is lost; lock.Done() is closed then.
	if _, err := lock.Exec(ctx, "SELECT 1"); err != nil {
		log.Fatal(err)
	}

	if err := lock.Release(ctx); err != nil {
		log.Fatal(err) // errors.Is(err, advisory.ErrLockLost): it was lost before
	}
	fmt.Println("released")
	// Output:
	// another instance acquired it too: false
	// released
}

// Do waits for the key, here at most 100 ms; a wait that runs out is
// ErrTimeout, and fn does not run.
func ExampleDo() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	key := advisory.StringKey("import-orders")
	importOrders := func(ctx context.Context) error {
		fmt.Println("importing orders")
		return nil
	}

	// Another instance is importing (played here by a lock of our own).
	busy, err := advisory.Acquire(ctx, pool, key)
	if err != nil {
		log.Fatal(err)
	}
	_, err = advisory.Do(ctx, pool, key, importOrders, advisory.WaitTimeout(100*time.Millisecond))
	fmt.Println("busy:", errors.Is(err, advisory.ErrTimeout))

	if err := busy.Release(ctx); err != nil {
		log.Fatal(err)
	}
	ran, err := advisory.Do(ctx, pool, key, importOrders, advisory.WaitTimeout(100*time.Millisecond))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ran:", ran)
	// Output:
	// busy: true
	// importing orders
	// ran: true
}

// One order of one tenant, locked for the length of a transaction. A
// transaction lock needs no connection of its own, ends with the
// transaction, and works through PgBouncer in transaction pooling mode.
func ExampleDoTx() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	tenant, order := int32(7), int32(42)
	key := advisory.PairKey(tenant, order)
	ran, err := advisory.DoTx(ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
		// The order's updates go here, in tx.
		hs, err := advisory.Holders(ctx, tx, key)
		if err != nil {
			return err
		}
		fmt.Println("holders during the transaction:", len(hs))
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	hs, err := advisory.Holders(ctx, pool, key)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ran:", ran, "holders after the commit:", len(hs))
	// Output:
	// holders during the transaction: 1
	// ran: true holders after the commit: 0
}

// Leader election: every instance calls Lead; fn runs in the one that
// leads, until it loses the lead (its ctx is cancelled, and Lead campaigns
// again) or Lead's ctx ends.
//
// fn leads for as long as it runs: when it returns nil, Lead resigns and
// campaigns again, and another instance may lead. So a periodic job ticks
// inside fn, as here; a body that did one tick and returned nil would hand
// the leadership round on every tick.
func ExampleLead() {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	if _, err := pool.Exec(context.Background(), "CREATE TABLE example_runs (at timestamptz)"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(context.Background(), "DROP TABLE example_runs")

	ctx, shutDown := context.WithCancel(context.Background())
	err = advisory.Lead(ctx, pool, advisory.StringKey("scheduler"), func(ctx context.Context) error {
		fmt.Println("leading: the scheduler runs")
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for ticks := 1; ; ticks++ {
			select {
			case <-ctx.Done(): // leadership lost, or Lead's ctx ended
				fmt.Println("stepped down")
				return nil
			case <-tick.C:
				// One tick of the scheduler's work: a fenced write, on the
				// lock's own connection; it cannot land once this instance
				// has lost the lead, even if it learns so late.
				tag, err := advisory.LockFromContext(ctx).Exec(ctx, "INSERT INTO example_runs VALUES (now())")
				if err != nil {
					return err
				}
				if ticks == 3 {
					fmt.Println("three fenced writes, the last:", tag)
					tick.Stop()
					shutDown() // for the example: the process is told to stop
				}
			}
		}
	})
	fmt.Println("Lead returned:", err)
	// Output:
	// leading: the scheduler runs
	// three fenced writes, the last: INSERT 0 1
	// stepped down
	// Lead returned: context canceled
}

// A transfer locks both accounts in one round trip. LockMany takes keys in
// one canonical order, so a transfer the other way round cannot deadlock
// with this one.
func ExampleSession_LockMany() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	s, err := advisory.NewSession(ctx, pool)
	if err != nil {
		log.Fatal(err)
	}
	accounts := []advisory.Key{advisory.StringKey("account:bob"), advisory.StringKey("account:alice")}
	if _, err := s.LockMany(ctx, accounts, advisory.WaitTimeout(5*time.Second)); err != nil {
		log.Fatal(err)
	}
	for _, h := range s.Held() {
		fmt.Println(h.Key, h.Mode, h.Count)
	}
	// The transfer runs here.
	if err := s.UnlockMany(ctx, accounts); err != nil {
		log.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		log.Fatal(err)
	}
	// Output:
	// int64:8844188345402156756 exclusive 1
	// int64:-4328975812806614919 exclusive 1
}

// Who holds a key, and who waits for it, as the server sees it: this finds
// locks taken by any program, not only by this package.
func ExampleHolders() {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "billing-worker"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	key := advisory.StringKey("invoices")
	lock, err := advisory.Acquire(ctx, pool, key)
	if err != nil {
		log.Fatal(err)
	}
	hs, err := advisory.Holders(ctx, pool, key)
	if err != nil {
		log.Fatal(err)
	}
	for _, h := range hs {
		fmt.Printf("%s %s granted=%v by %q\n", h.Key, h.Mode, h.Granted, h.ApplicationName)
	}
	if err := lock.Release(ctx); err != nil {
		log.Fatal(err)
	}
	// Output:
	// int64:1086344679492896912 exclusive granted=true by "billing-worker"
}

// A migration guard: every instance migrates at start-up, and the lock
// makes them take turns. The first applies the migration; the others wait,
// then find nothing left to do. The migration runs on the lock's own
// connection (LockFromContext, then WithConn): CREATE INDEX CONCURRENTLY
// cannot run in a transaction (so not in DoTx), the waiters hold no
// snapshot that would block it, and its statements cannot run once the
// lock is lost. For goose and golang-migrate, see the README's "Migration
// guards".
func Example_migrationGuard() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	var applied atomic.Int32
	migrate := func(ctx context.Context) error {
		lock := advisory.LockFromContext(ctx)
		return lock.WithConn(ctx, func(c *pgx.Conn) error {
			ctx := context.WithoutCancel(ctx) // WithConn cancels the statement if ctx ends
			_, err := c.Exec(ctx, "CREATE TABLE IF NOT EXISTS example_migrations (version int PRIMARY KEY)")
			if err != nil {
				return err
			}
			var done bool
			err = c.QueryRow(ctx, "SELECT EXISTS (SELECT FROM example_migrations WHERE version = 1)").Scan(&done)
			if err != nil || done {
				return err
			}
			for _, sql := range []string{
				"CREATE TABLE example_accounts (id bigint PRIMARY KEY, email text)",
				"CREATE INDEX CONCURRENTLY example_accounts_email ON example_accounts (email)",
				"INSERT INTO example_migrations VALUES (1)",
			} {
				if _, err := c.Exec(ctx, sql); err != nil {
					return err
				}
			}
			applied.Add(1)
			return nil
		})
	}

	const instances = 3
	var wg sync.WaitGroup
	errs := make([]error, instances)
	for i := range instances {
		wg.Go(func() {
			_, errs[i] = advisory.Do(ctx, pool, advisory.StringKey("migrations"), migrate,
				advisory.WaitTimeout(time.Minute))
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d instances started, migration 1 applied %d time(s)\n", instances, applied.Load())

	// For the example only: undo the migration.
	if _, err := pool.Exec(ctx, "DROP TABLE example_accounts, example_migrations"); err != nil {
		log.Fatal(err)
	}
	// Output:
	// 3 instances started, migration 1 applied 1 time(s)
}

// At most two exports at once, across every instance: a semaphore of size
// 2. Two holders take both slots; a third finds none free and skips.
func ExampleAcquireSemaphore() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	key := advisory.StringKey("exports")
	var held []*advisory.Lock
	for i := 0; i < 3; i++ {
		lock, err := advisory.AcquireSemaphore(ctx, pool, key, 2, advisory.NoWait())
		if err != nil {
			log.Fatal(err)
		}
		if !lock.Acquired() {
			fmt.Println("export", i, "skipped: both slots are taken")
			continue
		}
		fmt.Println("export", i, "runs in", slotOf(lock.Key(), advisory.SemaphoreKeys(key, 2)))
		held = append(held, lock)
	}
	for _, lock := range held {
		if err := lock.Release(ctx); err != nil {
			log.Fatal(err)
		}
	}
	// Output:
	// export 0 runs in slot 0
	// export 1 runs in slot 1
	// export 2 skipped: both slots are taken
}

// slotOf names the slot among slots that key is.
func slotOf(key advisory.Key, slots []advisory.Key) string {
	for i, s := range slots {
		if s == key {
			return fmt.Sprint("slot ", i)
		}
	}
	return "no slot"
}
