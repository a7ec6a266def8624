package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// connectTimeout bounds a connection attempt when the connection string
// sets none.
const connectTimeout = 10 * time.Second

// maxAppName is the longest application_name PostgreSQL keeps
// (NAMEDATALEN-1 bytes).
const maxAppName = 63

// conn says where the connection settings come from and which secrets
// must never be printed.
type conn struct {
	dsn     string // "" means: the libpq PG* environment variables
	from    string // "--dsn", "DATABASE_URL", "PG* environment" or fromNothing
	secrets []string
}

// fromNothing is conn.from when no --dsn, DATABASE_URL or PG* variable
// names a database: pgx then tries libpq's defaults (a local socket, the
// user's name).
const fromNothing = "libpq's defaults (nothing configured)"

// dbEnv are the variables that say a database is configured: with none of
// them (and no --dsn) nothing is, and the demo starts its own server.
var dbEnv = []string{"DATABASE_URL", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE"}

// configured reports whether the environment names a database.
func configured() bool {
	for _, v := range dbEnv {
		if os.Getenv(v) != "" {
			return true
		}
	}
	return false
}

// addDSNFlag defines --dsn on fs. An empty DSN is refused: pgx would read
// it as "use the PG* environment", which a --dsn "$UNSET" never means.
func addDSNFlag(fs *flag.FlagSet, usage string) *string {
	dsn := new(string)
	fs.Func("dsn", usage, func(s string) error {
		if strings.TrimSpace(s) == "" {
			return errors.New("empty connection string: give a DSN, or leave --dsn out to use DATABASE_URL or the PG* environment")
		}
		*dsn = s
		return nil
	})
	return dsn
}

// connFrom picks the connection string: --dsn, else DATABASE_URL, else the
// PG* environment (pgx reads it for an empty string).
func connFrom(flagDSN string) *conn {
	c := &conn{from: "PG* environment"}
	switch {
	case flagDSN == "" && !configured():
		c.from = fromNothing
	case flagDSN != "":
		c.dsn, c.from = flagDSN, "--dsn"
	case os.Getenv("DATABASE_URL") != "":
		c.dsn, c.from = os.Getenv("DATABASE_URL"), "DATABASE_URL"
	}
	c.secrets = dsnSecrets(c.dsn)
	if pw := os.Getenv("PGPASSWORD"); pw != "" {
		c.secrets = append(c.secrets, pw)
	}
	return c
}

// poolConfig parses the connection settings for a pool whose sessions show
// app as their application_name. The error is one line without secrets.
func (c *conn) poolConfig(app string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(c.dsn)
	if err != nil {
		return nil, c.errorf("invalid connection settings (from %s): %v", c.from, err)
	}
	c.addSecret(cfg.ConnConfig.Password)
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = connectTimeout
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = appName(app)
	return cfg, nil
}

// connConfig is poolConfig for a single connection.
func (c *conn) connConfig(app string) (*pgx.ConnConfig, error) {
	cfg, err := c.poolConfig(app)
	if err != nil {
		return nil, err
	}
	return cfg.ConnConfig, nil
}

// connectError is the one-line error for a connection that could not be
// made: it names the host and port, never the password, and says each
// distinct failed attempt once. When nothing was configured it says so and
// how to configure a database.
func (c *conn) connectError(cfg *pgx.ConnConfig, err error) error {
	if c.from == fromNothing {
		return c.errorf("cannot connect: no database is configured, and libpq's default (%s as user %q) failed: %s; "+
			"give --dsn DSN, or set DATABASE_URL, or the PG* variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD)",
			hostPort(cfg), cfg.User, attempts(err))
	}
	return c.errorf("cannot connect to %s as user %q (settings from %s): %s",
		hostPort(cfg), cfg.User, c.from, attempts(err))
}

// attempts describes a failed connection: pgx's *pgconn.ConnectError joins
// one error per attempt, and tries an address again on its fallback (TLS,
// then without), so the same text can come twice; each distinct one is
// said once, in order, after "; ". Other errors are said as they are.
func attempts(err error) string {
	var ce *pgconn.ConnectError
	if !errors.As(err, &ce) {
		return err.Error()
	}
	var tried []string
	var add func(error)
	add = func(err error) {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				add(e)
			}
			return
		}
		if msg := oneLine(err.Error()); !slices.Contains(tried, msg) {
			tried = append(tried, msg)
		}
	}
	add(ce.Unwrap())
	return strings.Join(tried, "; ")
}

// ping opens one connection of pool, so that an unreachable server gives a
// clear error before anything else is tried.
func (c *conn) ping(ctx context.Context, pool *pgxpool.Pool) error {
	if err := pool.Ping(ctx); err != nil {
		return c.connectError(pool.Config().ConnConfig, err)
	}
	return nil
}

// errorf formats a one-line error with every known secret replaced by
// "xxxxx".
func (c *conn) errorf(format string, args ...any) error {
	return errors.New(oneLine(c.redact(fmt.Sprintf(format, args...))))
}

// redact replaces every known secret in s by "xxxxx", longest first.
func (c *conn) redact(s string) string {
	secrets := slices.Clone(c.secrets)
	slices.SortFunc(secrets, func(a, b string) int { return len(b) - len(a) })
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, "xxxxx")
		}
	}
	return s
}

