package advisory

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

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
	lifetime // the session's end (end.go)
	connTurn // whose turn it is to use the connection (turn.go)
	holdings // what the session holds, and how often (holds.go); guarded by mu

	pool   *pgxpool.Pool // nil for a NewConnSession
	conn   *pgxpool.Conn // for giving the connection back; use pc to talk on it; nil for a NewConnSession
	pc     *pgx.Conn     // conn's connection, still reachable after conn is hijacked
	health time.Duration

	// lastAnswer is when the server last answered one of the library's own
	// statements (Unix nanoseconds): the watcher need not ping before an
	// interval has passed since. A turn taken without a round trip, or a
	// WithConn callback (which may send nothing), does not count.
	//
	// ready tells the health watcher that the socket has something to read
	// (watch.go); set by the watcher at its first turn, nil until then and
	// where the socket cannot be watched. Armed and disarmed under the turn,
	// closed by whoever ends the session.
	lastAnswer atomic.Int64
	ready      atomic.Pointer[readiness]
	ka         keepalive // the connection's keep-alives, the server's and the client socket's

	stmt statement // the statement in flight, for interrupting it

	mu sync.Mutex
	// noSlicesSaid: the tracer was told that this session's waits are one
	// statement, PL/pgSQL being unusable (noteNoSlices).
	noSlicesSaid bool
	watcher      sync.WaitGroup
	// watchStart starts the watcher once the session first holds something
	// (see arm); nil until then. Guarded by mu.
	watchStart *time.Timer

	trace *sessionTrace // nil unless traced (WithTracer, tracer.go)
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
	return newSession(ctx, pool, cfg)
}

func newSession(ctx context.Context, pool *pgxpool.Pool, cfg config) (*Session, error) {
	if pool == nil {
		return nil, errorf("nil *pgxpool.Pool")
	}
	acquireCtx, way := onTheWay(ctx, pool)
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
		pc:       pc,
		health:   cfg.health,
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

// WithConn runs fn with exclusive use of the session's own connection, the
// backend that holds its locks: fn's statements run only while those locks
// are held (fenced work). Other calls on the session wait for fn.
//
// It returns fn's error; an error matching ErrLockLost (joined with fn's)
// if the session was lost before or during fn; ErrClosed after Close.
//
// ctx bounds the wait for the connection and then fn. When ctx ends while
// fn runs, the statement in flight is cancelled (SQLSTATE 57014, also
// matching ctx's error) and the locks survive; fn must then return within
// 2 s, or the connection is closed under it and the session ends.
//
// Give fn's statements a context that lives as long as the lock should,
// such as context.WithoutCancel(ctx): by default pgx closes a connection
// whose statement's own context ends, which ends every lock of the session.
//
// fn must not keep the connection or rows read from it after it returns,
// must not leave a transaction open (it is rolled back and WithConn returns
// an error), and must not call Close or Release (they wait for fn, and
// close the connection under it after 5 s). Locks fn takes with its own SQL
// are the caller's to release; Close releases them too.
//
// A silent network cut while fn's statement runs ends the session within
// about three health intervals on Linux (one lost keep-alive probe
// is forgiven); elsewhere only when ctx ends or the
// operating system gives up on the connection (minutes): bound long fenced
// work with a deadline.
func (s *Session) WithConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	if err := s.takeTurn(ctx); err != nil {
		return &Error{Op: "with_conn", Err: err}
	}
	defer s.giveTurn()
	// fn may take locks of its own, so from now on the keep-alives stay in
	// force until the session ends (its unlock_all resets them); a session
	// that holds nothing yet does not have them yet.
	if !s.holding() {
		if err := s.setKeepalives(ctx); err != nil {
			if s.lost(err) {
				return &Error{Op: "with_conn", Kind: ErrLockLost, Err: err}
			}
			return &Error{Op: "with_conn", Err: err}
		}
	}
	s.mu.Lock()
	s.rawUsed, s.ka.on = true, true
	s.mu.Unlock()
	s.arm()
	// While fn's statement runs the health watcher cannot check the
	// connection, so on Linux the socket's TCP keep-alive is tightened for
	// the rest of the session (put back before the connection returns to
	// the pool): a silent cut during a statement the server has received
	// ends the connection within two health intervals (rounded up to whole
	// seconds), before the server frees the locks (a busy backend finds its
	// client gone only when the statement ends). TCP_USER_TIMEOUT is not
	// set, as it would also end a healthy connection whose server is slow to
	// read what fn sends (a COPY waiting on a row lock). Elsewhere, or for a
	// cut as a statement is sent, the cut is noticed when ctx ends (the
	// cancel request cannot get through; the connection is closed within
	// 4 s) or when the operating system gives up.
	s.keepClientAlive(false)
	err := s.runFor(ctx, true, false, func(_ context.Context, c *pgx.Conn) error { return fn(c) }) // not answered: fn may send nothing
	if s.lost(err) {
		return &Error{Op: "with_conn", Kind: ErrLockLost, Err: err}
	}
	if s.pc.PgConn().TxStatus() != 'I' {
		rollback := s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.Exec(ctx, "ROLLBACK")
			return err
		})
		if rollback != nil {
			s.lose(rollback)
		}
		return &Error{Op: "with_conn", Err: errors.Join(err, errorf("the callback left a transaction open; it was rolled back"), rollback)}
	}
	if s.ctx.Err() != nil {
		return &Error{Op: "with_conn", Kind: s.endKind(), Err: err}
	}
	if ctx.Err() != nil && sqlState(err) == codeQueryCanceled {
		return &Error{Op: "with_conn", Err: errors.Join(context.Cause(ctx), err)}
	}
	return err
}

// discardTimeout bounds saying goodbye (Terminate) to the server on a
// connection being discarded.
const discardTimeout = time.Second

// discard takes the connection out of the pool at once and closes it. A
// connection handed back closed would keep its pool slot until pgconn's
// background close ends, which waits up to 15 s for a cancel request that
// a cut network never answers, and meanwhile every Acquire on a small pool
// would wait. The caller holds the turn.
func (s *Session) discard() {
	c := s.pc
	if s.conn != nil {
		c = s.conn.Hijack()
	}
	nc := c.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(discardTimeout))
	_ = c.Close(context.Background()) // the socket's deadline bounds it, not a context handler
	_ = nc.Close()                    // pgconn may have marked it closed without closing it yet
}
