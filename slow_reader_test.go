package advisory

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A healthy connection whose server is slow to read what a WithConn
// callback sends is not lost: a COPY FROM whose first row waits for
// another transaction (a unique-key conflict) makes the backend stop
// reading, the client's socket fills up and the server's receive window
// stays closed while the other transaction lasts, with every packet
// acknowledged. The session must outlive that wait, as it did before the
// client socket's TCP_USER_TIMEOUT was set: that option also bounds data
// "that remains untransmitted due to a zero window" (tcp(7)), so with it
// the kernel aborts a healthy connection and the session loses its locks.
// The session waited for a lock in one statement before the callback. The
// blocking transaction lasts blockFor, a stimulus (well past the
// client's 2 s user timeout for HealthInterval(200ms)), not an assertion.
func TestSlowReaderIsNotALoss(t *testing.T) {
	const blockFor = 5 * time.Second
	e := newEnv(t)
	e.table("slow_reader_copy", `CREATE TABLE slow_reader_copy (id int PRIMARY KEY, pad text)`)
	blocker := e.conn()
	_, err := blocker.Exec(e.ctx, `BEGIN; INSERT INTO slow_reader_copy VALUES (0, '')`)
	must(t, err)

	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	s, err := NewSession(e.ctx, pool, HealthInterval(200*time.Millisecond))
	must(t, err)
	defer s.Close(e.ctx)
	// The second lock waits in one statement (the session holds one), as
	// the keep-alive tightening is for; then the callback runs.
	for _, key := range []Key{StringKey("slow-reader-copy"), StringKey("slow-reader-copy-2")} {
		if _, err := s.Lock(e.ctx, key); err != nil {
			t.Fatal(err)
		}
	}

	pad := strings.Repeat("x", 1000)
	const rows = 64 << 10 // 64 MB: far more than both sockets' buffers
	copied := make(chan error, 1)
	go func() {
		copied <- s.WithConn(e.ctx, func(c *pgx.Conn) error {
			i := 0
			_, err := c.CopyFrom(context.WithoutCancel(e.ctx), pgx.Identifier{"slow_reader_copy"}, []string{"id", "pad"},
				pgx.CopyFromFunc(func() ([]any, error) {
					if i == rows {
						return nil, nil
					}
					i++
					return []any{int32(i - 1), pad}, nil
				}))
			return err
		})
	}()
	e.eventually("the COPY waits for the blocking transaction", func(c *pgx.Conn) (bool, error) {
		var n int
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'transactionid' AND query LIKE 'copy%'`).Scan(&n)
		return n == 1, err
	})
	select {
	case <-s.Done():
		t.Errorf("the session ended while the server was slow to read a healthy connection: %v", s.Err())
	case <-time.After(blockFor):
	}
	_, err = blocker.Exec(e.ctx, `ROLLBACK`)
	must(t, err)
	if err := <-copied; err != nil {
		t.Errorf("WithConn's COPY on a healthy connection: %v", err)
	}
	if err := s.Close(e.ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
}
