package bench

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"testing"

	migratepgx "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx", for goose and migrate
	gooselock "github.com/pressly/goose/v3/lock"

	"github.com/seed0ad592b7/advisory"
)

// client is one user of a lock: its own connection (or pool checkout), and
// lock and unlock of one key, however the subject spells them.
type client interface {
	lock(ctx context.Context) error
	unlock(ctx context.Context) error
}

// subject is one way of taking a lock, under benchmark.
type subject struct {
	name string
	// polls is true when a waiter polls instead of waiting on the server
	// (goose): it never shows in pg_stat_activity as waiting, and a
	// hand-off takes up to its poll interval.
	polls bool
	// open returns a client for key on its own connection. All clients
	// opened with one key contend for one lock. pool is shared by the
	// clients of a benchmark.
	open func(b *testing.B, pool *pgxpool.Pool, key int64) client
}

// subjects, the floor first.
var subjects = []subject{
	{name: "raw-pgx", open: openRaw},
	{name: "raw-pgx-sliced", open: openRawSliced},
	{name: "pgxpool-naive", open: openPool},
	{name: "advisory-session", open: openSession},
	{name: "advisory-acquire", open: openAcquire},
	{name: "advisory-locktx", open: openLockTx},
	{name: "migrate-pgx5", open: openMigrate},
	{name: "goose-session", polls: true, open: openGoose},
}

var errNotHeld = errors.New("pg_advisory_unlock returned false")

// raw-pgx: the floor. One dedicated *pgx.Conn, pg_advisory_lock and
// pg_advisory_unlock: one round trip each.
type rawClient struct {
	c   *pgx.Conn
	key int64
}

func openRaw(b *testing.B, _ *pgxpool.Pool, key int64) client {
	return &rawClient{c: newConn(b), key: key}
}

func (r *rawClient) lock(ctx context.Context) error {
	_, err := r.c.Exec(ctx, "SELECT pg_advisory_lock($1)", r.key)
	return err
}

func (r *rawClient) unlock(ctx context.Context) error {
	var ok bool
	if err := r.c.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", r.key).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return errNotHeld
	}
	return nil
}

// pgxpool-naive: acquire a pool connection, lock, unlock, release.
type poolClient struct {
	pool *pgxpool.Pool
	key  int64
	conn *pgxpool.Conn
}

func openPool(_ *testing.B, pool *pgxpool.Pool, key int64) client {
	return &poolClient{pool: pool, key: key}
}

func (p *poolClient) lock(ctx context.Context) error {
	conn, err := p.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", p.key); err != nil {
		conn.Release()
		return err
	}
	p.conn = conn
	return nil
}

func (p *poolClient) unlock(ctx context.Context) error {
	defer p.conn.Release()
	var ok bool
	if err := p.conn.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", p.key).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return errNotHeld
	}
	return nil
}

// advisory-session: Session.Lock and Session.Unlock on one Session, which
// keeps its connection.
type sessionClient struct {
	s    *advisory.Session
	key  advisory.Key
	opts []advisory.Option
}

func openSession(b *testing.B, pool *pgxpool.Pool, key int64) client {
	s, err := advisory.NewSession(context.Background(), pool)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close(context.Background()) })
	return &sessionClient{s: s, key: advisory.Int64Key(key)}
}

func (c *sessionClient) lock(ctx context.Context) error {
	_, err := c.s.Lock(ctx, c.key, c.opts...)
	return err
}

func (c *sessionClient) unlock(ctx context.Context) error { return c.s.Unlock(ctx, c.key) }

// advisory-acquire: Acquire and Release, a connection from the pool per
// lock.
type acquireClient struct {
	pool *pgxpool.Pool
	key  advisory.Key
	l    *advisory.Lock
	opts []advisory.Option
}

func openAcquire(_ *testing.B, pool *pgxpool.Pool, key int64) client {
	return &acquireClient{pool: pool, key: advisory.Int64Key(key)}
}

func (c *acquireClient) lock(ctx context.Context) error {
	l, err := advisory.Acquire(ctx, c.pool, c.key, c.opts...)
	c.l = l
	return err
}

func (c *acquireClient) unlock(ctx context.Context) error { return c.l.Release(ctx) }

// advisory-locktx: BEGIN, LockTx, COMMIT through the pool.
type lockTxClient struct {
	pool *pgxpool.Pool
	key  advisory.Key
	tx   pgx.Tx
}

func openLockTx(_ *testing.B, pool *pgxpool.Pool, key int64) client {
	return &lockTxClient{pool: pool, key: advisory.Int64Key(key)}
}

func (c *lockTxClient) lock(ctx context.Context) error {
	tx, err := c.pool.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := advisory.LockTx(ctx, tx, c.key); err != nil {
		_ = tx.Rollback(ctx)
		return err
	}
	c.tx = tx
	return nil
}

func (c *lockTxClient) unlock(ctx context.Context) error { return c.tx.Commit(ctx) }

// migrate-pgx5: golang-migrate v4's pgx/v5 driver. Its lock id is derived
// from the database, schema and migrations table names, so each key gets a
// migrations table of its own. Lock and Unlock take no context.
type migrateClient struct {
	d interface {
		Lock() error
		Unlock() error
	}
}

func openMigrate(b *testing.B, _ *pgxpool.Pool, key int64) client {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		b.Fatal(err)
	}
	d, err := migratepgx.WithInstance(db, &migratepgx.Config{MigrationsTable: fmt.Sprintf("bench_migrations_%d", key)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = d.Close() })
	return &migrateClient{d: d}
}

func (c *migrateClient) lock(context.Context) error   { return c.d.Lock() }
func (c *migrateClient) unlock(context.Context) error { return c.d.Unlock() }

// goose-session: goose v3's Postgres session locker with its defaults: a
// pg_try_advisory_lock every 5 s, up to 60 retries (a budget shared by
// every call on one locker), on a *sql.Conn kept for the client's life.
type gooseClient struct {
	l    gooselock.SessionLocker
	conn *sql.Conn
}

func openGoose(b *testing.B, _ *pgxpool.Pool, key int64) client {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = db.Close() })
	conn, err := db.Conn(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = conn.Close() })
	l, err := gooselock.NewPostgresSessionLocker(gooselock.WithLockID(key))
	if err != nil {
		b.Fatal(err)
	}
	return &gooseClient{l: l, conn: conn}
}

func (c *gooseClient) lock(ctx context.Context) error   { return c.l.SessionLock(ctx, c.conn) }
func (c *gooseClient) unlock(ctx context.Context) error { return c.l.SessionUnlock(ctx, c.conn) }
