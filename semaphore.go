package advisory

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Counting semaphores (SPEC §9): at most n holders of a key at once. A
// semaphore of size n on key k is n ordinary advisory keys, its slots, and
// a holder is a session that holds one slot exclusively. No table, no
// extra state: the server's lock table is the semaphore, so a holder whose
// session ends frees its slot at once, and any program can take or inspect
// a slot.

// opSemaphore is the Op of every error about a semaphore.
const opSemaphore = "semaphore"

// SemaphoreKeys returns the slot keys of the semaphore of size n on key, in
// slot order: slot i, for i from 0 to n-1, is
//
//	StringKey(key.String() + "#" + strconv.Itoa(i))
//
// so the slots of StringKey("exports") with n = 3 are the StringKey of
// "int64:<its int64 value>#0", "…#1" and "…#2". The formula is part of the
// public contract and never changes: any program can compute a slot, take
// it, or find its holder in pg_locks (`pglock key --slots 3 exports`).
// Semaphores of different sizes on one key share their first slots, so use
// one size per key. Slot i of a semaphore on a named key (StringKey,
// NameKey) is named NAME#i in errors, traces and log lines.
//
// It returns nil when n < 1 or key is invalid.
func SemaphoreKeys(key Key, n int) []Key {
	if n < 1 || !key.Valid() {
		return nil
	}
	prefix, name := key.String()+"#", key.Name()
	slots := make([]Key, n)
	for i := range slots {
		if name == "" {
			slots[i] = StringKey(prefix + strconv.Itoa(i))
			continue
		}
		// A slot of a named semaphore is named after it: "exports#0".
		slots[i] = NameKey(hashKey(prefix+strconv.Itoa(i)), name+"#"+strconv.Itoa(i))
	}
	return slots
}

// AcquireSemaphore takes one of the n slots of the semaphore on key (see
// SemaphoreKeys) on a connection of its own from pool, so that at most n
// holders, in any number of processes, hold a slot of it at once. The
// returned Lock holds that slot: its Key is the slot's key, and it behaves
// as any Lock from Acquire: Release, Done and Err, TTL, WithConn.
//
// Options are Acquire's but Shared: NoWait, WaitTimeout, TTL,
// HealthInterval, WithTracer. Shared is an error (a slot is held
// exclusively), as is n < 1 or an invalid key (ErrInvalidKey), all before
// any connection is taken or SQL sent.
//
// With NoWait (or WaitTimeout(0)) it takes the first free slot in slot
// order, in one round trip; when all are busy it returns a Lock with
// Acquired() == false and a nil error, whose Key is key itself: the
// connection is back in the pool and Release does nothing.
//
// Otherwise it waits, holding no snapshot for longer than a wait slice (see
// the package documentation, "What waiting costs the server"). A slot that
// frees is taken within about one slice. Waiters are not served in strict
// FIFO order, but none starves while holders come and go. An uncontended
// acquire is one round trip, as is each slice; the slot keys travel in
// each, so the cost grows with n.
//
// A wait bounded by WaitTimeout or ctx's deadline fails with ErrTimeout
// (also matching context.DeadlineExceeded for the deadline); a cancelled
// ctx ends the wait at once with ctx's error, once a try in flight has
// answered (at most 500 ms, as Acquire). On any error no slot is held
// and the connection is back in the pool, or closed if its state could not
// be known. Errors are an *Error with Op "semaphore" and key as its Key.
func AcquireSemaphore(ctx context.Context, pool *pgxpool.Pool, key Key, n int, opts ...Option) (*Lock, error) {
	return acquireSemaphore(ctx, pool, key, n, EntryAcquireSemaphore, opts)
}

// acquireSemaphore is AcquireSemaphore for the entry point entry.
func acquireSemaphore(ctx context.Context, pool *pgxpool.Pool, key Key, n int, entry EntryPoint, opts []Option) (*Lock, error) {
	fn := callAcquireSemaphore
	if entry == EntryDoSemaphore {
		fn = callDoSemaphore
	}
	cfg, err := newConfig(fn, opts)
	if err != nil {
		return nil, err
	}
	cfg.entry = entry
	switch {
	case !key.Valid():
		return nil, invalidKey(opSemaphore)
	case n < 1:
		return nil, keyError(opSemaphore, key, nil, fmt.Errorf("size %d: a semaphore has at least one slot (n >= 1)", n))
	}
	slots := SemaphoreKeys(key, n)
	cfg.slots = n
	return acquireWith(ctx, pool, key, cfg, func(ctx context.Context, s *Session) (Key, error) {
		return s.lockSlot(ctx, key, slots, cfg)
	})
}

// DoSemaphore runs fn while holding one of the n slots of the semaphore on
// key: the context-manager form of AcquireSemaphore, as Do is of Acquire.
// fn runs only if a slot was taken (acquired reports whether it ran), and
// the slot is released when fn returns or panics (the panic goes on after
// the release).
//
// fn's context is cancelled when the slot is lost or its TTL passes;
// DoSemaphore then returns, once fn has returned, an error matching
// ErrLockLost or ErrTTLExceeded joined with fn's own error. Errors from
// AcquireSemaphore (n < 1, an invalid key, Shared(), a timeout, ...) are
// returned with acquired == false.
func DoSemaphore(ctx context.Context, pool *pgxpool.Pool, key Key, n int, fn func(context.Context) error, opts ...Option) (acquired bool, err error) {
	lock, err := acquireSemaphore(ctx, pool, key, n, EntryDoSemaphore, opts)
	return runHeld(ctx, lock, err, fn)
}

