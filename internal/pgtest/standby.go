package pgtest

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// StartStandby starts a hot standby of s that streams s's WAL: it takes a
// base backup of s as user postgres (pg_basebackup -R, which writes
// primary_conninfo and standby.signal), starts it on a free loopback port
// with s's Settings, and waits until it accepts read-only connections. The
// standby is a Server of its own: Stop it (or let the watchdog remove it)
// like any other.
//
// s must be a running local server (Options.Local). The standby replicates
// asynchronously; for synchronous replication set synchronous_standby_names
// on s (ALTER SYSTEM and pg_reload_conf) once the standby runs. Advisory
// locks are not replicated: the standby's pg_locks shows none of s's. On
// failure nothing of the standby is left.
func (s *Server) StartStandby(ctx context.Context) (*Server, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.needLocal("start standby"); err != nil {
		return nil, err
	}
	primary := s.local
	standby, err := newLocal(ctx, primary.settings, func(l *localServer) error {
		return l.run(ctx, "pg_basebackup", "-D", l.dataDir(), "-R",
			"-h", "127.0.0.1", "-p", strconv.Itoa(primary.port), "-U", "postgres",
			"-X", "stream", "--checkpoint=fast", "--no-sync")
	})
	if err != nil {
		return nil, fmt.Errorf("pgtest: start standby of port %d: %w", primary.port, err)
	}
	return standby, nil
}

// Promote turns a standby started by StartStandby into a primary (pg_ctl
// promote) and returns as soon as it accepts writes: it asks the server
// every few milliseconds rather than relying on pg_ctl's 100 ms polling,
// so a caller can time what follows the promotion. It returns an error for
// a server that is not a running local standby, or if the promotion fails
// or does not finish before ctx ends.
func (s *Server) Promote(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.needLocal("promote"); err != nil {
		return err
	}
	l := s.local
	conn, err := pgx.Connect(ctx, s.DSN)
	if err != nil {
		return fmt.Errorf("pgtest: promote: %w", err)
	}
	defer conn.Close(context.Background())
	if err := l.run(ctx, "pg_ctl", "promote", "-D", l.dataDir(), "-W"); err != nil {
		return fmt.Errorf("pgtest: promote: %w", err)
	}
	for {
		var recovering bool
		if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&recovering); err != nil {
			return fmt.Errorf("pgtest: promote: %w\nserver log (tail):\n%s", err, tailFile(l.logFile(), 20))
		}
		if !recovering {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgtest: promote: still in recovery: %w\nserver log (tail):\n%s", ctx.Err(), tailFile(l.logFile(), 20))
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// FailoverDSN returns a multi-host connection string (keyword/value form)
// that lists servers in order and accepts only the one that takes writes
// (target_session_attrs=read-write): what a client of a primary with
// streaming standbys uses, so that after a fail-over its new connections
// reach whichever server was promoted. It connects as user postgres to
// database postgres without TLS, as to every server pgtest starts itself.
func FailoverDSN(servers ...*Server) string {
	hosts := make([]string, len(servers))
	ports := make([]string, len(servers))
	for i, srv := range servers {
		hosts[i], ports[i] = srv.Host, strconv.Itoa(srv.Port)
	}
	return fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write",
		strings.Join(hosts, ","), strings.Join(ports, ","))
}
