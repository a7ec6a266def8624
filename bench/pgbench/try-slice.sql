-- What Session.Lock sends (keep-alives already set): a try, and only when
-- it fails, a slice.
\set k :client_id % 4
SELECT pg_try_advisory_lock(:k) AS got \gset
\if :got
\else
SET LOCAL lock_timeout = '500ms'\; DO $advisory$BEGIN
	PERFORM pg_advisory_lock(:k);
EXCEPTION WHEN lock_not_available THEN
	EXECUTE $h$SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND classid::int8 = 0 AND objid::int8 = $h$ || :k || $h$ AND objsubid = 1) THEN '' ELSE set_config('lock_timeout', '0', true) END$h$;
END$advisory$\; SHOW lock_timeout;
\endif
SELECT pg_advisory_unlock(:k);