func (c *conn) addSecret(s string) {
	if s != "" && !slices.Contains(c.secrets, s) {
		c.secrets = append(c.secrets, s)
	}
}

// passwordKV finds the start of password=VALUE in keyword/value strings and
// URL queries; passwordValue reads VALUE from there.
var passwordKV = regexp.MustCompile(`password\s*=\s*`)

// libpqKey matches " KEY=" for a keyword libpq or pgx recognises: an unquoted
// password in a keyword/value string runs up to the next one, so that
// "password=Sup3r S3cret host=db" is redacted whole although it does not
// parse.
var libpqKey = regexp.MustCompile(`\s+(host|hostaddr|port|dbname|user|password|passfile|channel_binding|` +
	`connect_timeout|client_encoding|options|application_name|fallback_application_name|keepalives|` +
	`keepalives_idle|keepalives_interval|keepalives_count|tcp_user_timeout|replication|gssencmode|` +
	`sslmode|sslnegotiation|requiressl|sslcompression|sslcert|sslkey|sslpassword|sslcertmode|sslrootcert|` +
	`sslcrl|sslcrldir|sslsni|requirepeer|ssl_min_protocol_version|ssl_max_protocol_version|krbsrvname|` +
	`gsslib|gssdelegation|service|target_session_attrs|load_balance_hosts|min_read_buffer_size|` +
	`search_path|statement_cache_capacity|description_cache_capacity|default_query_exec_mode)\s*=`)

// quotedValue is a quoted keyword/value value (its closing quote may be
// missing in a string that does not parse).
var quotedValue = regexp.MustCompile(`^'(?:[^'\\]|\\.)*'?`)

// passwordValue returns the VALUE of password=VALUE at the start of s: a
// quoted value up to its closing quote; in a URL query up to the next "&"
// or space; otherwise up to the next recognised keyword (or the end).
func passwordValue(s string, inURL bool) string {
	if strings.HasPrefix(s, "'") {
		return quotedValue.FindString(s)
	}
	if inURL {
		if i := strings.IndexAny(s, "& \t\n"); i >= 0 {
			return s[:i]
		}
		return s
	}
	if loc := libpqKey.FindStringIndex(s); loc != nil {
		s = s[:loc[0]]
	}
	return strings.TrimRight(s, " \t\r\n")
}

// dsnSecrets returns every string in dsn that may be a password, also when
// dsn cannot be parsed: the userinfo password of a URL (raw and decoded,
// taking the last "@" and the first "@" as its end) and password=VALUE
// settings (quoted and unquoted; an unquoted one with spaces also word by
// word, as parse errors quote single words, but words under 3 bytes are
// left out so that messages stay readable).
func dsnSecrets(dsn string) []string {
	var out []string
	add := func(s string) {
		if s == "" {
			return
		}
		out = append(out, s)
		if u, err := url.PathUnescape(s); err == nil && u != s {
			out = append(out, u)
		}
		if u, err := url.QueryUnescape(s); err == nil && u != s {
			out = append(out, u)
		}
	}
	_, rest, inURL := strings.Cut(dsn, "://")
	if inURL {
		for _, at := range []int{strings.LastIndex(rest, "@"), strings.Index(rest, "@")} {
			if at < 0 {
				continue
			}
			if _, pw, ok := strings.Cut(rest[:at], ":"); ok {
				add(pw)
			}
		}
	}
	for _, loc := range passwordKV.FindAllStringIndex(dsn, -1) {
		v := passwordValue(dsn[loc[1]:], inURL)
		add(v)
		if len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'' {
			add(strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(v[1 : len(v)-1]))
			continue
		}
		if words := strings.Fields(v); len(words) > 1 {
			for _, w := range words {
				if len(w) >= 3 {
					add(w)
				}
			}
		}
	}
	return out
}

// hostPort names the server of cfg: "host:port", or the socket directory.
func hostPort(cfg *pgx.ConnConfig) string {
	if strings.HasPrefix(cfg.Host, "/") {
		return fmt.Sprintf("socket %s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	return cfg.Host + ":" + strconv.Itoa(int(cfg.Port))
}

// appName truncates s to maxAppName bytes without splitting a UTF-8
// character.
func appName(s string) string {
	if len(s) <= maxAppName {
		return s
	}
	cut := maxAppName
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// sockets keeps the network connections a pool dials, so that pglock can
// close them when the server stops answering: a read blocked on a stalled
// connection then fails at once.
type sockets struct {
	mu     sync.Mutex
	conns  []net.Conn
	closed bool // closeAll was called
}

// track makes cfg's connections dial through s.
func (s *sockets) track(cfg *pgconn.Config) {
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err == nil {
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
		}
		return c, err
	}
}

// closeAll closes every connection dialled so far.
func (s *sockets) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, c := range s.conns {
		_ = c.Close()
	}
}

// closePool closes pool, unless closeAll was called: then pgx may still be
// trying, for up to 15 s, to send a cancel request over the stalled
// network, and pool.Close would wait for it. The process is about to exit,
// which closes every socket anyway.
func (s *sockets) closePool(pool *pgxpool.Pool) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if !closed {
		pool.Close()
	}
}
