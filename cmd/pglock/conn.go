package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
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
	from    string // "--dsn", "DATABASE_URL" or "PG* environment"
	secrets []string
}

// connFrom picks the connection string: --dsn, else DATABASE_URL, else the
// PG* environment (pgx reads it for an empty string).
func connFrom(flagDSN string) *conn {
	c := &conn{from: "PG* environment"}
	switch {
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
// made: it names the host and port, never the password.
func (c *conn) connectError(cfg *pgx.ConnConfig, err error) error {
	return c.errorf("cannot connect to %s as user %q (settings from %s): %v",
		hostPort(cfg), cfg.User, c.from, err)
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

// passwordKV finds password=VALUE in keyword/value strings and URL queries.
var passwordKV = regexp.MustCompile(`password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]*)`)

// dsnSecrets returns every string in dsn that may be a password, also when
// dsn cannot be parsed: the userinfo password of a URL (raw and decoded,
// taking the last "@" and the first "@" as its end) and password=VALUE
// settings (quoted and unquoted).
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
	if _, rest, ok := strings.Cut(dsn, "://"); ok {
		for _, at := range []int{strings.LastIndex(rest, "@"), strings.Index(rest, "@")} {
			if at < 0 {
				continue
			}
			if _, pw, ok := strings.Cut(rest[:at], ":"); ok {
				add(pw)
			}
		}
	}
	for _, m := range passwordKV.FindAllStringSubmatch(dsn, -1) {
		v := m[1]
		add(v)
		if len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'' {
			add(strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(v[1 : len(v)-1]))
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
