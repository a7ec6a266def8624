package advisory

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// lease is a session's connection and where it came from. Its rule: a
// connection goes back to the pool as the pool lent it, or leaves it
// closed. As lent means holding no advisory lock, with its keep-alives as
// they were (finish); a connection whose state is not known is discarded.
// A NewConnSession's connection has no pool: it stays with its owner.
type lease struct {
	pool *pgxpool.Pool // nil for a NewConnSession
	conn *pgxpool.Conn // for giving the connection back; use pc to talk on it; nil for a NewConnSession
	pc   *pgx.Conn     // conn's connection, still reachable after conn is hijacked
}

// giveBack ends the lease: a clean connection goes back to the pool (a
// NewConnSession's stays with its owner), any other is discarded. The
// caller holds the turn.
func (l *lease) giveBack(clean bool) {
	switch {
	case !clean:
		l.discard()
	case l.conn != nil:
		l.conn.Release()
	}
}

// discardTimeout bounds saying goodbye (Terminate) to the server on a
// connection being discarded.
const discardTimeout = time.Second

// discard takes the connection out of the pool at once and closes it. A
// connection handed back closed would keep its pool slot until pgconn's
// background close ends, which waits up to 15 s for a cancel request that
// a cut network never answers, and meanwhile every Acquire on a small pool
// would wait. The caller holds the turn.
func (l *lease) discard() {
	c := l.pc
	if l.conn != nil {
		c = l.conn.Hijack()
	}
	nc := c.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(discardTimeout))
	_ = c.Close(context.Background()) // the socket's deadline bounds it, not a context handler
	_ = nc.Close()                    // pgconn may have marked it closed without closing it yet
}
