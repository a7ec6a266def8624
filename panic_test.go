package advisory

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A body that panics, in every entry point that runs one, releases its lock
// and its connection before the panic goes on up, unchanged (SPEC §4): the
// caller that recovers finds the key free on the server and nothing
// acquired from the pool. Lead leaked both before (its body had no deferred
// release).
func TestPanickingBodyReleases(t *testing.T) {
	e := newEnv(t)
	probe := e.conn()
	type boom struct{ entry string } // a pointer to one is a value no other panic can equal
	for _, tc := range []struct {
		entry string
		key   Key // the key the server shows held while the body runs
		run   func(ctx context.Context, pool *pgxpool.Pool, body func()) error
	}{
		{"Do", StringKey("panic-do"), func(ctx context.Context, pool *pgxpool.Pool, body func()) error {
			_, err := Do(ctx, pool, StringKey("panic-do"), func(context.Context) error { body(); return nil })
			return err
		}},
		{"DoTx", StringKey("panic-dotx"), func(ctx context.Context, pool *pgxpool.Pool, body func()) error {
			_, err := DoTx(ctx, pool, StringKey("panic-dotx"), func(context.Context, pgx.Tx) error { body(); return nil })
			return err
		}},
		{"DoSemaphore", SemaphoreKeys(StringKey("panic-sem"), 1)[0], func(ctx context.Context, pool *pgxpool.Pool, body func()) error {
			_, err := DoSemaphore(ctx, pool, StringKey("panic-sem"), 1, func(context.Context) error { body(); return nil })
			return err
		}},
		{"Lead", StringKey("panic-lead"), func(ctx context.Context, pool *pgxpool.Pool, body func()) error {
			return Lead(ctx, pool, StringKey("panic-lead"), func(context.Context) error { body(); return nil })
		}},
	} {
		t.Run(tc.entry, func(t *testing.T) {
			pool := e.pool()
			want := &boom{tc.entry}
			var got any
			func() {
				defer func() { got = recover() }()
				err := tc.run(e.ctx, pool, func() {
					if e.tryFrom(probe, tc.key) {
						t.Errorf("%s: the body runs while %s is free on the server", tc.entry, tc.key)
					}
					panic(want)
				})
				t.Errorf("%s returned %v instead of letting the body's panic go on", tc.entry, err)
			}()
			if got != want {
				t.Fatalf("%s: recovered %v; want the body's own panic value %v", tc.entry, got, want)
			}
			// Checked at once: the release is done before the panic goes on.
			if n := pool.Stat().AcquiredConns(); n != 0 {
				t.Errorf("%s: after the body's panic the pool has %d connections acquired; want 0", tc.entry, n)
			}
			if !e.tryFrom(probe, tc.key) {
				t.Errorf("%s: %s still held on the server after the body's panic", tc.entry, tc.key)
			}
		})
	}
}
