-- The least a wait in slices (SPEC 2a) can cost: every acquire is a slice
-- (no first try), the body as the library's, the keep-alives already set.
\set k :client_id % 4
SET LOCAL lock_timeout = '500ms'\; DO $advisory$BEGIN
	PERFORM pg_advisory_lock(:k);
EXCEPTION WHEN lock_not_available THEN
	EXECUTE $h$SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND classid::int8 = 0 AND objid::int8 = $h$ || :k || $h$ AND objsubid = 1) THEN '' ELSE set_config('lock_timeout', '0', true) END$h$;
END$advisory$\; SHOW lock_timeout;
SELECT pg_advisory_unlock(:k);
