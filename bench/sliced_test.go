package bench

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// raw-pgx-sliced: the floor of a wait in slices (SPEC §2a), which no
// client can go below without holding a snapshot for its whole wait. One
// dedicated *pgx.Conn: pg_try_advisory_lock, then, while it is busy, the
// very message a Session sends for one slice of its wait, again and again;
// pg_advisory_unlock. It has none of the library's own work (turns,
// bookkeeping, the health watcher), so a subject's ratio to it is what the
// library costs beyond the SQL that slicing needs.
type rawSlicedClient struct {
	c     *pgx.Conn
	key   int64
	slice string // the slice message for key
}

func openRawSliced(b *testing.B, _ *pgxpool.Pool, key int64) client {
	return &rawSlicedClient{c: newConn(b), key: key, slice: sliceMessage(b, key)}
}

func (r *rawSlicedClient) lock(ctx context.Context) error {
	var got bool
	if err := r.c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", r.key).Scan(&got); err != nil || got {
		return err
	}
	for {
		results, err := r.c.PgConn().Exec(ctx, r.slice).ReadAll()
		if err != nil {
			return err
		}
		// The report, the message's last statement, is "0" when the slice
		// missed (sql.go, sliceReport).
		if last := results[len(results)-1]; len(last.Rows) != 1 || string(last.Rows[0][0]) != "0" {
			return nil
		}
	}
}

func (r *rawSlicedClient) unlock(ctx context.Context) error {
	return (&rawClient{c: r.c, key: r.key}).unlock(ctx)
}

// sliceProbeKey is the key whose slice message sliceMessage captures: a
// number that appears in the message only where the key does (as its
// value and its pg_locks objid, classid being 0), so that replacing it
// gives any other small key's message.
const sliceProbeKey = 987654321

var slice struct {
	once sync.Once
	msg  string
}

// sliceMessage returns the message a Session sends for one slice of a wait
// for key, read once from pg_stat_activity while a Session waits (so it is
// always the library's own), with the probe key replaced by key. The
// Session has held and released a lock before, as a long-lived Session
// has, so its message does not set the keep-alives again.
func sliceMessage(b *testing.B, key int64) string {
	// A pool of its own: the benchmark's may be exhausted by its clients.
	slice.once.Do(func() { slice.msg = captureSlice(b, newPool(b, 2)) })
	if slice.msg == "" {
		b.Fatal("no slice message captured")
	}
	return strings.ReplaceAll(slice.msg, strconv.Itoa(sliceProbeKey), strconv.FormatInt(key, 10))
}

func captureSlice(b *testing.B, pool *pgxpool.Pool) string {
	ctx := context.Background()
	holder, monitor := newConn(b), newConn(b)
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(sliceProbeKey)); err != nil {
		b.Fatal(err)
	}
	s, err := advisory.NewSession(ctx, pool)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close(ctx)
	// (Not WithConn: a Session that ran it may hold locks it did not take,
	// and waits in one statement, not in slices.)
	other := advisory.Int64Key(sliceProbeKey + 1)
	if _, err := s.Lock(ctx, other); err != nil {
		b.Fatal(err)
	}
	if err := s.Unlock(ctx, other); err != nil {
		b.Fatal(err)
	}
	locked := make(chan error, 1)
	go func() { _, err := s.Lock(ctx, advisory.Int64Key(sliceProbeKey)); locked <- err }()
	var msg string
	deadline := time.Now().Add(10 * time.Second)
	for msg == "" {
		err := monitor.QueryRow(ctx, `SELECT coalesce(max(query), '') FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND query LIKE 'SET LOCAL lock_timeout%'`).Scan(&msg)
		if err != nil {
			b.Fatal(err)
		}
		if time.Now().After(deadline) {
			b.Fatal("the Session did not wait in a slice within 10 s")
		}
		time.Sleep(100 * time.Microsecond) // the server pushes nothing: polling is the await
	}
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_unlock($1)", int64(sliceProbeKey)); err != nil {
		b.Fatal(err)
	}
	if err := <-locked; err != nil {
		b.Fatal(err)
	}
	if err := s.Unlock(ctx, advisory.Int64Key(sliceProbeKey)); err != nil {
		b.Fatal(err)
	}
	if !strings.HasPrefix(msg, "SET LOCAL lock_timeout") || strings.Count(msg, strconv.Itoa(sliceProbeKey)) < 2 {
		b.Fatal(fmt.Sprintf("not a slice message for the probe key: %q", msg))
	}
	return msg
}
