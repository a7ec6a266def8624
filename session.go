package advisory

import (
	"context"
	"errors"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Session is one connection, taken from a pool and kept for the Session's
// life (or lent by its caller: NewConnSession), that holds any number of
// session-level advisory locks.
//
// Holds are counted as PostgreSQL counts them: Lock a key twice, Unlock it
// twice; shared and exclusive holds of a key are counted apart. Only the
// first Lock and the last Unlock of a (key, mode) reach the server.
//
// A Session is safe for concurrent use. Its connection runs one call at a
// time: Lock, Unlock, WithConn and Close wait for the call in progress (a
// Lock waiting for a busy key delays the others; Close interrupts it).
// Held, Done and Err never block.
//
// The Session ends at Close or when its connection is lost (closed, backend
// terminated, server restarted, network cut; noticed within HealthInterval
// while it holds locks, but on a NewConnSession only by its next call):
// every hold is gone, Done is closed and Err says why. The connection goes
// back to the pool only when it is known to hold no advisory lock;
// otherwise it is closed.
type Session struct {
	lease                  // the connection, and the pool it goes back to (lease.go)
	connTurn               // whose turn it is to use the connection (turn.go)
	stmt     statement     // the statement in flight, for interrupting it (statement.go)
	ka       keepalive     // the connection's keep-alives, the server's and the socket's (keepalive.go)
	watching               // the health watcher's hand-shake with the callers (watch.go)
	holdings               // what the session holds, and how often (holds.go)
	lifetime               // the session's end (end.go)
	trace    *sessionTrace // nil unless traced (WithTracer, tracer.go)

	// mu guards holdings, the end's state, the watcher's start and
	// noSlicesSaid.
	mu sync.Mutex
	// noSlicesSaid: PL/pgSQL is unusable on this session's connection, so
	// its waits are one statement, and the tracer was told so once
	// (noteNoSlices, wait.go); LockMany then tries no slice first
	// (saidNoSlices).
	noSlicesSaid bool

	// args backs the arguments of the session's one-key statements
	// (keyArgs): room for a pair's two int4 and the four keep-alives. Its
	// first argsLen are argsKey's arguments, boxed once for the statements
	// on that key that follow (an Unlock after its Lock). Used under the
	// turn, by one statement at a time.
	args    [6]any
	argsKey Key
	argsLen int
	// answer is where a one-key lock or unlock statement scans its
	// boolean (a local scanned into would be moved to the heap); used
	// under the turn, set false before each such statement.
	answer bool
}

// NewSession takes a connection from pool for the life of the Session.
// Options: HealthInterval, WithTracer. It fails if pool is nil, if an
// option is invalid or does not apply, or if no connection can be had
// before ctx ends.
//
// Every Session keeps one pool connection until Close: size the pool for the
// sessions, locks and waiters you run at once, plus your other queries.
func NewSession(ctx context.Context, pool *pgxpool.Pool, opts ...Option) (*Session, error) {
	cfg, err := newConfig(callNewSession, opts)
	if err != nil {
		return nil, err
	}
	return newSession(ctx, pool, cfg, nil)
}

func newSession(ctx context.Context, pool *pgxpool.Pool, cfg config, way *coming) (*Session, error) {
	if pool == nil {
		return nil, errorf("nil *pgxpool.Pool")
	}
	if way == nil {
		_, way = onTheWay(ctx, pool)
	}
	acquireCtx := way.ctx
	conn, err := pool.Acquire(acquireCtx)
	if err != nil {
		way.leave()
		e := &Error{Op: "session", Kind: kindOf(err), Err: err}
		switch why := context.Cause(acquireCtx); {
		case errors.Is(why, errReleasedAll):
			e.Kind, e.Err = ErrClosed, why
		case errors.Is(ctx.Err(), context.DeadlineExceeded):
			// Every holder and waiter pins a connection: a deadline that
			// passes while the pool is exhausted is a wait that timed out.
			e.Kind, e.deadline = ErrTimeout, true
		}
		return nil, e
	}
	s := sessionOn(conn.Conn(), cfg)
	s.pool, s.conn = pool, conn
	if !way.arrive(s) {
		conn.Release() // untouched: clean
		return nil, &Error{Op: "session", Kind: ErrClosed, Err: errReleasedAll}
	}
	return s, nil
}

// NewConnSession returns a Session on conn, a connection the caller owns
// and keeps (one that database/sql's pgx driver lent through sql.Conn.Raw,
// for example), so that locks can be held by the very session that runs the
// caller's own statements: they live exactly as long as that session, and a
// statement of a dead process holds them until it ends on the server.
// Options: HealthInterval (it sets the keep-alives), WithTracer.
//
// It is a Session as NewSession's are (waits in slices, the keep-alives set
// while it holds locks and reset at its end, Unlock and Close checking what
// pg_advisory_unlock returns), with three differences. It never touches conn
// between its own calls: there is no health watcher, so a loss is found by
// the Session's next statement (Unlock or Close then return an error
// matching ErrLockLost, also when the caller's own statements found the
// connection closed), and Done closes only then. Close leaves conn open to
// the caller when the Session ends clean, and closes it when the locks'
// state cannot be known. ReleaseAll does not reach it. The caller must not
// use conn while a call on the Session runs, and runs its own statements
// between them at its own risk: a pg_advisory_unlock_all of its own makes
// the Session's unlock report the lock lost.
//
// It fails when conn is nil or closed, when conn is inside a transaction,
// or when an option is invalid or does not apply.
func NewConnSession(conn *pgx.Conn, opts ...Option) (*Session, error) {
	cfg, err := newConfig(callNewConnSession, opts)
	if err != nil {
		return nil, err
	}
	switch {
	case conn == nil:
		return nil, errorf("nil *pgx.Conn")
	case conn.IsClosed():
		return nil, &Error{Op: "session", Kind: ErrClosed, Err: errors.New("the connection is closed")}
	case conn.PgConn().TxStatus() != 'I':
		return nil, errorf("the connection is inside a transaction: a session lock taken there would outlive it, and its waits hold the transaction's snapshot; lock outside transactions")
	}
	return sessionOn(conn, cfg), nil
}

// sessionOn is a Session on pc that no pool lent (newSession sets pool and
// conn when one did).
func sessionOn(pc *pgx.Conn, cfg config) *Session {
	s := &Session{
		lease:    lease{pc: pc},
		watching: watching{health: cfg.health},
		ka:       keepalive{args: keepaliveFor(cfg.health)},
		connTurn: connTurn{turn: make(chan struct{}, 1)},
		holdings: holdings{holds: make(map[hold]int)},
		trace:    newSessionTrace(cfg),
	}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	s.done = make(chan struct{})
	s.stmt = statement{pc: pc, end: s.ctx}
	return s
}

// keyArgs returns key's SQL arguments followed by extra, in the session's
// own backing array, so that the statement allocates no slice for them,
// nor, if the session's last one-key statement was on key too, boxes
// them again. The caller holds the turn, and uses them for one statement
// before the next keyArgs.
func (s *Session) keyArgs(key Key, extra ...any) []any {
	if s.argsLen == 0 || key != s.argsKey {
		s.argsKey, s.argsLen = key, len(key.appendArgs(s.args[:0]))
	}
	return append(s.args[:s.argsLen], extra...)
}
