// Package advisory takes PostgreSQL advisory locks through pgx v5, and keeps
// the promises other libraries quietly break: a held lock never leaks back
// into a connection pool, waits are done by the server (no poll period), a
// cancelled wait leaves nothing behind, and a lost lock is reported.
//
// # Keys
//
// PostgreSQL has two advisory key spaces that never collide: one bigint
// (Int64Key; pg_locks.objsubid = 1) and a pair of int4 (PairKey; objsubid =
// 2). StringKey(s) is Int64Key of the XXH64 hash (seed 0) of s's UTF-8
// bytes, a fixed public mapping that other programs can reproduce
// (`xxhsum -H1`). Key is a comparable value; the zero Key is invalid and
// rejected before any SQL is sent. KeyFromLockRow reads a pg_locks row back.
//
// # Session locks
//
// A session lock is held by one database session (connection) until it is
// unlocked or the session ends. So a session lock must own its connection:
// Acquire takes a connection from a pgxpool.Pool and keeps it until Release,
// and a Session holds any number of keys on one connection. The connection
// goes back to the pool only when the library knows it holds no lock;
// otherwise it is closed. Holds are re-entrant as in PostgreSQL: lock twice,
// unlock twice; shared and exclusive holds of one key are counted apart.
//
// Waits happen on the server, with no poll period: a waiter wakes as soon
// as the lock is released, by any client. A wait bound (WaitTimeout or the
// context's deadline) is enforced by the server: a timed-out wait returns
// ErrTimeout and the connection stays healthy. A bound beyond what
// lock_timeout can express (about 24.8 days) is clamped to it. A cancelled
// context ends a sliced wait at once: its last slice is left to end on its
// own (within one slice; the second try before the slices, within a round
// trip), and a grant that comes then is dropped before the connection goes
// back; meanwhile the Session is busy. A try (the statement a lock begins
// with, LockTx's and DoTx's included, and all of a NoWait one; a waiting
// LockMany begins with a slice) is not interrupted at all: it never waits
// on the server, so the call returns once it has answered, within a round
// trip, with what it got (LockTx's transaction stays usable). If it has
// not answered 500 ms after the context ended (a server or a network
// holding it up), its connection is closed, which ends whatever it took:
// a Session ends, LockTx's transaction with it. The library sends no
// cancel request for a try, whatever context handler the pool has (the
// server would log an ERROR with the statement); but pgx, as it closes a
// connection under a read, sends one of its own, so a try still held up
// on the server then may leave that ERROR after all. A wait in one
// statement is interrupted with a cancel request, not by closing the
// connection.
// Because a cancel can land just after the server granted the lock, and a
// session lock survives the failed statement, the library then reads the
// session's own pg_locks rows and releases what was granted, or closes the
// connection if it cannot tell: a failed acquire never leaves a lock behind.
//
// # What waiting costs the server
//
// A backend blocked in pg_advisory_lock holds a snapshot for its whole
// wait. Held for long, that harms the whole database: VACUUM cannot remove
// any row that died after the wait began (a Lead standby waits for as long
// as the leader leads: days of bloat), and CREATE INDEX CONCURRENTLY, which
// waits for every older snapshot, waits for the waiters while they wait for
// the migration that runs it (a migration guard that hangs its own
// migration).
//
// So every wait that can be is cut into slices. A wait first tries the key
// (an uncontended lock is that one round trip); if that fails, a Session
// (Acquire, Do, Lead, Session.Lock) tries once more, asking the server what
// the wait needs to know in the same statement (one more round trip before
// a wait, so that the uncontended try carries none of it); then each slice
// is one round trip that waits on the server for at most half of the
// server's deadlock_timeout (at most 1 s, at most what is left of the
// bound), inside a PL/pgSQL DO block that ends the slice without an error:
// the caller's transaction stays usable, and a wait that ends by its bound
// or its context writes no error to the server log. A waiter holds a
// snapshot for at most one slice, shows as waiting in pg_locks, and wakes
// at once on a release. This holds for Acquire, Do, Lead, LockTx, DoTx,
// LockMany and Session.Lock when the waiting session (or LockTx's
// transaction) holds no lock; a LockMany slice takes all its keys or none.
// DoTx runs its try and each slice in a short transaction of its own, and
// begins fn's transaction (TxOptions) only once it holds the key, so fn's
// snapshot is taken after the grant at any isolation level. LockTx cannot
// do that for a REPEATABLE READ or SERIALIZABLE transaction of the
// caller's, whose snapshot is older than the grant: it does not see what
// the previous holder committed; use DoTx with TxOptions.
//
// What waiting costs, exactly: one round trip per slice per waiter (a
// standby waiting a day sends about 170,000, each a few tens of
// microseconds of server time). Each slice is a statement: with
// log_min_duration_statement below the slice length, every slice is logged
// as a slow statement; log_lock_waits and the deadlock detector never see
// a sliced waiter. Because the DO block's text carries the key, a server
// that tracks utility statements in pg_stat_statements sees one entry per
// waited key.
//
// In which order waiters are served: the server serves its queue in order
// and wakes the next waiter at once, but a sliced waiter leaves the queue
// for a moment at the end of each slice and joins it again at its tail.
// Among sliced waiters the order is therefore about, not exactly, arrival
// order, and none is passed over for ever (each is at the head of the
// queue sooner or later). Against waiters that wait in one statement
// (another program's pg_advisory_lock, a Session that holds locks), which
// keep their place, a sliced waiter that finds at the end of a slice that
// the key has changed hands since its wait began waits on in place, in
// one server-side wait of up to 8 slices, which holds a snapshot for that
// long: it is then served once the waiters ahead of it have been. A
// standby behind a leader that keeps the key keeps slicing. (Acquire, Do,
// Lead and Session.Lock do this; LockMany, semaphores, LockTx and DoTx do
// not, and can be overtaken by one-statement waiters for as long as those
// keep coming.) Within one process, the waiters of one key through one
// pool (Acquire, Do, AcquireSemaphore and DoSemaphore; Session.Lock on a
// Session that holds nothing) first queue in the process, which lets them
// through in arrival order: see "Goroutines of one process that want the
// same key", below.
//
// A wait that can be part of a deadlock cycle is one server-side wait
// instead, because PostgreSQL's deadlock detector, which looks once per
// wait after deadlock_timeout, must see it (ErrDeadlock): that of a
// Session that holds a lock (its own, or one a WithConn callback took),
// and that of a LockTx whose transaction holds any lock besides its own
// transaction id (an advisory lock, a row it updated, a table it read or
// altered). The library asks the server (pg_locks) with a try before the
// wait: the first for LockTx, the second for a Session's lock. Such a wait holds a snapshot for as long as it lasts, and a bounded
// one that times out is logged by the server as a lock_timeout error.
// Take long waits on a Session that holds nothing, or on its own Lock.
//
// Slices need PL/pgSQL: where it is not installed, or the role lacks USAGE
// on it, every wait is one server-side wait (it works, and holds a
// snapshot), the tracer says so once per Session (TraceWaitEndData's
// NoSlices), and a Session's first contended LockMany leaves one
// "permission denied" error in the server log (it has no first try to ask
// with).
//
// A deadlock victim (ErrDeadlock) loses only the wait that failed: its
// session keeps the locks it already held, as PostgreSQL does.
//
// # Transaction locks
//
// LockTx takes a lock that ends with a pgx.Tx (pg_advisory_xact_lock); DoTx
// runs a function in a transaction that holds one. They cannot be released
// early and need no connection of their own, and they are the only kind that
// works through PgBouncer in transaction pooling mode: there, consecutive
// statements of one client may run on different server sessions, so a
// session lock is taken on one server session and its unlock sent to
// another, and the lock stays behind on a server connection other clients
// then use. Do not use Acquire or Session through a transaction pooler.
// What happens there (PgBouncer 1.18, tested): an unrelated client whose
// statement lands on the lock's server session takes the "held" lock too
// (session locks are re-entrant), so mutual exclusion is gone; when the
// unlock lands on another server session, pg_advisory_unlock returns false,
// Release returns ErrLockLost and the lock stays held on the first server
// session, by no client, until that server connection ends.
//
// Through PgBouncer 1.18 in transaction mode, pgx needs a query exec mode
// without named prepared statements: default_query_exec_mode=exec or
// simple_protocol in the connection string (cache_describe works as well).
// The default, cache_statement, fails ("prepared statement ... already
// exists" or "does not exist"), and describe_exec fails outside a
// transaction ("unnamed prepared statement does not exist").
//
// An uncontended DoTx costs two round trips, as a session lock's cycle: its
// BEGIN carries the first try, and the try's outcome comes back as a
// reported change of default_transaction_read_only, which the BEGIN sets,
// for the rest of the transaction, to the opposite of the value the client
// last saw when the try got the key and to that same value when it did not
// (so a configuration reload or any other change is never taken for the
// key). It does not change the transaction under way, whose access mode
// its BEGIN fixed, and it ends with the transaction; but fn sees the
// flipped value (SHOW default_transaction_read_only, and pgconn's
// ParameterStatus). PostgreSQL 14 and later report that setting; PgBouncer
// 1.18 passes the report on. Where the change is not reported, DoTx asks
// the server instead, one round trip more. LockTx, on a transaction the
// caller began, is one round trip for the try.
//
// # Lost locks
//
// A session lock lives exactly as long as its session. While a Session holds
// locks, a health watcher watches its connection without holding it: on
// Linux it waits, through an epoll descriptor of the session's own (one more
// open file per Session that has held a lock for 10-20 ms; without one, it
// pings only), for the idle socket to become readable, so a terminated backend or a stopped
// server (a FATAL message or a closed socket) is noticed at once, and the
// watcher pings to read what came. The watch starts, and after each call on
// the session begins again, once the session has held its locks for 10-20 ms
// without a call: a lock released sooner costs no goroutine and no system
// call to watch it, and a loss right after a call is noticed up to 20 ms later. Callers use the connection at once and
// never wait for the watcher. When the connection has been quiet for a
// HealthInterval (default 1 s) the watcher pings, for a network cut that
// sends nothing: a ping unanswered within the interval (at least 1 s)
// closes the connection, so the holder steps down within about two
// intervals. On other systems, or with a DialFunc whose connection is not a
// socket, the pings are the only check, and a closed connection is noticed
// within the interval. A
// waiting session notices a stalled connection too: a wait slice that does
// not return within a slice plus that allowance closes it. A statement that
// may last on a session that holds locks (a wait for one more key, a
// WithConn callback) keeps the watcher out; for those, on Linux, the session
// tightens its socket's own TCP keep-alive (and, for a wait,
// TCP_USER_TIMEOUT), so that a cut ends it within three intervals rounded
// up to whole seconds (two probes: one lost probe is forgiven), and puts
// them back before the connection returns to the pool. The server side
// is bounded as well: the statement that takes a session's first lock sets
// tcp_keepalives_idle, _interval, _count and tcp_user_timeout (PostgreSQL 12
// or later, which the library needs) on its backend, in the same
// transaction as the grant, so the server drops a silent client, and frees
// its locks, four to five intervals after the cut (5 s at most by default:
// 1 s idle, four probes 1 s apart), at least an interval (rounded up to a
// second) after the holder has stepped down.
//
// The settings are in force from a session's first lock until the session
// ends: the statement that ends it (Release's unlock, Close's) resets them
// (RESET: to the values the connection started with), so a connection goes
// back to the pool as the pool lent it, and other users of the pool (a client that reads a large
// result slowly, say) are not held to a lock's tight timeouts. One limit: a
// keep-alive the host sets with SET after connecting (in AfterConnect, say)
// is reset to the startup value; set it in the connection string instead
// (tcp_user_timeout=9000 becomes a startup parameter, which RESET keeps). A
// Session that has run a WithConn callback, which may take locks of its
// own, keeps the settings until it ends. The lock's own connection is held
// to them: a WithConn callback that leaves a large result unread for longer
// than tcp_user_timeout (five health intervals, 5 s by default) loses the
// session, as the server cannot tell a client that stopped reading from a
// cut one. Read results in fenced work as they come, or give the lock a
// longer HealthInterval.
//
// When the session ends, Done is closed and Err matches ErrLockLost; Do and
// Lead cancel their function's context. Until the holder has noticed, it may
// still believe it holds the lock while the server has already granted it to
// another session: work that must never overlap runs on the lock's own
// connection through WithConn (or Lock.Exec), whose statements fail once the
// session is gone; the body of Do, DoSemaphore and Lead finds its Lock with
// LockFromContext. A TTL bounds how long a lock may be held at all.
//
// NewConnSession puts a Session on a connection the caller owns, such as the
// one database/sql lends a migration tool: the lock then lives exactly as
// long as the session that runs the tool's statements (the goose module's
// SessionLocker is built on it). It has no health watcher, since its owner
// uses the connection between the Session's calls: a loss shows at the
// Session's next call.
//
// Lead elects one leader per key: candidates wait on the server, so when a
// leader's session ends the next candidate takes over as soon as the server
// frees the lock, not after a poll period.
//
// # Semaphores
//
// AcquireSemaphore(ctx, pool, key, n) lets at most n holders, in any
// number of processes, hold key at once. A semaphore of size n is n
// ordinary advisory keys, its slots (SemaphoreKeys: slot i, for i from 0 to
// n-1, is StringKey(key.String() + "#" + strconv.Itoa(i))), and a holder is
// a Lock on one slot, with every Lock guarantee; a holder whose session
// ends frees its slot at once. NoWait tries every slot in one round trip. A
// wait is sliced as above: each slice waits on one slot, a different one
// each slice, and when it ends without that slot tries every slot, so a
// freed slot is taken at once by a waiter queued on it and otherwise
// within about a slice. DoSemaphore is Do for a semaphore. Use one size per key: the slots
// of sizes 3 and 5 on one key overlap, and admit 5.
//
// # Goroutines of one process that want the same key
//
// Goroutines of one process that wait for the same key through the same
// pool with Acquire, Do, AcquireSemaphore or DoSemaphore (exclusive, not
// NoWait; same HealthInterval and tracer) form a cohort: one of them waits
// on the server, on a pool connection, and the others wait in the process,
// in order, pinning no connection. When a holder releases while another
// goroutine of the cohort waits, the lock passes to that goroutine with its
// connection, without a round trip: the key stays held on the server, and
// the new holder gets a Lock of its own (its own Done, Err, TTL, WithConn
// and trace). Passes stop after CohortPasses (8) in a row, or once
// CohortHold (10 ms) has passed since the server granted the key to the
// cohort, and then the holder releases on the server, where the other
// processes' waiters, queued there, are served first. A batch is at most
// CohortPasses+1 holds, or CohortHold plus one hold. Waiters of other
// processes that wait in slices may re-enter the server's queue behind the
// cohort's next server waiter, so a process may see several batches pass
// while it waits: measured two to five on 2 busy cores, and tested to stay
// within eight (TestCohortFairAcrossProcesses); a waiter of another
// process is never starved. A holder whose WithConn is
// running, whose session is ending (lost, TTL, ReleaseAll) or that has
// nobody queued releases on the server as usual. This is lock cohorting
// (Dice, Marathe and Shavit, PPoPP 2012) across a network: contended
// throughput inside one process is several times raw pgx's, since a pass
// costs no round trip (BENCHMARKS.md). A goroutine queued in the process
// obeys its context, WaitTimeout and ReleaseAll as a waiter on the server
// does. Sessions own their connections, so nothing passes between them,
// but a Session that holds nothing and waits for a key queues behind the
// other such Sessions of the process waiting for or holding that key
// through the same pool (not a NewConnSession's, which has none): the
// server sees at most one waiter per key per process, and none while a
// Session of the process holds the key exclusively; when that Session
// releases the key (its last Unlock, Close, or the loss of its
// connection), the next queued Session tries it, on its own connection,
// and waits on the server if another process got it first. (A queued
// Session waiting on the server behind a holder of its own process would
// cost the server a wait per hand-off: in one process, 16 Sessions on 4
// keys ran at about a third of raw pgx's throughput that way.) A Session's
// shared Lock queues too, behind the process's other Sessions waiting for
// the key shared, and lets the next through as soon as it holds the key
// (shared holders do not exclude each other). Shared Acquire and Do,
// NoWait calls, Lead and Session.LockMany never take part. NoCohort turns
// it off for a call: it waits on the server on a connection of its own, as
// every waiter did before.
//
// What an operator sees (pglock status, Holders): the process's one
// session holding the key, while its goroutines take turns on it; HELD
// counts from that session's last statement, and a pass sends none, so it
// spans the turns of several goroutines (at most CohortPasses+1, or about
// CohortHold). WAITING lists at most one waiter of the process per key
// (its server waiter); the goroutines queued in the process are not on the
// server and do not show. A connection a holder passed on keeps its
// backend: its pid is the same across the turns.
//
// # Pool sizing
//
// Every Lock and every Session pins one pool connection, and so does every
// waiting Session, NoCohort call and Lead candidate; the waiting Acquire,
// Do and semaphore calls of one process pin one connection per key (one per
// semaphore). pgxpool's default MaxConns is max(4, NumCPU). Size the
// pool for the locks and waiters you run at once plus your other queries,
// or give locks a pool of their own. pgxpool.Pool.Close waits for every
// acquired connection, so Release every Lock and Close every Session before
// closing the pool, or call ReleaseAll.
//
// The watcher's pings are bounded by socket deadlines it sets itself, never
// by a context, so a pool configured with any BuildContextWatcherHandler
// (for example CancelRequestContextWatcherHandler with a DeadlineDelay)
// keeps the detection bounds. A lost connection is
// hijacked from the pool, so it leaves the pool's count at once.
//
// # Concurrency
//
// Lock and Session are safe for concurrent use. One connection runs one
// statement at a time, so calls on one Session take turns: a Lock waiting on
// the server delays the Session's other calls until it ends (each bounded by
// its context), except Close, which interrupts it. Release, Unlock and Close
// run even when their context is already cancelled, bounded by a timeout of
// their own. Inside WithConn, give statements a context that does not end
// (context.WithoutCancel): WithConn cancels them itself when its ctx ends,
// keeping the connection, where pgx's default handling would close it.
//
// # Observability
//
// A Tracer, modelled on pgx's QueryTracer, is told when a wait starts and
// how it ended (entry point, key, mode, try or wait, duration, acquired or
// not, error); one that is also a HoldTracer, when each hold starts and
// ends (released, lost, TTL, ReleaseAll; held for how long); one that is
// also a LeadTracer, when Lead wins and loses leadership. Start methods
// return the context for the rest of the call, which reaches the end
// method, the hold and Lead's fn. SlogTracer logs to a *slog.Logger; the
// module github.com/seed0ad592b7/advisory/otel records OpenTelemetry
// metrics.
//
// A tracer is given per call with WithTracer, not per pool: it is an
// Option like every other setting here, it reaches LockTx (whose pgx.Tx
// does not lead to a pool) like the rest, and it needs no global registry
// that code sharing a pool could fight over. Define the options once,
// next to the pool, and pass them to every call. A Session traced from
// NewSession traces all its calls and holds. Without a tracer the hooks
// are one nil check each and allocate nothing (BenchmarkUncontended…).
//
// A pgx QueryTracer on the pool sees the library's statements sent through
// pgx (tries, unlocks, LockTx's statements, DoTx's BEGIN and COMMIT) but
// not its wait slices: a slice is one simple-protocol message of several
// statements whose last result the library reads, and pgx offers that only
// on the underlying pgconn.PgConn, which pgx's tracer does not see. A
// LockMany on a session that holds nothing is such a message even when
// uncontended. The library's own Tracer reports every wait.
package advisory
