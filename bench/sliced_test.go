package bench

import (
	"context"
	"encoding/binary"
	"net"
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
		// missed (sql_waits.go, sliceReport).
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
// for key, captured once as the Session writes it (so it is always the
// library's own), with the probe key replaced by key. The Session has held
// and released a lock before, as a long-lived Session has, so its message
// does not set the keep-alives again.
func sliceMessage(b *testing.B, key int64) string {
	slice.once.Do(func() { slice.msg = captureSlice(b) })
	if slice.msg == "" {
		b.Fatal("no slice message captured")
	}
	return strings.ReplaceAll(slice.msg, strconv.Itoa(sliceProbeKey), strconv.FormatInt(key, 10))
}

// sliceRecorder is a connection that sends, on seen, the text of each
// simple-protocol query it writes that is a session slice's message.
type sliceRecorder struct {
	net.Conn
	seen chan string
}

func (r sliceRecorder) Write(p []byte) (int, error) {
	if len(p) > 5 && p[0] == 'Q' { // a Query message: 'Q', int32 length, text, NUL
		if n := int(binary.BigEndian.Uint32(p[1:5])); n >= 5 && 1+n <= len(p) {
			if text := string(p[5:n]); strings.Contains(text, "SET LOCAL lock_timeout") { // after the wait marker (-- advisory: waiting …)
				select {
				case r.seen <- text:
				default:
				}
			}
		}
	}
	return r.Conn.Write(p)
}

// captureSlice takes the probe key on a connection of its own, has a
// Session wait for it on a pool of its own (the benchmark's may be
// exhausted by its clients) whose connections record what they write,
// and returns the first slice message the Session sends.
func captureSlice(b *testing.B) string {
	ctx := context.Background()
	seen := make(chan string, 1)
	pool := newPool(b, 2, func(c *pgxpool.Config) {
		var d net.Dialer
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return sliceRecorder{nc, seen}, nil
		}
	})
	holder := newConn(b)
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
	select {
	case msg = <-seen:
	case err := <-locked:
		b.Fatalf("the Session's Lock returned (%v) without a wait slice", err)
	case <-time.After(10 * time.Second): // not hung: a slice is sent within a round trip
		b.Fatal("the Session sent no wait slice within 10 s")
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
	if strings.Count(msg, strconv.Itoa(sliceProbeKey)) < 2 {
		b.Fatalf("not a slice message for the probe key: %q", msg)
	}
	return msg
}