// lockSlot takes one of slots (the semaphore sem's, in slot order) on a
// session that holds nothing, and returns it, or the zero Key when NoWait
// found every slot busy.
//
// It tries every slot, then waits in slices. Each slice waits on the server
// on one slot, a different one each slice, so waiters spread over the
// slots, and then tries every slot again: a slot that frees is taken at
// once by a waiter queued on it, and otherwise by some waiter within about
// one slice. Every waiter queues on every slot in turn, where the server
// serves waiters in order, so none starves. A slot granted just as the
// wait fails is found in the session's own pg_locks rows and released.
func (s *Session) lockSlot(ctx context.Context, sem Key, slots []Key, cfg config) (Key, error) {
	if err := s.takeTurn(ctx); err != nil {
		return Key{}, turnError(opSemaphore, sem, err)
	}
	defer s.giveTurn()

	w, bound, byDeadline := cfg.waitPlan(ctx)
	s.waitingSince = cfg.waitingSince()
	end := endOf(bound) // fixed now: the first try's time counts against the bound
	slot, dtMs, canDoPL, err := s.trySlots(ctx, slots)
	switch {
	case err != nil || slot.Valid() || w == waitTry:
	case !canDoPL:
		slot, err = s.waitOneSlot(ctx, slots, end)
	default:
		slot, err = s.waitSlots(ctx, slots, dtMs, end)
	}
	switch {
	case err != nil:
		return Key{}, s.lockManyFailed(opSemaphore, sem, ctx, ctx, slots, ModeExclusive, byDeadline, err)
	case slot.Valid():
		s.mu.Lock()
		s.holds[hold{slot, ModeExclusive}] = 1
		s.ka.on = true
		s.mu.Unlock()
		s.arm()
		s.trace.started(ctx, cfg.entry, ModeExclusive, slot)
		return slot, nil
	case w != waitTry:
		return Key{}, &Error{Op: opSemaphore, Key: sem, Kind: ErrTimeout, deadline: byDeadline}
	}
	return Key{}, nil
}

// trySlots tries every slot in order in one statement, which also sets the
// keep-alives if it took one, and returns the slot taken or the zero Key,
// and the server's deadlock_timeout in milliseconds. The caller holds the
// turn.
func (s *Session) trySlots(ctx context.Context, slots []Key) (slot Key, dtMs int64, canDoPL bool, err error) {
	var (
		at *int64
		pl *bool
	)
	args := append([]any{manyArgs(slots)[0]}, s.ka.args...)
	err = s.runTry(ctx, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, semaphoreTrySQL, args...).Scan(&at, nil, &dtMs, &pl)
	})
	canDoPL = pl == nil || *pl
	switch {
	case err != nil || at == nil:
		return Key{}, dtMs, canDoPL, err
	case *at < 1 || *at > int64(len(slots)):
		return Key{}, dtMs, canDoPL, fmt.Errorf("the semaphore try reported slot position %d of %d", *at, len(slots))
	}
	return slots[*at-1], dtMs, canDoPL, nil
}

// waitSlots waits for one of slots in wait slices (dtMs is the server's
// deadlock_timeout) until it holds one, end (the zero time: none) passes (the
// zero Key and a nil error), or ctx ends. The slot each slice waits on
// starts at a random one and moves on by one each slice. The caller holds
// the turn and cleans up after an error.
func (s *Session) waitSlots(ctx context.Context, slots []Key, dtMs int64, end time.Time) (slot Key, err error) {
	next := rand.IntN(len(slots))
	at, err := s.waitSlicesAt(ctx, dtMs, end, false, func(ms int64) string {
		next = (next + 1) % len(slots)
		return semaphoreSliceSQL(slots, next, ms, s.ka.args)
	}, func(results []*pgconn.Result, err error) (int, error) {
		return slotAt(results, err, len(slots))
	})
	if at > 0 {
		slot = slots[at-1]
	}
	return slot, err
}

// waitOneSlot is the wait of a session that cannot run wait slices (no
// PL/pgSQL): one server-side wait on one slot, chosen at random, so a slot
// that frees meanwhile is not taken by this waiter. The caller holds the
// turn and cleans up after an error.
func (s *Session) waitOneSlot(ctx context.Context, slots []Key, end time.Time) (Key, error) {
	noteNoSlices(ctx, s)
	if err := s.setKeepalives(ctx); err != nil {
		return Key{}, err
	}
	slot := slots[rand.IntN(len(slots))]
	if got, err := s.waitOnce(ctx, slot, ModeExclusive, end); !got {
		return Key{}, err
	}
	return slot, nil
}

// slotAt reads a semaphore slice's report (the last statement of its
// message): the 1-based position of the slot taken among n, or 0 for none.
func slotAt(results []*pgconn.Result, err error, n int) (int, error) {
	if err != nil {
		return 0, err
	}
	if len(results) == 0 || len(results[len(results)-1].Rows) != 1 {
		return 0, errors.New("a wait slice returned no report")
	}
	v := string(results[len(results)-1].Rows[0][0])
	at, err := strconv.Atoi(v)
	if err != nil || at < 0 || at > n {
		return 0, fmt.Errorf("a semaphore wait slice reported %q; want a slot position from 0 to %d", v, n)
	}
	return at, nil
}
