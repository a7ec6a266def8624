-- The same, with the slice as it was at 56c0c66 (lock_timeout set inside
-- the block, the handler compiled with it, a SELECT as the report).
\set k :client_id % 4
SELECT pg_try_advisory_lock(:k) AS got \gset
\if :got
\else
DO $advisory$BEGIN
	PERFORM '' || set_config('lock_timeout', '500ms', true);
	PERFORM pg_advisory_lock(:k);
EXCEPTION WHEN lock_not_available THEN
	IF EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND classid::int8 = 0 AND objid::int8 = :k AND objsubid = 1) THEN
		PERFORM '' || set_config('lock_timeout', '1ms', true);
	ELSE
		PERFORM set_config('lock_timeout', '0', true);
	END IF;
END$advisory$\; SELECT current_setting('lock_timeout') <> '0';
\endif
SELECT pg_advisory_unlock(:k);
