package advisory

import (
	"context"
	"errors"
	"go/ast"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// optionKind is a kind of Option, as a caller gives it, valid.
type optionKind struct {
	name string
	opt  Option
}

// optionKinds are every kind of Option.
var optionKinds = []optionKind{
	{"Shared", Shared()},
	{"NoWait", NoWait()},
	{"WaitTimeout", WaitTimeout(time.Minute)},
	{"TTL", TTL(time.Minute)},
	{"HealthInterval", HealthInterval(time.Second)},
	{"WithTracer", WithTracer(&recorder{})},
	{"WaitingSince", WaitingSince(time.Now())},
	{"NoCohort", NoCohort()},
	{"TxOptions", TxOptions(pgx.TxOptions{IsoLevel: pgx.ReadCommitted})},
}

// optionCall runs one call that takes Options with opts on an uncontended
// key, and cleans up after it. It makes the call under test inside span,
// which counts the statements sent meanwhile (not the case's set-up and
// clean-up).
type optionCall struct {
	name    string
	applies []string // the optionKinds that apply: Option's documented table
	run     func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error
}

var errStopLeading = errors.New("stop leading")

// optionCalls are every exported call that takes Options.
var optionCalls = []optionCall{
	{"NewSession", []string{"HealthInterval", "WithTracer"}, func(e *env, pool *pgxpool.Pool, _ Key, span func(func() error) error, opts ...Option) error {
		var s *Session
		err := span(func() (err error) { s, err = NewSession(e.ctx, pool, opts...); return err })
		if err == nil {
			err = s.Close(e.ctx)
		}
		return err
	}},
	{"NewConnSession", []string{"HealthInterval", "WithTracer"}, func(e *env, pool *pgxpool.Pool, _ Key, span func(func() error) error, opts ...Option) error {
		c, err := pool.Acquire(e.ctx)
		if err != nil {
			return err
		}
		defer c.Release()
		var s *Session
		err = span(func() (err error) { s, err = NewConnSession(c.Conn(), opts...); return err })
		if err == nil {
			err = s.Close(e.ctx)
		}
		return err
	}},
	{"Acquire", []string{"Shared", "NoWait", "WaitTimeout", "TTL", "HealthInterval", "WithTracer", "WaitingSince", "NoCohort"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		var l *Lock
		err := span(func() (err error) { l, err = Acquire(e.ctx, pool, key, opts...); return err })
		if err == nil {
			err = lockedAndReleased(l)
		}
		return err
	}},
	{"Do", []string{"Shared", "NoWait", "WaitTimeout", "TTL", "HealthInterval", "WithTracer", "WaitingSince", "NoCohort"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return span(func() error {
			return ranOrNot(Do(e.ctx, pool, key, func(context.Context) error { return nil }, opts...))
		})
	}},
	{"Lead", []string{"TTL", "HealthInterval", "WithTracer"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		err := span(func() error {
			return Lead(e.ctx, pool, key, func(context.Context) error { return errStopLeading }, opts...)
		})
		if errors.Is(err, errStopLeading) {
			return nil
		}
		if err == nil {
			err = errors.New("Lead returned nil, want fn's error")
		}
		return err
	}},
	{"AcquireSemaphore", []string{"NoWait", "WaitTimeout", "TTL", "HealthInterval", "WithTracer", "WaitingSince", "NoCohort"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		var l *Lock
		err := span(func() (err error) { l, err = AcquireSemaphore(e.ctx, pool, key, 2, opts...); return err })
		if err == nil {
			err = lockedAndReleased(l)
		}
		return err
	}},
	{"DoSemaphore", []string{"NoWait", "WaitTimeout", "TTL", "HealthInterval", "WithTracer", "WaitingSince", "NoCohort"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return span(func() error {
			return ranOrNot(DoSemaphore(e.ctx, pool, key, 2, func(context.Context) error { return nil }, opts...))
		})
	}},
	{"Session.Lock", []string{"Shared", "NoWait", "WaitTimeout", "WaitingSince", "NoCohort"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return onSession(e, pool, func(s *Session) error {
			return span(func() error { return ranOrNot(s.Lock(e.ctx, key, opts...)) })
		})
	}},
	{"Session.LockMany", []string{"Shared", "NoWait", "WaitTimeout"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return onSession(e, pool, func(s *Session) error {
			return span(func() error { return ranOrNot(s.LockMany(e.ctx, []Key{key, PairKey(7, 7)}, opts...)) })
		})
	}},
	{"Session.Unlock", []string{"Shared"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return onSession(e, pool, func(s *Session) error {
			if err := holdBothModes(e, s, key); err != nil {
				return err
			}
			return span(func() error { return s.Unlock(e.ctx, key, opts...) })
		})
	}},
	{"Session.UnlockMany", []string{"Shared"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return onSession(e, pool, func(s *Session) error {
			if err := holdBothModes(e, s, key); err != nil {
				return err
			}
			return span(func() error { return s.UnlockMany(e.ctx, []Key{key}, opts...) })
		})
	}},
	{"LockTx", []string{"Shared", "NoWait", "WaitTimeout", "WithTracer"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		tx, err := pool.Begin(e.ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(e.ctx)
		return span(func() error { return ranOrNot(LockTx(e.ctx, tx, key, opts...)) })
	}},
	{"DoTx", []string{"Shared", "NoWait", "WaitTimeout", "WithTracer", "TxOptions"}, func(e *env, pool *pgxpool.Pool, key Key, span func(func() error) error, opts ...Option) error {
		return span(func() error {
			return ranOrNot(DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error { return nil }, opts...))
		})
	}},
}

// lockedAndReleased releases l, which must have been acquired.
func lockedAndReleased(l *Lock) error {
	if !l.Acquired() {
		return errors.New("not acquired on an uncontended key")
	}
	return l.Release(context.Background())
}

// ranOrNot is the error of a call that must have acquired its key.
func ranOrNot(acquired bool, err error) error {
	if err == nil && !acquired {
		return errors.New("not acquired on an uncontended key")
	}
	return err
}

// holdBothModes has s hold key exclusively and shared, so that an unlock
// has what to release whatever mode its options say.
func holdBothModes(e *env, s *Session, key Key) error {
	if err := ranOrNot(s.Lock(e.ctx, key)); err != nil {
		return err
	}
	return ranOrNot(s.Lock(e.ctx, key, Shared()))
}

// onSession runs fn on a new Session and closes it.
func onSession(e *env, pool *pgxpool.Pool, fn func(*Session) error) error {
	s, err := NewSession(e.ctx, pool)
	if err != nil {
		return err
	}
	return errors.Join(fn(s), s.Close(e.ctx))
}

// Every call × every kind of Option: an option that applies works; one that
// does not is an error naming the option and the call, before anything is
// sent (NoWait on Lead was silently ignored, Shared on a semaphore an
// error: one rule now).
func TestOptionsApplyOrFail(t *testing.T) {
	e := newEnv(t)
	var counter queryCounter
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	key := StringKey("options-table")
	for _, c := range optionCalls {
		for _, o := range optionKinds {
			var sent int64
			span := func(call func() error) error {
				before := counter.n.Load()
				err := call()
				sent = counter.n.Load() - before
				return err
			}
			err := c.run(e, pool, key, span, o.opt)
			if slices.Contains(c.applies, o.name) {
				if err != nil {
					t.Errorf("%s with %s: %v; want it to apply", c.name, o.name, err)
				}
				continue
			}
			switch {
			case err == nil:
				t.Errorf("%s with %s: no error; want one saying %s does not apply to %s", c.name, o.name, o.name, c.name)
			case !strings.Contains(err.Error(), "option "+o.name+" does not apply to "+c.name):
				t.Errorf("%s with %s: %q; want it to name the option and the call", c.name, o.name, err)
			case sent != 0:
				t.Errorf("%s with %s: %d statements sent before the error; want none", c.name, o.name, sent)
			}
		}
	}
	// The end-of-test check asserts that no lock and no connection is left.
}

// SessionOptions gives NewConnSession its options and Session.Lock the
// others, so that an adapter taking one list (advisorygoose) can follow the
// rule.
func TestSessionOptions(t *testing.T) {
	var all []Option
	for _, o := range optionKinds {
		all = append(all, o.opt)
	}
	session, others := SessionOptions(all)
	for _, c := range []struct {
		fn   call
		opts []Option
		want string
	}{
		{callNewConnSession, session, "HealthInterval, WithTracer"},
		{callSessionLock, others, "Shared, NoWait, WaitTimeout, TTL, WaitingSince, NoCohort, TxOptions"},
	} {
		cfg, _ := newConfig(c.fn, c.opts)
		if got := cfg.given.String(); got != c.want {
			t.Errorf("SessionOptions gave %s %s; want %s", calls[c.fn].name, got, c.want)
		}
	}
}

// Every kind of Option and every call that takes Options is in the table
// test above, so that a new one cannot skip the rule.
func TestOptionsTableComplete(t *testing.T) {
	var kinds, calls []string
	for _, f := range packageFiles(t, 0) {
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || !fd.Name.IsExported() {
				continue
			}
			name := fd.Name.Name
			if fd.Recv != nil {
				recv := fd.Recv.List[0].Type
				if star, ok := recv.(*ast.StarExpr); ok {
					recv = star.X
				}
				name = recv.(*ast.Ident).Name + "." + name
			}
			if r := fd.Type.Results; r != nil && len(r.List) == 1 && isIdent(r.List[0].Type, "Option") {
				kinds = append(kinds, name)
			}
			if p := fd.Type.Params.List; len(p) > 0 {
				if el, ok := p[len(p)-1].Type.(*ast.Ellipsis); ok && isIdent(el.Elt, "Option") {
					calls = append(calls, name)
				}
			}
		}
	}
	for _, k := range kinds {
		if !slices.ContainsFunc(optionKinds, func(o optionKind) bool { return o.name == k }) {
			t.Errorf("option %s is not in optionKinds: add it, and say where it applies (options.go, calls)", k)
		}
	}
	for _, c := range calls {
		if !slices.ContainsFunc(optionCalls, func(oc optionCall) bool { return oc.name == c }) {
			t.Errorf("%s takes Options but is not in optionCalls: add it, and say which options apply (options.go, calls)", c)
		}
	}
	if len(kinds) != len(optionKinds) || len(calls) != len(optionCalls) {
		t.Errorf("found options %q and calls %q; the table test has %d and %d", kinds, calls, len(optionKinds), len(optionCalls))
	}
}

func isIdent(x ast.Expr, name string) bool {
	id, ok := x.(*ast.Ident)
	return ok && id.Name == name
}
